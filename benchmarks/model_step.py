"""Training-step time of a multimodal MoE preset against a dense preset with the same active
FLOPs per sample, on a real task; and the parameter / active-parameter / FLOP table of presets.

    python benchmarks/model_step.py                      # av-digits token-choice vs dense-early
    python benchmarks/model_step.py --moe av-digits/comm-star --repeats 30
    python benchmarks/model_step.py --table              # every preset's cost (markdown)

A step is forward, loss (cross-entropy plus 0.01 x the aux losses), backward and an AdamW
update, on the same batches for both models. Steps alternate between the two models (ABAB,
order flipped every round) so machine noise hits both alike; the ratio is the median over
rounds of MoE time / dense time, measured in this one process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from modalmoe.data.tasks import load_task
from modalmoe.efficiency import measure_cost
from modalmoe.model import build_model
from modalmoe.model.presets import get_preset, preset_names
from modalmoe.runtime import tune_allocator


def build(name: str, task, seed: int = 0):
    cfg = get_preset(name)
    torch.manual_seed(seed)
    model = build_model(cfg.model, task.specs, outputs=task.train.num_classes).fit(task.train)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def step(model, optimizer, batch) -> float:
    start = time.perf_counter()
    out = model(batch)
    loss = F.cross_entropy(out.logits, batch.target)
    if out.aux_losses:
        loss = loss + 0.01 * sum(out.aux_losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def compare(args) -> int:
    task = load_task(get_preset(args.moe).task)
    moe, moe_opt = build(args.moe, task)
    dense, dense_opt = build(args.dense, task)
    gen = torch.Generator().manual_seed(0)
    batches = [
        task.train.batch(torch.randperm(len(task.train), generator=gen)[: args.batch]) for _ in range(args.batches)
    ]
    cost_moe, cost_dense = measure_cost(moe, batches[0]), measure_cost(dense, batches[0])
    print(f"task {task.name}, batch {args.batch}, threads {torch.get_num_threads()}")
    for name, cost in ((args.moe, cost_moe), (args.dense, cost_dense)):
        print(
            f"  {name:28s} params {cost.params:>9,d}  active {cost.active_params:>11,.0f}  "
            f"forward MFLOPs/sample {cost.flops / 1e6:7.3f}"
        )
    print(f"  active FLOPs ratio MoE/dense: {cost_moe.flops / cost_dense.flops:.3f}")
    model_steps = {"moe": (moe, moe_opt), "dense": (dense, dense_opt)}
    for _ in range(args.warmup):
        for m, opt in model_steps.values():
            step(m, opt, batches[0])
    times = {"moe": [], "dense": []}
    for r in range(args.repeats):
        batch = batches[r % len(batches)]
        order = ("moe", "dense") if r % 2 == 0 else ("dense", "moe")
        for key in order:
            times[key].append(step(*model_steps[key], batch))
    ratios = [m / d for m, d in zip(times["moe"], times["dense"], strict=True)]
    print(
        f"  step ms (median): MoE {statistics.median(times['moe']) * 1e3:.1f}, "
        f"dense {statistics.median(times['dense']) * 1e3:.1f}"
    )
    ratio = statistics.median(ratios)
    print(f"  training step MoE/dense: median {ratio:.3f} over {args.repeats} interleaved rounds")
    print("  (issue 4 target, for av-digits token-choice vs dense-early: <= 1.25)")
    return 0


def table(args) -> int:
    names = [n for n in preset_names(tiny=False) if not args.task or n.startswith(args.task + "/")]
    tasks = {}
    print("| preset | params | active params | forward MFLOPs / sample |")
    print("|---|---:|---:|---:|")
    for name in names:
        cfg = get_preset(name)
        if cfg.task not in tasks:
            task = load_task(cfg.task, **cfg.task_options)
            tasks[cfg.task] = (task, task.train.subset(range(min(len(task.train), 2000))))
        task, train = tasks[cfg.task]
        torch.manual_seed(0)
        model = build_model(cfg.model, task.specs, outputs=train.num_classes).fit(train)
        cost = measure_cost(model, task.test.batch(range(min(len(task.test), 256))))
        print(f"| {name} | {cost.params:,d} | {cost.active_params:,.0f} | {cost.flops / 1e6:.3f} |")
        sys.stdout.flush()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moe", default="av-digits/token-choice")
    parser.add_argument("--dense", default="av-digits/dense-early")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8, help="distinct batches cycled through")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--table", action="store_true", help="print the cost table of every preset instead")
    parser.add_argument("--task", default=None, help="with --table: only this task's presets")
    args = parser.parse_args()
    tune_allocator()
    return table(args) if args.table else compare(args)


if __name__ == "__main__":
    sys.exit(main())
