"""Soft MoE (Puigcerver et al. 2024, "From Sparse to Soft Mixtures of Experts").

There is no discrete assignment: each expert owns ``p`` slots; a slot's input is a convex
combination of tokens (dispatch weights, a softmax over tokens), and each token's output is
a convex combination of slot outputs (combine weights, a softmax over slots).

Slots are formed per sample: the softmax over tokens runs within each sample id, so
samples never mix and padding never leaks into a slot.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalmoe.moe.routers import routers
from modalmoe.moe.routers.base import Router
from modalmoe.moe.types import Routing, SoftSlots


def sample_layout(sample: Tensor) -> tuple[Tensor, Tensor, int, int]:
    """Place flat tokens in a ``[B, N]`` grid by sample id.

    Args:
        sample: [T] sample id per token (any integers, any order).

    Returns:
        (batch_index [T], position [T], B, N): token t sits at ``[batch_index[t], position[t]]``.
    """
    _, batch_index = torch.unique(sample, return_inverse=True)
    batch = int(batch_index.max()) + 1 if batch_index.numel() else 0
    order = torch.sort(batch_index, stable=True).indices
    counts = torch.bincount(batch_index, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(batch_index)
    position[order] = torch.arange(order.numel(), device=sample.device) - starts[batch_index[order]]
    length = int(counts.max()) if batch else 0
    return batch_index, position, batch, length


@routers.register("soft")
class SoftRouter(Router):
    """Soft MoE slots.

    Args:
        dim: token width D.
        num_experts: E.
        slots_per_expert: p.
        k: experts summarised per token in the routing record (the compute uses all slots).
    """

    expert_params = {"slot_keys": 0}

    def __init__(self, *, dim: int, num_experts: int, slots_per_expert: int = 1, k: int = 1) -> None:
        super().__init__(dim=dim, num_experts=num_experts, k=k)
        if slots_per_expert < 1:
            raise ValueError(f"slots_per_expert must be >= 1, got {slots_per_expert}")
        self.slots_per_expert = slots_per_expert
        self.slot_keys = nn.Parameter(torch.empty(num_experts * slots_per_expert, dim))
        nn.init.normal_(self.slot_keys, std=1 / math.sqrt(dim))
        # The paper l2-normalises tokens and keys and learns a scale, for stability at width.
        self.scale = nn.Parameter(torch.tensor(math.sqrt(dim) ** 0.5))

    def forward(self, x: Tensor, modality: Tensor, sample: Tensor) -> Routing:
        """x: [T, D]; sample: [T] groups tokens into samples."""
        batch_index, position, batch, length = sample_layout(sample)
        num_slots = self.num_experts * self.slots_per_expert
        logits = self.scale * F.normalize(x, dim=-1) @ F.normalize(self.slot_keys, dim=-1).t()  # [T, S]
        grid = logits.new_full((batch, length, num_slots), float("-inf"))
        grid[batch_index, position] = logits
        dispatch = torch.softmax(grid, dim=1)  # over each sample's tokens; padding gets exp(-inf) = 0
        combine = torch.softmax(logits, dim=-1)  # [T, S], over slots
        combine_grid = torch.zeros_like(grid)
        combine_grid[batch_index, position] = combine
        probs = combine.view(-1, self.num_experts, self.slots_per_expert).sum(-1)  # [T, E]
        weight, index = torch.topk(probs, self.k, dim=-1)
        slots = SoftSlots(dispatch, combine_grid, batch_index, position, self.slots_per_expert)
        return Routing(expert_index=index, weight=weight, probs=probs, logits=None, soft=slots)
