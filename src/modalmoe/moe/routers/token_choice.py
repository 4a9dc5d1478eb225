"""Token-choice top-k routing: Switch (k=1), GShard and Mixtral (k=2), DeepSeek-V3 (sigmoid).

Each token picks its k best experts. Routing is per token, so samples never interact here
(a capacity limit in the layer does make tokens compete; see ``moe/dispatch.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from modalmoe.moe.routers import routers
from modalmoe.moe.routers.base import Router, check_gating, check_modality_ids, jitter, laplace_logits, top_k_gating
from modalmoe.moe.types import Routing


@routers.register("token_choice")
class TokenChoiceRouter(Router):
    """Top-k token-choice router.

    Args:
        dim: token width D.
        num_experts: E.
        k: experts per token.
        gating: "softmax" (Switch/GShard/Mixtral), "sigmoid" (DeepSeek-V3) or "laplace"
            (FuseMoE: softmax over negative distances to learned expert keys).
        normalize: renormalise the chosen k weights to sum to 1.
        jitter_eps: multiplicative input noise U(1-eps, 1+eps) during training (Switch).
        modalities: modality names, modality id i is ``modalities[i]`` (the model passes the
            task's); only read with ``reserved``.
        reserved: modality name -> expert ids only that modality may use (experts added for a
            new modality, ``modalmoe.lifelong``): they are masked to -inf for every other
            modality, so its routing is what it was before they existed. Unreserved experts
            are open to all. None: no mask, plain top-k.
        tasks: task labels of a model that learned a sequence of tasks (``model.tasks``; the
            model passes them), in order; only read with ``reserved_tasks``.
        reserved_tasks: task label -> expert ids only that task's samples may use (experts
            added for a new task, ``modalmoe.lifelong.tasks``). Which task a forward pass is
            for is the router's ``task`` (an index into ``tasks``, by default the last one);
            ``routing_task`` sets it for a pass. Earlier tasks then route exactly as before.
    """

    expert_params = {"weight": 0}

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        k: int = 2,
        gating: str = "softmax",
        normalize: bool = True,
        jitter_eps: float = 0.0,
        modalities: Sequence[str] = (),
        reserved: Mapping[str, Sequence[int]] | None = None,
        tasks: Sequence[str] = (),
        reserved_tasks: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        super().__init__(dim=dim, num_experts=num_experts, k=k)
        check_gating(gating)
        self.gating, self.normalize, self.jitter_eps = gating, normalize, jitter_eps
        self.modalities = tuple(modalities)
        mask = None if reserved is None else reserved_mask(self.modalities, reserved, num_experts, k)
        self.register_buffer("allowed", mask, persistent=False)  # [M, E] or None
        self.tasks = tuple(tasks)
        if reserved_tasks is not None and reserved is not None:
            both = sorted(set().union(*map(set, reserved.values())) & set().union(*map(set, reserved_tasks.values())))
            if both:
                raise ValueError(f"token_choice: experts {both} are reserved for both a modality and a task")
        task_mask = None
        if reserved_tasks is not None:
            task_mask = reserved_mask(self.tasks, reserved_tasks, num_experts, k, what="task")
        self.register_buffer("task_allowed", task_mask, persistent=False)  # [T, E] or None
        self.task = len(self.tasks) - 1  # the task this pass is for: the last (the one trained now)
        # Laplace gating keeps one key per expert; the others a linear projection [E, D].
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=1.0 if gating == "laplace" else 1 / math.sqrt(dim))

    def forward(self, x: Tensor, modality: Tensor, sample: Tensor) -> Routing:
        """x: [T, D]; modality: [T] ids into ``modalities`` (read only with ``reserved``); sample: [T] unused."""
        x = jitter(x, self.jitter_eps, self.training)
        logits = laplace_logits(x, self.weight) if self.gating == "laplace" else x @ self.weight.t()
        if self.allowed is not None:  # as ModalityExpertsRouter: other modalities' reserved experts are -inf
            check_modality_ids(modality, len(self.modalities))
            logits = logits.masked_fill(~self.allowed[modality], float("-inf"))
        if self.task_allowed is not None:  # experts reserved for other tasks are -inf for this one
            logits = logits.masked_fill(~self.task_allowed[self.task], float("-inf"))
        index, weight, probs = top_k_gating(logits, self.k, gating=self.gating, normalize=self.normalize)
        return Routing(expert_index=index, weight=weight, probs=probs, logits=logits)

    def keep_experts(self, index: Tensor) -> None:
        super().keep_experts(index)
        if self.allowed is not None:
            self.allowed = self.allowed[:, index.to(self.allowed.device)]
        if self.task_allowed is not None:
            self.task_allowed = self.task_allowed[:, index.to(self.task_allowed.device)]


@contextmanager
def routing_task(module: nn.Module, task: int) -> Iterator[None]:
    """Route every ``token_choice`` router under ``module`` for task ``task`` (an index into
    their ``tasks``) inside the ``with`` block; each router's own choice is restored after."""
    found = [m for m in module.modules() if isinstance(m, TokenChoiceRouter) and m.task_allowed is not None]
    saved = [m.task for m in found]
    for m in found:
        if not 0 <= task < len(m.tasks):
            raise ValueError(f"task index {task} out of range for a router with tasks {list(m.tasks)}")
        m.task = task
    try:
        yield
    finally:
        for m, value in zip(found, saved, strict=True):
            m.task = value


def reserved_mask(
    modalities: Sequence[str], reserved: Mapping[str, Sequence[int]], num_experts: int, k: int, what: str = "modality"
) -> Tensor:
    """[M, E] bool: which experts each modality (or task, ``what="task"``) may use when
    ``reserved`` experts belong to one modality each (every unreserved expert is open to all)."""
    option, names = ("reserved", "modalities") if what == "modality" else ("reserved_tasks", "tasks")
    if not modalities:
        raise ValueError(f"token_choice: `{option}` needs the {what} names in `{names}`")
    if not isinstance(reserved, Mapping):
        raise ValueError(
            f"token_choice: `{option}` maps {what} names to expert ids (e.g. image: [8, 9]), got {reserved!r}"
        )
    unknown = sorted(set(reserved) - set(modalities))
    if unknown:
        raise ValueError(
            f"token_choice: `{option}` names {names} {unknown}, which are not among the model's {list(modalities)}"
        )
    mask = torch.ones(len(modalities), num_experts, dtype=torch.bool)
    owner: dict[int, str] = {}
    for name, experts in reserved.items():
        ids = list(experts)
        bad = [e for e in ids if not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"token_choice: `{option}[{name!r}]` has expert ids {bad}, outside [0, {num_experts})")
        for e in ids:
            if owner.setdefault(e, name) != name:
                raise ValueError(f"token_choice: expert {e} is reserved for both {owner[e]!r} and {name!r}")
        for i, other in enumerate(modalities):
            if other != name:
                mask[i, ids] = False
    smallest = int(mask.sum(-1).min())
    if smallest < k:
        raise ValueError(
            f"token_choice: with `{option}`, a {what} can use only {smallest} experts, fewer than k={k}; "
            "reserve fewer experts or add more"
        )
    return mask
