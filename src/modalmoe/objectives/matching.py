"""Cross-modal matching: does this sample's modality belong with the others?

Image-text matching (ITM) as in ALBEF (Li et al. 2021) and ViLT (Kim et al. 2021): a binary
head on the fused representation tells real samples from negatives in which one modality
was swapped with another sample's. The negatives here are random (a derangement), not
ALBEF's hard negatives mined from contrastive similarities, so the objective needs no
embedding head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalmoe.data.batch import MultimodalBatch
from modalmoe.model.multimodal import ModelOutput
from modalmoe.objectives.base import (
    Objective,
    has_data,
    objectives,
    permute_modality,
    select_rows,
    unwrap,
    zero_loss,
)


def derangement(n: int, device: torch.device | str | None = None) -> Tensor:
    """long [n]: a random permutation with no fixed point (n >= 2), from torch's global RNG.

    Sattolo's algorithm in one step: following a random order, each position takes the
    next one's value, giving a uniformly random n-cycle.
    """
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2, got {n}")
    order = torch.randperm(n)
    out = torch.empty(n, dtype=torch.long)
    out[order] = order.roll(-1)
    return out.to(device)


def usable(output: ModelOutput, modality: int) -> Tensor:
    """[B] samples that have ``modality`` and at least one other (after modality dropout)."""
    have = has_data(output)
    return have[:, modality] & (have.sum(1) >= 2)


@objectives.register("matching")
class Matching(Objective):
    """Binary matching loss: real batch (label 1) vs the batch with one modality swapped (0).

    Uses the samples that have the swapped modality and another one; each such sample's
    ``modality`` comes from another such sample in the negative batch, which is run through
    ``model``. Fewer than two usable samples give 0.

    Args:
        dim: the model width D (``output.fused`` is [B, D]).
        modality: the modality to swap (None: the model's first).
    """

    def __init__(self, *, dim: int | None = None, modality: str | None = None) -> None:
        super().__init__()
        if dim is None:
            raise ValueError("objective 'matching' has a head on the fused vector: pass dim=model.fusion.dim")
        self.modality = modality
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 1))

    def forward(self, output: ModelOutput, batch: MultimodalBatch, model) -> dict[str, Tensor]:
        names = unwrap(model).modalities
        name = self.modality or names[0]
        if name not in names or len(names) < 2:
            raise ValueError(f"matching swaps one of at least two modalities; got {name!r}, the model has {names}")
        i = names.index(name)
        rows = usable(output, i).nonzero().squeeze(1)
        if rows.numel() < 2:
            return {"loss": zero_loss(self)}
        negative = permute_modality(select_rows(batch, rows), name, derangement(rows.numel()))
        swapped = model(negative)
        # A negative counts only if the swapped modality and another one survived its own
        # modality dropout; otherwise it is not a mismatched pair.
        fake = swapped.fused[usable(swapped, i)]
        logits = self.head(torch.cat([output.fused.index_select(0, rows), fake])).squeeze(-1)
        target = torch.cat([logits.new_ones(rows.numel()), logits.new_zeros(fake.shape[0])])
        return {"loss": F.binary_cross_entropy_with_logits(logits, target)}
