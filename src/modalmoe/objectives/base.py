"""The objective contract, its registry, and the batch helpers objectives share.

An objective reads the model's output for a batch (and may run the model again, on a
changed batch) and returns named, unweighted loss terms::

    terms = objective(output, batch, model)      # {"loss": tensor(0.69)}

Extra forward passes go through ``model(...)``, never its submodules, so a
``DistributedDataParallel`` wrapper sees them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modalmoe.data.batch import MultimodalBatch
from modalmoe.model.multimodal import ModelOutput, MultimodalModel
from modalmoe.registry import Registry

objectives: Registry = Registry("objective")


class Objective(nn.Module):
    """Base: ``forward(output, batch, model) -> dict[str, Tensor]`` of scalar loss terms.

    A term named ``"loss"`` is reported under the objective's name, any other ``sub`` as
    ``"<objective>/<sub>"``. Every term counts in the total, times the objective's weight.
    Objectives with their own parameters (a temperature, a head) are trained with the model.
    """

    def forward(self, output: ModelOutput, batch: MultimodalBatch, model: nn.Module) -> dict[str, Tensor]:
        """Args: output: ``model(batch)``; batch: the batch; model: the (possibly wrapped) model."""
        raise NotImplementedError


def unwrap(model: nn.Module) -> MultimodalModel:
    """The ``MultimodalModel`` inside a DDP (or similar ``.module``) wrapper."""
    return getattr(model, "module", model)


def logits_of(output: ModelOutput, objective: str) -> Tensor:
    """output.logits, or a clear error for a model without a prediction head."""
    if output.logits is None:
        raise ValueError(f"objective {objective!r} reads the prediction head; this model has only an embedding head")
    return output.logits


def has_data(output: ModelOutput) -> Tensor:
    """[B, M] which modalities each sample's encoders really saw (after modality dropout).

    Unlike ``output.present``, bank tokens standing in for a missing modality do not count.
    """
    if output.inputs is None:
        return output.present
    return torch.stack([t.mask.any(1) for t in output.inputs], 1)


def zero_loss(module: nn.Module, like: Tensor | None = None) -> Tensor:
    """A scalar 0 connected to ``module``'s parameters, so backward still runs (with zero
    gradients) when a batch gives an objective nothing to learn from."""
    params = [p for p in module.parameters() if p.requires_grad]
    if params:
        return sum((p.sum() for p in params), params[0].new_zeros(())) * 0.0
    return torch.zeros((), device=None if like is None else like.device)


def select_rows(batch: MultimodalBatch, rows: Tensor) -> MultimodalBatch:
    """The samples at ``rows`` (long [R]) as a new batch. A modality none of them has leaves
    ``inputs`` (the batch contract); per-sample ``meta`` tensors are indexed too."""
    present = {k: v.index_select(0, rows.to(v.device)) for k, v in batch.present.items()}
    index = rows.tolist()
    inputs, masks = {}, {}
    for name, value in batch.inputs.items():
        if name in present and not bool(present[name].any()):
            continue
        inputs[name] = [value[i] for i in index] if isinstance(value, list) else value[index]
        if name in batch.masks:
            masks[name] = batch.masks[name][index]
    size = len(batch)
    meta = {
        k: v[index] if isinstance(v, Tensor) and v.dim() and v.shape[0] == size else v for k, v in batch.meta.items()
    }
    return MultimodalBatch(inputs=inputs, present=present, target=batch.target[index], masks=masks, meta=meta)


def permute_modality(batch: MultimodalBatch, name: str, order: Tensor) -> MultimodalBatch:
    """The batch with modality ``name`` of sample i taken from sample ``order[i]`` (order: long
    [B]); every other modality, the targets and meta stay in place."""
    index = order.tolist()
    value = batch.inputs[name]
    inputs = {**batch.inputs, name: [value[j] for j in index] if isinstance(value, list) else value[index]}
    masks = dict(batch.masks)
    if name in masks:
        masks[name] = masks[name][index]
    present = {**batch.present, name: batch.present[name][index]}
    return MultimodalBatch(inputs=inputs, present=present, target=batch.target, masks=masks, meta=dict(batch.meta))
