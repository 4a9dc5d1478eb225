"""Per-modality routers (FuseMoE, Han et al. 2024): one gating network per modality over one
shared pool of experts, so each modality learns its own preferences while experts are shared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from modalmoe.moe.routers import routers
from modalmoe.moe.routers.base import (
    Router,
    check_gating,
    check_modality_ids,
    grouped_logits,
    jitter,
    mask_logits,
    top_k_gating,
)
from modalmoe.moe.types import Routing


@routers.register("per_modality")
class PerModalityRouter(Router):
    """A separate top-k gate per modality.

    Args:
        dim: token width D.
        num_experts: E.
        modalities: modality names; modality id i is ``modalities[i]``.
        k: experts per token.
        gating: "softmax", "sigmoid" or "laplace" (FuseMoE's default: negative distances to
            per-modality expert keys).
        normalize: renormalise the chosen weights to sum to 1.
        jitter_eps: multiplicative input noise in training.
    """

    expert_params = {"weight": 1}
    accepts_mask = True

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        modalities: Sequence[str],
        k: int = 2,
        gating: str = "softmax",
        normalize: bool = True,
        jitter_eps: float = 0.0,
    ) -> None:
        super().__init__(dim=dim, num_experts=num_experts, k=k)
        check_gating(gating)
        if not modalities:
            raise ValueError("per_modality needs at least one modality name in `modalities`")
        self.modalities = tuple(modalities)
        self.gating, self.normalize, self.jitter_eps = gating, normalize, jitter_eps
        self.weight = nn.Parameter(torch.empty(len(modalities), num_experts, dim))  # [M, E, D]
        nn.init.normal_(self.weight, std=1.0 if gating == "laplace" else 1 / math.sqrt(dim))

    def forward(self, x: Tensor, modality: Tensor, sample: Tensor, allowed: Tensor | None = None) -> Routing:
        """x: [T, D]; modality: [T] ids into ``modalities``; allowed: [T, E] experts each token
        may use (None: all)."""
        check_modality_ids(modality, len(self.modalities))
        x = jitter(x, self.jitter_eps, self.training)
        logits = mask_logits(grouped_logits(x, modality, self.weight, self.gating), allowed)
        index, weight, probs = top_k_gating(logits, self.k, gating=self.gating, normalize=self.normalize)
        return Routing(expert_index=index, weight=weight, probs=probs, logits=logits)
