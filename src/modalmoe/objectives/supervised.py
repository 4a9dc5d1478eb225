"""Supervised losses on the prediction head: one per head kind.

- ``cross_entropy``: classification, ``target`` [B] class indices (optional label smoothing,
  Szegedy et al. 2016);
- ``bce``: multi-label, ``target`` [B, L] in {0, 1} (one independent sigmoid per label);
- ``mse``: regression, ``target`` [B] or [B, C] like the head's output.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from modalmoe.data.batch import MultimodalBatch
from modalmoe.model.multimodal import ModelOutput
from modalmoe.objectives.base import Objective, logits_of, objectives


def _same_shape(objective: str, logits: Tensor, target: Tensor) -> None:
    if logits.shape != target.shape:
        raise ValueError(
            f"objective {objective!r}: the head outputs {list(logits.shape)} but the target is {list(target.shape)}"
        )


@objectives.register("cross_entropy")
class CrossEntropy(Objective):
    """Cross-entropy on class logits [B, C] against class indices [B].

    Args:
        label_smoothing: mass spread uniformly over the classes (0: none).
    """

    def __init__(self, *, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, output: ModelOutput, batch: MultimodalBatch, model) -> dict[str, Tensor]:
        logits = logits_of(output, "cross_entropy")
        return {"loss": F.cross_entropy(logits, batch.target.long(), label_smoothing=self.label_smoothing)}


@objectives.register("bce")
class BinaryCrossEntropy(Objective):
    """Binary cross-entropy per label: logits [B, L] against float targets [B, L]."""

    def forward(self, output: ModelOutput, batch: MultimodalBatch, model) -> dict[str, Tensor]:
        logits = logits_of(output, "bce")
        target = batch.target.to(logits.dtype)
        _same_shape("bce", logits, target)
        return {"loss": F.binary_cross_entropy_with_logits(logits, target)}


@objectives.register("mse")
class MeanSquaredError(Objective):
    """Mean squared error: predictions [B] or [B, C] against targets of the same shape."""

    def forward(self, output: ModelOutput, batch: MultimodalBatch, model) -> dict[str, Tensor]:
        prediction = logits_of(output, "mse")
        target = batch.target.to(prediction.dtype)
        _same_shape("mse", prediction, target)
        return {"loss": F.mse_loss(prediction, target)}
