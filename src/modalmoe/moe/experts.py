"""The expert bank: ``E`` feed-forward experts with stacked weights, and its grouped kernel.

Tokens arrive sorted by expert (``counts[e]`` contiguous rows per expert). On a CPU, a
matmul over the 32-128 rows an expert typically gets runs well below the GEMM rate, and a
per-expert loop pays that on every call. The kernel runs each of the FFN's matmuls as one
grouped GEMM (MKL's ``cblas_?gemm_batch``, see ``grouped_gemm.py``) over unpadded rows.
Where that is unavailable it falls back to one ``bmm`` over ``[E, P, D]`` (the first ``P``
rows of every expert, zero-padded) plus a matmul per expert for the rows beyond ``P``, with
``P`` chosen per step by a small cost model (``GroupedLayout.blocks``).

The forward and backward are written by hand (``_GroupedFFN``) so that weight gradients are
written straight into one ``[E, ...]`` tensor, with no per-expert slices of the stacked
weights in the autograd graph (each such slice would allocate a full-size zero gradient),
and so that only the input and the pre-activation are kept for backward.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from modalmoe.moe import grouped_gemm

ACTIVATIONS = ("gelu", "swiglu")

# A per-expert matmul call costs about as much as this many extra rows of a batched one
# (measured on a 2-core AVX-512 CPU, D=512, F=1024: 64 calls of 64 rows took ~1.45x the
# time of one dense call of 4096 rows, while one bmm over the same rows took ~1.2x).
TAIL_CALL_ROWS = 32

# Whether the backward pass now running keeps its graph (``retain_graph=True`` or
# ``create_graph=True``). A private binding (torch's AOTAutograd asks it the same question);
# where a build lacks it, assume the graph is kept: correct for every caller, at the cost of
# holding h and a until the graph is freed rather than freeing them mid-backward.
_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)


@dataclass(frozen=True)
class _Blocks:
    """The padded-block layout of the fallback kernel (see ``GroupedLayout.blocks``)."""

    rows: int
    head_rows: Tensor | None
    head_slots: Tensor | None
    tails: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class GroupedLayout:
    """How ``A`` expert-sorted rows are laid out for the kernel.

    Attributes:
        counts: rows per expert (length E); expert e owns the next ``counts[e]`` rows.
        rows: force the fallback's padded height P (None: chosen by its cost model).
    """

    counts: tuple[int, ...]
    rows: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "counts", tuple(int(c) for c in self.counts))
        if any(c < 0 for c in self.counts):
            raise ValueError(f"expert row counts must be >= 0, got {list(self.counts)}")

    @classmethod
    def plan(cls, counts, *, rows: int | None = None) -> GroupedLayout:
        """Lay out rows sorted by expert, ``counts[e]`` rows for expert ``e``."""
        return cls(tuple(counts), rows)

    @property
    def num_experts(self) -> int:
        return len(self.counts)

    @property
    def num_rows(self) -> int:
        return sum(self.counts)

    @staticmethod
    def choose_rows(counts: tuple[int, ...], call_rows: int = TAIL_CALL_ROWS) -> int:
        """The padded height P minimising ``E*P + sum over tails of (c - P + call_rows)``."""
        best_rows, best_cost = 0, math.inf
        for rows in {0, *counts}:
            cost = len(counts) * rows + sum(c - rows + call_rows for c in counts if c > rows)
            if cost < best_cost or (cost == best_cost and rows > best_rows):
                best_rows, best_cost = rows, cost
        return best_rows

    @functools.cached_property
    def blocks(self) -> _Blocks:
        """Fallback layout: the first P rows of every expert in one zero-padded ``[E, P]`` block
        for a batched matmul, the rest ("tails") per expert. Built only when used."""
        rows = self.choose_rows(self.counts) if self.rows is None else int(self.rows)
        if all(c == rows for c in self.counts):
            return _Blocks(rows, None, None, ())
        head_rows, head_slots, tails, start = [], [], [], 0
        for expert, count in enumerate(self.counts):
            head = min(count, rows)
            head_rows.append(torch.arange(start, start + head))
            head_slots.append(torch.arange(expert * rows, expert * rows + head))
            if count > rows:
                tails.append((expert, start + rows, start + count))
            start += count
        return _Blocks(rows, torch.cat(head_rows), torch.cat(head_slots), tuple(tails))

    def to_blocks(self, x: Tensor) -> Tensor:
        """x: [A, C] sorted rows -> [E, P, C] zero-padded block (the tail rows left out)."""
        b = self.blocks
        if b.head_rows is None:
            return x.view(self.num_experts, b.rows, x.shape[-1])
        block = x.new_zeros(self.num_experts * b.rows, x.shape[-1])
        block.index_copy_(0, b.head_slots.to(x.device), x.index_select(0, b.head_rows.to(x.device)))
        return block.view(self.num_experts, b.rows, x.shape[-1])

    def from_blocks(self, block: Tensor, out: Tensor) -> Tensor:
        """block: [E, P, C] -> writes the head rows of ``out`` [A, C]; returns ``out``."""
        b = self.blocks
        if b.head_rows is None:
            out.copy_(block.reshape(out.shape))
        elif b.head_rows.numel():
            rows = block.reshape(-1, block.shape[-1]).index_select(0, b.head_slots.to(out.device))
            out.index_copy_(0, b.head_rows.to(out.device), rows)
        return out


def _activate(h: Tensor, activation: str) -> Tensor:
    """h: [..., F] (GELU) or [..., 2F] (SwiGLU: gate then up) -> [..., F]."""
    if activation == "gelu":
        return F.gelu(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _activate_backward(grad: Tensor, h: Tensor, activation: str, reuse_grad: bool = False) -> Tensor:
    """Gradient of ``_activate`` w.r.t. ``h``; grad: [..., F].

    With ``reuse_grad`` (GELU only, where the shapes match) the result overwrites ``grad``,
    saving one [A, F] buffer; elementwise kernels allow an output that is exactly an input.
    """
    if activation == "gelu":
        if reuse_grad:
            return torch.ops.aten.gelu_backward.grad_input(grad, h, grad_input=grad)
        return torch.ops.aten.gelu_backward(grad, h)
    gate, up = h.chunk(2, dim=-1)
    out = torch.empty_like(h)
    d_gate, d_up = out.chunk(2, dim=-1)
    torch.ops.aten.silu_backward(grad * up, gate, grad_input=d_gate)
    torch.mul(grad, F.silu(gate), out=d_up)
    return out


class _GroupedFFN(torch.autograd.Function):
    """y[rows of e] = gate * (act(x[index][rows of e] @ w_in[e]) @ w_out[e]), by grouped GEMMs.

    Memory is kept at the dense FFN's level, which matters as much as speed here:
    - the gate weight is applied inside, so the unweighted expert output is never kept: its
      gradient is ``rowsum(a * (grad_y @ w_out.T))``, built from tensors backward has anyway,
      and the weight gradient scales ``a`` in place instead of copying ``grad_y``;
    - with ``index`` the rows are gathered inside and not kept: backward gathers them again
      when the weight gradient needs them, after h and a are freed (a dense FFN gets its
      input for free, so keeping the gathered copy alive was pure overhead);
    - h and a are held on ``ctx`` rather than saved so backward can free each one as soon
      as it is used, as autograd does node by node.

    All three shortcuts consume what the graph holds, so they apply only when the engine
    frees the graph after this pass; under ``retain_graph`` backward leaves ``ctx`` intact and
    works on copies, and a second pass gives the same gradients. The backward is not itself
    differentiable (the grouped GEMM runs outside autograd), so ``create_graph`` through it
    raises rather than returning gradients with their second-order terms silently missing.
    """

    @staticmethod
    def forward(ctx, x, index, w_in, w_out, gate, layout: GroupedLayout, activation: str) -> Tensor:
        counts = layout.counts
        rows = x if index is None else x.index_select(0, index)
        h = grouped_gemm.grouped_mm(rows, w_in, counts)
        del rows
        a = _activate(h, activation)
        y = grouped_gemm.grouped_mm(a, w_out, counts)
        if gate is not None:
            y.mul_(gate.unsqueeze(-1))
        ctx.layout, ctx.activation, ctx.h, ctx.a = layout, activation, h, a
        ctx.save_for_backward(x, index, w_in, w_out, gate)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, index, w_in, w_out, gate = ctx.saved_tensors  # raises first if the graph was freed
        keep = _keep_graph()
        h, a = ctx.h, ctx.a
        if not keep:
            del ctx.h, ctx.a  # ours alone now: freed below as soon as each is used
        counts, grad_y = ctx.layout.counts, grad_y.contiguous()
        grad_a = grouped_gemm.grouped_mm(grad_y, w_out, counts, transpose_w=True)  # without the gate
        grad_gate = None
        if gate is not None:
            # Row-wise dot product without an [A, F] temporary.
            grad_gate = torch.bmm(grad_a.unsqueeze(1), a.unsqueeze(2)).view(-1) if ctx.needs_input_grad[4] else None
            grad_a.mul_(gate.unsqueeze(-1))
            # (gate * a).T @ grad_y == a.T @ (gate * grad_y): a is ours to overwrite unless a
            # later pass needs it; then a scaled copy, the same numbers as the in-place path.
            a = a * gate.unsqueeze(-1) if keep else a.mul_(gate.unsqueeze(-1))
        grad_w_out = grouped_gemm.grouped_weight_grad(a, grad_y, counts)
        del a, grad_y
        grad_h = _activate_backward(grad_a, h, ctx.activation, reuse_grad=True)
        del grad_a, h
        rows = x if index is None else x.index_select(0, index)
        grad_w_in = grouped_gemm.grouped_weight_grad(rows, grad_h, counts)
        del rows
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_gemm.grouped_mm(grad_h, w_in, counts, transpose_w=True)
            if index is not None:
                grad_x = torch.zeros_like(x).index_add_(0, index, grad_x)
        return grad_x, None, grad_w_in, grad_w_out, grad_gate, None, None


class _BlockFFN(torch.autograd.Function):
    """Fallback where MKL's grouped GEMM is missing (non-x86 builds, other dtypes, GPUs):
    one ``bmm`` over the padded block of ``layout.blocks`` plus a matmul per tail."""

    @staticmethod
    def forward(ctx, x: Tensor, w_in: Tensor, w_out: Tensor, layout: GroupedLayout, activation: str) -> Tensor:
        y = x.new_empty(x.shape[0], w_out.shape[-1])
        x_block = layout.to_blocks(x)
        h_block = torch.bmm(x_block, w_in) if layout.blocks.rows else None
        if h_block is not None:
            layout.from_blocks(torch.bmm(_activate(h_block, activation), w_out), y)
        tails = []
        for expert, start, stop in layout.blocks.tails:
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
        for (expert, start, stop), h in zip(layout.blocks.tails, tails, strict=True):
            g = grad_y[start:stop]
            grad_w_out[expert].addmm_(_activate(h, activation).t(), g)
            grad_h = _activate_backward(g @ w_out[expert].t(), h, activation)
            grad_w_in[expert].addmm_(x[start:stop].t(), grad_h)
            torch.mm(grad_h, w_in[expert].t(), out=grad_x[start:stop])
        return grad_x, grad_w_in, grad_w_out, None, None


def grouped_ffn(
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    layout: GroupedLayout,
    activation: str,
    gate: Tensor | None = None,
    index: Tensor | None = None,
) -> Tensor:
    """Run ``E`` FFN experts over expert-sorted rows.

    Args:
        x: [A, D] rows sorted by expert, ``layout.counts[e]`` rows for expert e; or, with
            ``index``, [T, D] tokens whose rows ``x[index]`` are the sorted rows.
        w_in: [E, D, F] (GELU) or [E, D, 2F] (SwiGLU).
        w_out: [E, F, D].
        layout: from ``GroupedLayout.plan(counts)``.
        activation: "gelu" or "swiglu".
        gate: [A] weight to scale each row's output by (None: 1).
        index: [A] token of each sorted row (None: ``x`` is already sorted). Passing it
            lets the kernel gather rows itself and not keep the gathered copy for backward.

    Returns:
        [A, D] expert outputs, in the sorted row order.
    """
    num_rows = x.shape[0] if index is None else index.shape[0]
    if num_rows != layout.num_rows:
        raise ValueError(f"layout covers {layout.num_rows} rows but got {num_rows}")
    x, w_in, w_out = x.contiguous(), w_in.contiguous(), w_out.contiguous()
    if grouped_gemm.available(x, w_in, w_out):
        gate = None if gate is None else gate.to(x.dtype)
        return _GroupedFFN.apply(x, index, w_in, w_out, gate, layout, activation)
    rows = x if index is None else x.index_select(0, index)
    y = _BlockFFN.apply(rows, w_in, w_out, layout, activation)
    return y if gate is None else y * gate.unsqueeze(-1).to(y.dtype)


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

    def forward(
        self, x: Tensor, layout: GroupedLayout, gate: Tensor | None = None, index: Tensor | None = None
    ) -> Tensor:
        """x: [A, D] rows sorted by expert (or [T, D] tokens with ``index`` [A]), gate: [A] or
        None -> [A, D] (scaled by gate). See ``grouped_ffn``."""
        return grouped_ffn(x, self.w_in, self.w_out, layout, self.activation, gate, index)

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
