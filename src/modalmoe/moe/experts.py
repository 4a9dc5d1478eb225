"""The expert bank: ``E`` feed-forward experts with stacked weights, and its grouped kernel.

Tokens arrive sorted by expert (``counts[e]`` contiguous rows per expert). On a CPU, a
matmul over the 32-128 rows an expert typically gets runs well below the GEMM rate, and a
per-expert loop pays that on every call. The kernel therefore runs one batched matmul over
``[E, P, D]``: the first ``P`` rows of every expert, zero-padded where an expert has fewer,
and a per-expert matmul only for the "tail" rows of experts that have more than ``P``.
``P`` is chosen per step from the counts by a small cost model (``GroupedLayout.plan``):
balanced routing becomes one ``bmm`` with no padding, skewed routing a short loop.

The forward and backward are written by hand (``_GroupedFFN``) so that weight gradients are
written straight into one ``[E, ...]`` tensor, with no per-expert slices of the stacked
weights in the autograd graph (each such slice would allocate a full-size zero gradient),
and so that only the input and the pre-activation are kept for backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("gelu", "swiglu")

# A per-expert matmul call costs about as much as this many extra rows of a batched one
# (measured on a 2-core AVX-512 CPU, D=512, F=1024: 64 calls of 64 rows took ~1.4x the
# time of one dense call of 4096 rows, while one bmm over the same rows took ~1.15x).
TAIL_CALL_ROWS = 32


@dataclass(frozen=True)
class GroupedLayout:
    """How ``A`` expert-sorted rows are laid out for the kernel.

    Attributes:
        counts: rows per expert (length E).
        rows: padded rows per expert in the batched matmul (P).
        head_rows: [H] sorted-row indices that go to the padded block (None: all rows, in order).
        head_slots: [H] their slot in the flattened ``[E * P]`` block (None: identity).
        tails: ``(expert, start, stop)`` row ranges handled by a per-expert matmul.
    """

    counts: tuple[int, ...]
    rows: int
    head_rows: Tensor | None
    head_slots: Tensor | None
    tails: tuple[tuple[int, int, int], ...]

    @property
    def num_experts(self) -> int:
        return len(self.counts)

    @property
    def num_rows(self) -> int:
        return sum(self.counts)

    @property
    def regular(self) -> bool:
        """True when every expert has exactly ``rows`` rows: the block is a view, no copies."""
        return self.head_rows is None

    @staticmethod
    def choose_rows(counts: list[int], call_rows: int = TAIL_CALL_ROWS) -> int:
        """The padded height P minimising ``E*P + sum over tails of (c - P + call_rows)``."""
        num_experts = len(counts)
        best_rows, best_cost = 0, math.inf
        for rows in {0, *counts}:
            tail = sum(c - rows + call_rows for c in counts if c > rows)
            cost = num_experts * rows + tail
            if cost < best_cost or (cost == best_cost and rows > best_rows):
                best_rows, best_cost = rows, cost
        return best_rows

    @classmethod
    def plan(cls, counts: list[int], *, rows: int | None = None, device: torch.device | None = None) -> GroupedLayout:
        """Lay out rows sorted by expert, ``counts[e]`` rows for expert ``e``.

        Args:
            counts: rows per expert.
            rows: force the padded height P (None: choose by the cost model; 0: pure loop).
            device: device of the index tensors.
        """
        counts = [int(c) for c in counts]
        if any(c < 0 for c in counts):
            raise ValueError(f"expert row counts must be >= 0, got {counts}")
        rows = cls.choose_rows(counts) if rows is None else int(rows)
        if all(c == rows for c in counts):
            return cls(tuple(counts), rows, None, None, ())
        head_rows, head_slots, tails = [], [], []
        start = 0
        for expert, count in enumerate(counts):
            head = min(count, rows)
            if head:
                head_rows.append(torch.arange(start, start + head, device=device))
                head_slots.append(torch.arange(expert * rows, expert * rows + head, device=device))
            if count > rows:
                tails.append((expert, start + rows, start + count))
            start += count
        empty = torch.empty(0, dtype=torch.long, device=device)
        return cls(
            tuple(counts),
            rows,
            torch.cat(head_rows) if head_rows else empty,
            torch.cat(head_slots) if head_slots else empty,
            tuple(tails),
        )

    def to_blocks(self, x: Tensor) -> Tensor:
        """x: [A, C] sorted rows -> [E, P, C] zero-padded block (the tail rows left out)."""
        if self.regular:
            return x.view(self.num_experts, self.rows, x.shape[-1])
        block = x.new_zeros(self.num_experts * self.rows, x.shape[-1])
        block.index_copy_(0, self.head_slots, x.index_select(0, self.head_rows))
        return block.view(self.num_experts, self.rows, x.shape[-1])

    def from_blocks(self, block: Tensor, out: Tensor) -> Tensor:
        """block: [E, P, C] -> writes the head rows of ``out`` [A, C]; returns ``out``."""
        if self.regular:
            out.copy_(block.reshape(out.shape))
        elif self.head_rows.numel():
            out.index_copy_(0, self.head_rows, block.reshape(-1, block.shape[-1]).index_select(0, self.head_slots))
        return out


def _activate(h: Tensor, activation: str) -> Tensor:
    """h: [..., F] (GELU) or [..., 2F] (SwiGLU: gate then up) -> [..., F]."""
    if activation == "gelu":
        return F.gelu(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _activate_backward(grad: Tensor, h: Tensor, activation: str) -> Tensor:
    """Gradient of ``_activate`` w.r.t. ``h``; grad: [..., F]."""
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, h)
    gate, up = h.chunk(2, dim=-1)
    out = torch.empty_like(h)
    d_gate, d_up = out.chunk(2, dim=-1)
    torch.ops.aten.silu_backward(grad * up, gate, grad_input=d_gate)
    torch.mul(grad, F.silu(gate), out=d_up)
    return out


class _GroupedFFN(torch.autograd.Function):
    """y[rows of e] = act(x[rows of e] @ w_in[e]) @ w_out[e] for every expert e."""

    @staticmethod
    def forward(ctx, x: Tensor, w_in: Tensor, w_out: Tensor, layout: GroupedLayout, activation: str) -> Tensor:
        y = x.new_empty(x.shape[0], w_out.shape[-1])
        x_block = layout.to_blocks(x)
        h_block = torch.bmm(x_block, w_in) if layout.rows else None
        if h_block is not None:
            layout.from_blocks(torch.bmm(_activate(h_block, activation), w_out), y)
        tails = []
        for expert, start, stop in layout.tails:
            h = x[start:stop] @ w_in[expert]
            torch.mm(_activate(h, activation), w_out[expert], out=y[start:stop])
            tails.append(h)
        ctx.layout, ctx.activation = layout, activation
        ctx.save_for_backward(x, x_block, h_block, w_in, w_out, *tails)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        layout, activation = ctx.layout, ctx.activation
        x, x_block, h_block, w_in, w_out, *tails = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = torch.empty_like(x)
        if h_block is not None:
            g_block = layout.to_blocks(grad_y)
            grad_w_out = torch.bmm(_activate(h_block, activation).transpose(1, 2), g_block)
            grad_h = _activate_backward(torch.bmm(g_block, w_out.transpose(1, 2)), h_block, activation)
            del g_block
            grad_w_in = torch.bmm(x_block.transpose(1, 2), grad_h)
            layout.from_blocks(torch.bmm(grad_h, w_in.transpose(1, 2)), grad_x)
        else:
            grad_w_in, grad_w_out = torch.zeros_like(w_in), torch.zeros_like(w_out)
        for (expert, start, stop), h in zip(layout.tails, tails, strict=True):
            g = grad_y[start:stop]
            grad_w_out[expert].addmm_(_activate(h, activation).t(), g)
            grad_h = _activate_backward(g @ w_out[expert].t(), h, activation)
            grad_w_in[expert].addmm_(x[start:stop].t(), grad_h)
            torch.mm(grad_h, w_in[expert].t(), out=grad_x[start:stop])
        return grad_x, grad_w_in, grad_w_out, None, None


def grouped_ffn(x: Tensor, w_in: Tensor, w_out: Tensor, layout: GroupedLayout, activation: str) -> Tensor:
    """Run ``E`` FFN experts over expert-sorted rows.

    Args:
        x: [A, D] rows sorted by expert, ``layout.counts[e]`` rows for expert e.
        w_in: [E, D, F] (GELU) or [E, D, 2F] (SwiGLU).
        w_out: [E, F, D].
        layout: from ``GroupedLayout.plan(counts)``.
        activation: "gelu" or "swiglu".

    Returns:
        [A, D] expert outputs, in the same order as ``x``.
    """
    if x.shape[0] != layout.num_rows:
        raise ValueError(f"layout covers {layout.num_rows} rows but x has {x.shape[0]}")
    return _GroupedFFN.apply(x.contiguous(), w_in, w_out, layout, activation)


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")


class ExpertBank(nn.Module):
    """``E`` feed-forward experts with stacked weights.

    Weights are stored ``[E, in, out]`` so that a batched matmul needs no transpose, and
    initialised like ``nn.Linear`` (uniform in +-1/sqrt(fan_in)) so that a 1-expert bank is
    exactly a dense FFN.

    Args:
        num_experts: E.
        dim: model width D.
        hidden: expert width F.
        activation: "gelu" or "swiglu" (gate and up projections stacked in ``w_in``).
    """

    def __init__(self, *, num_experts: int, dim: int, hidden: int, activation: str = "swiglu") -> None:
        super().__init__()
        _check_activation(activation)
        if num_experts < 1 or dim < 1 or hidden < 1:
            raise ValueError(f"num_experts, dim and hidden must be >= 1, got {num_experts}, {dim}, {hidden}")
        self.num_experts, self.dim, self.hidden, self.activation = num_experts, dim, hidden, activation
        width = 2 * hidden if activation == "swiglu" else hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, width))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.w_in, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(self.hidden), 1 / math.sqrt(self.hidden))

    def forward(self, x: Tensor, layout: GroupedLayout) -> Tensor:
        """x: [A, D] rows sorted by expert -> [A, D]."""
        return grouped_ffn(x, self.w_in, self.w_out, layout, self.activation)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, activation={self.activation}"


class FeedForward(nn.Module):
    """A dense FFN (the dense baseline and the shared experts' reference).

    Args:
        dim: model width D.
        hidden: hidden width F.
        activation: "gelu" or "swiglu".
    """

    def __init__(self, *, dim: int, hidden: int, activation: str = "swiglu") -> None:
        super().__init__()
        _check_activation(activation)
        self.activation = activation
        self.w_in = nn.Linear(dim, 2 * hidden if activation == "swiglu" else hidden, bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., D] -> [..., D]."""
        return self.w_out(_activate(self.w_in(x), self.activation))
