"""Data pipeline benchmark: does batching keep up with training, and how fast do tasks load?

For each bundled task it measures, in one process and interleaved, the median time to
(a) produce a shuffled training batch of ``--batch-size`` samples (``MultimodalDataset.batches``)
and (b) run one training step of a small multimodal MoE model on such a batch (a linear
token projection per modality, one ``MoELayer`` with 4 experts over all tokens, mean pool,
a linear head, AdamW). It prints ``step / batch`` (the target is >= 10: the pipeline
delivers batches ten times faster than training consumes them) and the median time to
load the processed task from the cache (target: < 2 s).

    python benchmarks/data_pipeline.py
    python benchmarks/data_pipeline.py --json results/data_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from modalmoe.data import MultimodalBatch, load_task
from modalmoe.data.batch import ModalitySpec
from modalmoe.moe import build_moe_layer
from modalmoe.runtime import allocator_name, tune_allocator

TASKS = ["av-digits", "clothing-reviews", "mfeat", "watch-imu"]
TEXT_BUCKETS = 1 << 14


class SmallModel(nn.Module):
    """Tokens per modality -> one MoE layer -> mean pool -> classes."""

    def __init__(self, specs: dict[str, ModalitySpec], num_classes: int, dim: int = 64) -> None:
        super().__init__()
        self.specs = specs
        proj = {}
        for name, spec in specs.items():
            if spec.kind == "text":
                proj[name] = nn.EmbeddingBag(TEXT_BUCKETS, dim, mode="mean")
            elif spec.kind == "sequence":
                proj[name] = nn.Linear(spec.shape[-1], dim)  # one token per time step
            elif spec.kind == "image":
                proj[name] = nn.Linear(7 * 7 * spec.shape[0], dim)  # 7x7 patches
            else:
                proj[name] = nn.Linear(spec.shape[0], dim)
        self.proj = nn.ModuleDict(proj)
        self.moe = build_moe_layer(dim=dim, hidden=2 * dim, num_experts=4, k=2)
        self.head = nn.Linear(dim, num_classes)

    def tokens(self, name: str, batch: MultimodalBatch) -> tuple[torch.Tensor, torch.Tensor]:
        spec, present = self.specs[name], batch.present[name]
        x = batch.inputs[name]
        if spec.kind == "text":
            ids = [[hash(w) % TEXT_BUCKETS for w in t.lower().split()] or [0] for t in x]
            offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
            tok = self.proj[name](torch.tensor([i for row in ids for i in row]), offsets).unsqueeze(1)
            return tok, present.unsqueeze(1)
        if spec.kind == "sequence":
            return self.proj[name](x), batch.masks[name] & present.unsqueeze(1)
        if spec.kind == "image":
            b, c, h, w = x.shape
            patches = x.unfold(2, 7, 7).unfold(3, 7, 7).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * 49)
            return self.proj[name](patches), present.unsqueeze(1).expand(b, patches.shape[1])
        return self.proj[name](x).unsqueeze(1), present.unsqueeze(1)

    def forward(self, batch: MultimodalBatch) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [self.tokens(name, batch) for name in self.specs if name in batch.inputs]
        x, mask = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
        out = self.moe(x, mask=mask)
        pooled = (out.x + x).mul(mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.head(pooled), sum(out.aux_losses.values())


def measure(name: str, args) -> dict:
    loads = []
    for _ in range(args.loads):
        start = time.perf_counter()
        task = load_task(name)
        loads.append(time.perf_counter() - start)
    train = task.train
    torch.manual_seed(0)
    model = SmallModel(task.specs, train.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    epoch = iter(())

    def next_batch():
        nonlocal epoch
        try:
            return next(epoch)
        except StopIteration:
            epoch = train.batches(args.batch_size, shuffle=True, seed=len(batch_times), drop_last=True)
            return next(epoch)

    def step(batch):
        logits, aux = model(batch)
        loss = nn.functional.cross_entropy(logits, batch.target) + 0.01 * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    batch_times, step_times = [], []
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        batch = next_batch()
        made = time.perf_counter()
        step(batch)
        done = time.perf_counter()
        if i >= args.warmup:
            batch_times.append(made - start)
            step_times.append(done - made)
    batch_ms, step_ms = statistics.median(batch_times) * 1e3, statistics.median(step_times) * 1e3
    return {
        "task": name,
        "batch_size": args.batch_size,
        "load_s": round(statistics.median(loads), 3),
        "batch_ms": round(batch_ms, 3),
        "step_ms": round(step_ms, 3),
        "step_over_batch": round(step_ms / batch_ms, 1),
        "allocator": allocator_name(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--loads", type=int, default=3, help="times to load each task from the cache")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the records to this path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()
    for name in args.tasks:  # fetch and build outside the timings
        load_task(name)
    records = [measure(name, args) for name in args.tasks]
    table = Table(title=f"data pipeline vs a small model's training step (batch {args.batch_size})")
    for column in ("task", "load_s", "batch_ms", "step_ms", "step_over_batch"):
        table.add_column(column, justify="right")
    for r in records:
        table.add_row(
            r["task"], f"{r['load_s']:.3f}", f"{r['batch_ms']:.3f}", f"{r['step_ms']:.2f}", f"{r['step_over_batch']}"
        )
    Console().print(table)
    if args.json:
        from modalmoe.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
