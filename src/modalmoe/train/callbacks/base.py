"""The trainer callback's interface (its hooks: see ``modalmoe.train.callbacks``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import nn


class Callback:
    """Base: every hook does nothing (see the module docstring for when each is called)."""

    name: ClassVar[str] = ""
    handles: ClassVar[tuple[str, ...]] = ()
    fixed_parameters: int = 0

    def init_transform(self) -> Callable | None:
        return None

    def on_model(self, model: nn.Module, init_report) -> None:
        pass

    def on_objectives(self, model: nn.Module, objectives: nn.Module, init_report) -> None:
        pass

    def on_optimizer(self, optimizer) -> None:
        pass

    def before_update(self, model: nn.Module, batch) -> dict[str, float]:
        return {}

    def after_update(self, step: int, epoch: int, records: list, log) -> str:
        return ""

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
