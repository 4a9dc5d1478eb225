"""K-fold protocols for small datasets: fold ``i`` of ``K`` as a task, seeded and stratified.

    from modalmoe.data.folds import fold_task
    task = fold_task(task, folds=5, fold=2, seed=0)

Every labelled sample of the task (train, valid and test pooled) is dealt into ``K`` folds:
stratified by class for classification (scikit-learn's ``StratifiedKFold``), grouped and
stratified when the data carries groups such as subjects (``StratifiedGroupKFold``: no group
in two folds), plain ``KFold`` for regression, each shuffled with ``seed``. Fold ``i`` tests
on fold ``i``, selects its checkpoint on fold ``i + 1`` (mod ``K``) and trains on the other
``K - 2`` folds, so over the ``K`` folds every sample is tested exactly once. ``K >= 3``.

A run names its fold in its task options (``folds``, ``fold``, ``fold_seed``; ``load_task``
applies them to any task), so ``eval``, ``analyze`` and ``predict`` read the same fold again.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
from sklearn.model_selection import KFold, StratifiedGroupKFold, StratifiedKFold

from modalmoe.data.batch import Task, concat
from modalmoe.data.formats.manifest import DataFormatError

OPTIONS = ("folds", "fold", "fold_seed")
SMALL = 100  # fewer training samples than this: a single test split is a noisy estimate


def fold_options(options: Mapping) -> tuple[dict, dict]:
    """Split task options into the fold's (``folds``, ``fold``, ``fold_seed``) and the loader's."""
    fold = {k: options[k] for k in OPTIONS if k in options}
    rest = {k: v for k, v in options.items() if k not in OPTIONS}
    if fold and ("folds" not in fold or "fold" not in fold):
        raise DataFormatError(f"task options {sorted(fold)}: a fold needs both folds (K) and fold (0..K-1)")
    return fold, rest


def check_folds(folds: int, fold: int | None = None) -> None:
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 3:
        raise DataFormatError(
            f"folds {folds!r}: K-fold needs an integer K >= 3 (a test fold, a valid fold, training folds)"
        )
    if fold is not None and (isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds):
        raise DataFormatError(f"fold {fold!r}: one of 0..{folds - 1}")


def fold_indices(
    target: np.ndarray, *, folds: int, seed: int = 0, classification: bool = True, groups: np.ndarray | None = None
) -> list[np.ndarray]:
    """The ``K`` folds' sample indices (sorted), seeded (see the module docstring)."""
    check_folds(folds)
    n = len(target)
    if n < folds:
        raise DataFormatError(f"{n} samples cannot be dealt into {folds} folds")
    index = np.arange(n)
    with warnings.catch_warnings():
        # scikit-learn warns when a class has fewer samples than folds; the fold is still valid
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        if groups is not None and classification:
            splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
            parts = [test for _, test in splitter.split(index, target, groups)]
        elif classification:
            parts = [test for _, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(index, target)]
        else:
            parts = [test for _, test in KFold(folds, shuffle=True, random_state=seed).split(index)]
    return [np.sort(p) for p in parts]


def fold_task(task: Task, *, folds: int, fold: int, fold_seed: int = 0) -> Task:
    """Fold ``fold`` of ``folds`` of ``task``: test, valid and train as the module docstring says."""
    check_folds(folds, fold)
    pool = concat([task.splits[s] for s in ("train", "valid", "test")])
    groups = None if pool.groups is None else pool.groups.numpy()
    parts = fold_indices(
        pool.target.numpy(),
        folds=folds,
        seed=fold_seed,
        classification=pool.task_type == "classification",
        groups=groups,
    )
    valid = (fold + 1) % folds
    train = np.sort(np.concatenate([p for i, p in enumerate(parts) if i not in (fold, valid)]))
    splits = {"train": pool.subset(train), "valid": pool.subset(parts[valid]), "test": pool.subset(parts[fold])}
    provenance = None if task.provenance is None else {**task.provenance, "fold": _record(folds, fold, fold_seed)}
    description = f"{task.description} (fold {fold} of {folds}, fold seed {fold_seed})"
    return Task(task.name, splits, description, provenance)


def _record(folds: int, fold: int, seed: int) -> dict:
    return {"folds": folds, "fold": fold, "fold_seed": seed}
