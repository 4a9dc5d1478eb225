"""Pre-extracted feature vectors: standardised, then projected to one or a few tokens."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modalmoe.encoders.base import Encoder, Standardize, encoders


@encoders.register("vector")
class VectorEncoder(Encoder):
    """[B, F] -> [B, tokens, D] by one linear map (features standardised with training stats).

    Args:
        spec: ``ModalitySpec`` of kind vector, shape ``(F,)``.
        dim: token width D.
        tokens: tokens per sample.
    """

    def __init__(self, *, spec, dim: int, tokens: int = 1) -> None:
        super().__init__(spec=spec, dim=dim)
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        self.tokens = tokens
        self.standardize = Standardize(spec.shape[0])
        self.proj = nn.Linear(spec.shape[0], tokens * dim)

    def fit(self, x: Tensor, present: Tensor, mask: Tensor | None = None) -> None:
        """Feature statistics from training data: x [N, F]."""
        self.require_samples(present)
        self.standardize.fit(x[present])

    def embed(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        tokens = self.proj(self.standardize(x)).view(x.shape[0], self.tokens, self.dim)
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=x.device)
