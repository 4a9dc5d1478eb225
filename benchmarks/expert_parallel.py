"""Expert-parallel MoE layer: tokens/s at expert-parallel size 1 and 2, and all-to-all volume.

Both settings run the same global work per step, forward and backward of one ``MoELayer``
(token-choice top-k, dropless) over ``2*T`` tokens:

- EP=1: one process holding all E experts runs the 2T tokens (with ``--threads`` threads);
- EP=2: two gloo processes (torchrun, one thread each unless ``--threads-per-rank``) each route
  their T tokens and hold E/2 experts; rows cross by ``all_to_all_single``.

It prints tokens/s (median of ``--repeats`` steps after warm-up; an EP=2 step lasts as long
as its slower rank) and, for EP=2, the bytes each rank put on the wire per step, measured
by wrapping ``torch.distributed.all_to_all_single`` (the call under both the layer's count
exchange and the autograd all-to-all, forward and backward): rows sent to the *other* rank
times their size. It compares them with the cost model of ``modalmoe.moe.parallel``,
``4*T*k*D*b*(P-1)/P`` per layer and step, under ``uniform`` routing (round robin, what the
model assumes) and with the learned router (whose imbalance the model does not know; the
exact figure from its split sizes is printed beside it).

Group-limited routing (DeepSeek-V3; token_choice ``expert_groups`` = P, ``limited_groups``)
bounds how many ranks each token's experts live on. The layer's all-to-all sends one row per
(token, expert) assignment, so its bytes do not shrink; what shrinks is the ranks each token
reaches and the volume of an exchange that sends a token once per destination rank
(DeepSeek-V3's node-limited dispatch). Both are printed for the EP=2 run and, from routing
alone, for P = 4 and 8 with a learned (untrained) router.

    python benchmarks/expert_parallel.py --quick
    python benchmarks/expert_parallel.py --json results/expert_parallel.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from modalmoe.moe import build_moe_layer
from modalmoe.moe.parallel import predicted_volume, shard_experts


def make_layer(args, uniform: bool, groups: tuple[int, int] | None = None):
    torch.manual_seed(0)
    options = {} if groups is None else {"expert_groups": groups[0], "limited_groups": groups[1]}
    return build_moe_layer(
        dim=args.dim,
        hidden=args.hidden,
        num_experts=args.experts,
        k=args.k,
        activation="gelu",
        uniform=uniform,
        router_options=options,
    )


def reach(index: torch.Tensor, experts: int, ranks: int, rank: int) -> tuple[float, float]:
    """(mean ranks a token's experts live on, mean *remote* ranks per token: the rows a
    once-per-rank exchange sends) for chosen experts ``index`` [T, k] over ``ranks`` equal shards."""
    owner = index // (experts // ranks)
    hit = torch.zeros(index.shape[0], ranks, dtype=torch.bool).scatter_(1, owner, True)
    return float(hit.sum(1).float().mean()), float(hit.sum(1).sub(hit[:, rank].long()).float().mean())


def group_reach(args) -> dict:
    """Ranks reached per token, plain vs group-limited (1 group kept, and P/2), from routing
    alone (no processes): E = 8 experts per rank, k = args.k * P / 2 at most 8."""
    out = {}
    for ranks in (2, 4, 8):
        experts, k = 8 * ranks, min(8, max(args.k, ranks))
        x = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(7))
        zeros = torch.zeros(args.tokens, dtype=torch.long)
        row = {}
        for limited in (None, max(1, ranks // 2), 1):
            if limited is not None and limited * 8 < k:
                continue
            torch.manual_seed(0)
            options = {} if limited is None else {"expert_groups": ranks, "limited_groups": limited}
            layer = build_moe_layer(dim=args.dim, hidden=8, num_experts=experts, k=k, router_options=options)
            with torch.no_grad():
                index = layer.router(x, zeros, zeros).expert_index
            row["plain" if limited is None else f"limited={limited}"] = reach(index, experts, ranks, 0)
        out[f"P={ranks} E={experts} k={k}"] = row
    return out


def tokens(args, rank: int) -> torch.Tensor:
    return torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(rank))


def step(layer, x: torch.Tensor) -> None:
    x = x.detach().requires_grad_(True)
    layer(x).x.sum().backward()
    layer.zero_grad(set_to_none=True)


def time_steps(layer, x, args, sync=None) -> list[float]:
    for _ in range(args.warmup):
        step(layer, x)
    times = []
    for _ in range(args.repeats):
        if sync:
            dist.barrier()
        start = time.perf_counter()
        step(layer, x)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        if sync:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    return times


class Wire:
    """Counts what this rank sends to other ranks through ``dist.all_to_all_single``."""

    def __init__(self) -> None:
        self.rows_bytes = self.count_bytes = 0
        self._inner = dist.all_to_all_single

    def __enter__(self) -> Wire:
        def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            size, rank = dist.get_world_size(group), dist.get_rank(group)
            splits = input_split_sizes or [input.shape[0] // size] * size
            row = input[0].numel() * input.element_size() if input.shape[0] else 0
            sent = (sum(splits) - splits[rank]) * row
            if input.dtype.is_floating_point:
                self.rows_bytes += sent
            else:
                self.count_bytes += sent
            return self._inner(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        dist.all_to_all_single = counting
        return self

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single = self._inner


def worker(args) -> None:
    """One rank of the EP=2 run (under torchrun)."""
    torch.set_num_threads(args.threads_per_rank)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    out = {}
    for routing in ("uniform", "learned", "group-limited"):
        limited = (size, 1) if routing == "group-limited" else None  # one group per rank, keep 1
        layer = make_layer(args, uniform=routing == "uniform", groups=limited)
        shard_experts(layer)
        x = tokens(args, rank)
        with Wire() as wire:
            step(layer, x)
        with torch.no_grad():  # the exact volume the split sizes imply (rows to the other rank, both ways)
            index = layer.router(x, *(torch.zeros(len(x), dtype=torch.long),) * 2).expert_index
            if routing == "uniform":
                index = torch.arange(index.numel()).view_as(index) % args.experts
            remote = int((index // (args.experts // size) != rank).sum())
            ranks_reached, remote_ranks = reach(index, args.experts, size, rank)
        sent = torch.tensor([wire.rows_bytes, wire.count_bytes, remote, remote_ranks], dtype=torch.float64)
        times = time_steps(layer, x, args, sync=True)
        out[routing] = dict(
            rows_bytes=wire.rows_bytes,
            count_bytes=wire.count_bytes,
            remote_assignments=remote,
            ranks_reached=ranks_reached,
            seconds=statistics.median(times),
        )
        dist.all_reduce(sent)  # sums over ranks
        out[routing]["mean_rows_bytes"] = float(sent[0]) / size
        # A rank sends its remote rows (dispatch) and the other ranks' rows back (combine), and
        # the backward sends both again: 4 * (mean remote assignments) * row bytes per rank.
        out[routing]["exact_mean_bytes"] = 4 * float(sent[2]) / size * args.dim * x.element_size()
        # A once-per-rank exchange sends each token once to each remote rank it reaches.
        out[routing]["dedup_mean_bytes"] = 4 * float(sent[3]) / size * args.tokens * args.dim * x.element_size()
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(out))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank per step (T)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="threads of the EP=1 process")
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.dim, args.hidden, args.repeats, args.warmup = 1024, 128, 256, 5, 2
    if args.worker_out:
        worker(args)
        return

    # EP=1: the same 2T tokens in one process, with --threads threads and with 1.
    layer = make_layer(args, uniform=False)
    x = torch.cat([tokens(args, 0), tokens(args, 1)])
    ep1 = {}
    for threads in sorted({args.threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        ep1[threads] = statistics.median(time_steps(layer, x, args))

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "ep2.json"
        forwarded = [a for a in sys.argv[1:] if a != "--json" and not a.endswith(".json")]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        cmd += [__file__, *forwarded, "--worker-out", str(result)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_rank)}
        subprocess.run(cmd, check=True, env=env)
        ep2 = json.loads(result.read_text())

    global_tokens = 2 * args.tokens
    model = predicted_volume(args.tokens, args.dim, args.k, 2, 4)
    report = {
        "sizes": {k: getattr(args, k) for k in ("tokens", "dim", "hidden", "experts", "k")},
        "ep1_tokens_per_s": {t: global_tokens / s for t, s in ep1.items()},
        "ep2_tokens_per_s": {r: global_tokens / ep2[r]["seconds"] for r in ep2},
        "cost_model_bytes_per_rank": model,
        "measured": ep2,
        "group_reach": group_reach(args),
    }
    print(f"T={args.tokens} tokens/rank, D={args.dim}, F={args.hidden}, E={args.experts}, k={args.k}, float32")
    best = max(report["ep1_tokens_per_s"].values())
    for threads, rate in report["ep1_tokens_per_s"].items():
        print(f"EP=1 learned routing (1 process, {threads} threads): {rate:,.0f} tokens/s (fwd+bwd)")
    for r, m in ep2.items():
        rate = report["ep2_tokens_per_s"][r]
        print(
            f"EP=2 {r:>7} routing (2 processes, {args.threads_per_rank} thread each): {rate:,.0f} tokens/s "
            f"({rate / best:.2f}x the faster EP=1)\n"
            f"    all-to-all per rank per step (mean of 2 ranks): {m['mean_rows_bytes']:,.0f} B of rows "
            f"(+ {m['count_bytes']} B of split counts on rank 0); cost model {model:,.0f} B -> "
            f"measured/model {m['mean_rows_bytes'] / model:.4f}; exact from the routing's split sizes "
            f"{m['exact_mean_bytes']:,.0f} B -> measured/exact {m['mean_rows_bytes'] / m['exact_mean_bytes']:.4f}"
        )
    plain, limited = ep2["learned"], ep2["group-limited"]
    print(
        f"group-limited routing (expert_groups=2, limited_groups=1) vs plain, EP=2: ranks reached per token "
        f"{limited['ranks_reached']:.2f} vs {plain['ranks_reached']:.2f}; rows on the wire (one per assignment) "
        f"{limited['mean_rows_bytes'] / plain['mean_rows_bytes']:.3f}x; a once-per-rank exchange would send "
        f"{limited['dedup_mean_bytes'] / plain['dedup_mean_bytes']:.3f}x"
    )
    print("ranks a token reaches (mean; remote ranks in brackets), routing only:")
    for setting, row in report["group_reach"].items():
        shown = ", ".join(f"{name} {r:.2f} ({remote:.2f})" for name, (r, remote) in row.items())
        print(f"    {setting}: {shown}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
