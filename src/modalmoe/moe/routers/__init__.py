"""Routers, one file each, registered by name in ``routers``.

Add a router: write one file here with a class decorated ``@routers.register("name")``
and import it below. Nothing else changes.
"""

from modalmoe.registry import Registry

routers = Registry("router")

# Registration happens on import; these imports must follow the registry's creation.
from modalmoe.moe.routers import (  # noqa: E402, F401
    expert_choice,
    hierarchical,
    modality_combination,
    modality_experts,
    noisy_top_k,
    per_modality,
    per_task,
    soft,
    task_film,
    token_choice,
    top_p,
)
from modalmoe.moe.routers.base import Router  # noqa: E402

__all__ = ["Router", "routers"]
