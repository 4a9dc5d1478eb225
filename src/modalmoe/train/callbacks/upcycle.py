"""``train.upcycle``: sparse upcycling of the dense run ``train.init_from`` (``modalmoe.model.upcycle``)."""

from __future__ import annotations

from rich.console import Console

from modalmoe.config import ExperimentConfig
from modalmoe.model.upcycle import upcycle_transform
from modalmoe.train.callbacks import callbacks
from modalmoe.train.callbacks.base import Callback


class Upcycle(Callback):
    """Hands the trainer the transform that fills the MoE layers with the dense FFNs' copies."""

    name, handles = "upcycle", ("train.upcycle",)

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config

    def init_transform(self):
        return upcycle_transform(self.config.train.upcycle, seed=self.config.train.seed)


@callbacks.register("upcycle")
def upcycle_callback(config: ExperimentConfig, console: Console) -> Callback | None:
    return Upcycle(config) if config.train.upcycle is not None else None
