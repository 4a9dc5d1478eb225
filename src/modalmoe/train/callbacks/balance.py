"""Auxiliary-loss-free load balancing (``moe/balance.py``) as a trainer callback.

Routers built with ``bias_rate`` (``model.moe.router_options``) count their training passes'
expert loads; after each optimizer step this callback moves every bias once from the counts
of that step's micro-batches, summed over all ranks of a distributed run. The biases and
counts are model buffers, so checkpoints carry them and resume is exact.
"""

from __future__ import annotations

from rich.console import Console

from modalmoe.config import ExperimentConfig
from modalmoe.moe.balance import ExpertBias, expert_biases, update_biases
from modalmoe.train.callbacks import callbacks
from modalmoe.train.callbacks.base import Callback


class BiasBalancing(Callback):
    """Update the routers' load-balancing biases after every optimizer step."""

    name, handles = "bias_balance", ("model.moe.router_options.bias_rate",)

    def __init__(self) -> None:
        self.model = None
        self.biases: list[ExpertBias] = []

    def on_model(self, model, init_report) -> None:
        self.model, self.biases = model, expert_biases(model)

    def after_update(self, step: int, epoch: int, records: list, log) -> str:
        if self.model is not None and self.biases:
            update_biases(self.model)
        return ""


@callbacks.register("bias_balance")
def bias_balance_callback(config: ExperimentConfig, console: Console) -> Callback | None:
    return BiasBalancing() if config.model.moe.every else None
