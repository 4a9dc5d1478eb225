"""Dispatch: sort token-expert assignments by expert, run the expert bank, combine.

Pure functions; nothing here holds parameters or state.

Capacity semantics are explicit: ``capacity_factor=None`` means dropless (every assignment
runs). A number > 0 caps each expert at ``ceil(capacity_factor * T * k / E)`` assignments;
the overflow is dropped, contributes nothing, and the token passes through the layer's
residual path unchanged. 0 or a negative number is an error, never "not set".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from modalmoe.moe.experts import ExpertBank, GroupedLayout
from modalmoe.moe.types import Routing, SoftSlots


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float | None) -> int | None:
    """Assignments each expert may take: ``ceil(capacity_factor * T * k / E)``, or None (dropless)."""
    if capacity_factor is None:
        return None
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
        raise TypeError(f"capacity_factor must be a number or None (dropless), got {capacity_factor!r}")
    if not capacity_factor > 0:
        raise ValueError(
            f"capacity_factor must be > 0 (or None for dropless routing), got {capacity_factor}; "
            "0 does not mean 'unset' here"
        )
    return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


@dataclass(frozen=True)
class DispatchPlan:
    """Assignments sorted by expert.

    ``A`` is the number of kept assignments. Choices are ranked first by choice order (all
    first choices before any second choice, as in GShard) and then by token position, or by
    token priority when one is given (V-MoE's batch-prioritised routing), so a capacity
    limit drops second choices first, and among them the last (or lowest-priority) tokens'.

    Attributes:
        token: [A] token index of each kept assignment, sorted by expert.
        choice: [A] flat index into the ``[T, k]`` routing tensors.
        counts: [E] kept assignments per expert.
        dropped: [T, k] choices dropped by the capacity limit.
        layout: how the expert bank lays out the sorted rows.
    """

    token: Tensor
    choice: Tensor
    counts: Tensor
    dropped: Tensor
    layout: GroupedLayout


def plan_dispatch(
    expert_index: Tensor,
    num_experts: int,
    *,
    valid: Tensor | None = None,
    capacity: int | None = None,
    priority: Tensor | None = None,
) -> DispatchPlan:
    """Sort the ``[T, k]`` assignments by expert and apply the capacity limit.

    Args:
        expert_index: [T, k] chosen experts.
        num_experts: E.
        valid: [T, k] which choices are real (None: all).
        capacity: max assignments per expert (None: dropless).
        priority: [T] token priority (higher is kept first; ties by position), e.g. each
            token's top gate weight (V-MoE); None: by position. Matters only under a capacity.
    """
    num_tokens, k = expert_index.shape
    # Tokens in rank order (position, or descending priority): rank r holds token rows[r].
    rows = None
    if priority is not None and capacity is not None:
        if priority.shape != (num_tokens,):
            raise ValueError(f"priority must be [T] = ({num_tokens},), got {tuple(priority.shape)}")
        rows = torch.sort(priority, descending=True, stable=True).indices
        expert_index = expert_index.index_select(0, rows)
        valid = None if valid is None else valid.index_select(0, rows)
    # Choice-major order: flat position j * T + r.
    flat_expert = expert_index.t().reshape(-1)
    if valid is not None:
        flat_expert = torch.where(valid.t().reshape(-1), flat_expert, num_experts)  # invalid sort last
    order = torch.sort(flat_expert, stable=True).indices
    sorted_expert = flat_expert[order]
    counts = torch.bincount(sorted_expert, minlength=num_experts + 1)[:num_experts]
    num_valid = int(counts.sum())
    order, sorted_expert = order[:num_valid], sorted_expert[:num_valid]
    dropped_flat = torch.zeros(num_tokens * k, dtype=torch.bool, device=expert_index.device)
    if capacity is not None and int(counts.max()) > capacity:
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(num_valid, device=order.device) - starts[sorted_expert]
        keep = rank < capacity
        dropped_flat[order[~keep]] = True
        order = order[keep]
        counts = counts.clamp(max=capacity)
    token = order % num_tokens
    dropped = dropped_flat.view(k, num_tokens).t()
    if rows is not None:  # back from rank order to token order
        token = rows[token]
        dropped = torch.empty_like(dropped).index_copy_(0, rows, dropped)
    choice = token * k + order // num_tokens
    layout = GroupedLayout.plan(counts.tolist())
    return DispatchPlan(token=token, choice=choice, counts=counts, dropped=dropped, layout=layout)


def uniform_routing(routing: Routing) -> Routing:
    """Replace the chosen experts by a perfectly balanced round robin (token t, choice j ->
    expert ``(t*k + j) % E``), keeping the router's probabilities as gate weights.

    For benchmarks: it measures the kernel apart from routing imbalance (as megablocks does).
    """
    num_tokens, k = routing.expert_index.shape
    num_experts = routing.num_experts
    index = torch.arange(num_tokens * k, device=routing.probs.device).view(num_tokens, k) % num_experts
    return Routing(
        expert_index=index,
        weight=routing.probs.gather(1, index),
        probs=routing.probs,
        logits=routing.logits,
        aux=routing.aux,
    )


def dispatch_combine(x: Tensor, weight: Tensor, plan: DispatchPlan, experts: ExpertBank) -> Tensor:
    """Run the experts on the planned assignments and sum them back per token.

    Args:
        x: [T, D] tokens.
        weight: [T, k] gate weights.
        plan: from ``plan_dispatch``.
        experts: the expert bank.

    Returns:
        [T, D]: ``sum_j weight[t, j] * expert_{e_tj}(x[t])`` over kept choices; 0 for a token
        whose every choice was dropped.
    """
    gate = weight.reshape(-1).index_select(0, plan.choice)
    y = experts(x, plan.layout, gate, index=plan.token)
    return torch.zeros_like(x).index_add_(0, plan.token, y)


def dispatch_outputs(x: Tensor, plan: DispatchPlan, experts: ExpertBank, k: int) -> Tensor:
    """Run the experts on the planned assignments, ungated, and lay the outputs out per choice.

    For combines other than the gate-weighted sum (``moe/communication.py``), which need each
    choice's output on its own before mixing.

    Args:
        x: [T, D] tokens.
        plan: from ``plan_dispatch``.
        experts: the expert bank.
        k: choices per token (the second dim of the routing tensors).

    Returns:
        [T, k, D]: ``expert_{e_tj}(x[t])`` at ``[t, j]`` for kept choices, 0 for invalid or
        dropped ones.
    """
    y = experts(x, plan.layout, None, index=plan.token)
    return x.new_zeros(x.shape[0] * k, x.shape[-1]).index_copy(0, plan.choice, y).view(x.shape[0], k, -1)


def soft_dispatch_combine(x: Tensor, slots: SoftSlots, experts: ExpertBank) -> Tensor:
    """Soft MoE: mix each sample's tokens into slots, run expert e on its slots, mix back.

    Args:
        x: [T, D] tokens.
        slots: from the soft router.
        experts: the expert bank (each expert takes ``p`` slots of every sample).

    Returns:
        [T, D].
    """
    batch, length, num_slots = slots.dispatch.shape
    num_experts, p = num_slots // slots.slots_per_expert, slots.slots_per_expert
    padded = x.new_zeros(batch, length, x.shape[-1])
    padded[slots.batch_index, slots.position] = x
    slot_in = slots.dispatch.transpose(1, 2) @ padded  # [B, S, D]
    # Expert e's rows: slots e*p .. e*p+p-1 of every sample, contiguous for the kernel.
    rows = slot_in.view(batch, num_experts, p, -1).transpose(0, 1).reshape(num_experts * batch * p, -1)
    layout = GroupedLayout.plan([batch * p] * num_experts, rows=batch * p)
    slot_out = experts(rows, layout).view(num_experts, batch, p, -1).transpose(0, 1).reshape(batch, num_slots, -1)
    out = slots.combine @ slot_out  # [B, N, D]
    return out[slots.batch_index, slots.position]
