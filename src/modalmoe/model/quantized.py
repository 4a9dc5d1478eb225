"""Int8 layers and post-training quantization: weights stored in int8 with a scale per output channel
(per expert and channel for the stacked expert weights), activations quantized per row on
the fly (dynamic quantization), matmuls in int8 with int32 accumulation.

    from modalmoe.efficiency.quantize import quantize_int8   # or modalmoe.model.quantized
    qmodel = quantize_int8(model)            # a new model; ``model`` is left as it is
    qmodel(batch).logits

What gets quantized: every ``nn.Linear`` (attention projections, dense FFNs, heads,
encoder projections), every ``ExpertBank`` (``Int8ExpertBank``: one scale per expert and
output channel, so one expert's range never flattens another's), and with ``patch_convs``
non-overlapping patch convolutions (kernel == stride, no padding: exactly a linear map of
each patch, so they run as an ``Int8Linear`` over unfolded patches). Layers whose weight (one
expert's ``w_in`` for a bank) has fewer than ``min_weight`` elements stay in float32: at that
size the per-call cost of quantizing the activations outweighs the faster matmul (measured,
see ``int8_matmul``). Patch convolutions stay float32 by default: on av-digits' image
patchify (16 -> 64 channels, 7x7 patches) the int8 path took about 3x mkldnn's float conv,
since copying the patches out and quantizing them costs more than the 784-wide matmul saves
(``benchmarks/quantization.py --layers RUN --min-weight 0``).

**The kernel, chosen by measurement** (``int8_matmul``, the one function to change when the
ecosystem moves). On this project's CPU (x86 with AVX2/AVX-512, torch 2.13), for
``[M, K] @ [K, N]`` against float32 ``addmm``, single thread, medians of 30 interleaved
runs (``benchmarks/quantization.py --kernels``):

- ``torch._int_mm`` on int8 rows quantized per row (this module): 0.37x the time at
  1600x256x768, 0.83x at 1600x64x192, 1.5x (slower) at 400x64x64; relative error ~0.9%.
- ``torch.ops.quantized.linear_dynamic`` (fbgemm, what ``torch.ao``'s deprecated
  ``quantize_dynamic`` runs): 0.25x / 0.80x / 1.8x, relative error ~2% (it quantizes
  activations per tensor with a reduced 7-bit range), and its weights must be packed as
  ``torch.qint8`` tensors, whose creation functions torch 2.13 deprecates (a warning on
  every conversion).
- ``torch.ops.aten._weight_int8pack_mm`` (int8 weights, float activations; torchao's CPU
  weight-only path): 20-50x slower than float32 here.
- torchao 0.18's ``Int8DynamicActivationInt8WeightConfig``: ~20x slower than float32 on
  this CPU (measured when the issue was written; torchao is not a dependency).

``_int_mm`` is close to fbgemm at large sizes, more accurate, and needs no deprecated API,
so it is the kernel; nothing is silenced.

Quantized models are for inference: ``Int8Linear`` and ``Int8ExpertBank`` have no gradient.
Their int8 weights and float scales are ordinary buffers, so a quantized model saves to and
loads from safetensors like any other (``model.quantization: int8`` in its config makes the run loader,
``modalmoe.run.RunDir.load_model``, give a built model the same structure before the weights are loaded).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.utils import flop_counter

from modalmoe.moe.experts import ExpertBank, GroupedLayout, _activate

QUANTIZATIONS = ("none", "int8")

#: Weights with fewer elements than this stay in float32 (``quantize_int8(min_weight=)``).
#: Measured with ``benchmarks/quantization.py --kernels``: int8 loses at 64x64 and wins from
#: 64x192 up.
MIN_WEIGHT = 8192


def _register_int_mm_flops() -> None:
    """FlopCounterMode does not know ``_int_mm``; it is a matmul like ``mm``."""
    op = torch.ops.aten._int_mm
    if op.default not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(op)
        def _int_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.mm_flop(a_shape, b_shape)


_register_int_mm_flops()


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row: x: [M, K] float -> (q: [M, K] int8, scale: [M, 1] float)."""
    scale = x.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127.0
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale


