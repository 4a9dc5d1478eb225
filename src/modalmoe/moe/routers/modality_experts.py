"""Modality experts (VLMo, Bao et al. 2022): each modality owns a group of experts.

A token is routed only inside its modality's group, plus an optional shared group open to
every modality (VLMo's vision-language experts). With groups of one expert, or ``k=1`` and
no learned preference, this is VLMo's hard switch; larger groups learn top-k within them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from modalmoe.moe.routers import routers
from modalmoe.moe.routers.base import Router, check_modality_ids, top_k_gating
from modalmoe.moe.types import Routing


def group_mask(
    modalities: Sequence[str],
    groups: Mapping[str, Sequence[int]] | None,
    shared: Sequence[int],
    num_experts: int,
) -> Tensor:
    """[M, E] bool: which experts each modality may use.

    With ``groups=None`` the experts not in ``shared`` are split evenly, in order, among the
    modalities.
    """
    if not modalities:
        raise ValueError("modality_experts needs at least one modality name in `modalities`")
    shared = list(shared)
    if groups is None:
        own = [e for e in range(num_experts) if e not in set(shared)]
        if len(own) < len(modalities):
            raise ValueError(
                f"{len(own)} non-shared experts cannot be split among {len(modalities)} modalities; "
                "raise num_experts or pass `groups`"
            )
        size = len(own) // len(modalities)
        groups = {m: own[i * size : (i + 1) * size] for i, m in enumerate(modalities)}
    unknown = sorted(set(groups) - set(modalities))
    if unknown:
        raise ValueError(f"modality map names {unknown}, which are not among the modalities {list(modalities)}")
    missing = [m for m in modalities if m not in groups]
    if missing:
        raise ValueError(f"modality map has no expert group for {missing}; give every modality a group")
    mask = torch.zeros(len(modalities), num_experts, dtype=torch.bool)
    for i, name in enumerate(modalities):
        experts = list(groups[name]) + shared
        bad = [e for e in experts if not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"modality {name!r} maps to experts {bad}, outside [0, {num_experts})")
        mask[i, experts] = True
    return mask


@routers.register("modality_experts")
class ModalityExpertsRouter(Router):
    """Route each token within its modality's expert group.

    Args:
        dim: token width D.
        num_experts: E.
        modalities: modality names; modality id i is ``modalities[i]``.
        groups: modality name -> its expert ids (default: an even split).
        shared: expert ids every modality may also use.
        k: experts per token, within the allowed group.
        normalize: renormalise the chosen weights to sum to 1.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        modalities: Sequence[str],
        groups: Mapping[str, Sequence[int]] | None = None,
        shared: Sequence[int] = (),
        k: int = 1,
        normalize: bool = True,
    ) -> None:
        super().__init__(dim=dim, num_experts=num_experts, k=k)
        mask = group_mask(modalities, groups, shared, num_experts)
        smallest = int(mask.sum(-1).min())
        if k > smallest:
            raise ValueError(f"k={k} is larger than the smallest modality group ({smallest} experts)")
        self.modalities, self.normalize = tuple(modalities), normalize
        self.register_buffer("allowed", mask, persistent=False)
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=1 / math.sqrt(dim))

    def forward(self, x: Tensor, modality: Tensor, sample: Tensor) -> Routing:
        """x: [T, D]; modality: [T] ids into ``modalities``."""
        check_modality_ids(modality, len(self.modalities))
        logits = (x @ self.weight.t()).masked_fill(~self.allowed[modality], float("-inf"))
        index, weight, probs = top_k_gating(logits, self.k, normalize=self.normalize)
        # Masked experts stay at -inf: they add nothing to the z-loss's logsumexp.
        return Routing(expert_index=index, weight=weight, probs=probs, logits=logits)
