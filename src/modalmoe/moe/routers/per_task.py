"""Per-task gates (MMoE, Ma et al. 2018; M3ViT, Fan et al. 2022): one gating network per task
over one shared pool of experts, so each task of a mixture picks its own mix of experts while
the experts themselves are shared."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from modalmoe.moe.routers import routers
from modalmoe.moe.routers.base import Router, check_gating, grouped_logits, jitter, mask_logits, task_ids, top_k_gating
from modalmoe.moe.types import Routing


@routers.register("per_task")
class PerTaskRouter(Router):
    """A separate top-k gate per task.

    Args:
        dim: token width D.
        num_experts: E.
        tasks: task labels; task id i is ``tasks[i]`` (a task mixture's members, filled in by
            the model builder).
        k: experts per token.
        gating: "softmax", "sigmoid" or "laplace".
        normalize: renormalise the chosen weights to sum to 1.
        jitter_eps: multiplicative input noise in training.
    """

    expert_params = {"weight": 1}
    accepts_mask = True
    accepts_task = True

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        tasks: Sequence[str],
        k: int = 2,
        gating: str = "softmax",
        normalize: bool = True,
        jitter_eps: float = 0.0,
    ) -> None:
        super().__init__(dim=dim, num_experts=num_experts, k=k)
        check_gating(gating)
        if not tasks:
            raise ValueError("per_task needs the task labels in `tasks` (train it on a task mixture)")
        self.tasks = tuple(tasks)
        self.gating, self.normalize, self.jitter_eps = gating, normalize, jitter_eps
        self.weight = nn.Parameter(torch.empty(len(self.tasks), num_experts, dim))  # [G, E, D]
        nn.init.normal_(self.weight, std=1.0 if gating == "laplace" else 1 / math.sqrt(dim))

    def forward(
        self, x: Tensor, modality: Tensor, sample: Tensor, allowed: Tensor | None = None, task: Tensor | None = None
    ) -> Routing:
        """x: [T, D]; task: [T] ids into ``tasks``; allowed: [T, E] experts each token may use
        (None: all); modality, sample: unused."""
        task = task_ids(task, self.tasks, x.shape[0], x.device)
        x = jitter(x, self.jitter_eps, self.training)
        logits = mask_logits(grouped_logits(x, task, self.weight, self.gating), allowed)
        index, weight, probs = top_k_gating(logits, self.k, gating=self.gating, normalize=self.normalize)
        return Routing(expert_index=index, weight=weight, probs=probs, logits=logits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tasks={list(self.tasks)}"
