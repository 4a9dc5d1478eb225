"""Seeded splits: stratified by class, or by group (no subject in two splits)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from modalmoe.data.batch import Task

FRACTIONS = (0.7, 0.15, 0.15)


def stratified_split(
    target: np.ndarray, *, seed: int, fractions: tuple[float, float, float] = FRACTIONS
) -> dict[str, np.ndarray]:
    """Indices of train/valid/test with the class proportions of ``target`` in each (sorted)."""
    target = np.asarray(target)
    index = np.arange(len(target))
    train, rest = train_test_split(index, train_size=fractions[0], stratify=target, random_state=seed)
    valid, test = train_test_split(
        rest, train_size=fractions[1] / (fractions[1] + fractions[2]), stratify=target[rest], random_state=seed
    )
    return {"train": np.sort(train), "valid": np.sort(valid), "test": np.sort(test)}


def group_split(groups: np.ndarray, assignment: dict[str, list]) -> dict[str, np.ndarray]:
    """Indices per split from a fixed assignment of groups (e.g. subjects) to splits.

    Raises ``ValueError`` when a group is in two splits or a group of the data in none.
    """
    groups = np.asarray(groups)
    seen: dict = {}
    for split, members in assignment.items():
        for g in members:
            if g in seen:
                raise ValueError(f"group {g!r} is assigned to both {seen[g]!r} and {split!r}")
            seen[g] = split
    missing = sorted(set(groups.tolist()) - set(seen))
    if missing:
        raise ValueError(f"groups {missing} are assigned to no split")
    return {split: np.flatnonzero(np.isin(groups, members)) for split, members in assignment.items()}


def limit_task(task: Task, limit: int | None) -> Task:
    """``task`` with at most ``limit`` samples per split (a seeded random subset, in the split's
    order; None or 0: all). The same subset every time, so runs of one suite stay paired."""
    if not limit:
        return task
    splits = {}
    for name, data in task.splits.items():
        if len(data) > limit:  # a random subset: bundled splits may be sorted by class
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:limit]
            data = data.subset(order.sort().values)
        splits[name] = data
    return Task(name=task.name, splits=splits, description=task.description, provenance=task.provenance)
