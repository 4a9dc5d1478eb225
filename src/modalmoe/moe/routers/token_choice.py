"""Token-choice top-k routing: Switch (k=1), GShard and Mixtral (k=2), DeepSeek-V3 (sigmoid).

Each token picks its k best experts. Routing is per token, so samples never interact here
(a capacity limit in the layer does make tokens compete; see ``moe/dispatch.py``).

Two DeepSeek-V3 options change only which experts are *chosen*, never the gate weights:

- ``bias_rate``: auxiliary-loss-free load balancing (``moe/balance.py``): a per-expert bias
  on the selection scores, moved after each optimizer step towards uniform load;
- ``expert_groups`` / ``limited_groups``: group-limited routing: the E experts form G equal
  groups (one per expert-parallel rank when G is the EP size); each token first keeps the
  ``limited_groups`` groups whose two best selection scores sum highest, then picks its top k
  inside them, so its all-to-all reaches at most ``limited_groups`` ranks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from modalmoe.moe.balance import ExpertBias
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
        bias_rate: auxiliary-loss-free balancing's bias step per optimizer step (DeepSeek-V3;
            Megatron-Core's default 1e-3); None: off. Train with ``train.aux_weights`` of
            ``load_balance`` at 0 to balance without the aux loss.
        expert_groups, limited_groups: group-limited routing (both or neither; see above).

    Accepts an expert mask (``allowed``, ``modalmoe.moe.masks``): experts a token may not use
    get -inf logits, so they get no probability and are never chosen.
    """

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
        bias_rate: float | None = None,
        expert_groups: int | None = None,
        limited_groups: int | None = None,
    ) -> None:
        super().__init__(dim=dim, num_experts=num_experts, k=k)
        check_gating(gating)
        self.gating, self.normalize, self.jitter_eps = gating, normalize, jitter_eps
        # Laplace gating keeps one key per expert; the others a linear projection [E, D].
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=1.0 if gating == "laplace" else 1 / math.sqrt(dim))
        self.balance = None if bias_rate is None else ExpertBias(num_experts, bias_rate)
        self.expert_groups, self.limited_groups = _check_groups(num_experts, k, expert_groups, limited_groups)

    @property
    def expert_params(self) -> dict[str, int]:  # type: ignore[override]
        # Pruning experts would break equal groups; the balancing bias is pruned with them.
        return {} if self.expert_groups else {"weight": 0}

    def keep_experts(self, index: Tensor) -> None:
        super().keep_experts(index)
        if self.balance is not None:
            bias = ExpertBias(len(index), self.balance.rate).to(self.weight.device)
            bias.bias.copy_(self.balance.bias.index_select(0, index.to(self.weight.device)))
            self.balance = bias

    def forward(self, x: Tensor, modality: Tensor, sample: Tensor, allowed: Tensor | None = None) -> Routing:
        """x: [T, D]; modality, sample: [T] unused; allowed: [T, E] experts each token may use (None: all)."""
        x = jitter(x, self.jitter_eps, self.training)
        logits = laplace_logits(x, self.weight) if self.gating == "laplace" else x @ self.weight.t()
        logits = mask_logits(logits, allowed)
        if self.balance is None and not self.expert_groups:
            index, weight, probs = top_k_gating(logits, self.k, gating=self.gating, normalize=self.normalize)
            return Routing(expert_index=index, weight=weight, probs=probs, logits=logits)
        # The same gating, with the choice made on biased / group-limited selection scores.
        _, _, probs = top_k_gating(logits, 1, gating=self.gating, normalize=False)
        scores = torch.sigmoid(logits) if self.gating == "sigmoid" else probs
        select = scores if self.balance is None else self.balance.choose(scores)
        if allowed is not None:  # a bias must never lift an expert the token may not use
            select = select.masked_fill(~allowed, float("-inf"))
        if self.expert_groups:
            select = _limit_groups(select, self.expert_groups, self.limited_groups)
        index = torch.topk(select, self.k, dim=-1).indices
        weight = scores.gather(1, index)
        if self.normalize:
            weight = weight / weight.sum(-1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
        if self.balance is not None:
            self.balance.count(index)
        return Routing(expert_index=index, weight=weight, probs=probs, logits=logits)

    def extra_repr(self) -> str:
        groups = (
            f", expert_groups={self.expert_groups}, limited_groups={self.limited_groups}" if self.expert_groups else ""
        )
        return super().extra_repr() + f", gating={self.gating}{groups}"


def _check_groups(num_experts: int, k: int, groups: int | None, limited: int | None) -> tuple[int, int]:
    """(G, groups kept) for group-limited routing, or (0, 0) when it is off."""
    if groups is None and limited is None:
        return 0, 0
    if groups is None or limited is None:
        raise ValueError(
            "group-limited routing needs both expert_groups (G) and limited_groups (groups kept per token)"
        )
    if groups < 1 or num_experts % groups:
        raise ValueError(f"expert_groups must divide num_experts={num_experts} into equal groups, got {groups}")
    if not 1 <= limited <= groups:
        raise ValueError(f"limited_groups must be between 1 and expert_groups={groups}, got {limited}")
    if limited * (num_experts // groups) < k:
        raise ValueError(
            f"limited_groups={limited} groups of {num_experts // groups} experts hold fewer than k={k} experts; "
            "keep more groups or lower k"
        )
    return groups, limited


def _limit_groups(select: Tensor, groups: int, limited: int) -> Tensor:
    """``select`` [T, E] with the experts outside each token's ``limited`` best groups at -inf;
    a group's score is the sum of its two best selection scores (its one best if it has one
    expert), as in DeepSeek-V3."""
    tokens, experts = select.shape
    grouped = select.view(tokens, groups, experts // groups)
    top = grouped.topk(min(2, experts // groups), dim=-1).values
    # A masked-out expert (-inf) must not make its group's score NaN or -inf-minus-inf.
    group_score = torch.nan_to_num(top, neginf=torch.finfo(select.dtype).min / 4).sum(-1)
    keep = torch.zeros(tokens, groups, dtype=torch.bool, device=select.device)
    keep.scatter_(1, group_score.topk(limited, dim=-1).indices, True)
    return select.masked_fill(~keep.repeat_interleave(experts // groups, dim=1), float("-inf"))
