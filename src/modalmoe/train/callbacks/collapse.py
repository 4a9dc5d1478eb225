"""``train.collapse``: the router-collapse alarm (``modalmoe.analysis.routing``) as a trainer callback."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from modalmoe.analysis.routing import CollapseMonitor
from modalmoe.config import ExperimentConfig
from modalmoe.train.callbacks import callbacks
from modalmoe.train.callbacks.base import Callback


class CollapseAlarm(Callback):
    """``train.collapse``: warn (console, progress line, ``metrics.jsonl``) when a MoE layer's
    routing stays collapsed (``modalmoe.analysis.routing.CollapseMonitor``)."""

    name, handles = "collapse", ("train.collapse",)

    def __init__(self, config, console: Console) -> None:
        self.monitor = CollapseMonitor(
            max_share=config.max_share, min_entropy=config.min_entropy, patience=config.patience
        )
        self.console = console

    def after_update(self, step, epoch, records, log) -> str:
        for message in self.monitor.update(records, step=step):
            self.console.print(f"[yellow]warning:[/yellow] step {step}: {message}")
            log.write("alarm", {"step": step, "epoch": epoch, "message": message})
        return " | [yellow]router collapse[/yellow]" if self.monitor.alarming else ""

    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict()

    def load_state_dict(self, state) -> None:
        self.monitor.load_state_dict(state)


@callbacks.register("collapse")
def collapse_callback(config: ExperimentConfig, console: Console) -> Callback | None:
    enabled = config.train.collapse.enabled and config.model.moe.every
    return CollapseAlarm(config.train.collapse, console) if enabled else None
