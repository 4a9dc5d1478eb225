"""Heads: what the model outputs from the fused representation.

- ``classification``: logits ``[B, C]`` (cross-entropy);
- ``multilabel``: logits ``[B, C]``, one independent label each (binary cross-entropy);
- ``regression``: ``[B]`` for one target, ``[B, C]`` for several (MSE);
- the embedding head: one projection per modality of that modality's pooled representation,
  L2-normalised, for contrastive training and cross-modal retrieval (CLIP's towers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

HEAD_KINDS = ("classification", "multilabel", "regression")


class Head(nn.Module):
    """LayerNorm then a linear map from the fused representation.

    Args:
        kind: one of ``HEAD_KINDS``.
        dim: input width D.
        outputs: classes, labels or regression targets.
    """

    def __init__(self, *, kind: str, dim: int, outputs: int) -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {kind!r}; choose one of {HEAD_KINDS}")
        if outputs < 1:
            raise ValueError(f"a {kind} head needs outputs >= 1, got {outputs}")
        self.kind, self.outputs = kind, outputs
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, outputs)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, D] -> [B, outputs] ([B] for a single regression target)."""
        y = self.linear(self.norm(x))
        return y.squeeze(-1) if self.kind == "regression" and self.outputs == 1 else y


class EmbeddingHead(nn.Module):
    """Per-modality projections to a shared, L2-normalised embedding space.

    Args:
        modalities: names, in id order.
        dim: input width D.
        embed_dim: output width.
    """

    def __init__(self, *, modalities: Sequence[str], dim: int, embed_dim: int) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.proj = nn.ModuleDict({m: nn.Linear(dim, embed_dim, bias=False) for m in modalities})

    def forward(self, pooled: Tensor, present: Tensor) -> dict[str, Tensor]:
        """pooled: [B, M, D], present: [B, M] -> name -> [B, embed_dim] (0 where absent)."""
        return {
            m: F.normalize(self.proj[m](pooled[:, i]), dim=-1) * present[:, i : i + 1].to(pooled.dtype)
            for i, m in enumerate(self.modalities)
        }
