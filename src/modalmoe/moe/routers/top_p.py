"""Top-p (dynamic) routing: each token takes as many experts as it needs to reach a mass p.

Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models": a token
sorts its router probabilities and takes experts, best first, until their cumulative
probability reaches ``p``; a confident token takes one expert, an uncertain one several.
Optional null experts (AdaMoE, Zeng et al. 2024, "Token-Adaptive Routing with Null Experts")
add N experts that do nothing: a choice that lands on one runs nothing and costs nothing,
so a token can also settle for fewer real experts (none at all: it then passes through the
block's residual unchanged).

Routing is per token, so samples never interact here (a capacity limit in the layer does
make tokens compete; see ``moe/dispatch.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalmoe.moe.routers import routers
from modalmoe.moe.routers.base import Router, check_gating, jitter, laplace_logits, mask_logits
from modalmoe.moe.types import Routing

#: How close to ``p`` the cumulative mass must come for a token to stop taking experts. The
#: probabilities are float32 and their sum is 1 only up to rounding (a few 1e-7 for tens of
#: experts), so without it ``p=1.0`` could miss its mark by a rounding error and spill onto
#: experts it does not need; the price is that a tail of experts holding less than this
#: mass together is never taken to reach ``p``.
MASS_TOLERANCE = 1e-5


def top_p_choice(probs: Tensor, p: float, max_choices: int | None = None) -> Tensor:
    """Which experts each token takes under top-p routing.

    Args:
        probs: [T, S] a distribution over S experts per token (rows sum to 1).
        p: the mass to reach, in (0, 1].
        max_choices: at most this many experts per token (None: no cap).

    Returns:
        (order [T, S], taken [T, S]): each token's experts sorted by probability, best first
        (ties: the lower expert index first), and whether each sorted position is taken. A
        token takes the fewest experts whose mass is >= ``p`` (within ``MASS_TOLERANCE``), at
        least one, and at most ``max_choices``; the taken positions are a prefix.
    """
    sorted_probs, order = torch.sort(probs.detach(), dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # the mass of the better experts
    taken = before < p - MASS_TOLERANCE
    taken[:, 0] = True  # a p below the tolerance still takes one expert
    if max_choices is not None:
        taken[:, max_choices:] = False
    return order, taken


@routers.register("top_p")
class TopPRouter(Router):
    """Top-p router with optional null experts.

    Args:
        dim: token width D.
        num_experts: E real experts.
        p: the probability mass each token's experts must reach, in (0, 1]; 1.0 takes every
            expert with non-negligible probability (see ``MASS_TOLERANCE``).
        max_k: at most this many choices per token, between 1 and E (None: E); with null
            experts a null choice counts toward the cap, as in AdaMoE's top-k over E + N. It
            is also the width K of the routing tensors, and what a capacity limit in the layer
            is sized by (``ceil(capacity_factor * T * K / E)``).
        k: ignored (the model config always passes ``model.moe.k``); the maximum is ``max_k``.
        gating: "softmax", "sigmoid" (independent scores, normalised to sum to 1 so that the
            mass ``p`` has a meaning) or "laplace" (FuseMoE: softmax over negative distances
            to learned expert keys).
        normalize: divide each token's gate weights by the mass of all its choices, so they
            sum to 1 (with null experts: the null choices' share is lost, and the real weights
            sum to 1 only when no null expert was chosen; this keeps the null experts' scores
            trained). The default, False, follows Huang et al.: the gate weights are the raw
            probabilities (over all E + N experts), so a token whose mass went partly to null
            experts gets a smaller update.
        jitter_eps: multiplicative input noise U(1-eps, 1+eps) during training (Switch).
        null_experts: N experts that run nothing (AdaMoE); the router scores E + N experts
            (``weight`` is [E + N, D]). A choice of a null expert is not a slot of the routing:
            it costs no expert FLOPs and contributes 0, and a token whose every choice is null
            comes out of the layer as exactly 0.

    Returns a ``Routing`` whose ``expert_index`` [T, K] holds each token's chosen real experts,
    best first, and whose ``valid`` [T, K] marks them (the rest of the row is unused, weight
    0): ``valid.sum(-1)`` is the number of experts each token used, and only those run.
    ``probs`` and ``logits`` cover the E real experts only (what the load-balance loss, the
    z-loss and the analysis read): ``probs`` is the gating distribution over the real experts
    alone, i.e. the real columns of the E + N distribution renormalised to sum to 1.

    Accepts an expert mask (``allowed`` [T, E], ``modalmoe.moe.masks``): experts a token may not
    use get -inf logits, so they get no probability and are never chosen; null experts are
    always allowed. A token needs only one open expert (``min_open``).

    Expert pruning (``keep_experts``) works without null experts; with them the router's rows
    E..E+N-1 are not experts of the bank, so it declares no ``expert_params`` (pruning and
    growing experts are then refused).
    """

    accepts_mask = True
    adaptive = True  # the experts per token follow the router: compare at equal parameters

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        p: float = 0.5,
        max_k: int | None = None,
        k: int | None = None,
        gating: str = "softmax",
        normalize: bool = False,
        jitter_eps: float = 0.0,
        null_experts: int = 0,
    ) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p p must be in (0, 1], got {p!r}")
        if max_k is not None and (
            isinstance(max_k, bool) or not isinstance(max_k, int) or not 1 <= max_k <= num_experts
        ):
            raise ValueError(f"top_p max_k must be None or between 1 and num_experts={num_experts}, got {max_k!r}")
        if isinstance(null_experts, bool) or not isinstance(null_experts, int) or null_experts < 0:
            raise ValueError(f"top_p null_experts must be an integer >= 0, got {null_experts!r}")
        super().__init__(dim=dim, num_experts=num_experts, k=num_experts if max_k is None else max_k)
        check_gating(gating)
        self.p, self.max_k, self.null_experts = float(p), max_k, null_experts
        self.gating, self.normalize, self.jitter_eps = gating, normalize, jitter_eps
        # Laplace gating keeps one key per expert; the others a linear projection [E + N, D].
        self.weight = nn.Parameter(torch.empty(num_experts + null_experts, dim))
        nn.init.normal_(self.weight, std=1.0 if gating == "laplace" else 1 / math.sqrt(dim))

    @property
    def expert_params(self) -> dict[str, int]:  # type: ignore[override]
        # With null experts, slicing ``weight`` per expert would cut through the null rows.
        return {} if self.null_experts else {"weight": 0}

    @property
    def min_open(self) -> int:
        return 1  # a token takes as many experts as it needs, one at least

    def keep_experts(self, index: Tensor) -> None:
        if self.max_k is not None:
            super().keep_experts(index)
            return
        k = self.k
        self.k = min(k, len(index))  # no cap: the maximum follows the experts kept
        try:
            super().keep_experts(index)
        except Exception:
            self.k = k
            raise

    def _distribution(self, logits: Tensor) -> Tensor:
        """[T, S] logits -> [T, S] float32 probabilities (rows sum to 1) under the gating."""
        if self.gating == "sigmoid":
            scores = torch.sigmoid(logits.float())
            return scores / scores.sum(-1, keepdim=True)
        return F.softmax(logits, dim=-1, dtype=torch.float32)

    def forward(self, x: Tensor, modality: Tensor, sample: Tensor, allowed: Tensor | None = None) -> Routing:
        """x: [T, D]; modality, sample: [T] unused; allowed: [T, E] experts each token may use (None: all)."""
        num_tokens, num_real = x.shape[0], self.num_experts
        x = jitter(x, self.jitter_eps, self.training)
        logits = laplace_logits(x, self.weight) if self.gating == "laplace" else x @ self.weight.t()
        if allowed is not None:
            if allowed.shape != (num_tokens, num_real):
                raise ValueError(f"allowed must be [T, E] = {(num_tokens, num_real)}, got {tuple(allowed.shape)}")
            nulls = allowed.new_ones(num_tokens, self.null_experts)  # null experts are always open
            logits = mask_logits(logits, torch.cat([allowed, nulls], dim=-1))
        full = self._distribution(logits)  # [T, E + N]
        order, taken = top_p_choice(full, self.p, self.max_k)
        # Keep the taken real experts, compacted to the front of the row in their sorted order
        # (a stable sort of "not kept" moves them ahead of the rest): at most K of them.
        keep = taken & (order < num_real)
        front = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[:, : self.k]
        valid = keep.gather(1, front)
        index = torch.where(valid, order.gather(1, front), 0)
        weight = full.gather(1, index) * valid
        if self.normalize:  # by the mass of every choice, null ones included (their share is lost)
            mass = (full.gather(1, order) * taken).sum(-1, keepdim=True)
            weight = weight / mass.clamp_min(torch.finfo(weight.dtype).tiny)
        real = logits[:, :num_real]
        probs = self._distribution(real) if self.null_experts else full
        return Routing(expert_index=index, weight=weight.to(x.dtype), probs=probs.to(x.dtype), logits=real, valid=valid)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, p={self.p:g}, max_k={self.max_k}, "
            f"null_experts={self.null_experts}, gating={self.gating}, normalize={self.normalize}"
        )
