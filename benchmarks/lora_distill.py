"""LoRA fine-tuning vs full fine-tuning vs training from scratch on a new task, and a dense
student distilled from an MoE teacher vs the same student without distillation.

    python benchmarks/lora_distill.py                      # both parts, seeds 0 1 2
    python benchmarks/lora_distill.py --part lora --seeds 0 --train-samples 0

Base runs (the pretrained models and the teachers) are ``<--base>-s<seed>``, by default the
``av-digits/token-choice`` runs of ``benchmarks/designs_seeds.py``; missing ones are trained
with the preset's recipe first.

(a) LoRA. The new task shares av-digits' inputs and splits but asks another question: the
digit modulo 3 (classes {0,3,6,9}, {1,4,7}, {2,5,8}), learned from ``--train-samples``
labelled training samples (a fixed, seeded subset; 0: all 2100), validated and tested on the
full relabelled valid and test splits (which the base runs never trained on). Three recipes,
seed for seed, all the preset's recipe otherwise: ``scratch`` (a fresh model), ``full``
(``train.init_from`` the base run, every parameter trains) and ``lora`` (``init_from`` plus
``train.lora``: rank 4, alpha 8, adapters on attention and the stacked experts, a new head;
``--lora-lr``). Caveat: the new labels are a function of the old ones, so the base model's
features already separate them; this measures how cheaply that knowledge transfers.

(b) Distillation. ``av-digits/dense-early`` trained with ``0.5 cross_entropy + 0.5 distill``
(T=2) from the base run of the same seed, against the same preset and seed with
cross-entropy alone; FLOPs per sample of student and teacher (``measure_cost``).

Runs go to ``--out`` (finished runs are reused); results to ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

import torch

MOD3 = ["0,3,6,9", "1,4,7", "2,5,8"]


def new_task(train_samples: int):
    """av-digits relabelled to digit mod 3, with ``train_samples`` training samples (0: all)."""
    from modalmoe.data.batch import MultimodalDataset, Task
    from modalmoe.data.tasks import load_task

    base = load_task("av-digits")

    def relabel(data: MultimodalDataset) -> MultimodalDataset:
        return MultimodalDataset(
            specs=data.specs,
            inputs=data.inputs,
            target=data.target % 3,
            present=data.present,
            lengths=data.lengths,
            classes=MOD3,
            task_type=data.task_type,
            groups=data.groups,
            extras=data.extras,
        )

    splits = {name: relabel(data) for name, data in base.splits.items()}
    if train_samples:
        keep = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(0))[:train_samples]
        splits["train"] = splits["train"].subset(keep.sort().values)
    return Task(name="av-digits-mod3", splits=splits, description="av-digits, label = digit mod 3")


def train(cfg, out: Path, task=None) -> dict:
    """Train (or reuse) one run; its summary."""
    from modalmoe.train import Trainer

    if not (out / "summary.json").exists():
        if out.exists():
            shutil.rmtree(out)  # an unfinished run: start it again
        Trainer(cfg, out, task=task, progress=False).fit()
    return json.loads((out / "summary.json").read_text())


def base_run(prefix: str, seed: int) -> Path:
    from modalmoe.model.presets import get_preset

    run = Path(f"{prefix}-s{seed}")
    train(get_preset("av-digits/token-choice", overrides=[f"train.seed={seed}"]), run)
    return run


def lora_part(args) -> dict:
    from modalmoe.model.presets import get_preset

    task = new_task(args.train_samples)
    lora = ["train.lora.rank=4", "train.lora.alpha=8", f"train.lr={args.lora_lr}"]
    rows: dict[str, list] = {"scratch": [], "full": [], "lora": []}
    for seed in args.seeds:
        base = base_run(args.base, seed)
        recipes = {"scratch": [], "full": [f"train.init_from={base}"], "lora": [f"train.init_from={base}", *lora]}
        for name, extra in recipes.items():
            cfg = get_preset("av-digits/token-choice", overrides=[f"train.seed={seed}", *extra])
            summary = train(cfg, Path(args.out) / f"mod3-n{args.train_samples}" / f"{name}-s{seed}", task)
            rows[name].append(
                {
                    "seed": seed,
                    "accuracy": summary["test"]["accuracy"],
                    "trainable_fraction": summary["parameters"]["trainable_fraction"],
                    "trainable": summary["parameters"]["trainable"],
                    "steps": summary["steps"],
                    "train_seconds": summary["train_seconds"],
                }
            )
    return rows


def distill_part(args) -> dict:
    from modalmoe.efficiency.flops import measure_cost
    from modalmoe.model.presets import get_preset
    from modalmoe.train import load_run_model
    from modalmoe.train.trainer import experiment_task

    rows: dict[str, list] = {"teacher": [], "student": [], "student+kd": []}
    cost: dict[str, dict] = {}
    batch = experiment_task(get_preset("av-digits/token-choice")).test.batch(range(128))
    for seed in args.seeds:
        teacher = base_run(args.base, seed)
        kd = [
            {"name": "cross_entropy", "weight": 0.5},
            {"name": "distill", "weight": 0.5, "options": {"teacher": str(teacher), "temperature": 2.0}},
        ]
        students = {
            "student": get_preset(f"av-digits/{args.student}", overrides=[f"train.seed={seed}"]),
            "student+kd": get_preset(
                f"av-digits/{args.student}", overrides=[f"train.seed={seed}", f"train.objectives={kd}"]
            ),
        }
        runs = {"teacher": teacher}
        for name, cfg in students.items():
            runs[name] = Path(args.out) / "distill" / f"{args.student}-{'kd' if 'kd' in name else 'ce'}-s{seed}"
            train(cfg, runs[name])
        for name, run in runs.items():
            summary = json.loads((run / "summary.json").read_text())
            rows[name].append({"seed": seed, "accuracy": summary["test"]["accuracy"], "steps": summary["steps"]})
            if name not in cost:
                measured = measure_cost(load_run_model(run), batch)
                cost[name] = {"flops": measured.flops, "params": measured.params, "active": measured.active_params}
    return {"rows": rows, "cost": cost}


def _stats(values: list[float]) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["lora", "distill", "both"], default="both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--base", default="runs/designs/av-digits/token-choice", help="base runs: <base>-s<seed>")
    parser.add_argument("--train-samples", type=int, default=300, help="labelled samples of the new task (0: all)")
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--student", default="dense-early")
    parser.add_argument("--out", default="runs/lora_distill")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict = {"args": vars(args)}
    if args.part in ("lora", "both"):
        rows = results["lora"] = lora_part(args)
        print(f"\n(a) new task: av-digits digit mod 3, {args.train_samples or 'all'} training samples; test accuracy")
        print(f"{'recipe':10} {'accuracy (mean ± std)':>24} {'trainable':>12} {'fraction':>10} {'steps':>7}")
        for name, runs in rows.items():
            frac = runs[0]["trainable_fraction"]
            steps = statistics.mean(r["steps"] for r in runs)
            accuracy = _stats([r["accuracy"] for r in runs])
            print(f"{name:10} {accuracy:>24} {runs[0]['trainable']:>12,} {frac:>10.4f} {steps:>7.0f}")
    if args.part in ("distill", "both"):
        part = results["distill"] = distill_part(args)
        print(f"\n(b) distillation on av-digits: {args.student} student, token-choice teacher; test accuracy")
        print(f"{'model':12} {'accuracy (mean ± std)':>24} {'MFLOPs/sample':>14} {'params':>10}")
        for name, runs in part["rows"].items():
            c = part["cost"][name]
            accuracy = _stats([r["accuracy"] for r in runs])
            print(f"{name:12} {accuracy:>24} {c['flops'] / 1e6:>14.3f} {c['params']:>10,}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
