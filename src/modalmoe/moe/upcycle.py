"""Sparse upcycling of one dense FFN into an MoE layer's tensors (Komatsuzaki et al. 2023).

    w_in, w_out = expert_copies(ffn_w_in, ffn_w_out, experts=8, granularity=1, activation="gelu")

Every expert starts as a copy of the trained dense FFN, so the MoE layer starts from what the
dense model learned. Fine-grained experts (``granularity`` G > 1, as Megatron-Core's
``--moe-ffn-hidden-size`` smaller than the dense FFN): the dense FFN's hidden units are split
into G shards of ``F / G`` units, and expert ``e`` holds shard ``e % G`` (experts ``c*G`` to
``c*G + G - 1`` form copy ``c`` of the whole FFN). With ``k = G`` active experts per token the
active FLOPs equal the dense FFN's.

Why the upcycled layer computes exactly the dense FFN at step 0: an FFN is a sum over its
hidden units, ``f(x) = sum_g W_out,g act(W_in,g x)``, and the router's chosen weights sum to
1 (top-k renormalised). Coarse experts (G = 1) are identical, so any choice gives ``f(x)``.
For G > 1, ``tie_router`` gives the G experts of one copy the same router row: they tie, top-k
(k a multiple of G) takes whole copies, every shard once per copy with the same weight, and
scaling each expert's output by G gives ``f(x)``. Shared experts narrower than the FFN (the
presets' DeepSeek-MoE layout, ``F = (k + shared) * h``) hold the FFN's first units as they are
and the routed experts copies of the rest (``modalmoe.model.upcycle``); shared experts as wide
as whole copies take a fraction of the FFN's output (``shared_copy``), the routed ones the rest.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modalmoe.config import ConfigError


class UpcycleError(ConfigError):
    """A dense run that cannot be upcycled into this MoE layout; the message says why and what fits."""


def check_granularity(dense_hidden: int, expert_hidden: int, num_experts: int, k: int | None) -> int:
    """G = dense width / expert width, checked: an integer that divides E (and k, when given)."""
    if dense_hidden % expert_hidden:
        raise UpcycleError(
            f"the dense FFN has {dense_hidden} hidden units, which do not split into experts of {expert_hidden}; "
            f"set model.moe.expert_hidden to {dense_hidden} or a divisor of it"
        )
    g = dense_hidden // expert_hidden
    if num_experts % g:
        raise UpcycleError(f"{num_experts} experts do not hold whole copies of {g} shards; use a multiple of {g}")
    if k is not None and g > 1 and k % g:
        raise UpcycleError(f"k={k} active experts do not take whole copies of {g} shards; use a multiple of {g}")
    return g


def _shards(w_in: Tensor, w_out: Tensor, granularity: int, activation: str) -> tuple[list[Tensor], list[Tensor]]:
    """The dense FFN (``nn.Linear`` weights ``w_in`` [F or 2F, D], ``w_out`` [D, F]) as G shards,
    each ``([D, h or 2h], [h, D])`` in the expert bank's layout."""
    hidden = w_out.shape[1]
    h = hidden // granularity
    ins, outs = [], []
    for g in range(granularity):
        rows = slice(g * h, (g + 1) * h)
        if activation == "swiglu":  # gate rows then up rows, as experts._activate splits them
            shard_in = torch.cat([w_in[:hidden][rows], w_in[hidden:][rows]])
        else:
            shard_in = w_in[rows]
        ins.append(shard_in.t())
        outs.append(w_out[:, rows].t())
    return ins, outs


def expert_copies(
    w_in: Tensor,
    w_out: Tensor,
    *,
    experts: int,
    granularity: int,
    activation: str,
    scale: float = 1.0,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``(w_in [E, D, h or 2h], w_out [E, h, D])`` of an expert bank filled with the FFN's
    shards (expert ``e``: shard ``e % G``), each output scaled by ``scale * G``; ``noise``
    multiplies each copy by ``1 + noise * N(0, 1)`` elementwise (0: exact copies)."""
    ins, outs = _shards(w_in, w_out, granularity, activation)
    bank_in = torch.stack([ins[e % granularity] for e in range(experts)]).clone()
    bank_out = torch.stack([outs[e % granularity] for e in range(experts)]).clone() * (scale * granularity)
    if noise:
        bank_in = bank_in * (1 + noise * torch.randn(bank_in.shape, generator=generator, dtype=bank_in.dtype))
        bank_out = bank_out * (1 + noise * torch.randn(bank_out.shape, generator=generator, dtype=bank_out.dtype))
    return bank_in, bank_out


def shared_copy(w_in: Tensor, w_out: Tensor, *, width: int, activation: str, scale: float) -> tuple[Tensor, Tensor]:
    """A shared expert of ``width`` hidden units (a multiple of the FFN's F) as ``width / F``
    tiled copies of the FFN, in ``nn.Linear`` layout, computing ``scale * f(x)``."""
    hidden = w_out.shape[1]
    if width % hidden:
        raise UpcycleError(
            f"shared experts {width} units wide do not hold whole copies of the dense FFN's {hidden}; "
            f"make model.moe.shared_experts * expert width a multiple of {hidden}"
        )
    copies = width // hidden
    if activation == "swiglu":
        shared_in = torch.cat([w_in[:hidden].repeat(copies, 1), w_in[hidden:].repeat(copies, 1)])
    else:
        shared_in = w_in.repeat(copies, 1)
    return shared_in.clone(), w_out.repeat(1, copies) * (scale / copies)


def tie_router(param: Tensor, *, num_experts: int, granularity: int) -> Tensor:
    """``param`` with the slices of each copy's G experts (along its expert dimension, the
    one of size E) equal to the copy's first: they tie in top-k. G = 1: unchanged."""
    if granularity == 1:
        return param
    dims = [d for d, n in enumerate(param.shape) if n == num_experts]
    if not dims:
        return param
    dim = dims[0]
    index = torch.arange(num_experts) // granularity * granularity
    return param.index_select(dim, index).clone()
