"""Task-conditioned routing by a learned task embedding (FiLM, Perez et al. 2018, applied to the
router's input, in the spirit of Mod-Squad's and TaskMoE's task-aware gates): one gate shared by
every task, whose input each task scales and shifts,

    logits = W ((1 + gamma_t) * x + beta_t),

so tasks can move the same token to different experts while sharing the gate. The task
embeddings start at zero: at initialisation it routes exactly as ``token_choice`` with the
same ``W``, and learns how much the task should matter."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from modalmoe.moe.routers import routers
from modalmoe.moe.routers.base import Router, check_gating, jitter, laplace_logits, mask_logits, task_ids, top_k_gating
from modalmoe.moe.types import Routing


@routers.register("task_film")
class TaskFiLMRouter(Router):
    """Top-k token choice on task-modulated tokens.

    Args:
        dim: token width D.
        num_experts: E.
        tasks: task labels; task id i is ``tasks[i]`` (filled in by the model builder).
        k: experts per token.
        gating: "softmax", "sigmoid" or "laplace".
        normalize: renormalise the chosen weights to sum to 1.
        jitter_eps: multiplicative input noise in training.
    """

    expert_params = {"weight": 0}
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
            raise ValueError("task_film needs the task labels in `tasks` (train it on a task mixture)")
        self.tasks = tuple(tasks)
        self.gating, self.normalize, self.jitter_eps = gating, normalize, jitter_eps
        self.weight = nn.Parameter(torch.empty(num_experts, dim))  # [E, D], shared by every task
        nn.init.normal_(self.weight, std=1.0 if gating == "laplace" else 1 / math.sqrt(dim))
        self.scale = nn.Parameter(torch.zeros(len(self.tasks), dim))  # gamma [G, D]
        self.shift = nn.Parameter(torch.zeros(len(self.tasks), dim))  # beta [G, D]

    def forward(
        self, x: Tensor, modality: Tensor, sample: Tensor, allowed: Tensor | None = None, task: Tensor | None = None
    ) -> Routing:
        """x: [T, D]; task: [T] ids into ``tasks``; allowed: [T, E] (None: all)."""
        task = task_ids(task, self.tasks, x.shape[0], x.device)
        x = jitter(x, self.jitter_eps, self.training)
        h = x * (1 + self.scale[task]) + self.shift[task]
        logits = laplace_logits(h, self.weight) if self.gating == "laplace" else h @ self.weight.t()
        logits = mask_logits(logits, allowed)
        index, weight, probs = top_k_gating(logits, self.k, gating=self.gating, normalize=self.normalize)
        return Routing(expert_index=index, weight=weight, probs=probs, logits=logits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tasks={list(self.tasks)}"
