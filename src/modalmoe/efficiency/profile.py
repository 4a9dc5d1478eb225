"""Profiling on the CPU: inference latency percentiles and peak working memory.

Machines are shared and noisy: report medians and ratios measured in one process, never a
single absolute time, and never assert a timing threshold in a test (see DESIGN.md).

Memory is the peak of live CPU tensor storage created during a step, traced op by op with a
``TorchDispatchMode`` (``LiveBytes``): unlike the process RSS it ignores the allocator's
caches and the Python heap, and unlike ``torch.profiler``'s memory view it needs no profiler
run. Storages that existed before the step (parameters, the batch) do not count.

    latency(model, batch)                                # {"p50_ms": ..., "p95_ms": ...}
    inference_memory(model, batch)                       # MiB
    training_memory(model, batch, lambda out, b: F.cross_entropy(out.logits, b.target))
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Container
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from modalmoe.efficiency.flops import measure_cost

MIB = 2**20


class LiveBytes(TorchDispatchMode):
    """Logs every CPU storage an op creates and when it is freed (while the mode is active).

    Attributes:
        events: ``(uid, +bytes)`` at a storage's creation and ``(uid, -bytes)`` at its release,
            in time order.
        uid_of_ptr: data pointer -> uid of each storage still alive.
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[int, int]] = []
        self.uid_of_ptr: dict[int, int] = {}

    def _free(self, uid: int, ptr: int, nbytes: int) -> None:
        self.events.append((uid, -nbytes))
        if self.uid_of_ptr.get(ptr) == uid:
            del self.uid_of_ptr[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output that shares an input's storage (a view, an in-place or out= op) is not
        # a new allocation, even when the input predates the step (a parameter, the batch).
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
                if ptr in self.uid_of_ptr or ptr in inputs or nbytes == 0:
                    continue
                uid = len(self.events)
                self.uid_of_ptr[ptr] = uid
                self.events.append((uid, nbytes))
                weakref.finalize(storage, self._free, uid, ptr, nbytes)
        return out

    def peak(self, exclude: Container[int] = frozenset()) -> int:
        """Peak live bytes over the events, leaving out the storages whose uid is in ``exclude``."""
        live = peak = 0
        for uid, delta in self.events:
            if uid not in exclude:
                live += delta
                peak = max(peak, live)
        return peak

    @property
    def live(self) -> int:
        """Bytes created while tracing that are still alive."""
        return sum(delta for _, delta in self.events)


def peak_memory(step: Callable[[], Any], *, exclude_grads_of: nn.Module | None = None) -> float:
    """Peak MiB of live CPU tensor storage created during ``step()``.

    Args:
        step: runs the work; what it returns is dropped before the trace ends.
        exclude_grads_of: leave out storages that end up as this module's parameter
            gradients (E experts have E times a dense FFN's weights and gradients by
            design; that is not working memory).
    """
    tracker = LiveBytes()
    with tracker:
        step()
    excluded: set[int] = set()
    if exclude_grads_of is not None:
        grads = {p.grad.untyped_storage().data_ptr() for p in exclude_grads_of.parameters() if p.grad is not None}
        excluded = {uid for ptr, uid in tracker.uid_of_ptr.items() if ptr in grads}
    return tracker.peak(excluded) / MIB


def _eval_forward(model: nn.Module, batch, forward_kwargs: dict) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            model(batch, **forward_kwargs)

    return step


def latency(model: nn.Module, batch, *, repeats: int = 20, warmup: int = 3, **forward_kwargs) -> dict[str, float]:
    """Inference latency of ``model(batch)`` in eval mode without gradients.

    Args:
        repeats: timed passes; warmup: untimed passes before them (caches, lazy init).

    Returns:
        ``{"p50_ms": median, "p95_ms": 95th percentile}`` over the timed passes, in ms.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    was_training = model.training
    model.eval()
    step = _eval_forward(model, batch, forward_kwargs)
    try:
        for _ in range(warmup):
            step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
    finally:
        model.train(was_training)
    p50, p95 = np.percentile(times, [50, 95])
    return {"p50_ms": float(p50), "p95_ms": float(p95)}


def inference_memory(model: nn.Module, batch, **forward_kwargs) -> float:
    """Peak MiB of activations of one eval-mode, no-grad ``model(batch)`` (after one untraced
    warm-up pass, so that caches such as a frozen text encoder's are not counted)."""
    was_training = model.training
    model.eval()
    step = _eval_forward(model, batch, forward_kwargs)
    try:
        step()
        return peak_memory(step)
    finally:
        model.train(was_training)


def training_memory(model: nn.Module, batch, loss_fn: Callable[[Any, Any], Tensor], **forward_kwargs) -> float:
    """Peak MiB of one training step's forward and backward, parameter gradients excluded.

    Args:
        loss_fn: ``(model output, batch) -> scalar loss``.

    The model's existing gradients are set aside during the step and restored after it.
    """
    was_training = model.training
    params = list(model.parameters())
    saved = [p.grad for p in params]

    def step() -> None:
        loss_fn(model(batch, **forward_kwargs), batch).backward()

    try:
        model.train()
        with torch.no_grad():
            model(batch, **forward_kwargs)  # warm-up, as in ``inference_memory``
        for p in params:
            p.grad = None
        return peak_memory(step, exclude_grads_of=model)
    finally:
        for p, grad in zip(params, saved, strict=True):
            p.grad = grad
        model.train(was_training)


def profile_model(model: nn.Module, dataset, *, repeats: int = 20, batch_size: int = 64) -> dict:
    """Everything ``modalmoe profile`` reports for a model on a dataset (the test split).

    FLOPs per sample by component and active parameters come from ``measure_cost`` on the
    first ``batch_size`` samples (the batch the benchmark measures on); latency p50/p95 at
    batch 1 and ``batch_size``; throughput in samples/s at ``batch_size`` (from the p50);
    peak inference memory at ``batch_size``.
    """
    batch = dataset.batch(torch.arange(min(batch_size, len(dataset))))
    one = dataset.batch(torch.arange(1))
    cost = measure_cost(model, batch)
    small, large = latency(model, one, repeats=repeats), latency(model, batch, repeats=max(3, repeats // 2))
    return {
        "params": cost.params,
        "active_params": cost.active_params,
        "flops_per_sample": cost.flops,
        "flops_by_component": dict(cost.components),
        "latency_b1_ms": small,
        f"latency_b{len(batch)}_ms": large,
        "throughput_samples_per_s": len(batch) / (large["p50_ms"] / 1e3),
        f"memory_b{len(batch)}_mib": inference_memory(model, batch),
        "batch_size": len(batch),
    }
