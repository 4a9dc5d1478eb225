"""Train presets over seeds and report test accuracy (mean, std), per modality subset, against
unimodal references and the logistic-regression baseline on concatenated features.

    python benchmarks/designs_seeds.py --task av-digits --jobs 2
    python benchmarks/designs_seeds.py --task watch-imu --designs dense-early token-choice --seeds 0 1 2

For each design it trains ``<task>/<design>`` once per seed (``modalmoe.train.Trainer``,
the preset's recipe), evaluates the best checkpoint on the test split with every non-empty
subset of modalities, and, for each modality, trains the ``--unimodal`` design on that
modality alone (``modalities=[m]``): the reference a missing-modality model is judged
against. Runs go to ``--out`` (default ``runs/designs/<task>``); finished runs are reused,
so an interrupted sweep continues where it stopped. ``modalmoe bench`` is the benchmark
(compute matching, statistics, leaderboard); this script keeps each preset's own recipe and
adds the unimodal references the missing-modality comparison needs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DEFAULT_DESIGNS = ["dense-early", "dense-late", "token-choice", "modality-experts", "soft", "token-choice-bank"]


def run_one(job: tuple) -> dict:
    """Train (or reuse) one run and evaluate it on every modality subset; in a worker process."""
    import torch

    torch.set_num_threads(1)
    from modalmoe.evaluate.runner import evaluate
    from modalmoe.model.presets import get_preset
    from modalmoe.train import Trainer, load_run_model
    from modalmoe.train.trainer import experiment_task

    task_name, design, seed, modalities, out, extra = job
    overrides = [*extra, f"train.seed={seed}"]
    if modalities:
        overrides.append(f"modalities={json.dumps(list(modalities))}")
    cfg = get_preset(f"{task_name}/{design}", overrides=overrides)
    run_dir = Path(out)
    if not (run_dir / "summary.json").exists():
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)  # an unfinished run of an earlier sweep: start it again
        Trainer(cfg, run_dir, progress=False).fit()
    task = experiment_task(cfg)
    model = load_run_model(run_dir)
    report = evaluate(model, task.test, subsets=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "design": design,
        "seed": seed,
        "modalities": list(modalities) if modalities else None,
        "subsets": {"+".join(row.modalities): row.metrics["accuracy"] for row in report.subsets},
        "epochs": summary["epochs"],
        "seconds": summary["train_seconds"],
    }


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="av-digits")
    parser.add_argument("--designs", nargs="+", default=DEFAULT_DESIGNS)
    parser.add_argument("--unimodal", default="token-choice", help="design of the unimodal references ('' for none)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override for every run")
    args = parser.parse_args()

    from modalmoe.data.describe import linear_baselines
    from modalmoe.data.tasks import load_task

    task = load_task(args.task)
    modalities = list(task.specs)
    out = Path(args.out or f"runs/designs/{args.task}")
    extra = tuple(args.overrides)
    jobs = [(args.task, d, s, None, str(out / f"{d}-s{s}"), extra) for d in args.designs for s in args.seeds]
    if args.unimodal:
        jobs += [
            (args.task, args.unimodal, s, (m,), str(out / f"{args.unimodal}-{m}-only-s{s}"), extra)
            for m in modalities
            for s in args.seeds
        ]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = []
        for result in pool.map(run_one, jobs):
            results.append(result)
            print(json.dumps(result), flush=True)

    columns = ["+".join(modalities), *modalities]
    print(f"\n### {args.task}: test accuracy (%), mean ± std over seeds {args.seeds}\n")
    print("| trained on | design | " + " | ".join(f"test: {c}" for c in columns) + " | epochs |")
    print("|---|---|" + "---:|" * (len(columns) + 1))
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["design"], tuple(r["modalities"] or ())), []).append(r)
    for (design, only), rows in groups.items():
        cells = []
        for c in columns:
            values = [r["subsets"][c] for r in rows if c in r["subsets"]]
            cells.append(mean_std(values) if values else "")
        trained = "+".join(only) if only else "all"
        epochs = statistics.mean(r["epochs"] for r in rows)
        print(f"| {trained} | {design} | " + " | ".join(cells) + f" | {epochs:.0f} |")
    baselines = linear_baselines(task)
    shown = ", ".join(f"{k} {100 * v['test']:.1f}" for k, v in baselines.items())
    print(f"\nlogistic regression on features (test %): {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
