"""Token-choice top-k routing: Switch (k=1), GShard and Mixtral (k=2), DeepSeek-V3 (sigmoid).

Each token picks its k best experts. Routing is per token, so samples never interact here
(a capacity limit in the layer does make tokens compete; see ``moe/dispatch.py``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from modalmoe.moe.routers import routers
from modalmoe.moe.routers.base import Router, check_gating, jitter, laplace_logits, mask_logits, top_k_gating
from modalmoe.moe.types import Routing


@routers.register("token_choice")
class TokenChoiceRouter(Router):
    """Top-k token-choice router.

    Args:
        dim: token width D.
        num_experts: E.
        k: experts per token.
        gating: "softmax" (Switch/GShard/Mixtral), "sigmoid" (DeepSeek-V3) or "laplace"
            (FuseMoE: softmax over negative distances to learned expert keys).
        normalize: renormalise the chosen k weights to sum to 1.
        jitter_eps: multiplicative input noise U(1-eps, 1+eps) during training (Switch).

    Accepts an expert mask (``allowed``, ``modalmoe.moe.masks``): experts a token may not use
    get -inf logits, so they get no probability and are never chosen.
    """

    expert_params = {"weight": 0}
    accepts_mask = True

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        k: int = 2,
        gating: str = "softmax",
        normalize: bool = True,
        jitter_eps: float = 0.0,
    ) -> None:
        super().__init__(dim=dim, num_experts=num_experts, k=k)
        check_gating(gating)
        self.gating, self.normalize, self.jitter_eps = gating, normalize, jitter_eps
        # Laplace gating keeps one key per expert; the others a linear projection [E, D].
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=1.0 if gating == "laplace" else 1 / math.sqrt(dim))

    def forward(self, x: Tensor, modality: Tensor, sample: Tensor, allowed: Tensor | None = None) -> Routing:
        """x: [T, D]; modality, sample: [T] unused; allowed: [T, E] experts each token may use (None: all)."""
        x = jitter(x, self.jitter_eps, self.training)
        logits = laplace_logits(x, self.weight) if self.gating == "laplace" else x @ self.weight.t()
        logits = mask_logits(logits, allowed)
        index, weight, probs = top_k_gating(logits, self.k, gating=self.gating, normalize=self.normalize)
        return Routing(expert_index=index, weight=weight, probs=probs, logits=logits)
