"""Fusion: where and how modality streams meet.

Every fusion takes the encoders' tokens, one ``Tokens`` per modality in a fixed order
(modality id i is the i-th), and returns each modality's pooled representation after
fusion, ``[B, M, D]``, with which of them exist (``[B, M]``), each modality's final token
states (for token-level objectives such as masked modelling), plus the aux losses and
routing records of every MoE layer it ran. A sample's absent modality has no tokens; streams run
only on the rows that have their modality, so nothing is computed from placeholders.

- ``early``: one transformer over all modalities' tokens (single-stream; VLMo, LIMoE).
- ``late``: a transformer per modality, pooled; the head combines them (MultiBench's late fusion).
- ``bottleneck``: a transformer per modality whose streams exchange information only
  through a few shared fusion tokens (Nagrani et al. 2021, "Attention Bottlenecks for
  Multimodal Fusion"): each layer, every present stream updates its copy of the fusion
  tokens and the copies are averaged.
- ``cross``: a transformer per modality that, before each block, cross-attends to the other
  modalities' tokens (ViLBERT/LXMERT-style co-attention). A learned null key lets a sample
  with a single modality attend to "nothing" instead of producing NaNs.

``early`` and ``late`` support token reduction (``reduction=``, a ``model.reduction``
``TokenReducer`` handed to their trunks): the trunks hand back states at the original
positions, and pooling skips pruned ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalmoe.encoders.base import Tokens
from modalmoe.model.blocks import RoutingLog, Trunk, TrunkOutput, TrunkShape, collect
from modalmoe.model.reduction import SUPPORTED_FUSIONS, TokenReducer
from modalmoe.moe.types import RoutingRecord
from modalmoe.registry import Registry

fusions: Registry = Registry("fusion")


@dataclass
class FusionOutput:
    """What a fusion returns.

    Attributes:
        pooled: [B, M, D] per-modality representations.
        present: [B, M] which exist.
        aux_losses: name -> aux loss summed over MoE layers.
        records: one routing record per MoE layer.
        tokens: per modality, in id order, its final token states [B, N_m, D] (zero where
            that modality's mask is False; N_m is the width of its input stream).
    """

    pooled: Tensor
    present: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    records: list[RoutingRecord] = field(default_factory=list)
    tokens: list[Tensor] = field(default_factory=list)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """x: [B, N, D], mask: [B, N] -> [B, D] mean over real tokens (0 for a row without any)."""
    weight = mask.to(x.dtype).unsqueeze(-1)
    return (x * weight).sum(1) / weight.sum(1).clamp_min(1.0)


def _stream_ids(rows: Tensor, n: int, modality: int) -> Tensor:
    return torch.full((rows.shape[0], n), modality, dtype=torch.long, device=rows.device)


class Fusion(nn.Module):
    """Base: ``forward(streams: list[Tokens], task=None) -> FusionOutput``; ``task``: [B] the
    task id of each sample, for MoE layers whose experts are reserved by task (None: none).

    Args (shared by every fusion): ``modalities``: the names, in id order; ``shape``: the
    sizes of its trunks or streams (``TrunkShape``); ``reduction``: token reduction for its
    trunks (see ``set_reduction``). A new fusion is a subclass registered with
    ``@fusions.register(name)`` that takes these (and its own options, which
    ``build_model`` passes from ``config.fusion``).
    """

    def __init__(self, *, modalities: Sequence[str], shape: TrunkShape, reduction: TokenReducer | None = None) -> None:
        super().__init__()
        if not modalities:
            raise ValueError("a fusion needs at least one modality")
        self.modalities = tuple(modalities)
        self.shape = shape
        self.dim = shape.dim
        if reduction is not None:
            Fusion.set_reduction(self, reduction)  # refuses it: fusions with trunks take it there

    def set_reduction(self, reduction: TokenReducer | None) -> None:
        """Hand its trunks a token reduction part (None: none); fusions without trunks that
        can run on reduced tokens refuse one."""
        if reduction is not None:
            raise ValueError(
                f"token reduction works with the fusions {SUPPORTED_FUSIONS}, not {type(self).__name__}: bottleneck "
                "and cross fusion exchange tokens between streams position by position every layer"
            )


@fusions.register("early")
class EarlyFusion(Fusion):
    """One trunk over the concatenated tokens of every modality; ``reduction``: see ``Trunk``."""

    def __init__(self, *, modalities: Sequence[str], shape: TrunkShape, reduction: TokenReducer | None = None) -> None:
        super().__init__(modalities=modalities, shape=shape)
        self.trunk = Trunk(shape, reduction=reduction)

    def set_reduction(self, reduction: TokenReducer | None) -> None:
        self.trunk.set_reduction(reduction)

    def forward(self, streams: list[Tokens], task: Tensor | None = None) -> FusionOutput:
        x = torch.cat([s.x for s in streams], 1)
        mask = torch.cat([s.mask for s in streams], 1)
        modality = torch.cat([torch.full_like(s.mask, i, dtype=torch.long) for i, s in enumerate(streams)], 1)
        out = self._packed(x, mask, modality, task)
        widths = [s.mask.shape[1] for s in streams]
        tokens = list(out.x.split(widths, 1))  # the trunk zeroes padding
        # After token reduction, pool only the positions that still carry a state.
        masks = [s.mask for s in streams] if out.mask is None else list(out.mask.split(widths, 1))
        pooled = [masked_mean(x, m) for x, m in zip(tokens, masks, strict=True)]
        present = torch.stack([s.mask.any(1) for s in streams], 1)
        return FusionOutput(torch.stack(pooled, 1), present, out.aux_losses, out.records, tokens)

    def _packed(self, x: Tensor, mask: Tensor, modality: Tensor, task: Tensor | None) -> TrunkOutput:
        """The trunk over each row's real tokens only, packed to the left and cut to the longest
        row, then put back in place (padding comes out as 0, as the trunk leaves it).

        Samples that lack most modalities (a task mixture's, or missing sensors) would
        otherwise spend attention and dense-FFN FLOPs on every other modality's padding; the
        same tokens meet the same keys either way, so the outputs are the same. A trunk with
        token reduction keeps the full layout (its keep counts are per position)."""
        real = mask.sum(1)
        length = int(real.max()) if real.numel() else 0
        if self.trunk.reduction is not None or length in (0, mask.shape[1]):
            return self.trunk(x, mask, modality, task=task)
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :length]  # [B, L] real first
        wide = order.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        out = self.trunk(x.gather(1, wide), mask.gather(1, order), modality.gather(1, order), task=task)
        placed = x.new_zeros(x.shape).scatter(1, wide, out.x)
        return TrunkOutput(placed, out.aux_losses, out.records, mask=None)


@fusions.register("late")
class LateFusion(Fusion):
    """A trunk per modality over its own tokens; streams never see each other. ``reduction``
    (see ``Trunk``) is handed to every trunk."""

    def __init__(self, *, modalities: Sequence[str], shape: TrunkShape, reduction: TokenReducer | None = None) -> None:
        super().__init__(modalities=modalities, shape=shape)
        self.trunks = nn.ModuleList(Trunk(shape, reduction=reduction) for _ in modalities)

    def set_reduction(self, reduction: TokenReducer | None) -> None:
        for trunk in self.trunks:
            trunk.set_reduction(reduction)

    def forward(self, streams: list[Tokens], task: Tensor | None = None) -> FusionOutput:
        batch = streams[0].x.shape[0]
        result = RoutingLog()
        pooled, tokens = [], []
        for i, (s, trunk) in enumerate(zip(streams, self.trunks, strict=True)):
            rows = s.mask.any(1).nonzero().squeeze(1)
            column, states = s.x.new_zeros(batch, self.dim), s.x.new_zeros(batch, s.x.shape[1], self.dim)
            if rows.numel():
                x, mask = s.x.index_select(0, rows), s.mask.index_select(0, rows)
                out = trunk(x, mask, _stream_ids(rows, x.shape[1], i), sample=rows, task=task)
                pool = mask if out.mask is None else out.mask  # after token reduction: what is left
                column = column.index_copy(0, rows, masked_mean(out.x, pool))
                states = states.index_copy(0, rows, out.x)
                result.records.extend(out.records)
                collect(result, out.aux_losses, None)
            pooled.append(column)
            tokens.append(states)
        present = torch.stack([s.mask.any(1) for s in streams], 1)
        return FusionOutput(torch.stack(pooled, 1), present, result.aux_losses, result.records, tokens)


class _Streams(Fusion):
    """Per-modality stacks of blocks advanced layer by layer (bottleneck and cross)."""

    def __init__(self, *, modalities: Sequence[str], shape: TrunkShape, reduction: TokenReducer | None = None) -> None:
        super().__init__(modalities=modalities, shape=shape, reduction=reduction)
        self.depth = shape.depth
        self.streams = nn.ModuleList(nn.ModuleList(shape.blocks()) for _ in modalities)
        self.norms = nn.ModuleList(nn.LayerNorm(self.dim) for _ in modalities)

    def finish(self, streams: list[Tokens], xs: list[Tensor], result: RoutingLog) -> FusionOutput:
        tokens = [norm(x) * s.mask.unsqueeze(-1) for norm, x, s in zip(self.norms, xs, streams, strict=True)]
        pooled = [masked_mean(x, s.mask) for x, s in zip(tokens, streams, strict=True)]
        present = torch.stack([s.mask.any(1) for s in streams], 1)
        return FusionOutput(torch.stack(pooled, 1), present, result.aux_losses, result.records, tokens)


@fusions.register("bottleneck")
class BottleneckFusion(_Streams):
    """Per-modality streams that share ``bottleneck_tokens`` fusion tokens (MBT).

    Args:
        bottleneck_tokens: number of shared fusion tokens (MBT uses 4).
    """

    def __init__(
        self,
        *,
        modalities: Sequence[str],
        shape: TrunkShape,
        bottleneck_tokens: int = 4,
        reduction: TokenReducer | None = None,
    ) -> None:
        if bottleneck_tokens < 1:
            raise ValueError(f"bottleneck_tokens must be >= 1, got {bottleneck_tokens}")
        super().__init__(modalities=modalities, shape=shape, reduction=reduction)
        self.bottleneck = nn.Parameter(torch.randn(bottleneck_tokens, self.dim) * 0.02)

    def forward(self, streams: list[Tokens], task: Tensor | None = None) -> FusionOutput:
        batch, nb = streams[0].x.shape[0], self.bottleneck.shape[0]
        xs = [s.x * s.mask.unsqueeze(-1) for s in streams]
        rows_of = [s.mask.any(1).nonzero().squeeze(1) for s in streams]
        z = self.bottleneck.expand(batch, nb, self.dim)
        result = RoutingLog()
        for layer in range(self.depth):
            z_sum, count = torch.zeros_like(z), z.new_zeros(batch, 1, 1)
            for i, (s, rows) in enumerate(zip(streams, rows_of, strict=True)):
                if not rows.numel():
                    continue
                n = s.x.shape[1]
                x = torch.cat([xs[i].index_select(0, rows), z.index_select(0, rows)], 1)
                mask = torch.cat([s.mask.index_select(0, rows), s.mask.new_ones(rows.shape[0], nb)], 1)
                sample = rows.unsqueeze(1).expand(-1, n + nb)
                out = self.streams[i][layer](x, mask, _stream_ids(rows, n + nb, i), sample, task=task)
                collect(result, out.aux_losses, out.record)
                xs[i] = xs[i].index_copy(0, rows, out.x[:, :n])
                z_sum = z_sum.index_add(0, rows, out.x[:, n:])
                count = count.index_add(0, rows, count.new_ones(rows.shape[0], 1, 1))
            z = z_sum / count.clamp_min(1.0)
        return self.finish(streams, xs, result)


class CrossAttention(nn.Module):
    """Pre-norm cross-attention with a learned null key/value always available.

    Args:
        dim: token width D.
        heads: attention heads.
    """

    def __init__(self, *, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.null = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        """x: [B, N, D] queries; memory: [B, S, D] with mask [B, S] -> [B, N, D] (no residual)."""
        b, n, d = x.shape
        memory = torch.cat([self.null.expand(b, 1, d), self.norm_kv(memory)], 1)
        keep = torch.cat([memory_mask.new_ones(b, 1), memory_mask], 1)
        h = self.heads
        q = self.q(self.norm_q(x)).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(memory).view(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return self.out(y.transpose(1, 2).reshape(b, n, d))


@fusions.register("cross")
class CrossFusion(_Streams):
    """Per-modality streams; before each block a stream cross-attends to all other streams."""

    def __init__(self, *, modalities: Sequence[str], shape: TrunkShape, reduction: TokenReducer | None = None) -> None:
        super().__init__(modalities=modalities, shape=shape, reduction=reduction)
        self.cross = nn.ModuleList(
            nn.ModuleList(CrossAttention(dim=self.dim, heads=shape.heads) for _ in range(self.depth))
            for _ in modalities
        )

    def forward(self, streams: list[Tokens], task: Tensor | None = None) -> FusionOutput:
        xs = [s.x * s.mask.unsqueeze(-1) for s in streams]
        rows_of = [s.mask.any(1).nonzero().squeeze(1) for s in streams]
        result = RoutingLog()
        for layer in range(self.depth):
            previous = list(xs)  # every stream reads the others' tokens from the same layer
            for i, (s, rows) in enumerate(zip(streams, rows_of, strict=True)):
                if not rows.numel():
                    continue
                others = [j for j in range(len(streams)) if j != i]
                x, mask = previous[i].index_select(0, rows), s.mask.index_select(0, rows)
                if others:
                    memory = torch.cat([previous[j].index_select(0, rows) for j in others], 1)
                    memory_mask = torch.cat([streams[j].mask.index_select(0, rows) for j in others], 1)
                    x = (x + self.cross[i][layer](x, memory, memory_mask)) * mask.unsqueeze(-1)
                n = x.shape[1]
                sample = rows.unsqueeze(1).expand(-1, n)
                out = self.streams[i][layer](x, mask, _stream_ids(rows, n, i), sample, task=task)
                collect(result, out.aux_losses, out.record)
                xs[i] = xs[i].index_copy(0, rows, out.x)
        return self.finish(streams, xs, result)
