"""Trainer callbacks: features handed to the training loop as parts.

The loop in ``trainer.py`` knows batches, losses, the optimizer, checkpoints, validation and
early stopping, and nothing else. A feature that changes training (LoRA adapters, OGM-GE
gradient modulation, the router-collapse alarm, growing a trained run) is a ``Callback``: a
class with the hooks it needs, built from the config. The trainer builds the callbacks of
the features below it (``builtin_callbacks``); features on higher floors (``modalmoe.lifelong``)
hand theirs to ``Trainer(callbacks=...)``.

A new feature below the trainer is one new file here: a ``Callback`` subclass and a factory
``(config, console) -> Callback | None`` (None when the config leaves the feature off),
registered with ``@callbacks.register(name)``, plus its import line below.

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

from rich.console import Console

from modalmoe.config import ExperimentConfig
from modalmoe.registry import Registry
from modalmoe.train.callbacks.base import Callback

#: Name -> factory ``(config, console) -> Callback | None`` of each feature below the trainer.
callbacks: Registry[Callback | None] = Registry("callback")

# Registration happens on import; these imports must follow the registry's creation.
from modalmoe.train.callbacks import balance, collapse, lora, ogm, upcycle  # noqa: E402, F401


def builtin_callbacks(config: ExperimentConfig, console: Console) -> list[Callback]:
    """The callbacks of the features the config turns on that live below the trainer."""
    built = (callbacks.get(name)(config, console) for name in callbacks.names())
    return [callback for callback in built if callback is not None]


__all__ = ["Callback", "builtin_callbacks", "callbacks"]
