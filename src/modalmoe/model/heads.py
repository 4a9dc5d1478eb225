"""Heads: what the model outputs from the fused representation.

- ``classification``: logits ``[B, C]`` (cross-entropy);
- ``multilabel``: logits ``[B, C]``, one independent label each (binary cross-entropy);
- ``regression``: ``[B]`` for one target, ``[B, C]`` for several (MSE);
- ``TaskHeads``: one classification head per member of a task mixture
  (``modalmoe.data.tasks.mixture``), each over its own classes; a sample's logits are its own
  task's, every other task's classes held at the lowest finite value;
- the embedding head: one projection per modality of that modality's pooled representation,
  L2-normalised, for contrastive training and cross-modal retrieval (CLIP's towers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEAD_KINDS = ("classification", "multilabel", "regression")


class Head(nn.Module):
    """LayerNorm then a linear map from the fused representation.

    Args:
        kind: one of ``HEAD_KINDS``.
        dim: input width D.
        outputs: classes, labels or regression targets.
    """

    def __init__(self, *, kind: str, dim: int, outputs: int) -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {kind!r}; choose one of {HEAD_KINDS}")
        if outputs < 1:
            raise ValueError(f"a {kind} head needs outputs >= 1, got {outputs}")
        self.kind, self.outputs = kind, outputs
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, outputs)

    def forward(self, x: Tensor, task: Tensor | None = None) -> Tensor:
        """x: [B, D] -> [B, outputs] ([B] for a single regression target); one head serves
        every sample, so ``task`` is not read."""
        y = self.linear(self.norm(x))
        return y.squeeze(-1) if self.kind == "regression" and self.outputs == 1 else y


class TaskHeads(nn.Module):
    """One classification head per task of a mixture, side by side in the mixture's labels.

    Args:
        dim: input width D.
        tasks: task label -> its number of classes, in the mixture's task-id order (task i's
            classes are the labels after those of tasks 0..i-1).
    """

    kind = "classification"

    def __init__(self, *, dim: int, tasks: dict[str, int]) -> None:
        super().__init__()
        if not tasks or any(int(n) < 1 for n in tasks.values()):
            raise ValueError(f"task heads need each task's number of classes (>= 1), got {tasks!r}")
        self.sizes = {str(k): int(v) for k, v in tasks.items()}
        self.outputs = sum(self.sizes.values())
        self.heads = nn.ModuleList(Head(kind="classification", dim=dim, outputs=n) for n in self.sizes.values())
        owner = torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(list(self.sizes.values())))
        self.register_buffer("owner", owner, persistent=False)  # [C] the task each label belongs to

    @property
    def names(self) -> list[str]:
        return list(self.sizes)

    def forward(self, x: Tensor, task: Tensor | None = None) -> Tensor:
        """x: [B, D], task: [B] task ids -> [B, C] logits, each row its own task's head's
        logits in its classes and the dtype's lowest finite value elsewhere."""
        if task is None:
            raise ValueError(
                "a model with one head per task needs each sample's task id (batch.meta['task'], as a task "
                "mixture's batches carry it)"
            )
        logits = torch.cat([head(x) for head in self.heads], dim=-1)  # [B, C]: each head on every row
        own = self.owner.unsqueeze(0) == task.unsqueeze(1)  # [B, C]
        return logits.masked_fill(~own, torch.finfo(logits.dtype).min)

    def extra_repr(self) -> str:
        return f"tasks={self.sizes}"


class EmbeddingHead(nn.Module):
    """Per-modality projections to a shared, L2-normalised embedding space.

    Args:
        modalities: names, in id order.
        dim: input width D.
        embed_dim: output width.
    """

    def __init__(self, *, modalities: Sequence[str], dim: int, embed_dim: int) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.proj = nn.ModuleDict({m: nn.Linear(dim, embed_dim, bias=False) for m in modalities})

    def forward(self, pooled: Tensor, present: Tensor) -> dict[str, Tensor]:
        """pooled: [B, M, D], present: [B, M] -> name -> [B, embed_dim] (0 where absent)."""
        return {
            m: F.normalize(self.proj[m](pooled[:, i]), dim=-1) * present[:, i : i + 1].to(pooled.dtype)
            for i, m in enumerate(self.modalities)
        }
