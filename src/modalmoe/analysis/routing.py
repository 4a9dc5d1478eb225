"""Routing statistics: pure functions of ``RoutingRecord``s for the routing report and the
collapse alarm.

Every function reads a record (detach it first, or join several batches with
``concat_records``) and plain tensors, and returns tensors or floats. Counts are over *kept*
assignments: a (token, choice) pair that was made (``valid``) and not dropped by the capacity
limit (``dropped``). A token routed to k experts counts once for each of them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from modalmoe.moe.types import RoutingRecord


def concat_records(records: list[RoutingRecord], sample_offsets: list[int] | None = None) -> RoutingRecord:
    """Join records of the same MoE layer from several batches into one (detached).

    Args:
        records: records with the same ``num_experts`` and the same number of choices k.
        sample_offsets: added to each record's ``sample`` ids, so ids from different batches
            stay distinct; pass each batch's first row in the dataset to index dataset-wide
            labels. By default each record is shifted past the largest id of those before it
            (right when every batch row has at least one token).

    Returns:
        One record over all ``T = sum T_i`` tokens. ``logits`` is kept only if every record has
        them; ``capacity`` is the common capacity, the largest one if batches differ, or None
        when every record is dropless.
    """
    if not records:
        raise ValueError("concat_records needs at least one record")
    if sample_offsets is not None and len(sample_offsets) != len(records):
        raise ValueError(f"got {len(sample_offsets)} sample offsets for {len(records)} records")
    experts = {r.num_experts for r in records}
    choices = {r.expert_index.shape[1] for r in records}
    if len(experts) > 1 or len(choices) > 1:
        raise ValueError(f"records disagree on experts {sorted(experts)} or choices per token {sorted(choices)}")
    samples, start = [], 0
    for i, r in enumerate(records):
        offset = start if sample_offsets is None else sample_offsets[i]
        samples.append(r.sample.detach() + offset)
        if r.sample.numel():
            start = max(start, int(samples[-1].max()) + 1)

    def cat(name: str) -> Tensor:
        return torch.cat([getattr(r, name).detach() for r in records])

    logits = cat("logits") if all(r.logits is not None for r in records) else None
    capacities = [r.capacity for r in records if r.capacity is not None]
    return RoutingRecord(
        expert_index=cat("expert_index"),
        weight=cat("weight"),
        probs=cat("probs"),
        logits=logits,
        modality=cat("modality"),
        sample=torch.cat(samples),
        dropped=cat("dropped"),
        valid=cat("valid"),
        num_experts=records[0].num_experts,
        capacity=max(capacities) if capacities else None,
        task=cat("task") if all(r.task is not None for r in records) else None,
    )


def kept(record: RoutingRecord) -> Tensor:
    """[T, k] bool: choices that were made and not dropped by the capacity limit."""
    return record.valid.bool() & ~record.dropped.bool()


def tokens_per_expert(record: RoutingRecord, modality: int | None = None) -> Tensor:
    """[E] int64 kept assignments per expert (a token counts once per kept choice).

    Args:
        record: routing record.
        modality: count only this modality's tokens; None counts all.
    """
    mask = kept(record)
    if modality is not None:
        mask = mask & (record.modality == modality).unsqueeze(-1)
    return torch.bincount(record.expert_index[mask], minlength=record.num_experts)


def expert_share(record: RoutingRecord, modality: int | None = None) -> Tensor:
    """[E] fraction of kept assignments per expert (sums to 1; all zeros if nothing was routed).

    With top-k routing a token's k choices are distinct experts, so one expert's share is at
    most 1/k.

    Args:
        record: routing record.
        modality: restrict to this modality's tokens; None uses all.
    """
    counts = tokens_per_expert(record, modality).double()
    return counts / counts.sum().clamp_min(1)


def _joint_counts(record: RoutingRecord, values: Tensor, size: int, weighted: bool, keep: Tensor) -> Tensor:
    """[E, size] float64 kept assignments per (expert, value); ``values``: [T] in [0, size)."""
    mask = kept(record) & keep.unsqueeze(-1)
    cell = record.expert_index * size + values.unsqueeze(-1)
    weights = record.weight.detach().double() if weighted else torch.ones_like(cell, dtype=torch.float64)
    counts = torch.bincount(cell[mask], weights=weights[mask], minlength=record.num_experts * size)
    return counts.double().view(record.num_experts, size)


def expert_modality_counts(record: RoutingRecord, num_modalities: int, *, weighted: bool = False) -> Tensor:
    """[E, M] kept assignments per expert and modality.

    Each of a token's kept choices counts once (or, with ``weighted``, by its gate weight, so a
    token contributes its total routed gate mass rather than k).

    Args:
        record: routing record; ``modality`` ids must lie in ``[0, num_modalities)``.
        num_modalities: M.
        weighted: count gate weights instead of assignments.
    """
    if record.modality.numel() and int(record.modality.max()) >= num_modalities:
        raise ValueError(f"modality id {int(record.modality.max())} >= num_modalities={num_modalities}")
    keep = torch.ones_like(record.modality, dtype=torch.bool)
    return _joint_counts(record, record.modality, num_modalities, weighted, keep)


def expert_task_counts(record: RoutingRecord, num_tasks: int, *, weighted: bool = False) -> Tensor:
    """[E, G] kept assignments per expert and task (a task mixture's records carry each token's
    task id, ``RoutingRecord.task``).

    Raises:
        ValueError: the record has no task ids, or one is outside ``[0, num_tasks)``.
    """
    if record.task is None:
        raise ValueError("this routing record has no task ids (only a task mixture's batches carry them)")
    if record.task.numel() and int(record.task.max()) >= num_tasks:
        raise ValueError(f"task id {int(record.task.max())} >= num_tasks={num_tasks}")
    keep = torch.ones_like(record.task, dtype=torch.bool)
    return _joint_counts(record, record.task, num_tasks, weighted, keep)


def expert_class_counts(record: RoutingRecord, labels: Tensor, num_classes: int, *, weighted: bool = False) -> Tensor:
    """[E, C] kept assignments per expert and class; a token's class is its sample's label.

    Counting is as in ``expert_modality_counts``. Tokens whose sample has a negative label
    (an ignore index such as -100) are skipped.

    Args:
        record: routing record; its ``sample`` ids index ``labels``.
        labels: [B] integer class per sample.
        num_classes: C.
        weighted: count gate weights instead of assignments.
    """
    if record.sample.numel() and int(record.sample.max()) >= labels.shape[0]:
        raise ValueError(f"sample id {int(record.sample.max())} has no label (got {labels.shape[0]} labels)")
    token_class = labels.to(record.sample.device).long()[record.sample]
    if token_class.numel() and int(token_class.max()) >= num_classes:
        raise ValueError(f"label {int(token_class.max())} >= num_classes={num_classes}")
    keep = token_class >= 0
    return _joint_counts(record, token_class.clamp_min(0), num_classes, weighted, keep)


def router_entropy(record: RoutingRecord) -> Tensor:
    """[T] entropy of each token's router distribution ``probs`` in nats (0 log 0 = 0)."""
    p = record.probs.detach().double()
    return -torch.special.xlogy(p, p).sum(-1)


