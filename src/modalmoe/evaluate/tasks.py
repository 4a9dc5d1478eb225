"""Per-task metrics of a task mixture, and its mean normalised score.

A mixture's model (``modalmoe.data.tasks.mixture``, one head per member) is scored on each
member task in that member's own label space: its rows of the split, its head's columns of
the logits, its labels. A model serving several tasks is then summarised by the **mean
normalised score**: each member's primary metric (accuracy) scaled so that its majority-class
rate scores 0 and its reference scores 1,

    normalised_t = (score_t - majority_t) / (reference_t - majority_t),

averaged over the members with equal weight (the normalisation of multi-task benchmarks such
as GLUE's baselines and Atari's human-normalised score). The reference is the best
specialist's score (one model per task at the same per-sample FLOPs; the ``generalist`` suite
trains them) where it is known, else a perfect score (1.0), which the report says. The
majority class is the most frequent class of the member's training split, scored on the
evaluated split.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from modalmoe.data.batch import MultimodalDataset
from modalmoe.data.tasks.mixture import MixtureLayout
from modalmoe.evaluate.metrics import PRIMARY, task_metrics

PERFECT = 1.0
"""The reference of a member with no specialist score: a perfect accuracy."""

MIN_SPAN = 0.01
"""The least a reference must beat the majority class by (1 point of accuracy) for the scale to
mean something; below it a member's normalised score is undefined (None), not a huge ratio."""


@dataclass
class TaskScore:
    """One member task of a mixture, scored alone.

    Attributes:
        task: the member's label.
        samples: its samples in the evaluated split.
        metrics: its metrics in its own label space.
        majority: the accuracy of always answering its training split's most frequent class.
        reference: the score that normalises to 1 (its best specialist's, or ``PERFECT``).
        reference_kind: ``"specialist"`` or ``"perfect"``.
        normalised: ``(accuracy - majority) / (reference - majority)`` (None if undefined).
    """

    task: str
    samples: int
    metrics: dict[str, float]
    majority: float
    reference: float
    reference_kind: str
    normalised: float | None


def majority_rates(layout: MixtureLayout, train: MultimodalDataset, split: MultimodalDataset) -> dict[str, float]:
    """Member -> accuracy on ``split`` of always predicting its most frequent training class."""
    train_task, split_task = _task_ids(train), _task_ids(split)
    rates = {}
    for t, name in enumerate(layout.names):
        labels = train.target[train_task == t]
        own = split.target[split_task == t]
        if len(labels) == 0 or len(own) == 0:
            continue
        top = torch.bincount(labels - layout.starts[t], minlength=layout.sizes[t]).argmax() + layout.starts[t]
        rates[name] = float((own == top).float().mean())
    return rates


def normalised(score: float, majority: float, reference: float) -> float | None:
    """``score`` on the scale where ``majority`` is 0 and ``reference`` is 1 (None when the
    reference beats the majority class by less than ``MIN_SPAN``: the scale is undefined)."""
    span = reference - majority
    return None if span < MIN_SPAN else (score - majority) / span


def task_scores(
    logits: Tensor,
    target: Tensor,
    task: Tensor,
    layout: MixtureLayout,
    *,
    majority: Mapping[str, float],
    reference: Mapping[str, float] | None = None,
) -> list[TaskScore]:
    """Score each member on its own rows and columns.

    Args:
        logits: [N, C] the mixture model's logits.
        target: [N] mixture labels.
        task: [N] member id of each row.
        layout: the mixture's layout.
        majority: member -> majority-class accuracy on this split (``majority_rates``).
        reference: member -> the best specialist's accuracy (None or missing: ``PERFECT``).
    """
    metric = PRIMARY["classification"][0]
    scores = []
    for t, name in enumerate(layout.names):
        rows = (task == t).nonzero().squeeze(-1)
        if len(rows) == 0:
            continue
        start, size = layout.starts[t], layout.sizes[t]
        own = logits.index_select(0, rows)[:, start : start + size]
        labels = target[rows] - start
        metrics = task_metrics(own, labels, "classification")
        given = (reference or {}).get(name)
        ref, kind = (float(given), "specialist") if given is not None else (PERFECT, "perfect")
        base = float(majority.get(name, 0.0))
        scores.append(TaskScore(name, len(rows), metrics, base, ref, kind, normalised(metrics[metric], base, ref)))
    return scores


def mean_normalised(scores: list[TaskScore]) -> float | None:
    """The mean of the members' normalised scores (None when any is undefined)."""
    values = [s.normalised for s in scores]
    if not values or any(v is None for v in values):
        return None
    return float(sum(values) / len(values))


def _task_ids(dataset: MultimodalDataset) -> Tensor:
    task = dataset.extras.get("task")
    if task is None:
        raise ValueError("per-task scores need a task mixture's split (extras['task'] holds each sample's task)")
    return torch.as_tensor(task).reshape(-1)
