"""Training objectives: supervised, contrastive, matching, masked modelling; OGM-GE.

Each objective is registered by name and returns named, unweighted loss terms; an
``ObjectiveSet`` weights and sums them::

    from modalmoe.objectives import build_objectives
    losses = build_objectives(cfg.train.objectives, head_kind=model.head.kind, dim=model.fusion.dim)
    output = model(batch)
    total, terms = losses(output, batch, model)   # terms: {"cross_entropy": ..., "infonce/audio-image": ...}

- ``cross_entropy``, ``bce``, ``mse`` (``supervised.py``): the prediction head's losses;
- ``infonce`` (``contrastive.py``): CLIP's symmetric InfoNCE between modality pairs;
- ``matching`` (``matching.py``): ALBEF/ViLT-style matching against swapped-modality negatives;
- ``masked`` (``masked.py``): masked modelling of one modality's tokens;
- ``distill`` (``distill.py``): knowledge distillation from a trained run (the teacher);
- ``ogm_ge`` (``ogm.py``): not a loss but a gradient modulation for modality imbalance.

Adding an objective: one new file with an ``Objective`` subclass registered by name and an
import below. Its keyword arguments are its ``options``; an argument named ``dim`` receives
the model width.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from modalmoe.config import ObjectiveConfig
from modalmoe.data.batch import MultimodalBatch
from modalmoe.model.multimodal import ModelOutput
from modalmoe.objectives import contrastive, distill, masked, matching, supervised  # noqa: F401  (registration)
from modalmoe.objectives.base import Objective, objectives
from modalmoe.objectives.ogm import ogm_ge

#: The loss an empty objective list means, by head kind.
SUPERVISED = {"classification": "cross_entropy", "multilabel": "bce", "regression": "mse"}


class ObjectiveSet(nn.Module):
    """Weighted objectives.

    Args:
        objectives: name -> objective.
        weights: name -> weight in the total.
    """

    def __init__(self, objectives: Mapping[str, Objective], weights: Mapping[str, float]) -> None:
        super().__init__()
        if set(objectives) != set(weights):
            raise ValueError(f"objectives {sorted(objectives)} and weights {sorted(weights)} name different sets")
        self.objectives = nn.ModuleDict(objectives)
        self.weights = dict(weights)

    def forward(self, output: ModelOutput, batch: MultimodalBatch, model: nn.Module) -> tuple[Tensor, dict]:
        """Args: output: ``model(batch)``; model: the model (possibly DDP-wrapped).

        Returns:
            (the weighted sum, a scalar; name -> each unweighted term). Terms are named
            ``"<objective>"`` or ``"<objective>/<sub>"``.
        """
        total, terms = output.fused.new_zeros(()), {}
        for name, objective in self.objectives.items():
            for sub, value in objective(output, batch, model).items():
                terms[name if sub == "loss" else f"{name}/{sub}"] = value
                total = total + self.weights[name] * value
        return total, terms


def build_objectives(
    configs: Sequence[ObjectiveConfig | Mapping], *, head_kind: str | None, dim: int | None = None
) -> ObjectiveSet:
    """Component builder: the ``ObjectiveSet`` of a training config.

    Args:
        configs: ``ObjectiveConfig`` s (or their mappings); empty: the head's supervised loss
            (classification: ``cross_entropy``, multilabel: ``bce``, regression: ``mse``).
        head_kind: ``model.head.kind`` (None for an embedding-only model).
        dim: the model width (``model.fusion.dim``), for objectives with their own head
            (``matching``, ``masked``).
    """
    configs = [c if isinstance(c, ObjectiveConfig) else ObjectiveConfig.model_validate(c) for c in configs]
    if not configs:
        if head_kind not in SUPERVISED:
            raise ValueError(
                f"no objectives given and no supervised loss for head kind {head_kind!r}: "
                f"list train.objectives (e.g. infonce) or use a head of kind {list(SUPERVISED)}"
            )
        configs = [ObjectiveConfig(name=SUPERVISED[head_kind])]
    built, weights = {}, {}
    for config in configs:
        if config.name in built:
            raise ValueError(f"objective {config.name!r} is listed twice; give it one entry with all its options")
        cls = objectives.get(config.name)  # unknown names: the registry's error, with the known names
        accepted = [n for n in inspect.signature(cls).parameters if n != "dim"]
        unknown = sorted(set(config.options) - set(accepted))
        if unknown:
            raise ValueError(f"objective {config.name!r} has no options {unknown}; it takes {accepted or 'none'}")
        options = dict(config.options)
        if "dim" in inspect.signature(cls).parameters:
            options["dim"] = dim
        built[config.name], weights[config.name] = cls(**options), config.weight
    return ObjectiveSet(built, weights)


__all__ = ["SUPERVISED", "Objective", "ObjectiveSet", "build_objectives", "objectives", "ogm_ge"]
