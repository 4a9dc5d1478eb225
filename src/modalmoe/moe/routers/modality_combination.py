"""Modality-combination routing (Flex-MoE's S-Router, Yun et al. NeurIPS 2024, "Flex-MoE:
Modeling Arbitrary Modality Combination via the Flexible Mixture-of-Experts"): which experts
a sample's tokens use depends on *which* modalities the sample has.

Flex-MoE gives each combination of present modalities its own experts. Here that is learned:
a small MLP reads a sample's present set as a multi-hot vector ``[M]`` and returns a bias over
the ``E`` experts. Every combination gets its own bias without a ``2^M`` table (a task mixture
has 17 modalities), and combinations that share modalities share what they learn.

- ``mode="bias"`` (default): a token's logits are ``W x`` plus its sample's combination bias,
  then top-k as in ``token_choice``. The MLP's last layer starts at zero, so at
  initialisation the router is exactly ``token_choice`` with the same ``W``.
- ``mode="sample"``: the S-Router's "each combination has its experts". Every token of a
  sample takes the same top-k experts, chosen from the combination's logits alone, and the
  gate weights come from those logits. The route reads no token content at all. All-zero
  logits would send every sample to the same k experts (a tie), so in this mode the last
  layer starts small and random: combinations start on different experts.

A sample's present set is the set of modality ids among its tokens. The layer removes
padding, and with the ``mask`` missing-modality strategy an absent modality has no tokens,
so the set is exactly the modalities the sample has. Two consequences:

- the ``bank`` strategy gives absent modalities learned tokens that carry their ids, so
  every sample looks complete: this router needs the ``mask`` strategy;
- per-modality streams (``late``, ``bottleneck`` and ``cross`` fusion) route each modality's
  tokens in that stream's own layers, so every call sees one modality per sample and the
  combination is that modality alone (a per-modality bias). Use ``early`` fusion for the
  combination to matter.

Samples never interact: a token's route reads its own content and its sample's present set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalmoe.moe.routers import routers
from modalmoe.moe.routers.base import (
    Router,
    check_gating,
    check_modality_ids,
    jitter,
    laplace_logits,
    mask_logits,
    top_k_gating,
)
from modalmoe.moe.types import Routing

MODES = ("bias", "sample")


def present_sets(modality: Tensor, sample: Tensor, num_modalities: int) -> tuple[Tensor, Tensor]:
    """Each sample's present modalities, read from its tokens.

    Args:
        modality: [T] modality ids in ``[0, num_modalities)``.
        sample: [T] sample ids (any non-negative ints, in any order).
        num_modalities: M.

    Returns:
        (present [S, M] bool, one row per distinct sample id in increasing order; row [T]
        which row each token's sample is).
    """
    ids, row = torch.unique(sample, return_inverse=True)
    present = torch.zeros(ids.shape[0], num_modalities, dtype=torch.bool, device=modality.device)
    present[row, modality] = True
    return present, row


@routers.register("modality_combination")
class ModalityCombinationRouter(Router):
    """Top-k routing conditioned on each sample's combination of present modalities.

    Args:
        dim: token width D.
        num_experts: E.
        modalities: modality names; modality id i is ``modalities[i]`` (filled in by the
            model builder).
        k: experts per token.
        mode: ``"bias"`` (token logits plus the combination's bias) or ``"sample"`` (every
            token of a sample takes its combination's top-k; no token content is read).
        gating: "softmax", "sigmoid" or, in ``"bias"`` mode only, "laplace" (negative
            distances to expert keys, as in ``token_choice``).
        normalize: renormalise the chosen k weights to sum to 1.
        jitter_eps: multiplicative input noise in training (``"bias"`` mode only: the
            ``"sample"`` mode reads no tokens).
        hidden: the combination MLP's width (default ``max(8, 2 * M)``).

    Accepts an expert mask (``allowed``): experts a token may not use get -inf logits. In
    ``"sample"`` mode a token whose mask differs from the rest of its sample's (experts
    reserved for one modality) takes its combination's best experts among those it may use.

    Supports ``keep_experts``: the token gate ``weight`` [E, D] and the MLP's last layer
    (``combo_out`` [E, H], ``combo_out_bias`` [E]) have one row per expert, and pruning keeps
    the same rows of each.
    """

    accepts_mask = True

    #: Routes by each sample's set of present modalities, read from its tokens' modality ids:
    #: it needs absent modalities to contribute no tokens (the ``mask`` missing-modality
    #: strategy, not ``bank``).
    reads_present_set = True

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        modalities: Sequence[str],
        k: int = 2,
        mode: str = "bias",
        gating: str = "softmax",
        normalize: bool = True,
        jitter_eps: float = 0.0,
        hidden: int | None = None,
    ) -> None:
        super().__init__(dim=dim, num_experts=num_experts, k=k)
        check_gating(gating)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        if not modalities:
            raise ValueError("modality_combination needs at least one modality name in `modalities`")
        if mode == "sample" and gating == "laplace":
            raise ValueError("gating 'laplace' scores tokens against expert keys; mode 'sample' reads no tokens")
        if mode == "sample" and jitter_eps > 0:
            raise ValueError("jitter_eps perturbs the tokens the router reads; mode 'sample' reads none")
        hidden = max(8, 2 * len(modalities)) if hidden is None else hidden
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.modalities, self.mode, self.hidden = tuple(modalities), mode, hidden
        self.gating, self.normalize, self.jitter_eps = gating, normalize, jitter_eps
        m = len(self.modalities)
        if mode == "bias":  # the token gate, as token_choice's
            self.weight = nn.Parameter(torch.empty(num_experts, dim))  # [E, D]
            nn.init.normal_(self.weight, std=1.0 if gating == "laplace" else 1 / math.sqrt(dim))
        # The combination MLP: multi-hot present set [M] -> hidden [H] -> expert bias [E].
        self.combo_in = nn.Parameter(torch.randn(hidden, m) / math.sqrt(m))  # [H, M]
        self.combo_in_bias = nn.Parameter(torch.zeros(hidden))  # [H]
        self.combo_out = nn.Parameter(torch.zeros(num_experts, hidden))  # [E, H]
        self.combo_out_bias = nn.Parameter(torch.zeros(num_experts))  # [E]
        if mode == "sample":
            nn.init.normal_(self.combo_out, std=1 / math.sqrt(hidden))

    @property
    def expert_params(self) -> dict[str, int]:  # type: ignore[override]
        rows = {"combo_out": 0, "combo_out_bias": 0}
        return {"weight": 0, **rows} if self.mode == "bias" else rows

    def combination_logits(self, present: Tensor) -> Tensor:
        """present: [S, M] bool -> [S, E]: the bias each combination adds to its tokens'
        logits (``"bias"`` mode), or its whole logits (``"sample"`` mode)."""
        h = F.gelu(F.linear(present.to(self.combo_in.dtype), self.combo_in, self.combo_in_bias))
        return F.linear(h, self.combo_out, self.combo_out_bias)

    def forward(self, x: Tensor, modality: Tensor, sample: Tensor, allowed: Tensor | None = None) -> Routing:
        """x: [T, D]; modality: [T] ids into ``modalities``; sample: [T] sample ids (any
        non-negative ints); allowed: [T, E] experts each token may use (None: all)."""
        check_modality_ids(modality, len(self.modalities))
        present, row = present_sets(modality, sample, len(self.modalities))
        combination = self.combination_logits(present).index_select(0, row)  # [T, E]
        if self.mode == "bias":
            x = jitter(x, self.jitter_eps, self.training)
            logits = laplace_logits(x, self.weight) if self.gating == "laplace" else x @ self.weight.t()
            logits = logits + combination.to(logits.dtype)
        else:
            logits = combination
        logits = mask_logits(logits, allowed)
        index, weight, probs = top_k_gating(logits, self.k, gating=self.gating, normalize=self.normalize)
        return Routing(expert_index=index, weight=weight, probs=probs, logits=logits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}, modalities={list(self.modalities)}, hidden={self.hidden}"
