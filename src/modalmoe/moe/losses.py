"""Auxiliary router losses, pure functions of a ``RoutingRecord``.

Training and analysis read the same numbers because both call these functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modalmoe.moe.types import RoutingRecord


def expert_fraction(record: RoutingRecord) -> Tensor:
    """[E] fraction of routed (token, expert) choices per expert, before any capacity drop."""
    # Weighted bincount rather than boolean indexing: no data-dependent shape, no sync.
    counts = torch.bincount(
        record.expert_index.reshape(-1),
        weights=record.valid.reshape(-1).to(record.probs.dtype),
        minlength=record.num_experts,
    ).to(record.probs.dtype)
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


def sequence_balance_loss(record: RoutingRecord) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss: the Switch load balance ``E * sum_e f_e P_e``
    within each sample (its tokens' choice fractions and mean probabilities), averaged over
    samples. It keeps every single sample from crowding onto a few experts, which the
    batch-level loss allows as long as samples disagree. 1 under uniform routing inside
    every sample."""
    if record.probs.shape[0] == 0:
        return record.probs.sum() * 0
    _, sample = torch.unique(record.sample, return_inverse=True)
    samples, experts = int(sample.max()) + 1, record.num_experts
    dtype = record.probs.dtype
    cell = (sample.unsqueeze(1) * experts + record.expert_index).reshape(-1)
    counts = torch.bincount(cell, weights=record.valid.reshape(-1).to(dtype), minlength=samples * experts)
    counts = counts.view(samples, experts).to(dtype)
    fraction = counts / counts.sum(1, keepdim=True).clamp_min(1)
    tokens = torch.bincount(sample, minlength=samples).to(dtype).unsqueeze(1)
    mean_probs = record.probs.new_zeros(samples, experts).index_add(0, sample, record.probs) / tokens
    return (experts * (fraction * mean_probs).sum(1)).mean()


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


def _modality_means(record: RoutingRecord, values: Tensor) -> Tensor:
    """Mean of ``values`` [T, ...] over each modality's tokens -> [M', ...] for the M'
    modalities that have tokens (one scatter, no Python loop over modalities)."""
    modality = record.modality
    size = int(modality.max()) + 1
    sums = values.new_zeros(size, *values.shape[1:]).index_add(0, modality, values)
    counts = torch.bincount(modality, minlength=size)
    seen = counts > 0
    return sums[seen] / counts[seen].to(values.dtype).view(-1, *[1] * (values.dim() - 1))


def local_entropy_loss(record: RoutingRecord) -> Tensor:
    """LIMoE's local entropy: mean per-token routing entropy, averaged over modalities.

    Minimising it makes each token's routing decisive.
    """
    if record.probs.shape[0] == 0:
        return record.probs.sum() * 0
    return _modality_means(record, _entropy(record.probs)).mean()


def global_entropy_loss(record: RoutingRecord, threshold: float | None = None) -> Tensor:
    """LIMoE's global entropy: minus the entropy of each modality's mean routing distribution.

    Minimising it spreads each modality over many experts. With ``threshold`` (LIMoE's tau),
    only entropy below the threshold is penalised: ``relu(threshold - H)``, so a modality may
    settle on a few experts without being pushed to use them all.
    """
    if record.probs.shape[0] == 0:
        return record.probs.sum() * 0
    h = _entropy(_modality_means(record, record.probs))
    return (-h if threshold is None else torch.relu(threshold - h)).mean()


AUX_LOSSES = ("load_balance", "sequence_balance", "z_loss", "local_entropy", "global_entropy")


def aux_losses(
    record: RoutingRecord,
    *,
    entropy_threshold: float | None = None,
    names: tuple[str, ...] = AUX_LOSSES,
) -> dict[str, Tensor]:
    """The named auxiliary losses of one layer, unweighted; the trainer chooses their weights.

    Args:
        record: the layer's routing record.
        entropy_threshold: LIMoE's tau for the global entropy loss.
        names: which losses to compute (a subset of ``AUX_LOSSES``); losses a run does not
            weight need not be computed.
    """
    unknown = sorted(set(names) - set(AUX_LOSSES))
    if unknown:
        raise ValueError(f"unknown aux losses {unknown}; choose from {AUX_LOSSES}")
    compute = {
        "load_balance": lambda: load_balance_loss(record),
        "sequence_balance": lambda: sequence_balance_loss(record),
        "z_loss": lambda: router_z_loss(record),
        "local_entropy": lambda: local_entropy_loss(record),
        "global_entropy": lambda: global_entropy_loss(record, entropy_threshold),
    }
    return {name: compute[name]() for name in names}
