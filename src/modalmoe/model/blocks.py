"""Pre-norm transformer blocks whose FFN is dense or a Mixture-of-Experts layer.

Attention is ``F.scaled_dot_product_attention`` with a key padding mask, so padding tokens
(and the tokens of absent modalities) are never attended to. The MoE layer routes only
real tokens (``mask``) and receives each token's modality and sample ids, so modality-aware
routers work and soft MoE forms slots per sample. Every MoE layer's aux losses and routing
record are collected and returned, never stored on a module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalmoe.model.reduction import BlockStats, TokenReducer, TokenState
from modalmoe.moe import FeedForward, MoELayer, build_moe_layer
from modalmoe.moe.types import RoutingRecord


@dataclass
class TrunkOutput:
    """x: [B, N, D]; aux_losses: name -> sum over MoE layers; records: one per MoE layer;
    mask: [B, N] which positions carry a state after token reduction (pruned ones do not;
    merged ones carry their merged token's state), or None when the trunk reduced nothing."""

    x: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    records: list[RoutingRecord] = field(default_factory=list)
    mask: Tensor | None = None


@dataclass
class BlockOutput:
    """What a block returns.

    Attributes:
        x: [B, N', D] its output tokens (zero on padding); N' = N unless ``reduce`` shrank them.
        aux_losses: name -> its MoE layer's aux loss (empty for a dense block).
        record: its MoE layer's routing record (None for a dense block).
        stats: what token reduction reads (``BlockStats``), when asked for; else None.
        state: the reduced tokens that ``reduce`` returned between the attention and the FFN
            (their ``x`` is the post-attention tokens; ``x`` above is the block's output); None
            without ``reduce``.
    """

    x: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    record: RoutingRecord | None = None
    stats: BlockStats | None = None
    state: TokenState | None = None


@dataclass
class RoutingLog:
    """Aux losses (summed by name) and routing records gathered from the MoE layers a fusion
    runs over several trunks or streams."""

    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    records: list[RoutingRecord] = field(default_factory=list)


class Block(nn.Module):
    """``x + attn(norm(x))``, then ``x + ffn(norm(x))``.

    Args:
        dim: token width D.
        heads: attention heads (D must be a multiple).
        ffn: a ``FeedForward`` or a ``MoELayer``.
        dropout: on the attention weights and both residual branches (training only).
    """

    def __init__(self, *, dim: int, heads: int, ffn: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn = ffn

    def attention(self, x: Tensor, mask: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(b, n, d))

    def attention_with_stats(
        self, x: Tensor, mask: Tensor, *, size: Tensor | None = None, scores: bool = False
    ) -> tuple[Tensor, BlockStats]:
        """``attention`` plus what token reduction needs.

        Args:
            x: [B, N, D] normalised tokens; mask: [B, N] real tokens.
            size: [B, N] tokens each one stands for after merging: ``log(size)`` is added to
                the logits (ToMe's proportional attention); None for none.
            scores: compute the attention probabilities explicitly (instead of the fused
                kernel) to report the attention each token received.
        """
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = mask[:, None, None, :]
        if size is not None:
            bias = torch.where(bias, size.clamp_min(1e-6).log().to(q.dtype)[:, None, None, :], -math.inf)
        received = None
        if scores:
            logits = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            logits = logits + bias if bias.dtype != torch.bool else logits.masked_fill(~bias, -math.inf)
            probs = logits.softmax(-1)
            weight = mask.to(probs.dtype)  # padding queries do not vote
            received = (probs.mean(1) * weight.unsqueeze(-1)).sum(1) / weight.sum(1, keepdim=True).clamp_min(1.0)
            y = F.dropout(probs, self.dropout, self.training) @ v
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
            )
        return self.out(y.transpose(1, 2).reshape(b, n, d)), BlockStats(k.mean(1), received)

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        modality: Tensor,
        sample: Tensor,
        *,
        size: Tensor | None = None,
        stats: bool = False,
        scores: bool = False,
        reduce: Callable[[Tensor, BlockStats], TokenState] | None = None,
        task: Tensor | None = None,
    ) -> BlockOutput:
        """The block on x: [B, N, D], mask: [B, N] real tokens, modality/sample: [B, N] ids
        (sample ids are rows of the caller's batch).

        Args:
            size, scores: token reduction, as in ``attention_with_stats``.
            stats: report ``BlockStats`` in the output (token reduction).
            reduce: token reduction between the attention and the FFN (ToMe's placement):
                ``(x [B, N, D] post-attention tokens, stats) -> TokenState``; the FFN runs on
                the state's tokens, and the output carries the state.
            task: [B0] the task id of each row of the caller's batch (indexed by ``sample``),
                for MoE layers whose experts are reserved by task; None: none.
        """
        block_stats = None
        if stats or reduce is not None:
            attended, block_stats = self.attention_with_stats(self.norm1(x), mask, size=size, scores=scores)
        else:
            attended = self.attention(self.norm1(x), mask)
        x = x + F.dropout(attended, self.dropout, self.training)
        state = None
        if reduce is not None:
            state = reduce(x, block_stats)
            x, mask, modality, sample = state.x, state.mask, state.modality, state.sample
        h = self.norm2(x)
        if isinstance(self.ffn, MoELayer):
            task_ids = None if task is None else task[sample]
            out = self.ffn(h, modality=modality, sample=sample, mask=mask, task=task_ids)
            y, aux, record = out.x, out.aux_losses, out.record
        else:
            # Only real tokens: padding (and absent modalities' slots) costs no FFN FLOPs,
            # as in the MoE layer, so dense and MoE blocks are compared on the same tokens.
            rows = mask.reshape(-1).nonzero().squeeze(1)
            flat = h.reshape(-1, h.shape[-1])
            y = torch.zeros_like(flat).index_copy(0, rows, self.ffn(flat.index_select(0, rows))).view_as(h)
            aux, record = {}, None
        x = (x + F.dropout(y, self.dropout, self.training)) * mask.unsqueeze(-1)
        return BlockOutput(x, aux, record, block_stats if stats else None, state)


