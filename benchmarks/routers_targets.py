"""Issue 22's targets from a ``routers`` bench directory (``modalmoe bench --suite routers``).

Prints, per task: loss-free bias balancing against the aux-loss run (max/mean expert load
per seed, accuracy with the paired difference and its 95% interval), and top-p (with and
without null experts) against top-2 (FLOPs actually spent, accuracy, paired difference, and
where top-p spends its experts: by modality and by layer).

    python benchmarks/routers_targets.py /path/to/bench/routers
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from scipy import stats

from modalmoe.bench.stats import paired_test, summarize
from modalmoe.bench.store import ResultsStore


def paired(a: dict[int, float], b: dict[int, float]) -> str:
    seeds = sorted(set(a) & set(b))
    diff = [a[s] - b[s] for s in seeds]
    if len(diff) < 2:
        return "n/a"
    mean, sem = statistics.mean(diff), statistics.stdev(diff) / len(diff) ** 0.5
    half = stats.t.ppf(0.975, len(diff) - 1) * sem
    p = paired_test(a, b)
    low, high = 100 * (mean - half), 100 * (mean + half)
    return f"{100 * mean:+.2f} [{low:+.2f}, {high:+.2f}] points, p {p:.3g} ({len(diff)} seeds)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    cells: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for r in ResultsStore(args.out).records():
        if r.get("status") == "ok" and "metrics" in r:
            cells[(r["task"], r["design"])][r["seed"]] = r
    tasks = sorted({t for t, _ in cells})
    for task in tasks:
        metric = "accuracy"

        def score(design, task=task, metric=metric):
            return {s: r["metrics"][metric] for s, r in cells.get((task, design), {}).items() if metric in r["metrics"]}

        def routing(design, key, task=task):
            return [r["routing"][key] for r in cells.get((task, design), {}).values() if r.get("routing")]

        print(f"## {task}")
        for design in ("token-choice", "token-choice-bias", "token-choice-sequence", "noisy-top-k"):
            loads = routing(design, "max_mean_load")
            if loads:
                acc = summarize(list(score(design).values()))
                print(
                    f"  {design:>22}: max/mean load {statistics.mean(loads):.3f} (max over seeds {max(loads):.3f}); "
                    f"accuracy {100 * acc.mean:.2f} [{100 * acc.ci_low:.2f}, {100 * acc.ci_high:.2f}]"
                )
        if score("token-choice-bias") and score("token-choice"):
            print(f"  bias - aux loss accuracy: {paired(score('token-choice-bias'), score('token-choice'))}")
        for design in ("top-p", "top-p-null"):
            if not score(design) or not score("token-choice"):
                continue
            flops = {s: r["flops"] for s, r in cells[(task, design)].items()}
            top2 = {s: r["flops"] for s, r in cells[(task, "token-choice")].items()}
            ratio = statistics.mean(flops[s] / top2[s] for s in set(flops) & set(top2))
            experts = routing(design, "experts_per_token")
            by_mod = defaultdict(list)
            by_layer = defaultdict(list)
            for r in cells[(task, design)].values():
                for n, v in r["routing"]["experts_per_token_by_modality"].items():
                    by_mod[n].append(v)
                for i, layer in enumerate(r["routing"]["layers"]):
                    by_layer[i].append(layer["experts_per_token"])
            print(
                f"  {design}: FLOPs {ratio:.3f}x top-2's, experts/token {statistics.mean(experts):.2f}; accuracy "
                f"vs top-2 {paired(score(design), score('token-choice'))}\n"
                f"      by modality: {', '.join(f'{n} {statistics.mean(v):.2f}' for n, v in sorted(by_mod.items()))}\n"
                f"      by layer: {', '.join(f'L{i} {statistics.mean(v):.2f}' for i, v in sorted(by_layer.items()))}"
            )


if __name__ == "__main__":
    main()
