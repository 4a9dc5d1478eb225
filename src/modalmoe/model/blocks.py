"""Pre-norm transformer blocks whose FFN is dense or a Mixture-of-Experts layer.

Attention is ``F.scaled_dot_product_attention`` with a key padding mask, so padding tokens
(and the tokens of absent modalities) are never attended to. The MoE layer routes only
real tokens (``mask``) and receives each token's modality and sample ids, so modality-aware
routers work and soft MoE forms slots per sample. Every MoE layer's aux losses and routing
record are collected and returned, never stored on a module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalmoe.moe import FeedForward, MoELayer, build_moe_layer
from modalmoe.moe.types import RoutingRecord


@dataclass
class TrunkOutput:
    """x: [B, N, D]; aux_losses: name -> sum over MoE layers; records: one per MoE layer."""

    x: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    records: list[RoutingRecord] = field(default_factory=list)


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

    def forward(self, x: Tensor, mask: Tensor, modality: Tensor, sample: Tensor):
        """x: [B, N, D], mask: [B, N] real tokens, modality/sample: [B, N] ids ->
        (x, aux_losses or None, record or None)."""
        x = x + F.dropout(self.attention(self.norm1(x), mask), self.dropout, self.training)
        h = self.norm2(x)
        if isinstance(self.ffn, MoELayer):
            out = self.ffn(h, modality=modality, sample=sample, mask=mask)
            y, aux, record = out.x, out.aux_losses, out.record
        else:
            # Only real tokens: padding (and absent modalities' slots) costs no FFN FLOPs,
            # as in the MoE layer, so dense and MoE blocks are compared on the same tokens.
            rows = mask.reshape(-1).nonzero().squeeze(1)
            flat = h.reshape(-1, h.shape[-1])
            y = torch.zeros_like(flat).index_copy(0, rows, self.ffn(flat.index_select(0, rows))).view_as(h)
            aux, record = None, None
        return (x + F.dropout(y, self.dropout, self.training)) * mask.unsqueeze(-1), aux, record


class Trunk(nn.Module):
    """``depth`` blocks; every ``moe_every``-th block (counting from 1) has an MoE FFN.

    Args:
        dim, depth, heads: transformer sizes.
        hidden: FFN width (the width of each expert in MoE blocks).
        activation: "gelu" or "swiglu".
        moe_every: 0 for a dense trunk; 1 for MoE in every block; 2 for every other block.
        moe: arguments of ``build_moe_layer`` (``num_experts``, ``router``, ``k``, ...).
        dropout: see ``Block``.
        expert_hidden: each expert's width (None: ``hidden``).
    """

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        heads: int,
        hidden: int,
        activation: str = "gelu",
        moe_every: int = 0,
        moe: dict | None = None,
        dropout: float = 0.0,
        expert_hidden: int | None = None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            build_blocks(
                dim=dim,
                depth=depth,
                heads=heads,
                hidden=hidden,
                activation=activation,
                moe_every=moe_every,
                moe=moe,
                dropout=dropout,
                expert_hidden=expert_hidden,
            )
        )
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, x: Tensor, mask: Tensor, modality: Tensor | None = None, sample: Tensor | None = None
    ) -> TrunkOutput:
        """x: [B, N, D], mask: [B, N] real tokens, modality: [B, N] ids (default 0), sample:
        [B] id of each row in the caller's batch (default ``arange(B)``; fusions that run a
        subset of rows pass their batch indices so routing records name the right samples)."""
        if not bool(mask.any(1).all()):
            empty = (~mask.any(1)).nonzero().squeeze(1).tolist()
            raise ValueError(f"samples {empty} have no tokens: every sample needs at least one modality")
        b, n, _ = x.shape
        modality = torch.zeros(b, n, dtype=torch.long, device=x.device) if modality is None else modality
        sample = torch.arange(b, device=x.device) if sample is None else sample
        sample = sample.unsqueeze(1).expand(b, n)
        out = TrunkOutput(x * mask.unsqueeze(-1))
        for block in self.blocks:
            out.x, block_aux, record = block(out.x, mask, modality, sample)
            collect(out, block_aux, record)
        out.x = self.norm(out.x) * mask.unsqueeze(-1)
        return out


def collect(into: TrunkOutput | RoutingLog, aux: dict[str, Tensor] | None, record: RoutingRecord | None) -> None:
    """Add one block's aux losses (summed by name) and routing record to ``into``."""
    if record is not None:
        into.records.append(record)
    for name, value in (aux or {}).items():
        into.aux_losses[name] = into.aux_losses[name] + value if name in into.aux_losses else value


def build_blocks(
    *,
    dim: int,
    depth: int,
    heads: int,
    hidden: int,
    activation: str = "gelu",
    moe_every: int = 0,
    moe: dict | None = None,
    dropout: float = 0.0,
    expert_hidden: int | None = None,
) -> list[Block]:
    """``depth`` blocks; every ``moe_every``-th one (counting from 1) has an MoE FFN whose
    experts are ``expert_hidden`` wide (None: ``hidden``)."""
    if moe_every < 0:
        raise ValueError(f"moe_every must be >= 0, got {moe_every}")
    if moe_every and not moe:
        raise ValueError("moe_every > 0 needs moe=dict(num_experts=..., router=..., ...)")
    blocks = []
    for i in range(1, depth + 1):
        if moe_every and i % moe_every == 0:
            ffn = build_moe_layer(dim=dim, hidden=expert_hidden or hidden, activation=activation, **moe)
        else:
            ffn = FeedForward(dim=dim, hidden=hidden, activation=activation)
        blocks.append(Block(dim=dim, heads=heads, ffn=ffn, dropout=dropout))
    return blocks
