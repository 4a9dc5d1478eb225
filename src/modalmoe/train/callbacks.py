"""Trainer callbacks: features handed to the training loop as parts.

The loop in ``trainer.py`` knows batches, losses, the optimizer, checkpoints, validation and
early stopping, and nothing else. A feature that changes training (LoRA adapters, OGM-GE
gradient modulation, the router-collapse alarm, growing a trained run) is a ``Callback``: a
class with the hooks it needs, built from the config. The trainer builds the callbacks of
the features below it (``builtin_callbacks``); features on higher floors (``modalmoe.lifelong``)
hand theirs to ``Trainer(callbacks=...)``. A new feature is one new class plus, where the
config turns it on, one line in ``builtin_callbacks`` or in its own room's factory.

Hooks, in the order the trainer calls them:

- ``init_transform()``: a ``transform(model, saved_state) -> (state, grown)`` for
  ``train.init_from`` (``train.init.load_matching``), or None;
- ``on_model(model, init_report)``: the built, fitted and initialised model, before the
  objectives exist (LoRA wraps layers here);
- ``on_objectives(model, objectives, init_report)``: both built (growth adds its EWC term);
- ``on_optimizer(optimizer)``: the optimizer, before the first step;
- ``before_update(model, batch) -> dict``: after backward, before gradients are synced and
  the optimizer steps (OGM-GE rescales gradients); returns fields for the train log;
- ``after_update(step, epoch, records, log) -> str``: after each optimizer step with that
  step's last routing records; returns a note for the progress line ("" for none);
- ``state_dict()`` / ``load_state_dict(state)``: JSON-safe state kept in every checkpoint's
  progress under the callback's ``name``, so a resumed run continues it exactly;
- ``fixed_parameters``: parameters counted as trainable that the callback keeps fixed.

``handles`` names the config key a callback implements; the trainer refuses a config that
turns on a feature no callback handles (a grown run trained without its growth callbacks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from rich.console import Console
from torch import nn

from modalmoe.analysis.routing import CollapseMonitor
from modalmoe.config import ExperimentConfig
from modalmoe.model.lora import apply_lora
from modalmoe.objectives.ogm import ogm_ge


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


class LoRA(Callback):
    """``train.lora``: LoRA adapters on the model's linear layers and expert banks; only they train."""

    name, handles = "lora", ("train.lora",)

    def __init__(self, config, console: Console) -> None:
        self.config, self.console = config, console

    def on_model(self, model, init_report) -> None:
        self.console.print(apply_lora(model, self.config).summary())


class OGMGE(Callback):
    """``train.ogm``: on-the-fly gradient modulation (Peng et al. 2022) before each update."""

    name, handles = "ogm", ("train.ogm",)

    def __init__(self, config) -> None:
        self.config = config

    def before_update(self, model, batch) -> dict[str, float]:
        with torch.no_grad():
            output = model(batch)
        coefficients = ogm_ge(model, output, batch, alpha=self.config.alpha, noise=self.config.noise)
        return {f"ogm/{k}": v for k, v in coefficients.items()}


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


def builtin_callbacks(config: ExperimentConfig, console: Console) -> list[Callback]:
    """The callbacks of the features the config turns on that live below the trainer."""
    train, out = config.train, []
    if train.lora.rank:
        out.append(LoRA(train.lora, console))
    if train.ogm.enabled:
        out.append(OGMGE(train.ogm))
    if train.collapse.enabled and config.model.moe.every:
        out.append(CollapseAlarm(train.collapse, console))
    return out