@dataclass(frozen=True)
class TrunkShape:
    """The sizes every trunk, stack of blocks and fusion is built from.

    Args:
        dim, depth, heads: transformer sizes.
        hidden: FFN width of the dense blocks.
        activation: "gelu" or "swiglu".
        moe_every: 0 for a dense trunk; 1 for MoE in every block; 2 for every other block
            (counting from 1).
        moe: arguments of ``build_moe_layer`` (``num_experts``, ``router``, ``k``, ...).
        dropout: see ``Block``.
        expert_hidden: each expert's width (None: ``hidden``).
    """

    dim: int
    depth: int
    heads: int
    hidden: int
    activation: str = "gelu"
    moe_every: int = 0
    moe: dict | None = None
    dropout: float = 0.0
    expert_hidden: int | None = None

    def blocks(self) -> list[Block]:
        """``depth`` new blocks; every ``moe_every``-th one has an MoE FFN."""
        return build_blocks(self)


class Trunk(nn.Module):
    """``shape.depth`` blocks (``TrunkShape``) and a final norm.

    Args:
        shape: the trunk's sizes.
        reduction: token reduction (a ``TokenReducer``, such as ``model.reduction``'s
            ``TokenReduction``; None for none): fewer tokens after (or inside) chosen blocks.
    """

    def __init__(self, shape: TrunkShape, *, reduction: TokenReducer | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(shape.blocks())
        self.norm = nn.LayerNorm(shape.dim)
        self.reduction: TokenReducer | None = None
        self.set_reduction(reduction)

    def set_reduction(self, reduction: TokenReducer | None) -> None:
        """Hand the trunk another token reduction part (None: none), after checking it fits
        the blocks. It holds no parameters, so the weights and state_dict keys stay as they are."""
        if reduction is not None:
            reduction.check(self.blocks)
        self.reduction = reduction

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        modality: Tensor | None = None,
        sample: Tensor | None = None,
        task: Tensor | None = None,
    ) -> TrunkOutput:
        """x: [B, N, D], mask: [B, N] real tokens, modality: [B, N] ids (default 0), sample:
        [B] id of each row in the caller's batch (default ``arange(B)``; fusions that run a
        subset of rows pass their batch indices so routing records name the right samples),
        task: [B0] task id of each row of the caller's batch (see ``Block.forward``)."""
        if not bool(mask.any(1).all()):
            empty = (~mask.any(1)).nonzero().squeeze(1).tolist()
            raise ValueError(f"samples {empty} have no tokens: every sample needs at least one modality")
        b, n, _ = x.shape
        modality = torch.zeros(b, n, dtype=torch.long, device=x.device) if modality is None else modality
        sample = torch.arange(b, device=x.device) if sample is None else sample
        sample = sample.unsqueeze(1).expand(b, n)
        out = TrunkOutput(x * mask.unsqueeze(-1))
        if self.reduction is not None and self.reduction.active:
            return self._forward_reduced(out, mask, modality, sample, task)
        for block in self.blocks:
            result = block(out.x, mask, modality, sample, task=task)
            out.x = result.x
            collect(out, result.aux_losses, result.record)
        out.x = self.norm(out.x) * mask.unsqueeze(-1)
        return out

    def _forward_reduced(
        self, out: TrunkOutput, mask: Tensor, modality: Tensor, sample: Tensor, task: Tensor | None
    ) -> TrunkOutput:
        """The blocks on shrinking tokens; the output goes back to the original positions."""
        reduction = self.reduction
        state = reduction.reduce(reduction.start(out.x, mask, modality, sample), -1)
        for i, block in enumerate(self.blocks):
            size = reduction.bias(state)
            scores = reduction.needs_attention(i)
            # Between this block's attention and its FFN (ToMe's placement), or after it.
            inside = partial(_reduce_inside, reduction, state, i) if reduction.inside(i) else None
            result = block(
                state.x,
                state.mask,
                state.modality,
                state.sample,
                size=size,
                stats=True,
                scores=scores,
                reduce=inside,
                task=task,
            )
            collect(out, result.aux_losses, result.record)
            if result.state is None:
                state = reduction.reduce(replace(state, x=result.x), i, stats=result.stats, record=result.record)
            else:
                state = replace(result.state, x=result.x)
        out.x, out.mask = reduction.restore(state, self.norm(state.x) * state.mask.unsqueeze(-1))
        return out


