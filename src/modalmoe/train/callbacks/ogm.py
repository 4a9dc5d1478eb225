"""``train.ogm``: OGM-GE gradient modulation (``modalmoe.objectives.ogm``) as a trainer callback."""

from __future__ import annotations

import torch
from rich.console import Console

from modalmoe.config import ExperimentConfig
from modalmoe.objectives.ogm import ogm_ge
from modalmoe.train.callbacks import callbacks
from modalmoe.train.callbacks.base import Callback


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


@callbacks.register("ogm")
def ogm_callback(config: ExperimentConfig, console: Console) -> Callback | None:
    return OGMGE(config.train.ogm) if config.train.ogm.enabled else None
