"""Per-expert tensors of a model's MoE layers, and how a grown one takes a run's values
(``grow_tensor``; ``head_state`` for the head of a model that learns a new task)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from modalmoe.moe.layer import MoELayer


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def expert_dims(model: nn.Module) -> dict[str, tuple[int, bool]]:
    """Parameter name -> (its expert dimension, whether it is a router's) for every routed
    expert tensor of ``model``'s MoE layers: the routers' ``expert_params`` (``weight`` [E, D]
    for token choice) and the expert banks' stacked weights (``w_in`` [E, D, W], ``w_out``
    [E, F, D])."""
    out: dict[str, tuple[int, bool]] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, MoELayer):
            for name, dim in module.router.expert_params.items():
                out[_join(prefix, f"router.{name}")] = (dim, True)
            for name, _ in module.experts.named_parameters():
                out[_join(prefix, f"experts.{name}")] = (0, False)
    return out


def shared_expert_names(model: nn.Module) -> set[str]:
    """Parameter names of the MoE layers' always-on shared experts (DeepSeek-MoE)."""
    out = set()
    for prefix, module in model.named_modules():
        if isinstance(module, MoELayer) and module.shared is not None:
            out.update(_join(prefix, f"shared.{name}") for name, _ in module.shared.named_parameters())
    return out


def grow_tensor(value: Tensor, theirs: Tensor, dim: int, router: bool) -> Tensor | None:
    """``value`` (the grown model's fresh tensor) with ``theirs`` (the run's) in its leading
    slice along ``dim``, or None unless the shapes differ only there, with ``value`` larger.

    New router rows start at the mean of the run's rows (a new expert scores like an average
    old one, so the new modality's tokens are not pushed to or away from it at the start);
    new experts keep their fresh init. Old modalities never see new reserved experts either way.
    """
    if value.dim() != theirs.dim() or value.shape[dim] <= theirs.shape[dim]:
        return None
    if any(a != b for i, (a, b) in enumerate(zip(value.shape, theirs.shape, strict=True)) if i != dim):
        return None
    old, new = theirs.shape[dim], value.shape[dim]
    out = value.detach().clone()
    out.narrow(dim, 0, old).copy_(theirs)
    if router:
        out.narrow(dim, old, new - old).copy_(theirs.mean(dim, keepdim=True).expand_as(out.narrow(dim, old, new - old)))
    return out


def head_state(model, saved: Mapping[str, Any]) -> dict[str, Any]:
    """A run's state dict ``saved`` as the grown ``model`` names it: when ``model`` learns a
    new task, the run's ``head.*`` is the head of the task before it (``task_heads.<label>.*``),
    and the new task's ``head`` starts fresh. Unchanged for other models."""
    tasks = model.tasks
    if len(tasks) < 2 or any(key.startswith(f"task_heads.{tasks[-2]}.") for key in saved):
        return dict(saved)  # not a new task, or the checkpoint is this model's own (a resume)
    out = {}
    for key, value in saved.items():
        if key.startswith("head."):
            out[f"task_heads.{tasks[-2]}.{key[len('head.') :]}"] = value
        else:
            out[key] = value
    return out
