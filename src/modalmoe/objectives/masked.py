"""Masked modelling: hide some of a modality's tokens and predict them from the rest.

Tokens are hidden behind the model's learned mask token (BERT, Devlin et al. 2019; MAE,
He et al. 2022) and the model, seeing every other token of every modality, predicts each
hidden token's *encoder output* from its final state through a linear head. Regressing
features of the model's own encoder rather than raw inputs follows data2vec (Baevski et
al. 2022); the target is detached and layer-normalised without parameters (data2vec's
target normalisation), which keeps the target's scale fixed. Unlike data2vec there is no
EMA teacher: pair it with a supervised or contrastive loss, which keeps the encoder
from collapsing to a trivially predictable output.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalmoe.data.batch import MultimodalBatch
from modalmoe.encoders.base import Tokens
from modalmoe.model.multimodal import ModelOutput
from modalmoe.objectives.base import Objective, objectives, unwrap, zero_loss


def draw_token_mask(tokens: Tokens, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """Which tokens to hide: bool [B, N].

    Each sample with n >= 2 real tokens hides ``round(ratio * n)`` of them, at least one and
    never all, uniformly at random (torch's global RNG unless ``generator``); padding and
    absent samples are never hidden. A sample with a single token hides none: hiding it
    would hide the whole modality.

    Args:
        tokens: the modality's ``Tokens`` (only ``mask`` [B, N] is read).
        ratio: fraction of each sample's real tokens to hide.
    """
    mask = tokens.mask
    real = mask.sum(1)
    count = torch.minimum((ratio * real).round().clamp(min=1), real - 1).clamp(min=0)  # [B]
    score = torch.rand(mask.shape, generator=generator, device=mask.device).masked_fill(~mask, 2.0)
    rank = score.argsort(1).argsort(1)  # real tokens rank first, in random order
    return (rank < count.unsqueeze(1)) & mask


@objectives.register("masked")
class MaskedModelling(Objective):
    """MSE between a linear map of hidden tokens' final states and their encoder outputs.

    Runs its own forward pass with ``token_masks`` (the ``output`` it is given is unmasked);
    a batch with nothing to hide gives 0.

    Args:
        dim: the model width D.
        modality: the modality to mask (None: the model's first).
        ratio: fraction of each sample's tokens to hide.
        normalize_target: layer-normalise the targets (data2vec).
    """

    def __init__(
        self, *, dim: int | None = None, modality: str | None = None, ratio: float = 0.3, normalize_target: bool = True
    ) -> None:
        super().__init__()
        if dim is None:
            raise ValueError("objective 'masked' has a prediction head on token states: pass dim=model.fusion.dim")
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"masked: ratio must be in (0, 1), got {ratio}")
        self.modality, self.ratio, self.normalize_target = modality, ratio, normalize_target
        self.head = nn.Linear(dim, dim)

    def forward(self, output: ModelOutput, batch: MultimodalBatch, model) -> dict[str, Tensor]:
        names = unwrap(model).modalities
        name = self.modality or names[0]
        if name not in names:
            raise ValueError(f"masked: unknown modality {name!r}; this model has {names}")
        if not bool(batch.present[name].any()):
            return {"loss": zero_loss(self)}
        i = names.index(name)
        # The mask is drawn from this pass's encoder output: with modality dropout (or text,
        # padded to its longest present sample) the token count is only known there.
        out = model(batch, token_masks={name: partial(draw_token_mask, ratio=self.ratio)})
        hide = out.hidden[name]
        if not bool(hide.any()):
            return {"loss": zero_loss(self)}
        target = out.inputs[i].x.detach()[hide]  # [H, D]
        if self.normalize_target:
            target = F.layer_norm(target, target.shape[-1:])
        states = out.tokens[i].x[:, : hide.shape[1]][hide]  # bank tokens, if any, sit to the right
        return {"loss": F.mse_loss(self.head(states), target)}
