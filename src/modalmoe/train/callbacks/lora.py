"""``train.lora``: LoRA adapters (``modalmoe.model.lora``) as a trainer callback."""

from __future__ import annotations

from rich.console import Console

from modalmoe.config import ExperimentConfig
from modalmoe.model.lora import apply_lora
from modalmoe.train.callbacks import callbacks
from modalmoe.train.callbacks.base import Callback


class LoRA(Callback):
    """``train.lora``: LoRA adapters on the model's linear layers and expert banks; only they train."""

    name, handles = "lora", ("train.lora",)

    def __init__(self, config, console: Console) -> None:
        self.config, self.console = config, console

    def on_model(self, model, init_report) -> None:
        self.console.print(apply_lora(model, self.config).summary())


@callbacks.register("lora")
def lora_callback(config: ExperimentConfig, console: Console) -> Callback | None:
    return LoRA(config.train.lora, console) if config.train.lora.rank else None