def quantize_weight(w: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one scale per slice along ``dim`` (the output channels):
    w: float -> (int8 like w, float scale with ``dim`` kept and the others of size 1)."""
    reduce = [d for d in range(w.dim()) if d != dim % w.dim()]
    scale = w.detach().abs().amax(reduce, keepdim=True).clamp_min(1e-8) / 127.0
    return torch.round(w.detach() / scale).clamp_(-127, 127).to(torch.int8), scale.float()


def int8_matmul(q: Tensor, row_scale: Tensor, weight: Tensor, col_scale: Tensor) -> Tensor:
    """``(q * row_scale) @ (weight * col_scale)`` in int8 with int32 accumulation.

    Args:
        q: [M, K] int8 activations, row_scale: [M, 1] their scales.
        weight: [K, N] int8, col_scale: [N] (or [1, N]) its per-column scales.

    Returns:
        [M, N] float32.
    """
    return torch._int_mm(q, weight).float().mul_(row_scale).mul_(col_scale.reshape(1, -1))


class Int8Linear(nn.Module):
    """An ``nn.Linear`` with int8 weights (one scale per output feature), for inference.

    Buffers: ``weight`` [in, out] int8 (transposed, the layout the kernel reads), ``scale``
    [out], ``bias`` [out] or absent.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(in_features, out_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        q, scale = quantize_weight(linear.weight.t(), dim=1)
        out.weight.copy_(q)
        out.scale.copy_(scale.reshape(-1))
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach())
        return out

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., in] -> [..., out] (float32)."""
        flat = x.reshape(-1, self.in_features).float()
        y = int8_matmul(*quantize_rows(flat), self.weight, self.scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8PatchConv(nn.Module):
    """A non-overlapping patch convolution (kernel == stride, no padding, no dilation or
    groups) as an ``Int8Linear`` over unfolded patches; same output as the ``nn.Conv1d`` /
    ``nn.Conv2d`` it replaces."""

    def __init__(self, linear: Int8Linear, kernel: tuple[int, ...]) -> None:
        super().__init__()
        self.linear, self.kernel = linear, tuple(kernel)

    @staticmethod
    def supports(conv: nn.Module) -> bool:
        return (
            isinstance(conv, (nn.Conv1d, nn.Conv2d))
            and tuple(conv.kernel_size) == tuple(conv.stride)
            and all(p == 0 for p in conv.padding)
            and all(d == 1 for d in conv.dilation)
            and conv.groups == 1
            and conv.padding_mode == "zeros"
        )

    @classmethod
    def from_float(cls, conv: nn.Conv1d | nn.Conv2d) -> Int8PatchConv:
        linear = nn.Linear(conv.weight[0].numel(), conv.out_channels, bias=conv.bias is not None)
        linear.weight.data = conv.weight.detach().reshape(conv.out_channels, -1)
        if conv.bias is not None:
            linear.bias.data = conv.bias.detach()
        return cls(Int8Linear.from_float(linear), tuple(conv.kernel_size))

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, L] or [B, C, H, W] -> [B, out, L/k] or [B, out, H/kh, W/kw]."""
        if len(self.kernel) == 1:
            (k,) = self.kernel
            b, c, length = x.shape
            steps = length // k
            patches = x[..., : steps * k].reshape(b, c, steps, k).permute(0, 2, 1, 3).reshape(b, steps, c * k)
            return self.linear(patches).transpose(1, 2)
        kh, kw = self.kernel
        b, c, h, w = x.shape
        gh, gw = h // kh, w // kw
        # Non-overlapping patches by one reshape and permute (one copy; F.unfold's im2col
        # plus a transpose cost two), flattened in the conv weight's (C, kh, kw) order.
        patches = x[..., : gh * kh, : gw * kw].reshape(b, c, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5)
        y = self.linear(patches.reshape(b, gh * gw, c * kh * kw))  # [B, L, out]
        return y.transpose(1, 2).reshape(b, -1, gh, gw)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}"


class Int8ExpertBank(nn.Module):
    """An ``ExpertBank`` with int8 weights, one scale per expert and output channel; same
    call contract (``forward(x, layout, gate, index)``), for inference.

    Buffers: ``w_in`` [E, D, W] int8 and ``scale_in`` [E, W]; ``w_out`` [E, F, D] int8 and
    ``scale_out`` [E, D].
    """

    def __init__(self, *, num_experts: int, dim: int, hidden: int, activation: str = "swiglu") -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden, self.activation = num_experts, dim, hidden, activation
        width = 2 * hidden if activation == "swiglu" else hidden
        self.register_buffer("w_in", torch.zeros(num_experts, dim, width, dtype=torch.int8))
        self.register_buffer("scale_in", torch.ones(num_experts, width))
        self.register_buffer("w_out", torch.zeros(num_experts, hidden, dim, dtype=torch.int8))
        self.register_buffer("scale_out", torch.ones(num_experts, dim))

    @classmethod
    def from_float(cls, bank: ExpertBank) -> Int8ExpertBank:
        out = cls(num_experts=bank.num_experts, dim=bank.dim, hidden=bank.hidden, activation=bank.activation)
        for name in ("in", "out"):
            q, scale = quantize_weight_per_expert(getattr(bank, f"w_{name}"))
            getattr(out, f"w_{name}").copy_(q)
            getattr(out, f"scale_{name}").copy_(scale)
        return out

    def _grouped(self, rows: Tensor, weight: Tensor, scale: Tensor, counts: tuple[int, ...]) -> Tensor:
        q, row_scale = quantize_rows(rows)
        out = rows.new_empty(rows.shape[0], weight.shape[-1])
        start = 0
        for expert, count in enumerate(counts):
            if count:
                stop = start + count
                out[start:stop] = int8_matmul(q[start:stop], row_scale[start:stop], weight[expert], scale[expert])
                start = stop
        return out

    def forward(
        self, x: Tensor, layout: GroupedLayout, gate: Tensor | None = None, index: Tensor | None = None
    ) -> Tensor:
        """x: [A, D] rows sorted by expert (or [T, D] tokens with ``index`` [A]), gate: [A] or
        None -> [A, D] (scaled by gate). See ``modalmoe.moe.experts.grouped_ffn``."""
        rows = (x if index is None else x.index_select(0, index)).float()
        if rows.shape[0] != layout.num_rows:
            raise ValueError(f"layout covers {layout.num_rows} rows but got {rows.shape[0]}")
        h = self._grouped(rows, self.w_in, self.scale_in, layout.counts)
        y = self._grouped(_activate(h, self.activation), self.w_out, self.scale_out, layout.counts)
        return y if gate is None else y.mul_(gate.unsqueeze(-1).to(y.dtype))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, activation={self.activation}"


