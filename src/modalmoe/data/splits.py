"""Seeded splits: stratified by class, or by group (no subject in two splits)."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

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
