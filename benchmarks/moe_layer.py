"""MoE layer benchmark: our layer against the dense lower bound and a per-expert loop.

For each case (E, k, activation, pass) it times, in one process and interleaved, the
median of ``--repeats`` runs after warm-up:

- ours:  ``MoELayer`` with token-choice routing (router, dispatch, experts, combine);
- dense: the lower bound, one dense FFN of the expert's size over T*k tokens;
- loop:  the per-expert Python loop of Hugging Face's Mixtral block
         (``for e in experts: idx = where(...); out.index_add_(...)``), same router.

It prints ``ours/dense`` and ``loop/ours``, the share of our time spent outside the expert
matmuls (router, sort, gather, combine), and peak working memory of forward+backward
(activations and temporaries; parameters and their gradients excluded, since E experts
have E times the dense FFN's weights by design; see ``peak_working_memory``), and writes JSON with ``--json PATH``.

    python benchmarks/moe_layer.py --quick
    python benchmarks/moe_layer.py --json results/moe_layer.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from modalmoe.efficiency.profile import peak_memory
from modalmoe.moe import FeedForward, build_moe_layer
from modalmoe.moe.dispatch import plan_dispatch
from modalmoe.runtime import allocator_name, tune_allocator


class LoopMoE(nn.Module):
    """The reference: one ``nn.Linear`` FFN per expert and a Python loop, as in HF Mixtral."""

    def __init__(self, router: nn.Module, num_experts: int, dim: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.router = router
        self.experts = nn.ModuleList(
            FeedForward(dim=dim, hidden=hidden, activation=activation) for _ in range(num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros(x.shape[0], dtype=torch.long)
        routing = self.router(x, zeros, zeros)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            idx, j = torch.where(routing.expert_index == e)
            if idx.numel():
                out.index_add_(0, idx, expert(x[idx]) * routing.weight[idx, j, None])
        return out


def make_cases(args) -> list[dict]:
    cases = [
        {"E": e, "k": k, "activation": a, "pass": p}
        for e in args.experts
        for k in args.k
        for a in args.activations
        for p in args.passes
    ]
    if args.quick:
        cases = [c for c in cases if c["k"] == 2 and c["pass"] == "fwdbwd"]
    return cases


def build(case: dict, args):
    torch.manual_seed(0)
    e, k, act = case["E"], case["k"], case["activation"]
    ours = build_moe_layer(dim=args.dim, hidden=args.hidden, num_experts=e, k=k, activation=act, uniform=args.uniform)
    dense = FeedForward(dim=args.dim, hidden=args.hidden, activation=act)
    loop = LoopMoE(ours.router, e, args.dim, args.hidden, act)
    x = torch.randn(args.tokens, args.dim)
    x_dense = torch.randn(args.tokens * k, args.dim)
    return ours, dense, loop, x, x_dense


def step_fn(module: nn.Module, x: torch.Tensor, backward: bool, unwrap: bool):
    """One forward (and backward) step, grads reset to None as an optimizer would."""
    x = x.clone().requires_grad_(backward)
    grad = torch.randn(x.shape) if backward else None

    def step():
        if backward:
            module.zero_grad(set_to_none=True)
            x.grad = None
            out = module(x)
            (out.x if unwrap else out).backward(grad)
        else:
            with torch.no_grad():
                module(x)

    return step


def expert_matmul_step(layer, x: torch.Tensor, backward: bool):
    """Only the expert bank on pre-sorted rows: the layer's time minus this is bookkeeping."""
    zeros = torch.zeros(x.shape[0], dtype=torch.long)
    with torch.no_grad():
        routing = layer.router(x, zeros, zeros)
        plan = plan_dispatch(routing.expert_index, layer.experts.num_experts)
    rows = x.index_select(0, plan.token).requires_grad_(backward)
    grad = torch.randn(rows.shape[0], x.shape[1]) if backward else None

    def step():
        if backward:
            layer.zero_grad(set_to_none=True)
            layer.experts(rows, plan.layout).backward(grad)
        else:
            with torch.no_grad():
                layer.experts(rows, plan.layout)

    return step


def peak_working_memory(step, module: nn.Module) -> float:
    """Peak MiB of activations and temporaries during one step.

    Every storage created during the step counts from its creation to its release, except
    those that end up as parameter gradients: E experts have E times the dense FFN's
    weights and gradients by design, and that is not what dispatch should be judged on.
    """
    return peak_memory(step, exclude_grads_of=module)


def time_interleaved(steps: dict, repeats: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def run_case(case: dict, args) -> dict:
    ours, dense, loop, x, x_dense = build(case, args)
    backward = case["pass"] == "fwdbwd"
    steps = {
        "ours": step_fn(ours, x, backward, unwrap=True),
        "dense": step_fn(dense, x_dense, backward, unwrap=False),
        "loop": step_fn(loop, x, backward, unwrap=False),
        "experts": expert_matmul_step(ours, x, backward),
    }
    ms = time_interleaved(steps, args.repeats, args.warmup)
    record = {
        **case,
        "ours_ms": round(ms["ours"], 3),
        "dense_ms": round(ms["dense"], 3),
        "loop_ms": round(ms["loop"], 3),
        "ours_over_dense": round(ms["ours"] / ms["dense"], 3),
        "loop_over_ours": round(ms["loop"] / ms["ours"], 3),
        "bookkeeping_share": round(max(0.0, 1 - ms["experts"] / ms["ours"]), 3),
        "allocator": allocator_name(),
        "uniform": args.uniform,
        "threads": torch.get_num_threads(),
    }
    if backward and not args.no_memory:
        mem_ours, mem_dense = peak_working_memory(steps["ours"], ours), peak_working_memory(steps["dense"], dense)
        if mem_dense:
            record.update(
                ours_peak_mib=round(mem_ours, 1),
                dense_peak_mib=round(mem_dense, 1),
                memory_over_dense=round(mem_ours / mem_dense, 3),
            )
    return record


def print_table(records: list[dict]) -> None:
    table = Table(title=f"MoE layer (allocator: {records[0]['allocator']}, threads: {records[0]['threads']})")
    cols = [
        "E",
        "k",
        "activation",
        "pass",
        "ours_ms",
        "dense_ms",
        "loop_ms",
        "ours_over_dense",
        "loop_over_ours",
        "bookkeeping_share",
        "memory_over_dense",
    ]
    for c in cols:
        table.add_column(c, justify="right")
    for r in records:
        table.add_row(*(str(r.get(c, "-")) for c in cols))
    Console(width=max(160, Console().width)).print(table)


def write_json_atomic(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(records, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only k=2 forward+backward, fewer repeats (< 60 s)")
    p.add_argument("--json", type=Path, help="write the records to this JSON file")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    p.add_argument("--k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--activations", nargs="+", default=["gelu", "swiglu"], choices=["gelu", "swiglu"])
    p.add_argument("--passes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 9, quick 7)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--allocator",
        choices=["tuned", "default"],
        default="tuned",
        help="'tuned' calls modalmoe.runtime.tune_allocator(); 'default' leaves glibc as is",
    )
    p.add_argument("--uniform", action="store_true", help="force perfectly balanced routing")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 7 if args.quick else 9
    if args.quick:
        args.activations = args.activations if len(args.activations) == 1 else ["swiglu", "gelu"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.allocator == "tuned":
        tune_allocator()
    torch.set_num_threads(args.threads)
    records = []
    for case in make_cases(args):
        records.append(run_case(case, args))
        print(json.dumps(records[-1]), file=sys.stderr, flush=True)
    print_table(records)
    if args.json:
        write_json_atomic(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
