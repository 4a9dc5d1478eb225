"""Sequences (audio frames, sensor series): standardised channels, patches over time, positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalmoe.encoders.base import Encoder, Standardize, encoders, sinusoidal_positions


@encoders.register("sequence")
class SequenceEncoder(Encoder):
    """[B, L, C] with a frame mask [B, L] -> one token per ``patch`` frames.

    A 1-D convolution with stride ``patch`` embeds each patch (PatchTST-style patching keeps
    long sensor series affordable); sinusoidal positions allow any length. Padding frames
    are zeroed before the convolution, and a patch is a token when its first frame is real.

    Args:
        spec: ``ModalitySpec`` of kind sequence, shape ``(None, C)``.
        dim: token width D.
        patch: frames per token (1: one token per frame).
    """

    def __init__(self, *, spec, dim: int, patch: int = 1) -> None:
        super().__init__(spec=spec, dim=dim)
        if patch < 1:
            raise ValueError(f"patch must be >= 1, got {patch}")
        channels = spec.shape[-1]
        self.patch = patch
        self.standardize = Standardize(channels)
        self.proj = nn.Conv1d(channels, dim, patch, stride=patch)

    def fit(self, x: Tensor, present: Tensor, mask: Tensor | None = None) -> None:
        """Channel statistics from training data: x [N, L, C], mask [N, L]."""
        self.require_samples(present)
        mask = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask
        self.standardize.fit(x, mask & present.unsqueeze(1))

    def embed(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        x = self.standardize(x) * mask.unsqueeze(-1)
        pad = (-x.shape[1]) % self.patch
        if pad:
            x, mask = F.pad(x, (0, 0, 0, pad)), F.pad(mask, (0, pad))
        tokens = self.proj(x.transpose(1, 2)).transpose(1, 2)  # [P, L / patch, D]
        tokens = tokens + sinusoidal_positions(tokens.shape[1], self.dim, device=x.device)
        return tokens, mask[:, :: self.patch]
