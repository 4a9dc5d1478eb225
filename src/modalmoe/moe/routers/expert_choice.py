"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Each expert picks its top-C tokens, ``C = ceil(T * experts_per_token / E)``; a token may be
taken by 0 to E experts. Load is balanced by construction and nothing is dropped by a
capacity limit, but a token taken by no expert gets no FFN update (only the residual).

This router mixes information across the batch: which tokens an expert takes depends on
every other token routed in the same call, so a sample's output depends on the rest of the
batch, and inference with a different batch (or batch size) routes differently. Route
per sample (one call per sample) where that matters.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalmoe.moe.routers import routers
from modalmoe.moe.routers.base import Router, mask_logits
from modalmoe.moe.types import Routing


@routers.register("expert_choice")
class ExpertChoiceRouter(Router):
    """Each expert chooses its top-C tokens.

    Args:
        dim: token width D.
        num_experts: E.
        experts_per_token: average experts per token (Zhou et al.'s capacity factor c);
            C = ceil(T * experts_per_token / E). Not the layer's drop cap
            (``model.moe.capacity_factor``), which expert choice does not need.
        capacity_factor: the old name of ``experts_per_token`` (deprecated: it read as the
            layer's drop cap); still accepted, with a warning.
        k: ignored beyond validation; expert choice decides per expert (kept for a uniform API).
    """

    expert_params = {"weight": 0}
    accepts_mask = True

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        experts_per_token: float | None = None,
        k: int = 1,
        capacity_factor: float | None = None,
    ) -> None:
        super().__init__(dim=dim, num_experts=num_experts, k=k)
        if capacity_factor is not None:
            if experts_per_token is not None:
                raise ValueError("expert_choice: give experts_per_token, not also its old name capacity_factor")
            warnings.warn(
                "expert_choice's option capacity_factor is now experts_per_token (it is not the layer's drop cap "
                "model.moe.capacity_factor); rename it in router_options",
                DeprecationWarning,
                stacklevel=2,
            )
            experts_per_token = capacity_factor
        experts_per_token = 2.0 if experts_per_token is None else experts_per_token
        if isinstance(experts_per_token, bool) or not experts_per_token > 0:
            raise ValueError(f"expert_choice experts_per_token must be > 0, got {experts_per_token}")
        self.experts_per_token = float(experts_per_token)
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=1 / math.sqrt(dim))

    def capacity(self, num_tokens: int) -> int:
        """C, the tokens each expert takes out of ``num_tokens``."""
        return min(num_tokens, max(1, math.ceil(num_tokens * self.experts_per_token / self.num_experts)))

    @property
    def min_open(self) -> int:
        return 1  # experts choose tokens: a token needs no fixed number of experts

    def forward(self, x: Tensor, modality: Tensor, sample: Tensor, allowed: Tensor | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_index [T, E] (column e is expert e) and valid [T, E].
        allowed: [T, E] experts each token may use (None: all); an expert never takes a token
        that may not use it, even when fewer than C may."""
        num_tokens = x.shape[0]
        logits = mask_logits(x @ self.weight.t(), allowed)
        probs = F.softmax(logits, dim=-1)
        taken = torch.zeros_like(probs, dtype=torch.bool)
        if num_tokens:
            chosen = torch.topk(probs, self.capacity(num_tokens), dim=0).indices  # [C, E]
            taken.scatter_(0, chosen, True)
            if allowed is not None:
                taken &= allowed
        index = torch.arange(self.num_experts, device=x.device).expand(num_tokens, -1)
        return Routing(expert_index=index, weight=probs * taken, probs=probs, logits=logits, valid=taken)
