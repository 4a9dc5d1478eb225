"""Lifelong protocol on av-digits: train on audio, then add images; measure what is forgotten.

    python benchmarks/lifelong.py --jobs 1
    python benchmarks/lifelong.py --methods grow naive --seeds 0 --dropout 0.3

Stage 1 trains ``av-digits/token-choice`` on audio only (``modalities=["audio"]``, the preset's
recipe), one run per seed; finished runs of ``benchmarks/designs_seeds.py``
(``runs/designs/av-digits/token-choice-audio-only-s<seed>``) are reused when they exist.
Stage 2 continues each stage-1 run with images (``modalmoe.lifelong.grow_config``, the same
recipe, the run's seed) by each method:

- ``grow``: ``--experts`` new experts per MoE layer reserved for images, the run's experts
  and router rows frozen (``freeze: experts``); ``grow-old`` freezes everything from the run,
  ``grow-none`` nothing;
- ``naive``: no new experts, everything trains;
- ``freeze-old``: no new experts, everything from the run frozen (only the image encoder trains);
- ``ewc``: no new experts, Elastic Weight Consolidation on the run's weights (``--ewc``).

Every stage-2 run uses modality dropout ``--dropout`` (``model.missing.dropout``), which keeps
audio-only inputs in the training distribution. Each run's best checkpoint (by validation
accuracy with both modalities) is evaluated on the test split with every modality subset.
Reported per method, mean ± std over seeds, in accuracy points: audio-only accuracy before
(stage 1) and after (stage 2), forgetting = before - after, audio+image accuracy after, and
the gain from images = audio+image after - audio before. Finished runs whose config matches
are reused, so an interrupted protocol continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

#: method -> grow_config options (experts: None takes --experts; ewc: None takes --ewc).
METHODS = {
    "grow": {"experts": None, "freeze": "experts"},
    "grow-old": {"experts": None, "freeze": "old"},
    "grow-none": {"experts": None, "freeze": "none"},
    "naive": {"experts": 0, "freeze": "none"},
    "freeze-old": {"experts": 0, "freeze": "old"},
    "ewc": {"experts": 0, "freeze": "none", "ewc": None},
}
TASK, DESIGN, OLD, NEW = "av-digits", "token-choice", "audio", "image"


def _train(config, run_dir: Path) -> None:
    """Train ``config`` into ``run_dir`` unless a finished run of the same config is there."""
    import shutil

    from modalmoe.config import load_config
    from modalmoe.lifelong import growth_callbacks
    from modalmoe.train import Trainer

    if (run_dir / "summary.json").exists():
        if load_config(run_dir / "config.yaml").model_dump(mode="json") == config.model_dump(mode="json"):
            return
    if run_dir.exists():
        shutil.rmtree(run_dir)  # unfinished, or another protocol setting: train again
    Trainer(config, run_dir, progress=False, callbacks=growth_callbacks(config)).fit()


def _subsets(run_dir: Path) -> dict[str, float]:
    from modalmoe.evaluate.runner import evaluate
    from modalmoe.train import load_run_model, read_run_config
    from modalmoe.train.trainer import experiment_task

    task = experiment_task(read_run_config(run_dir))
    report = evaluate(load_run_model(run_dir), task.test, subsets=True)
    return {"+".join(row.modalities): row.metrics["accuracy"] for row in report.subsets}


def stage1(job: tuple) -> dict:
    """Train (or reuse) the audio-only run of one seed; in a worker process."""
    import torch

    torch.set_num_threads(1)
    from modalmoe.model.presets import get_preset

    seed, out, reuse = job
    run_dir = Path(reuse) / f"{DESIGN}-{OLD}-only-s{seed}"
    if not (run_dir / "summary.json").exists():
        run_dir = Path(out) / f"stage1-s{seed}"
        config = get_preset(f"{TASK}/{DESIGN}", overrides=[f"train.seed={seed}", f'modalities=["{OLD}"]'])
        _train(config, run_dir)
    return {"seed": seed, "run": str(run_dir), "subsets": _subsets(run_dir)}


def stage2(job: tuple) -> dict:
    """Grow one stage-1 run by images with one method, train, evaluate; in a worker process."""
    import time

    import torch

    torch.set_num_threads(1)
    from modalmoe.lifelong import grow_config
    from modalmoe.train import read_run_config

    method, options, seed, source, out, dropout = job
    config = grow_config(read_run_config(source), run_dir=source, add_modalities=[NEW], dropout=dropout, **options)
    run_dir = Path(out) / f"{method}-s{seed}"
    started = time.perf_counter()
    _train(config, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "method": method,
        "seed": seed,
        "options": options,
        "subsets": _subsets(run_dir),
        "epochs": summary["epochs"],
        "seconds": round(time.perf_counter() - started, 1),
        "parameters": summary["parameters"]["total"],
    }


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--experts", type=int, default=4, help="experts added per MoE layer (grow methods)")
    parser.add_argument("--ewc", type=float, default=1000.0, help="EWC strength lambda (method ewc)")
    parser.add_argument("--dropout", type=float, default=0.3, help="modality dropout in stage 2")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", default=f"runs/lifelong/{TASK}")
    parser.add_argument("--reuse", default=f"runs/designs/{TASK}", help="where finished stage-1 runs may be")
    parser.add_argument("--json", default=None, help="also write every result here (default OUT/results.json)")
    args = parser.parse_args()

    out = Path(args.out)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        before = {r["seed"]: r for r in pool.map(stage1, [(s, str(out), args.reuse) for s in args.seeds])}
        jobs = []
        for method in args.methods:
            options = dict(METHODS[method])
            if options.get("experts", 0) is None:
                options["experts"] = args.experts
            if "ewc" in options:
                options["ewc"] = args.ewc
            jobs += [(method, options, s, before[s]["run"], str(out), args.dropout) for s in args.seeds]
        results = []
        for result in pool.map(stage2, jobs):
            results.append(result)
            print(json.dumps(result), flush=True)

    rows = []
    for method in args.methods:
        runs = [r for r in results if r["method"] == method]
        audio_before = [100 * before[r["seed"]]["subsets"][OLD] for r in runs]
        audio_after = [100 * r["subsets"][OLD] for r in runs]
        both = [100 * r["subsets"][f"{OLD}+{NEW}"] for r in runs]
        rows.append(
            {
                "method": method,
                "options": runs[0]["options"],
                "audio_before": audio_before,
                "audio_after": audio_after,
                "forgetting": [b - a for b, a in zip(audio_before, audio_after, strict=True)],
                "audio_image": both,
                "gain": [x - b for x, b in zip(both, audio_before, strict=True)],
                "image_only": [100 * r["subsets"][NEW] for r in runs],
                "parameters": runs[0]["parameters"],
                "epochs": statistics.mean(r["epochs"] for r in runs),
            }
        )
    print(
        f"\n### {TASK}: audio, then + {NEW} (test accuracy, points; mean ± std over seeds {args.seeds}; "
        f"stage-2 modality dropout {args.dropout})\n"
    )
    print(
        "| method | new experts | freeze | EWC λ | audio before | audio after | forgetting | audio+image after "
        "| gain from images | image only | parameters | epochs |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        o = row["options"]
        cells = [mean_std(row[k]) for k in ("audio_before", "audio_after", "forgetting", "audio_image", "gain")]
        print(
            f"| {row['method']} | {o['experts']} | {o['freeze']} | {o.get('ewc', 0):g} | " + " | ".join(cells)
            + f" | {mean_std(row['image_only'])} | {row['parameters']:,} | {row['epochs']:.0f} |"
        )  # fmt: skip
    naive = next((r for r in rows if r["method"] == "naive"), None)
    for row in rows:
        if not row["method"].startswith("grow"):
            continue
        forgetting, gain = statistics.mean(row["forgetting"]), statistics.mean(row["gain"])
        checks = [f"forgets {forgetting:.2f} <= 1: {'yes' if forgetting <= 1 else 'NO'}"]
        checks.append(f"gains {gain:.1f} >= 5: {'yes' if gain >= 5 else 'NO'}")
        if naive is not None:
            theirs = statistics.mean(naive["forgetting"])
            checks.append(f"forgets less than naive ({theirs:.2f}): {'yes' if forgetting < theirs else 'NO'}")
        print(f"target, {row['method']}: " + "; ".join(checks))
    path = Path(args.json) if args.json else out / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"stage1": before, "stage2": results, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
