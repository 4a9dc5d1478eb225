"""Robustness to missing and noisy modalities: which subsets to test, and MultiBench's
robustness measures over a curve of scores at increasing imperfection.

References:
    Liang et al. 2021, "MultiBench: Multiscale Benchmarks for Multimodal Representation
    Learning" (NeurIPS Datasets and Benchmarks), and its follow-up Liang et al. 2023,
    "MultiZoo & MultiBench: A Standardized Toolkit for Multimodal Deep Learning" (JMLR).
    The formulas below are those of MultiBench's ``eval_scripts/robustness.py``
    (``relative_robustness_helper``, ``effective_robustness_helper``, ``maxmin_normalize``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch

from modalmoe.data.tasks.mixture import task_groups

MULTIBENCH_STEP = 0.1
"""MultiBench's imperfection grid: levels 0.0, 0.1, ..., 1.0, equally spaced by 0.1."""


def modality_subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``modalities``: the full set first, then by size descending.

    Within a size, subsets follow the order of ``modalities`` (``itertools.combinations``).

    Args:
        modalities: M distinct names.

    Returns:
        The 2^M - 1 subsets as tuples.
    """
    names = tuple(modalities)
    if len(set(names)) != len(names):
        raise ValueError(f"modality names must be distinct, got {list(names)}")
    return [combo for size in range(len(names), 0, -1) for combo in itertools.combinations(names, size)]


def relative_robustness(scores: Sequence[float], imperfection: Sequence[float] | None = None) -> float:
    """MultiBench's relative robustness: the area under the score-vs-imperfection curve.

    With scores ``a_0..a_n`` at imperfection levels ``x_0 < ... < x_n`` (``a_0`` clean), the
    trapezoid rule gives

        RR = sum_{i < n} (a_i + a_{i+1}) * (x_{i+1} - x_i) / 2.

    MultiBench evaluates levels ``x_i = 0.1 * i`` (so ``(a_i + a_{i+1}) * 0.1 / 2`` per
    interval), the default here. Higher is more robust for accuracy-like scores; for an
    error (MSE) lower is better, as MultiBench's finance tasks.

    Args:
        scores: the metric at each level, clean first.
        imperfection: the levels' positions, increasing (default ``0.1 * i``).

    Returns:
        The area; 0 for a single score.
    """
    y = torch.as_tensor(list(scores), dtype=torch.float64)
    if y.numel() == 0:
        raise ValueError("relative robustness needs at least one score")
    if imperfection is None:
        x = MULTIBENCH_STEP * torch.arange(y.numel(), dtype=torch.float64)
    else:
        x = torch.as_tensor(list(imperfection), dtype=torch.float64)
        if x.shape != y.shape:
            raise ValueError(f"got {y.numel()} scores but {x.numel()} imperfection levels")
        if bool((x.diff() <= 0).any()):
            raise ValueError(f"imperfection levels must increase, got {x.tolist()}")
    return float(torch.trapezoid(y, x))


def effective_robustness(scores: Sequence[float], reference: Sequence[float]) -> float:
    """MultiBench's effective robustness: how much better the curve holds up than a
    reference's (late fusion in MultiBench), once both start from the same clean score.

    With scores ``f_0..f_n`` and reference scores ``r_0..r_n`` at the same levels (index 0
    clean), the reference shifted to the method's clean score is ``r_i + (f_0 - r_0)``, and

        ER = sum_i (f_i - (r_i + f_0 - r_0)) = sum_i ((f_i - f_0) - (r_i - r_0)),

    positive when the method loses less than the reference (after Taori et al. 2020,
    "Measuring Robustness to Natural Distribution Shifts in Image Classification").

    Args:
        scores: the method's metric at each level, clean first.
        reference: the reference method's metric at the same levels.

    Returns:
        The summed excess; 0 for identical curves or a single level.
    """
    f = torch.as_tensor(list(scores), dtype=torch.float64)
    r = torch.as_tensor(list(reference), dtype=torch.float64)
    if f.numel() == 0 or f.shape != r.shape:
        raise ValueError(f"need as many scores as reference scores (at least one), got {f.numel()} and {r.numel()}")
    return float((f - (r + (f[0] - r[0]))).sum())


def maxmin_normalize(values: Mapping[str, float], *, lower_is_better: bool = False) -> dict[str, float]:
    """MultiBench's normalisation of a robustness measure across the methods compared.

    ``(v - min) / (max - min)`` over the methods, after negating every value when lower is
    better (MultiBench does so for its MSE-scored finance tasks): 1 is the most robust
    method, 0 the least. When every value is equal the ratio is 0/0 and every method gets
    NaN, as in MultiBench.

    Args:
        values: method name -> unnormalised measure.
        lower_is_better: negate before normalising.

    Returns:
        Method name -> normalised measure in [0, 1].
    """
    if not values:
        raise ValueError("nothing to normalise")
    v = torch.as_tensor(list(values.values()), dtype=torch.float64)
    v = -v if lower_is_better else v
    span = v.max() - v.min()
    normalised = (v - v.min()) / span if span > 0 else torch.full_like(v, float("nan"))
    return dict(zip(values, normalised.tolist(), strict=True))


def evaluated_subsets(modalities: Sequence[str], dataset) -> list[tuple[str, ...]]:
    """The modality subsets worth evaluating on ``dataset``: every subset of ``modalities``, or
    for a task mixture (``extras["task"]``) the full set and then each member's subsets of the
    modalities its samples carry: a mixture's union of modalities has 2^M subsets, and almost
    all of them mix modalities no sample has together."""
    if "task" not in dataset.extras:
        return modality_subsets(modalities)
    out = [tuple(modalities)]
    for rows in task_groups(dataset):
        own = [m for m in modalities if m in dataset.present and bool(dataset.present[m][rows].any())]
        out.extend(s for s in modality_subsets(own) if s not in out)
    return out
