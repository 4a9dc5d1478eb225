"""Hierarchical routing: a modality-aware choice of an expert group, then top-k inside it.

A two-level gate as in the hierarchical mixture of experts (Jordan & Jacobs 1994,
"Hierarchical Mixtures of Experts and the EM Algorithm"): ``p(e) = p(g) * p(e | g)``. The
group level carries the modality prior, as modality-grouped experts do (VLMo's modality
experts, modality-aware MoE such as MoMa and Uni-MoE), but softly: a learned ``[M, G]``
bias starts each modality on its own group, and the shared group gate may learn to send a
token elsewhere. The expert level is an ordinary top-k over that group's experts.

Experts are split evenly and in order: group g holds experts ``g*S .. g*S+S-1``, ``S = E / G``.
Routing is per token; tokens and samples never interact here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalmoe.moe.routers import routers
from modalmoe.moe.routers.base import Router, check_modality_ids
from modalmoe.moe.types import Routing

MODALITY_BIAS = 1.0  # initial preference of modality i for group i % G, in logits


@routers.register("hierarchical")
class HierarchicalRouter(Router):
    """Top-1 expert group (shared gate plus a per-modality bias), then top-k experts in it.

    Args:
        dim: token width D.
        num_experts: E, divisible by ``groups``.
        modalities: modality names; modality id i is ``modalities[i]``.
        groups: number of groups G; group g holds experts ``g*E/G .. (g+1)*E/G - 1``.
        k: experts per token, all inside the chosen group (``k <= E / G``).
        normalize: renormalise the chosen k weights to sum to 1 (else they are the full
            probabilities ``p(g) p(e | g)``).

    The modality bias starts at ``MODALITY_BIAS`` (1.0) for (modality i, group i % G) and 0
    elsewhere: a mild prior that a token's own content (group logits of scale ~1 at init)
    can override. With ``normalize`` the values of the weights do not depend on ``p(g)``; they
    are multiplied by ``p(g) / stopgrad(p(g))`` (= 1) so the group gate still learns from the
    task loss, not from the auxiliary losses alone.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        modalities: Sequence[str],
        groups: int = 2,
        k: int = 1,
        normalize: bool = True,
    ) -> None:
        super().__init__(dim=dim, num_experts=num_experts, k=k)
        if not modalities:
            raise ValueError("hierarchical needs at least one modality name in `modalities`")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be an integer >= 1, got {groups!r}")
        if num_experts % groups:
            raise ValueError(
                f"num_experts={num_experts} cannot be split evenly into groups={groups}; "
                "choose groups that divide num_experts"
            )
        size = num_experts // groups
        if k > size:
            raise ValueError(f"k={k} is larger than a group ({num_experts} experts / {groups} groups = {size})")
        self.modalities, self.groups, self.group_size, self.normalize = tuple(modalities), groups, size, normalize
        self.group_weight = nn.Parameter(torch.empty(groups, dim))  # W_g, shared by all modalities
        self.weight = nn.Parameter(torch.empty(num_experts, dim))  # W_e
        nn.init.normal_(self.group_weight, std=1 / math.sqrt(dim))
        nn.init.normal_(self.weight, std=1 / math.sqrt(dim))
        bias = torch.zeros(len(modalities), groups)
        bias[torch.arange(len(modalities)), torch.arange(len(modalities)) % groups] = MODALITY_BIAS
        self.modality_bias = nn.Parameter(bias)  # [M, G]

    def forward(self, x: Tensor, modality: Tensor, sample: Tensor) -> Routing:
        """x: [T, D]; modality: [T] ids into ``modalities``.

        Returns:
            Routing with ``probs`` [T, E] = ``p(g) p(e | g)`` (rows sum to 1) and ``logits``
            [T, E] = ``z_g(e) + u_e``, the two-level log-potential: its logsumexp is
            ``log sum_g exp(z_g) sum_{e in g} exp(u_e)``, so the z-loss keeps both levels'
            logits small. (``softmax(logits)`` is not ``probs``: each level normalises on its own.)
        """
        check_modality_ids(modality, len(self.modalities))
        num_tokens, groups, size = x.shape[0], self.groups, self.group_size
        group_logits = x @ self.group_weight.t() + self.modality_bias[modality]  # [T, G]
        expert_logits = x @ self.weight.t()  # [T, E]
        log_pg = F.log_softmax(group_logits.float(), dim=-1)  # [T, G]
        log_pe = F.log_softmax(expert_logits.float().view(num_tokens, groups, size), dim=-1)  # [T, G, S]
        probs = (log_pg.unsqueeze(-1) + log_pe).exp().view(num_tokens, -1).to(x.dtype)

        group = group_logits.argmax(-1)  # [T], top-1 group
        in_group = log_pe.gather(1, group.view(-1, 1, 1).expand(-1, 1, size)).squeeze(1).exp()  # [T, S]
        p_expert, local = torch.topk(in_group, self.k, dim=-1)  # p(e | g), best k in the group
        p_group = log_pg.gather(1, group.unsqueeze(1)).exp()  # [T, 1]
        if self.normalize:
            weight = p_expert / p_expert.sum(-1, keepdim=True) * (p_group / p_group.detach())
        else:
            weight = p_group * p_expert
        logits = group_logits.repeat_interleave(size, dim=-1) + expert_logits
        return Routing(
            expert_index=group.unsqueeze(1) * size + local,
            weight=weight.to(x.dtype),
            probs=probs,
            logits=logits,
        )