def normalized_entropy(record: RoutingRecord) -> Tensor:
    """[T] ``router_entropy / log E`` in [0, 1]: 1 is uniform, 0 one-hot (zeros when E = 1)."""
    h = router_entropy(record)
    return h / math.log(record.num_experts) if record.num_experts > 1 else torch.zeros_like(h)


def _entropy(p: Tensor) -> float:
    """Entropy in nats of a distribution ``p`` (any shape, sums to 1)."""
    return float(-torch.special.xlogy(p, p).sum())


def _joint(counts: Tensor) -> Tensor | None:
    """[E, X] float64 joint distribution of a count table, or None when it is empty."""
    total = counts.double().sum()
    return counts.double() / total if total > 0 else None


def mutual_information(counts: Tensor) -> float:
    """Mutual information I(E; X) in nats of the joint distribution given by a count table.

    0 when experts and X are independent; ``log K`` when K values of X each go to their own
    expert. 0 for an empty table.

    Args:
        counts: [E, X] non-negative counts (e.g. ``expert_modality_counts``).
    """
    p = _joint(counts)
    if p is None:
        return 0.0
    # H(E) + H(X) - H(E, X); clamped because rounding can leave -1e-16 for independent tables.
    return max(0.0, _entropy(p.sum(1)) + _entropy(p.sum(0)) - _entropy(p))