def quantize_weight_per_expert(w: Tensor) -> tuple[Tensor, Tensor]:
    """w: [E, K, N] float -> (int8 [E, K, N], scale [E, N]): one scale per expert and output
    column."""
    scale = w.detach().abs().amax(1).clamp_min(1e-8) / 127.0  # [E, N]
    q = torch.round(w.detach() / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, scale.float()


def _convert(module: nn.Module, min_weight: int, *, structure_only: bool, patch_convs: bool = False) -> nn.Module:
    """Swap children in place: float layers -> int8 ones (weights copied unless
    ``structure_only``, where the caller loads them afterwards)."""
    for name, child in list(module.named_children()):
        replacement = None
        if isinstance(child, ExpertBank) and child.w_in[0].numel() >= min_weight:
            replacement = (
                Int8ExpertBank.from_float(child)
                if not structure_only
                else Int8ExpertBank(
                    num_experts=child.num_experts, dim=child.dim, hidden=child.hidden, activation=child.activation
                )
            )
        elif isinstance(child, nn.Linear) and child.weight.numel() >= min_weight:
            replacement = (
                Int8Linear.from_float(child)
                if not structure_only
                else Int8Linear(child.in_features, child.out_features, bias=child.bias is not None)
            )
        elif patch_convs and Int8PatchConv.supports(child) and child.weight.numel() >= min_weight:
            replacement = Int8PatchConv.from_float(child)  # weights are overwritten by a later load
        if replacement is not None:
            setattr(module, name, replacement)
        else:
            _convert(child, min_weight, structure_only=structure_only, patch_convs=patch_convs)
    return module


@torch.no_grad()
def quantize_int8(
    model: nn.Module, *, min_weight: int = MIN_WEIGHT, patch_convs: bool = False, inplace: bool = False
) -> nn.Module:
    """Int8 post-training dynamic quantization of ``model`` (see the module docstring).

    Args:
        model: a trained model (e.g. a ``MultimodalModel``); left unchanged unless ``inplace``.
        min_weight: layers whose weight has fewer elements stay in float32.
        patch_convs: also quantize non-overlapping patch convolutions (see the module doc).
        inplace: convert ``model`` itself instead of a copy.

    Returns:
        The quantized model in eval mode; its ``config.quantization`` (when it has a config)
        says ``int8`` so that a saved copy is rebuilt the same way.
    """
    out = model if inplace else copy.deepcopy(model)
    _convert(out, min_weight, structure_only=False, patch_convs=patch_convs)
    _mark(out, min_weight, patch_convs)
    return out.eval()


def int8_structure(model: nn.Module, *, min_weight: int = MIN_WEIGHT, patch_convs: bool = False) -> nn.Module:
    """Give a freshly built float model the int8 structure (in place, weights left at their
    defaults) so that a quantized checkpoint's state dict loads into it."""
    with torch.no_grad():
        _convert(model, min_weight, structure_only=True, patch_convs=patch_convs)
    _mark(model, min_weight, patch_convs)
    return model.eval()


def _mark(model: nn.Module, min_weight: int, patch_convs: bool) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization"):
        update = {"method": "int8", "min_weight": min_weight, "patch_convs": patch_convs}
        quantization = config.quantization.model_copy(update=update)
        model.config = config.model_copy(update={"quantization": quantization})


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int8ExpertBank)) for m in model.modules())


def weight_count(model: nn.Module) -> int:
    """Parameters plus int8 weight elements (a quantized model's weights are buffers)."""
    count = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, Int8Linear):
            count += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
        elif isinstance(m, Int8ExpertBank):
            count += m.w_in.numel() + m.w_out.numel()
    return count
