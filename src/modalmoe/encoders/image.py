"""Images: a small convolutional stem, then non-overlapping patches as tokens (ViT-style)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modalmoe.encoders.base import Encoder, encoders


@encoders.register("image")
class ImageEncoder(Encoder):
    """[B, C, H, W] -> one token per ``patch x patch`` patch, with learned positions.

    Args:
        spec: ``ModalitySpec`` of kind image, shape ``(C, H, W)``.
        dim: token width D.
        patch: patch side; H and W must be multiples of it.
        stem_channels: width of the 3x3 convolution before patching (0: no stem).
    """

    def __init__(self, *, spec, dim: int, patch: int = 7, stem_channels: int = 16) -> None:
        super().__init__(spec=spec, dim=dim)
        channels, height, width = spec.shape
        if height % patch or width % patch:
            raise ValueError(
                f"image modality {spec.name!r}: {height}x{width} is not divisible by patch={patch}; "
                "choose a patch that divides both sides"
            )
        stem = nn.Sequential(nn.Conv2d(channels, stem_channels, 3, padding=1), nn.GELU()) if stem_channels else None
        self.patch = patch
        self.stem = stem or nn.Identity()
        self.patchify = nn.Conv2d(stem_channels or channels, dim, patch, stride=patch)
        self.positions = nn.Parameter(torch.randn((height // patch) * (width // patch), dim) * 0.02)

    def embed(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        tokens = self.patchify(self.stem(x)).flatten(2).transpose(1, 2) + self.positions  # [P, N, D]
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=x.device)