def normalized_mutual_information(counts: Tensor) -> float:
    """``I(E; X) / min(H(E), H(X))`` in [0, 1]; 0 when either entropy is 0.

    Args:
        counts: [E, X] non-negative counts.
    """
    p = _joint(counts)
    if p is None:
        return 0.0
    bound = min(_entropy(p.sum(1)), _entropy(p.sum(0)))
    return mutual_information(counts) / bound if bound > 1e-12 else 0.0


def specialisation(counts: Tensor) -> Tensor:
    """[E] how far each expert's mix of X departs from the overall mix, in nats.

    ``KL(p(x | e) || p(x))``: 0 when an expert sees X in the same proportions as all tokens do,
    ``-log p(x)`` when it sees only value x (so specialising on a rare value scores higher).
    Experts with no tokens score 0. Averaged with weights ``p(e)`` it is the mutual information.
    LIMoE (Mustafa et al. 2022) reports experts specialising per modality in this sense: some
    take mostly image tokens, some mostly text.

    Args:
        counts: [E, X] non-negative counts.
    """
    counts = counts.double()
    per_expert = counts.sum(1, keepdim=True)
    marginal = counts.sum(0) / counts.sum().clamp_min(1e-300)
    cond = counts / per_expert.clamp_min(1e-300)
    # xlogy(c, c) - xlogy(c, m) is c log(c / m), with 0 wherever c = 0 (m > 0 wherever c > 0).
    return (torch.special.xlogy(cond, cond) - torch.special.xlogy(cond, marginal)).sum(1)


