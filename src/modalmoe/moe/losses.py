"""Auxiliary router losses, pure functions of a ``RoutingRecord``.

Training and analysis read the same numbers because both call these functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modalmoe.moe.types import RoutingRecord


def expert_fraction(record: RoutingRecord) -> Tensor:
    """[E] fraction of routed (token, expert) choices per expert, before any capacity drop."""
    index = record.expert_index[record.valid]
    counts = torch.bincount(index.reshape(-1), minlength=record.num_experts).to(record.probs.dtype)
    return counts / counts.sum().clamp_min(1)


def load_balance_loss(record: RoutingRecord) -> Tensor:
    """Switch Transformer / GShard load balance: ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of choices sent to expert e (not differentiable), ``P_e`` the
    mean router probability of e. It equals 1 under perfectly uniform routing and grows to
    E when all tokens go to one expert.
    """
    if record.probs.shape[0] == 0:
        return record.probs.sum() * 0
    return record.num_experts * torch.sum(expert_fraction(record) * record.probs.mean(0))


def router_z_loss(record: RoutingRecord) -> Tensor:
    """ST-MoE's router z-loss: ``mean_t logsumexp(logits_t)^2``; keeps logits small.

    Zero for routers without logits (soft MoE normalises its logits instead).
    """
    if record.logits is None or record.logits.shape[0] == 0:
        return record.probs.sum() * 0
    return torch.logsumexp(record.logits.float(), dim=-1).square().mean()


def _entropy(p: Tensor) -> Tensor:
    """Entropy along the last dim, with 0 log 0 = 0."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def _per_modality(record: RoutingRecord):
    for m in torch.unique(record.modality).tolist():
        yield record.probs[record.modality == m]


def local_entropy_loss(record: RoutingRecord) -> Tensor:
    """LIMoE's local entropy: mean per-token routing entropy, averaged over modalities.

    Minimising it makes each token's routing decisive.
    """
    terms = [_entropy(p).mean() for p in _per_modality(record)]
    return torch.stack(terms).mean() if terms else record.probs.sum() * 0


def global_entropy_loss(record: RoutingRecord, threshold: float | None = None) -> Tensor:
    """LIMoE's global entropy: minus the entropy of each modality's mean routing distribution.

    Minimising it spreads each modality over many experts. With ``threshold`` (LIMoE's tau),
    only entropy below the threshold is penalised: ``relu(threshold - H)``, so a modality may
    settle on a few experts without being pushed to use them all.
    """
    terms = []
    for p in _per_modality(record):
        h = _entropy(p.mean(0))
        terms.append(-h if threshold is None else torch.relu(threshold - h))
    return torch.stack(terms).mean() if terms else record.probs.sum() * 0


def aux_losses(record: RoutingRecord, *, entropy_threshold: float | None = None) -> dict[str, Tensor]:
    """All auxiliary losses of one layer, unweighted; the trainer chooses their weights."""
    return {
        "load_balance": load_balance_loss(record),
        "z_loss": router_z_loss(record),
        "local_entropy": local_entropy_loss(record),
        "global_entropy": global_entropy_loss(record, entropy_threshold),
    }
