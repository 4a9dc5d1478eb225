"""Missing modalities: handled, not faked.

An absent modality never reaches an encoder (its rows are not read) and, by default,
contributes no tokens: attention masks them out and the MoE layers never route them
(the ``mask`` strategy). Two learned alternatives:

- ``bank`` (Flex-MoE, Yun et al. 2024): a missing modality is represented by learned
  tokens from a *missing-modality bank*, conditioned on which modalities the sample does
  have. Flex-MoE indexes the bank by the full combination of present modalities; we
  factorise it additively (a base embedding per missing modality plus one learned offset
  per present modality). For up to three modalities this is exactly as expressive as one
  entry per combination, and it grows as M^2 instead of 2^M, so six views (mfeat) stay small.
- modality dropout (Neverova et al. 2016, ModDrop): in training, each present modality of
  each sample is dropped with probability p, keeping at least one, so the model learns to
  predict from any subset.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modalmoe.encoders.base import Tokens


def check_some_present(present: Tensor, modalities) -> None:
    """present: [B, M]. A sample with no modality at all cannot be predicted: say which."""
    empty = (~present.any(1)).nonzero().squeeze(1)
    if empty.numel():
        raise ValueError(
            f"samples {empty.tolist()[:10]}{' ...' if empty.numel() > 10 else ''} have none of the modalities "
            f"{list(modalities)}: every sample needs at least one present modality to be predicted"
        )


def modality_dropout(present: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Drop each present modality of each sample with probability ``p``, keeping at least one.

    Args:
        present: [B, M] bool.
        p: drop probability.

    Returns:
        [B, M] bool, a subset of ``present``; samples that would lose every modality keep
        their original set.
    """
    if p <= 0:
        return present
    keep = torch.rand(present.shape, generator=generator, device=present.device) >= p
    dropped = present & keep
    emptied = ~dropped.any(1, keepdim=True)
    return torch.where(emptied, present, dropped)


class MissingBank(nn.Module):
    """Learned tokens for missing modalities, conditioned on the present ones.

    Args:
        num_modalities: M.
        dim: token width D.
        tokens: bank tokens per missing modality.
    """

    def __init__(self, *, num_modalities: int, dim: int, tokens: int = 1) -> None:
        super().__init__()
        self.tokens = tokens
        self.base = nn.Parameter(torch.randn(num_modalities, tokens, dim) * 0.02)  # [M, n, D]
        self.given = nn.Parameter(torch.zeros(num_modalities, num_modalities, tokens, dim))  # [M, M, n, D]

    def forward(self, streams: list[Tokens], present: Tensor) -> list[Tokens]:
        """Fill each sample's missing modalities with bank tokens.

        Args:
            streams: one ``Tokens`` per modality, in id order.
            present: [B, M] which modalities each sample has.

        Returns:
            new ``Tokens`` per modality in which every sample has tokens.
        """
        n = self.tokens
        cond = present.to(self.base.dtype)
        out = []
        for m, s in enumerate(streams):
            absent = ~present[:, m]
            if not bool(absent.any()):
                out.append(s)
                continue
            # [B, n, D]: base plus the offsets of the modalities this sample has.
            bank = self.base[m] + torch.einsum("bj,jnd->bnd", cond, self.given[m])
            x, mask = s.x, s.mask
            if x.shape[1] < n:
                x = torch.cat([x, x.new_zeros(x.shape[0], n - x.shape[1], x.shape[2])], 1)
                mask = torch.cat([mask, mask.new_zeros(mask.shape[0], n - mask.shape[1])], 1)
            slot = torch.arange(x.shape[1], device=x.device) < n
            fill = absent[:, None] & slot[None, :]  # [B, N]
            bank = torch.cat([bank, bank.new_zeros(bank.shape[0], x.shape[1] - n, bank.shape[2])], 1)
            out.append(Tokens(torch.where(fill.unsqueeze(-1), bank, x), mask | fill))
        return out
