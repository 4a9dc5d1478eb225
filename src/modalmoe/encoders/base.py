"""The encoder base: the ``Tokens`` contract, the modality embedding, input standardisation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from modalmoe.data.formats import DataFormatError
from modalmoe.registry import Registry

encoders: Registry = Registry("encoder")

# Fewest present training samples an encoder fits input statistics on (one has no spread).
MIN_FIT_SAMPLES = 2


@dataclass
class Tokens:
    """Tokens of one modality.

    Attributes:
        x: [B, N, D] token embeddings (zero where ``mask`` is False).
        mask: [B, N] True for real tokens; all False for a sample without the modality.
        aux_losses: auxiliary losses of MoE layers inside the encoder (``text_minilm_moe``),
            by name; the model adds them to its own (``ModelOutput.aux_losses``).
    """

    x: Tensor
    mask: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)


class Encoder(nn.Module):
    """Base: subclasses implement ``embed`` on the present samples' rows only.

    Args:
        spec: the modality's ``ModalitySpec``.
        dim: token width D.
    """

    def __init__(self, *, spec, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.spec, self.dim = spec, dim
        self.modality_embedding = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.modality_embedding, std=0.02)

    def fit(self, x, present: Tensor, mask: Tensor | None = None) -> None:
        """Set data-dependent state (input statistics, a tokenizer) from the training split.
        x: [N, ...] (strings for text), present: [N], mask: [N, L] for sequences."""

    def require_samples(self, present: Tensor, minimum: int = MIN_FIT_SAMPLES) -> None:
        """Refuse to fit input statistics on fewer than ``minimum`` present training samples.

        One sample has no spread (its std is NaN), so the statistics would be made up and the
        run would only fail later, far from the cause (a NaN loss blamed on the learning rate).

        Raises:
            DataFormatError: naming the modality (an exit-2 usage error in the CLI).
        """
        count = int(present.sum())
        if count >= minimum:
            return
        carry = "sample carries" if count == 1 else "samples carry"
        raise DataFormatError(
            f"modality {self.spec.name!r}: {count} training {carry} it, but its input statistics (mean and std "
            f"per feature) need at least {minimum}; add training samples that carry it, or leave the modality out"
        )

    def embed(self, x, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """x: the present samples' rows -> ([P, N, D] tokens, [P, N] mask)."""
        raise NotImplementedError

    def embed_with_losses(self, x, mask: Tensor | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``embed`` and the auxiliary losses of MoE layers inside the encoder (none here)."""
        tokens, token_mask = self.embed(x, mask)
        return tokens, token_mask, {}

    def forward(self, x, present: Tensor, mask: Tensor | None = None) -> Tokens:
        """x: [B, ...] (a list of strings for text); present: [B] bool; mask: [B, L] for
        sequences -> ``Tokens``. Rows of absent samples are not read."""
        batch = present.shape[0]
        if bool(present.all()):  # the common case: no copy in, no scatter out
            tokens, token_mask, losses = self.embed_with_losses(x, mask)
            tokens = (tokens + self.modality_embedding) * token_mask.unsqueeze(-1)
            return Tokens(tokens, token_mask, losses)
        rows = present.nonzero().squeeze(1)
        if isinstance(x, list):
            kept = [x[i] for i in rows.tolist()]
        else:
            kept = x.index_select(0, rows)
        kept_mask = None if mask is None else mask.index_select(0, rows)
        tokens, token_mask, losses = self.embed_with_losses(kept, kept_mask)
        tokens = (tokens + self.modality_embedding) * token_mask.unsqueeze(-1)
        out = tokens.new_zeros(batch, tokens.shape[1], self.dim).index_copy(0, rows, tokens)
        out_mask = token_mask.new_zeros(batch, tokens.shape[1]).index_copy(0, rows, token_mask)
        return Tokens(out, out_mask, losses)


class Standardize(nn.Module):
    """(x - mean) / std per feature, with statistics set from training data (identity until set).

    Feature scales of real data differ by orders of magnitude (mfeat's views, raw sensor
    axes), and an encoder should not depend on the user remembering to standardise.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))

    @torch.no_grad()
    def fit(self, x: Tensor, mask: Tensor | None = None) -> None:
        """x: [N, ..., F] training inputs (``mask`` [N, L] for sequences).

        A feature whose statistics are not finite (fewer than two rows, an Inf in the data)
        keeps mean 0 and std 1: standardising must never turn inputs into NaN. Encoders
        refuse too few samples before this (``Encoder.require_samples``)."""
        flat = x[mask] if mask is not None else x.reshape(-1, x.shape[-1])
        mean = flat.mean(0) if len(flat) else torch.zeros_like(self.mean)
        std = flat.std(0) if len(flat) > 1 else torch.ones_like(self.std)
        self.mean.copy_(torch.where(mean.isfinite(), mean, 0.0))
        self.std.copy_(torch.where(std.isfinite(), std.clamp(min=1e-6), 1.0))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def sinusoidal_positions(length: int, dim: int, device=None) -> Tensor:
    """[length, dim] fixed sine/cosine positions (Vaswani et al. 2017); any length."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    out = torch.zeros(length, dim, device=device)
    out[:, 0::2] = torch.sin(position * freq)
    out[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return out
