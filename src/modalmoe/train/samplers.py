"""Training orders: which samples an epoch visits, and in what order (``train.sampler``).

A sampler is a pure function ``(dataset, seed, epoch, **options) -> order [N]`` (indices into
the training split), so an epoch's order depends only on (seed, epoch) and a resumed run
replays it exactly. Every epoch has the split's length N; samplers differ in how they share
those N draws among the tasks of a task mixture (``extras["task"]``,
``modalmoe.data.tasks.mixture``); a dataset without task ids is one group.

- ``proportional`` (the default): a permutation of the split, each task as often as it has
  samples.
- ``uniform``: every task gets the same share of the epoch's draws; a small task's samples
  repeat, a large task's are subsampled (each task cycles through its own permutations).
- ``temperature``: task t's share is proportional to ``n_t ** (1 / temperature)`` (multilingual
  training's temperature sampling, as in XLM-R and mT5: 1 is proportional, larger flattens
  towards uniform).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from modalmoe.data.batch import MultimodalDataset
from modalmoe.data.tasks.mixture import task_groups
from modalmoe.registry import Registry

samplers: Registry[Callable[..., Tensor]] = Registry("sampler")


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_order(num_samples: int, seed: int, epoch: int) -> Tensor:
    """A permutation of ``num_samples`` that depends only on (seed, epoch)."""
    return torch.randperm(num_samples, generator=_generator(seed, epoch))


def _by_shares(dataset: MultimodalDataset, seed: int, epoch: int, weights: Tensor) -> Tensor:
    """N draws shared among the task groups in proportion to ``weights`` [G]: each group's count
    is drawn from the multinomial, its samples taken from its own permutations (cycling, with a
    fresh permutation per cycle), and the whole epoch shuffled."""
    groups = task_groups(dataset)
    generator = _generator(seed, epoch)
    total = len(dataset)
    counts = torch.bincount(
        torch.multinomial(weights / weights.sum(), total, replacement=True, generator=generator),
        minlength=len(groups),
    )
    picked = []
    for rows, count in zip(groups, counts.tolist(), strict=True):
        cycles = -(-count // len(rows)) if count else 0
        perms = [rows[torch.randperm(len(rows), generator=generator)] for _ in range(cycles)]
        if perms:
            picked.append(torch.cat(perms)[:count])
    order = torch.cat(picked) if picked else torch.empty(0, dtype=torch.long)
    return order[torch.randperm(len(order), generator=generator)]


@samplers.register("proportional")
def proportional(dataset: MultimodalDataset, seed: int, epoch: int) -> Tensor:
    """Every sample once per epoch, in a seeded random order."""
    return epoch_order(len(dataset), seed, epoch)


@samplers.register("uniform")
def uniform(dataset: MultimodalDataset, seed: int, epoch: int) -> Tensor:
    """The same share of each epoch for every task."""
    groups = task_groups(dataset)
    if len(groups) == 1:
        return proportional(dataset, seed, epoch)
    return _by_shares(dataset, seed, epoch, torch.ones(len(groups), dtype=torch.float64))


@samplers.register("temperature")
def temperature(dataset: MultimodalDataset, seed: int, epoch: int, temperature: float = 2.0) -> Tensor:
    """Task t's share of each epoch proportional to ``n_t ** (1 / temperature)``."""
    if not temperature > 0:
        raise ValueError(f"train.sampler temperature must be > 0, got {temperature!r}")
    groups = task_groups(dataset)
    if len(groups) == 1:
        return proportional(dataset, seed, epoch)
    sizes = torch.tensor([len(g) for g in groups], dtype=torch.float64)
    return _by_shares(dataset, seed, epoch, sizes ** (1.0 / temperature))


def task_shares(order: Tensor, dataset: MultimodalDataset) -> dict[int, float]:
    """The share of an epoch's draws each task id received (for progress logs and tests)."""
    task = dataset.extras.get("task")
    if task is None or len(order) == 0:
        return {0: 1.0} if len(order) else {}
    ids = torch.as_tensor(task).reshape(-1)[order]
    values, counts = torch.unique(ids, return_counts=True)
    return {int(v): float(c) / len(order) for v, c in zip(values, counts, strict=True)}
