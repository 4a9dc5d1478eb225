"""Task metrics from a model's outputs, computed by torchmetrics (no hand-written formulas).

    from modalmoe.evaluate.metrics import task_metrics, PRIMARY
    task_metrics(logits, target, "classification")  # {"accuracy": 0.91, "macro_f1": ..., ...}

Every function takes raw model outputs (logits, not probabilities) and returns plain Python
floats, so results go straight to JSON. An empty input is an error, not a silent 0.

torchmetrics is imported by the functions that use it, on first call: importing it imports
transformers and scipy (about 3 s), which every command of the CLI would otherwise pay at
startup, since the CLI's modules all reach this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("classification", "multilabel", "regression")

PRIMARY: dict[str, tuple[str, str]] = {
    "classification": ("accuracy", "max"),
    "multilabel": ("macro_f1", "max"),
    "regression": ("mse", "min"),
}
"""Kind -> (metric, "max" or "min"): the default early-stopping and robustness metric."""

METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1", "auroc", "ece", "nll"),
    "multilabel": ("accuracy", "macro_f1", "auroc"),
    "regression": ("mse", "mae", "r2"),
}
"""Kind -> the metric names ``task_metrics`` returns, in display order."""

LOWER_IS_BETTER: frozenset[str] = frozenset({"ece", "nll", "mse", "mae"})
"""The metrics where a smaller value is better; every other metric is higher-is-better. The
one table of metric directions (early stopping, the leaderboard, robustness read it)."""


def direction(metric: str) -> str:
    """``"min"`` for a lower-is-better metric, else ``"max"``."""
    return "min" if metric in LOWER_IS_BETTER else "max"


ECE_BINS = 15  # the usual choice since Guo et al. 2017, "On Calibration of Modern Neural Networks"


def classification_metrics(logits: Tensor, target: Tensor) -> dict[str, float]:
    """Single-label classification metrics.

    - ``accuracy``: fraction of argmax predictions that are right (micro average).
    - ``macro_f1``: unweighted mean of per-class F1 over the classes that occur in the
      targets or the predictions (torchmetrics ignores classes with no TP, FP or FN).
    - ``auroc``: one-vs-rest AUROC, macro mean over all ``C`` classes (also for ``C == 2``,
      where both one-vs-rest curves equal the binary one). A class absent from the targets
      follows torchmetrics' rule: its AUROC is 0, it still counts in the mean, and
      torchmetrics warns. Small splits and modality subsets can hit this.
    - ``ece``: expected calibration error of the top-class confidence, L1, 15 equal-width bins.
    - ``nll``: mean cross-entropy of the softmax.

    Args:
        logits: [N, C] unnormalised scores.
        target: [N] class indices in ``0..C-1``.

    Returns:
        Metric name -> float.
    """
    _check(logits, target)
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [N, C] and target [N], got {tuple(logits.shape)} and {tuple(target.shape)}")
    # local import: torchmetrics costs ~3 s to import (see the top)
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_auroc,
        multiclass_calibration_error,
        multiclass_f1_score,
    )

    logits, target = logits.detach().float().cpu(), target.detach().long().cpu()
    classes = logits.shape[1]
    # Probabilities, passed explicitly: torchmetrics only applies softmax when values leave [0, 1].
    probs = logits.softmax(-1)
    common = dict(num_classes=classes)
    return {
        "accuracy": _float(multiclass_accuracy(probs, target, average="micro", **common)),
        "macro_f1": _float(multiclass_f1_score(probs, target, average="macro", **common)),
        "auroc": _float(multiclass_auroc(probs, target, average="macro", **common)),
        "ece": _float(multiclass_calibration_error(probs, target, n_bins=ECE_BINS, norm="l1", **common)),
        "nll": _float(F.cross_entropy(logits, target)),
    }


def multilabel_metrics(logits: Tensor, target: Tensor) -> dict[str, float]:
    """Multi-label metrics, each label an independent sigmoid thresholded at 0.5.

    - ``accuracy``: fraction of (sample, label) decisions that are right (micro average).
    - ``macro_f1``: unweighted mean of per-label F1.
    - ``auroc``: macro mean of per-label AUROC (a label with no positives follows
      torchmetrics' rule, as in ``classification_metrics``).

    Args:
        logits: [N, L] unnormalised scores.
        target: [N, L] 0/1 labels.

    Returns:
        Metric name -> float.
    """
    _check(logits, target)
    if logits.dim() != 2 or target.shape != logits.shape:
        raise ValueError(f"expected logits and target [N, L], got {tuple(logits.shape)} and {tuple(target.shape)}")
    # local import: torchmetrics costs ~3 s to import (see the top)
    from torchmetrics.functional.classification import multilabel_accuracy, multilabel_auroc, multilabel_f1_score

    probs = logits.detach().float().cpu().sigmoid()
    target = target.detach().long().cpu()
    common = dict(num_labels=logits.shape[1])
    return {
        "accuracy": _float(multilabel_accuracy(probs, target, average="micro", **common)),
        "macro_f1": _float(multilabel_f1_score(probs, target, average="macro", **common)),
        "auroc": _float(multilabel_auroc(probs, target, average="macro", **common)),
    }


def regression_metrics(pred: Tensor, target: Tensor) -> dict[str, float]:
    """Regression metrics.

    ``mse`` and ``mae`` average over every element; ``r2`` is the coefficient of
    determination, averaged uniformly over outputs when there are several (NaN-free only
    with at least two samples, as R^2 needs a target variance).

    Args:
        pred: [N] or [N, C] predictions.
        target: same shape as ``pred``.

    Returns:
        Metric name -> float.
    """
    _check(pred, target)
    if pred.shape != target.shape or pred.dim() not in (1, 2):
        raise ValueError(
            "expected pred and target of the same shape [N] or [N, C], "
            f"got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    # local import: torchmetrics costs ~3 s to import (see the top)
    from torchmetrics.functional.regression import mean_absolute_error, mean_squared_error, r2_score

    pred, target = pred.detach().float().cpu(), target.detach().float().cpu()
    return {
        "mse": _float(mean_squared_error(pred, target)),
        "mae": _float(mean_absolute_error(pred, target)),
        "r2": _float(r2_score(pred, target)),
    }


def task_metrics(logits: Tensor, target: Tensor, kind: str) -> dict[str, float]:
    """The metrics of one task kind.

    Args:
        logits: the model's output: [N, C] (classification, multilabel) or [N] / [N, C] (regression).
        target: [N] class indices, [N, L] labels, or values shaped like ``logits``.
        kind: "classification", "multilabel" or "regression".

    Returns:
        Metric name -> float; the names are ``METRICS[kind]``.
    """
    if kind == "classification":
        return classification_metrics(logits, target)
    if kind == "multilabel":
        return multilabel_metrics(logits, target)
    if kind == "regression":
        return regression_metrics(logits, target)
    raise ValueError(f"unknown task kind {kind!r}; choose one of {KINDS}")


def _check(output: Tensor, target: Tensor) -> None:
    if output.shape[0] == 0 or target.shape[0] == 0:
        raise ValueError("metrics need at least one sample, got N = 0")
    if output.shape[0] != target.shape[0]:
        raise ValueError(f"outputs have {output.shape[0]} samples but targets have {target.shape[0]}")


def _float(value: Tensor) -> float:
    return float(torch.as_tensor(value).item())