def _reduce_inside(reduction: TokenReducer, state: TokenState, layer: int, x: Tensor, stats: BlockStats) -> TokenState:
    """``state`` with the post-attention tokens ``x`` of block ``layer``, reduced there."""
    return reduction.reduce(replace(state, x=x), layer, stats=stats)


def collect(into: TrunkOutput | RoutingLog, aux: dict[str, Tensor] | None, record: RoutingRecord | None) -> None:
    """Add one block's aux losses (summed by name) and routing record to ``into``."""
    if record is not None:
        into.records.append(record)
    for name, value in (aux or {}).items():
        into.aux_losses[name] = into.aux_losses[name] + value if name in into.aux_losses else value


def build_blocks(shape: TrunkShape) -> list[Block]:
    """``shape.depth`` blocks; every ``moe_every``-th one (counting from 1) has an MoE FFN whose
    experts are ``expert_hidden`` wide (None: ``hidden``)."""
    if shape.moe_every < 0:
        raise ValueError(f"moe_every must be >= 0, got {shape.moe_every}")
    if shape.moe_every and not shape.moe:
        raise ValueError("moe_every > 0 needs moe=dict(num_experts=..., router=..., ...)")
    dim, hidden, activation = shape.dim, shape.hidden, shape.activation
    blocks = []
    for i in range(1, shape.depth + 1):
        if shape.moe_every and i % shape.moe_every == 0:
            ffn = build_moe_layer(dim=dim, hidden=shape.expert_hidden or hidden, activation=activation, **shape.moe)
        else:
            ffn = FeedForward(dim=dim, hidden=hidden, activation=activation)
        blocks.append(Block(dim=dim, heads=shape.heads, ffn=ffn, dropout=shape.dropout))
    return blocks
