"""Sparse upcycling vs continuing the dense run, for the same extra steps, at equal FLOPs.

    python benchmarks/upcycle.py                                   # av-digits and watch-imu, seeds 0-4
    python benchmarks/upcycle.py --tasks av-digits --seeds 0 1 --dense-epochs 5 --extra-epochs 5

Per task and seed: ``<task>/dense-early`` trains ``--dense-epochs`` epochs (the parent run).
Two arms then train ``--extra-epochs`` more epochs with the preset's recipe, seed for seed:
``continue`` (the same dense model, ``train.init_from`` the parent) and ``upcycle``
(``modalmoe.model.upcycle.upcycled_experiment``: an 8-expert top-2 token-choice MoE FFN in
every block, each expert half the dense FFN's width, filled with the parent's FFN shards, so
its forward FLOPs per sample equal the dense model's up to the router). Both arms see the same
batches in the same order (same seed) and start from the same function (the step-0 oracle of
``tests/test_upcycle.py``). Reported: each arm's test metric, the paired difference
(upcycle - continue) over seeds with its 95% Student-t interval and paired t-test p-value
(Holm-adjusted over the tasks), the FLOPs per sample of both arms, and the validation
metric and training loss per epoch of both arms (the curves over training steps), averaged
over seeds.

Runs go to ``--out`` (finished runs are reused); results to ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from modalmoe.bench.stats import holm, paired_test, summarize
from modalmoe.efficiency.flops import measure_cost
from modalmoe.model.presets import get_preset
from modalmoe.model.upcycle import upcycled_experiment
from modalmoe.run import RunDir, load_run_model
from modalmoe.train import Trainer


def train(config, out: Path) -> dict:
    if not (out / "summary.json").is_file():
        Trainer(config, out, progress=False).fit(overwrite=True)
    return json.loads((out / "summary.json").read_text())


def curve(run: Path, metric: str) -> list[float]:
    """The validation metric after each epoch (``metrics.jsonl``)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[metric] for r in rows if r.get("split") == "valid" and metric in r]


def train_loss(run: Path) -> list[float]:
    """The training cross-entropy of the last logged step of each epoch."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = {r["epoch"]: r["cross_entropy"] for r in rows if r.get("split") == "train" and "cross_entropy" in r}
    return [last[e] for e in sorted(last)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["av-digits", "watch-imu"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--extra-epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("runs/upcycle-bench"))
    args = parser.parse_args()
    results, pvalues = {}, {}
    for task in args.tasks:
        arms: dict[str, dict[int, float]] = {"continue": {}, "upcycle": {}}
        curves: dict[str, list[list[float]]] = {"continue": [], "upcycle": []}
        losses: dict[str, list[list[float]]] = {"continue": [], "upcycle": []}
        flops = {}
        for seed in args.seeds:
            common = [f"train.seed={seed}", "train.early_stopping=null"]
            parent = args.out / task / f"dense-s{seed}"
            train(get_preset(f"{task}/dense-early", overrides=[*common, f"train.epochs={args.dense_epochs}"]), parent)
            extra = [*common, f"train.epochs={args.extra_epochs}"]
            configs = {
                "continue": get_preset(f"{task}/dense-early", overrides=[*extra, f"train.init_from={parent}"]),
                "upcycle": upcycled_experiment(parent, overrides=extra),
            }
            for arm, config in configs.items():
                run = args.out / task / f"{arm}-s{seed}"
                summary = train(config, run)
                metric = next(iter(summary["test"]))
                arms[arm][seed] = summary["test"][metric]
                curves[arm].append(curve(run, metric))
                losses[arm].append(train_loss(run))
                if arm not in flops:
                    batch = RunDir(run).task().test.batch(range(64))
                    flops[arm] = measure_cost(load_run_model(run), batch).flops
            print(f"{task} s{seed}: continue {arms['continue'][seed]:.4f}  upcycle {arms['upcycle'][seed]:.4f}")
        diffs = [arms["upcycle"][s] - arms["continue"][s] for s in args.seeds]
        d = summarize(diffs)
        pvalues[task] = paired_test(arms["upcycle"], arms["continue"])
        results[task] = {
            "metric": metric,
            "continue": {str(s): v for s, v in arms["continue"].items()},
            "upcycle": {str(s): v for s, v in arms["upcycle"].items()},
            "difference": {"mean": d.mean, "ci_low": d.ci_low, "ci_high": d.ci_high, "n": d.n},
            "p": pvalues[task],
            "flops_per_sample": flops,
            "valid_curve": {a: [statistics.mean(col) for col in zip(*c, strict=False)] for a, c in curves.items()},
            "train_loss_curve": {a: [statistics.mean(col) for col in zip(*c, strict=False)] for a, c in losses.items()},
        }
    for task, p in holm(pvalues).items():
        results[task]["p_holm"] = p
        r = results[task]
        print(
            f"{task} ({r['metric']}): continue {statistics.mean(r['continue'].values()):.4f}, upcycle "
            f"{statistics.mean(r['upcycle'].values()):.4f}; upcycle - continue {r['difference']['mean']:+.4f} "
            f"[{r['difference']['ci_low']:+.4f}, {r['difference']['ci_high']:+.4f}], p {r['p']}, Holm {p}; "
            f"MFLOPs/sample {', '.join(f'{a} {v / 1e6:.3f}' for a, v in r['flops_per_sample'].items())}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
