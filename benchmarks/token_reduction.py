"""Token reduction on trained runs: test accuracy against forward FLOPs per sample.

    python benchmarks/token_reduction.py --runs runs/designs/av-digits/token-choice-s{0,1,2}
    python benchmarks/token_reduction.py --runs runs/designs/av-digits/dense-early-s{0,1,2} \\
        --methods merge --layers -1 before,0 --keeps image=0.75,audio=0.5 audio=0.5
    python benchmarks/token_reduction.py --runs runs/designs/av-digits/token-choice-s{0,1,2} \\
        --trained runs/designs/av-digits-tome/token-choice-s{0,1,2}

With ``--trained``, the runs there were trained with token reduction on (their config's
``model.token_reduction``, as ToMe trains with merging); each is compared as it is with the
``--runs`` run in the same position (the same preset and seed, trained without), and one
table gives both accuracies, the FLOPs ratio and the paired change.

For every run it loads the best checkpoint (``modalmoe.train.load_run_model``), switches
token reduction on with ``modalmoe.efficiency.tokens.apply_token_reduction`` (training-free)
for each method x layer choice x keep, and measures test accuracy
(``modalmoe.evaluate.runner.evaluate``, all modalities) and forward FLOPs per sample
(``modalmoe.efficiency.flops.measure_cost`` over the first ``--flops-samples`` test samples,
each measured alone by default, so no padding is counted: in a padded batch the attention
projections also run on padding, which any reduction that re-packs the tokens removes, and
the ratio would credit the reduction with that; ``--flops-batch`` measures one padded batch).
Runs are grouped by their preset; each group gets a markdown table: MFLOPs per sample, the
FLOPs ratio against no reduction, accuracy mean ± std over the runs, and the paired accuracy
change (mean ± std of each run's own difference), in points.

Layer choices are comma-separated 0-based blocks ("0": after block 0; "-1" or "before": before
the first block, ``merge`` only; "before,0": both). A keep is a fraction ("0.5") or per-modality fractions
("image=0.5,audio=0.75"; unnamed modalities keep all their tokens). ``router`` runs only on
MoE models; keep 1.0 is a no-op by construction (it reproduces the ``none`` row exactly).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def parse_keep(text: str) -> float | dict[str, float]:
    if "=" not in text:
        return float(text)
    pairs = [part.split("=", 1) for part in text.split(",") if part]
    return {name.strip(): float(value) for name, value in pairs}


def parse_layers(text: str) -> list[int]:
    """ "0" -> [0]; "before,0" (or "-1,0", which argparse takes for a flag) -> [-1, 0]."""
    return [-1 if part == "before" else int(part) for part in text.split(",") if part]


def settings(methods: list[str], layers: list[str], keeps: list[str], moe: bool) -> list[tuple]:
    """(method, layers text, keep text) for every combination that applies to the model."""
    out = [("none", "", "1.0")]
    for method in methods:
        if method == "router" and not moe:
            continue
        for layer_text in layers:
            if method != "merge" and -1 in parse_layers(layer_text):
                continue  # attention and router scores come from a block
            out += [(method, layer_text, keep) for keep in keeps]
    return out


def run_one(job: tuple) -> dict:
    """Every setting on one run; in a worker process."""
    import torch

    torch.set_num_threads(1)
    from modalmoe.efficiency import measure_cost
    from modalmoe.efficiency.tokens import apply_token_reduction
    from modalmoe.evaluate.runner import evaluate
    from modalmoe.train import load_run_model
    from modalmoe.train.trainer import experiment_task, read_run_config

    run_dir, methods, layers, keeps, flops_samples, flops_batch, batch_size = job
    config = read_run_config(run_dir)
    task = experiment_task(config)
    model = load_run_model(run_dir)
    samples = range(min(flops_samples, len(task.test)))
    batches = [task.test.batch(samples)] if flops_batch else [task.test.batch([i]) for i in samples]

    def flops() -> float:
        return sum(measure_cost(model, batch).flops * len(batch) for batch in batches) / len(samples)

    results = {}
    for method, layer_text, keep_text in settings(methods, layers, keeps, bool(config.model.moe.every)):
        if method == "none":
            apply_token_reduction(model, method="none")
        else:
            apply_token_reduction(model, method=method, keep=parse_keep(keep_text), layers=parse_layers(layer_text))
        report = evaluate(model, task.test, subsets=False, batch_size=batch_size)
        results[(method, layer_text, keep_text)] = {
            "accuracy": report.metrics["accuracy"],
            "flops": flops(),
        }
    return {"run": str(run_dir), "preset": config.name or Path(run_dir).name, "results": results}


def run_as_is(job: tuple) -> dict:
    """One run with the token reduction it was trained with (none for a plain run)."""
    import torch

    torch.set_num_threads(1)
    from modalmoe.efficiency import measure_cost
    from modalmoe.evaluate.runner import evaluate
    from modalmoe.train import load_run_model
    from modalmoe.train.trainer import experiment_task, read_run_config

    run_dir, flops_samples, batch_size = job
    config = read_run_config(run_dir)
    task, model = experiment_task(config), load_run_model(run_dir)
    samples = range(min(flops_samples, len(task.test)))
    flops = sum(measure_cost(model, task.test.batch([i])).flops for i in samples) / len(samples)
    accuracy = evaluate(model, task.test, subsets=False, batch_size=batch_size).metrics["accuracy"]
    reduction = config.model.token_reduction
    setting = "none" if reduction.method == "none" else f"{reduction.method} {reduction.keep} after {reduction.layers}"
    return {"run": str(run_dir), "seed": config.train.seed, "setting": setting, "accuracy": accuracy, "flops": flops}


def trained_table(base: list[dict], reduced: list[dict]) -> str:
    """Runs trained with token reduction against the same presets and seeds trained without."""
    lines = [
        "| seed | trained with | accuracy without (%) | accuracy with (%) | Δ (pts) | FLOPs with / without |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    deltas, ratios = [], []
    for a, b in zip(base, reduced, strict=True):
        deltas.append(100 * (b["accuracy"] - a["accuracy"]))
        ratios.append(b["flops"] / a["flops"])
        lines.append(
            f"| {b['seed']} | {b['setting']} | {100 * a['accuracy']:.1f} | {100 * b['accuracy']:.1f} | "
            f"{deltas[-1]:+.1f} | {ratios[-1]:.3f} |"
        )
    lines.append(f"| all | | | | {spread(deltas, signed=True)} | {statistics.mean(ratios):.3f} |")
    return "\n".join(lines)


def table(preset: str, runs: list[dict]) -> str:
    base_acc = [r["results"][("none", "", "1.0")]["accuracy"] for r in runs]
    base_flops = statistics.mean(r["results"][("none", "", "1.0")]["flops"] for r in runs)
    lines = [
        f"### {preset}: {len(runs)} runs; no reduction: {base_flops / 1e6:.3f} MFLOPs/sample, "
        f"accuracy {100 * statistics.mean(base_acc):.1f}%",
        "",
        "| method | layers | keep | MFLOPs/sample | FLOPs vs none | accuracy (%) | Δ accuracy (pts) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for key in runs[0]["results"]:
        method, layer_text, keep_text = key
        acc = [r["results"][key]["accuracy"] for r in runs]
        flops = statistics.mean(r["results"][key]["flops"] for r in runs)
        delta = [100 * (a - b) for a, b in zip(acc, base_acc, strict=True)]
        layers = ",".join(map(str, parse_layers(layer_text))) or "—"
        lines.append(
            f"| {method} | {layers} | {keep_text} | {flops / 1e6:.3f} | {flops / base_flops:.3f} | "
            f"{spread([100 * a for a in acc])} | {spread(delta, signed=True)} |"
        )
    return "\n".join(lines)


def spread(values: list[float], signed: bool = False) -> str:
    fmt = "+.1f" if signed else ".1f"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="trained run directories")
    parser.add_argument("--methods", nargs="+", default=["merge", "attention", "router"])
    parser.add_argument("--layers", nargs="+", default=["0", "-1"], help="layer choices, e.g. 0 -1 before,0")
    parser.add_argument("--keeps", nargs="+", default=["1.0", "0.75", "0.5", "0.25"])
    parser.add_argument("--flops-samples", type=int, default=64, help="test samples FLOPs are measured on")
    parser.add_argument("--flops-batch", action="store_true", help="measure FLOPs on one padded batch")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=1, help="runs evaluated in parallel (one thread each)")
    parser.add_argument("--trained", nargs="+", default=None,
                        help="runs trained with token reduction, paired in order with --runs")  # fmt: skip
    args = parser.parse_args()
    for run in [*args.runs, *(args.trained or [])]:
        if not (Path(run) / "config.yaml").is_file():
            parser.error(f"{run!r} is not a run directory (no config.yaml); train one with `modalmoe train`")
    if args.trained is not None:
        if len(args.trained) != len(args.runs):
            parser.error(f"--trained lists {len(args.trained)} runs, --runs {len(args.runs)}: pair them one to one")
        jobs = [(run, args.flops_samples, args.batch_size) for run in [*args.runs, *args.trained]]
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            done = list(pool.map(run_as_is, jobs))
        print(trained_table(done[: len(args.runs)], done[len(args.runs) :]))
        return 0
    for text in args.keeps:
        parse_keep(text)  # fail before any work on a malformed keep
    jobs = [
        (run, args.methods, args.layers, args.keeps, args.flops_samples, args.flops_batch, args.batch_size)
        for run in args.runs
    ]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        done = list(pool.map(run_one, jobs))
    groups: dict[str, list[dict]] = {}
    for result in done:
        groups.setdefault(result["preset"], []).append(result)
    for preset, runs in groups.items():
        print("\n" + table(preset, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
