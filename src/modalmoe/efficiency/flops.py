"""FLOPs and parameters, MoE-aware.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on a real forward pass
(matmuls, convolutions and attention; one multiply-add is 2 FLOPs; elementwise ops are not
counted, as in every common counter). Expert FLOPs are the exception: the grouped expert
kernel runs most of its GEMMs inside MKL, where the counter cannot see them, so whatever the
counter attributed to an ``ExpertBank`` is replaced by the exact count of the rows each
expert bank really ran: ``rows x (2*D*W_in + 2*F*D)``. Only experts that run are counted,
never all E (counting inactive experts is how Mixtral's 80 TFLOPs become 288).

Frozen pretrained feature extractors that cache their outputs (``text_minilm``) count as
preprocessing, like pre-extracted features: a warm-up pass fills their cache before counting.

Active parameters follow the usual definition (Mixtral, DeepSeek-MoE): the parameters one
token goes through, i.e. every non-expert parameter plus, per MoE layer, one expert's
parameters times the average number of expert rows per routed token (k for token choice;
the capacity factor for expert choice; slots/tokens for soft MoE).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from modalmoe.encoders.base import Encoder
from modalmoe.model.blocks import Block
from modalmoe.model.fusion import CrossAttention
from modalmoe.model.heads import EmbeddingHead, Head
from modalmoe.model.quantized import Int8ExpertBank, weight_count
from modalmoe.moe.experts import ExpertBank, FeedForward
from modalmoe.moe.layer import MoELayer
from modalmoe.moe.routers.base import Router


def _register_cpu_attention() -> None:
    """Teach the counter the CPU SDPA kernel (torch 2.13 counts only the CUDA kernels; without
    this, attention would count as 0 FLOPs on the CPU). Same formula as the CUDA kernels."""
    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None and forward not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(forward)
        def _forward(query, key, value, *args, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query, key, value)  # shapes: the registry passes shapes

    if backward is not None and backward not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(backward)
        def _backward(grad_out, query, key, value, *args, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


_register_cpu_attention()


@dataclass
class Cost:
    """The cost of a model on a batch.

    Attributes:
        flops: forward FLOPs per sample.
        params: total parameters.
        active_params: parameters one token goes through (see the module docstring).
        components: FLOPs per sample by component (``encoders``, ``attention`` (projections
            and scores), ``router``, ``experts``, ``communication``, ``ffn`` (dense FFNs and
            shared experts), ``heads``, ``other``).
        samples: the batch size it was measured on.
    """

    flops: float
    params: int
    active_params: float
    components: dict[str, float] = field(default_factory=dict)
    samples: int = 0


def expert_row_flops(bank: ExpertBank) -> int:
    """Forward FLOPs of one row through one expert: ``2*D*W_in + 2*F*D``."""
    width = bank.w_in.shape[-1]
    return 2 * bank.dim * width + 2 * bank.hidden * bank.dim


def _module_flops(counter: FlopCounterMode) -> dict[str, int]:
    # Keys are "Global" (everything counted), the root's class name, and the root's name
    # followed by a module path; the result maps "" to the total and paths to their counts.
    out = {}
    for name, ops in counter.get_flop_counts().items():
        if name == "Global":
            out[""] = int(sum(ops.values()))
        elif "." in name:
            out[name.partition(".")[2]] = int(sum(ops.values()))
    return out


@torch.no_grad()
def measure_cost(model: nn.Module, batch, **forward_kwargs) -> Cost:
    """Count forward FLOPs and active parameters of ``model(batch)`` (in eval mode).

    Args:
        model: any module whose MoE layers are ``MoELayer``s (e.g. ``MultimodalModel``).
        batch: what ``model`` takes; its ``len`` is the number of samples.
    """
    was_training = model.training
    model.eval()
    banks = {m: name for name, m in model.named_modules() if isinstance(m, (ExpertBank, Int8ExpertBank))}
    rows: dict[str, int] = defaultdict(int)
    routed: dict[str, int] = defaultdict(int)
    hooks = []
    for bank, name in banks.items():

        def on_bank(module, args, _out, name=name):
            rows[name] += args[1].num_rows  # args: (x, layout, gate, index)

        hooks.append(bank.register_forward_hook(on_bank))
    for name, layer in model.named_modules():
        if isinstance(layer, MoELayer):

            def on_layer(module, _args, out, name=name):
                routed[f"{name}.experts"] += int(out.record.modality.shape[0])

            hooks.append(layer.register_forward_hook(on_layer))
    try:
        # One uncounted pass first: frozen pretrained feature extractors (the MiniLM text
        # encoder) cache their outputs, and like mfeat's pre-extracted features they are
        # preprocessing, not the model's per-sample cost.
        model(batch, **forward_kwargs)
        rows.clear()
        routed.clear()
        with FlopCounterMode(display=False) as counter:
            model(batch, **forward_kwargs)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)

    samples = len(batch)
    flops = _module_flops(counter)
    total = flops.get("", 0)
    expert_exact = {name: rows[name] * expert_row_flops(bank) for bank, name in banks.items()}
    total += sum(expert_exact.values()) - sum(flops.get(name, 0) for name in banks.values())

    components: dict[str, float] = defaultdict(float)
    for name, module in model.named_modules():
        component = _component(module)
        if component == "attention" and isinstance(module, Block):
            components[component] += flops.get(f"{name}.qkv", 0) + flops.get(f"{name}.out", 0)
        elif component is not None:
            components[component] += flops.get(name, 0)
    components["experts"] = float(sum(expert_exact.values()))
    components["attention"] += _sdpa_flops(counter)
    components["other"] = max(0.0, total - sum(components.values()))

    params = weight_count(model)  # parameters, plus int8 weights (buffers) in a quantized model
    active = float(params)
    for bank, name in banks.items():
        per_expert = (bank.w_in.numel() + bank.w_out.numel()) / bank.num_experts
        per_token = rows[name] / routed[name] if routed[name] else 0.0
        active += per_expert * per_token - bank.w_in.numel() - bank.w_out.numel()
    return Cost(
        flops=total / samples,
        params=params,
        active_params=active,
        components={k: v / samples for k, v in components.items()},
        samples=samples,
    )


def _component(module: nn.Module) -> str | None:
    """The component a module's FLOPs belong to (None: its children are attributed)."""
    if isinstance(module, Encoder):
        return "encoders"
    if isinstance(module, (Block, CrossAttention)):
        return "attention"  # a Block's projections only; its FFN is attributed below
    if isinstance(module, Router):
        return "router"
    if isinstance(module, FeedForward):
        return "ffn"  # dense FFNs and shared experts
    if isinstance(module, (Head, EmbeddingHead)):
        return "heads"
    if type(module).__module__ == "modalmoe.moe.communication":
        return "communication"
    return None


def _sdpa_flops(counter: FlopCounterMode) -> int:
    """Attention-score FLOPs (SDPA ops) counted anywhere in the model."""
    ops = counter.get_flop_counts().get("Global", {})
    return int(sum(v for op, v in ops.items() if "attention" in str(op)))