def dominant(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Each expert's most frequent value of X and that value's share of the expert's tokens.

    Args:
        counts: [E, X] non-negative counts.

    Returns:
        [E] int64 argmax over X (0 for experts with no tokens), and [E] float64 its share
        (0 for experts with no tokens).
    """
    counts = counts.double()
    top, index = counts.max(1)
    return index, top / counts.sum(1).clamp_min(1e-300)


def drop_rate(record: RoutingRecord) -> float:
    """Fraction of valid assignments dropped by the capacity limit (0 when dropless or empty)."""
    valid = record.valid.bool()
    made = int(valid.sum())
    return int((record.dropped.bool() & valid).sum()) / made if made else 0.0


def routing_shift(full: RoutingRecord, partial: RoutingRecord, modality: int) -> float:
    """Total-variation distance between a modality's expert shares in two conditions.

    Measures how the routing of one modality's tokens changes when another modality is missing:
    ``0.5 * sum_e |share_full(e) - share_partial(e)|``, 0 for identical routing, 1 when the
    two conditions use disjoint experts.

    Args:
        full: record with every modality present.
        partial: record of the same layer with some other modality missing.
        modality: the modality whose tokens are compared.
    """
    if full.num_experts != partial.num_experts:
        raise ValueError(f"records have {full.num_experts} and {partial.num_experts} experts")
    a, b = expert_share(full, modality), expert_share(partial, modality)
    if a.sum() == 0 or b.sum() == 0:
        raise ValueError(f"modality {modality} has no routed tokens in one of the records")
    return 0.5 * float((a - b).abs().sum())


def token_share(record: RoutingRecord) -> Tensor:
    """[E] fraction of routed tokens that have each expert among their kept choices.

    Unlike ``expert_share`` (a share of assignments, at most 1/k under top-k routing), this
    reaches 1 when every token goes to the same expert, whatever k is.
    """
    keep = kept(record)
    tokens = int(keep.any(1).sum())
    if tokens == 0:
        return record.probs.new_zeros(record.num_experts, dtype=torch.float64)
    hit = torch.zeros(record.expert_index.shape[0], record.num_experts, dtype=torch.bool, device=keep.device)
    hit.scatter_(1, record.expert_index.long(), keep)
    # scatter_ with duplicates is fine: an index repeated in a row carries the same truth value.
    return hit.sum(0).to(torch.float64) / tokens


def collapse_status(record: RoutingRecord, *, max_share: float, min_entropy: float) -> dict[str, Any]:
    """Whether one layer's routing looks collapsed onto few experts.

    Args:
        record: routing record.
        max_share: alarm when one expert receives more than this share of the routed tokens
            (``token_share``; 1.0 means every token).
        min_entropy: alarm when the mean normalised router entropy falls below this.

    Returns:
        ``top_share`` (largest ``token_share``), ``top_expert`` (its index, -1 if nothing was
        routed), ``mean_entropy`` (mean ``normalized_entropy``, NaN without tokens), and the
        booleans ``share_alarm`` and ``entropy_alarm`` (never raised with a single expert, which
        has nothing to collapse onto, or without tokens).
    """
    share = token_share(record)
    routed = bool(share.sum() > 0)
    top_share, top_expert = (float(share.max()), int(share.argmax())) if routed else (0.0, -1)
    tokens = record.probs.shape[0]
    mean_entropy = float(normalized_entropy(record).mean()) if tokens else math.nan
    can_collapse = record.num_experts > 1
    return {
        "top_share": top_share,
        "top_expert": top_expert,
        "mean_entropy": mean_entropy,
        "share_alarm": can_collapse and routed and top_share > max_share,
        "entropy_alarm": can_collapse and tokens > 0 and mean_entropy < min_entropy,
    }


class CollapseMonitor:
    """Warns when a layer's routing stays collapsed for ``patience`` consecutive updates.

    One warning per episode: a layer warns when its streak of alarmed updates reaches
    ``patience``, stays quiet while the alarm holds, and may warn again after it recovers
    (one update without alarm resets it). State is JSON-safe for checkpoints.

        monitor = CollapseMonitor(max_share=0.8, min_entropy=0.2, patience=20)
        for message in monitor.update([r.detach() for r in out.records]):
            log.warning(message)

    Args:
        max_share: see ``collapse_status``.
        min_entropy: see ``collapse_status``.
        patience: alarmed updates in a row before warning.
    """

    def __init__(self, max_share: float = 0.8, min_entropy: float = 0.2, patience: int = 20) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.max_share = max_share
        self.min_entropy = min_entropy
        self.patience = patience
        self.updates = 0
        self.streak: list[int] = []
        self.warned: list[bool] = []

    @property
    def alarming(self) -> bool:
        """True while some layer has warned and not yet recovered."""
        return any(self.warned)

    def update(self, records: list[RoutingRecord], step: int | None = None) -> list[str]:
        """Read one update's records (one per MoE layer) and return any new warnings.

        Args:
            records: one record per MoE layer, in layer order.
            step: the training step to name in messages; defaults to the monitor's update count.
        """
        self.updates += 1
        step = self.updates if step is None else step
        grow = len(records) - len(self.streak)
        self.streak += [0] * max(grow, 0)
        self.warned += [False] * max(grow, 0)
        messages = []
        for layer, record in enumerate(records):
            s = collapse_status(record, max_share=self.max_share, min_entropy=self.min_entropy)
            if not (s["share_alarm"] or s["entropy_alarm"]):
                self.streak[layer], self.warned[layer] = 0, False
                continue
            self.streak[layer] += 1
            if self.streak[layer] >= self.patience and not self.warned[layer]:
                self.warned[layer] = True
                messages.append(self._message(layer, step, s))
        return messages

    def _message(self, layer: int, step: int, s: dict[str, Any]) -> str:
        reasons = []
        if s["share_alarm"]:
            reasons.append(
                f"expert {s['top_expert']} takes {s['top_share']:.1%} of assignments (> {self.max_share:.1%})"
            )
        if s["entropy_alarm"]:
            reasons.append(f"mean normalised router entropy {s['mean_entropy']:.3f} (< {self.min_entropy:.3f})")
        return (
            f"routing collapse in MoE layer {layer} at step {step}, for {self.streak[layer]} updates in a row: "
            f"{'; '.join(reasons)}. Raise the load-balance loss weight, add router jitter noise, "
            "or lower the learning rate."
        )

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe progress (thresholds come from the constructor, so a resume may change them)."""
        return {"updates": self.updates, "streak": list(self.streak), "warned": list(self.warned)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore progress saved by ``state_dict``."""
        if len(state["streak"]) != len(state["warned"]):
            raise ValueError("collapse monitor state has streak and warned lists of different lengths")
        self.updates = int(state["updates"])
        self.streak = [int(v) for v in state["streak"]]
        self.warned = [bool(v) for v in state["warned"]]
