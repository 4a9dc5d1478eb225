"""Sparse upcycling inside a pretrained Hugging Face transformer: its FFNs become MoE layers.

    from transformers import AutoModel
    from modalmoe.moe.transformers_ffn import upcycle_transformer, moe_outputs

    model = AutoModel.from_pretrained(path)                 # a BERT or a Llama-family model
    report = upcycle_transformer(model, num_experts=8, k=2)  # every FFN -> an upcycled MoE layer
    with moe_outputs(model) as outputs:                      # the MoE layers' aux losses and records
        hidden = model(**inputs).last_hidden_state
    loss = task_loss + 0.01 * outputs.aux_losses["load_balance"]

Which modules are FFNs is declared per architecture family in ``families`` (``bert``: each
layer's ``intermediate`` (dense + GELU) and ``output.dense``; ``llama``: each layer's ``mlp``,
SwiGLU from ``gate_proj``, ``up_proj``, ``down_proj``, as Mistral, Qwen2 and most decoders
have). The family is found from the modules (``family=`` to choose it). Every FFN is replaced
by an ``UpcycledFFN`` holding a modalmoe ``MoELayer`` whose experts are copies (or, with
``expert_hidden`` below the FFN's width, shards) of the FFN (``modalmoe.moe.upcycle``), so
at step 0 the model computes what it computed before: biases included. The FFN's input bias
is kept exactly by appending a constant 1 to the layer's input (one more input row in each
expert, and in the router); its output bias is added once after the experts, since the
chosen experts' weights sum to 1. Only ``transformers`` modules' attributes are read: this
module does not import ``transformers``.

The MoE layers' auxiliary losses and routing records are read with ``moe_outputs(model)``
(forward hooks on the MoE layers: nothing is kept on the modules). A model upcycled this way
fine-tunes end to end like any ``nn.Module``; ``state_dict`` holds the expert banks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalmoe.moe.layer import MoELayer, MoEOutput, build_moe_layer
from modalmoe.moe.upcycle import UpcycleError, check_granularity, expert_copies, tie_router
from modalmoe.registry import Registry


@dataclass(frozen=True)
class FFNSite:
    """One FFN of a transformer, as the MoE layer needs it.

    Attributes:
        name: the FFN's module path (for reports and errors).
        w_in: ``[F, D]`` (GELU) or ``[2F, D]`` (SwiGLU: gate rows, then up rows).
        b_in: ``[F]`` or ``[2F]``, or None.
        w_out: ``[D, F]``.
        b_out: ``[D]`` or None.
        activation: ``gelu`` or ``swiglu``.
        install: puts the replacement module in place of the FFN.
    """

    name: str
    w_in: Tensor
    b_in: Tensor | None
    w_out: Tensor
    b_out: Tensor | None
    activation: str
    install: Callable[[nn.Module], None]


@dataclass(frozen=True)
class Family:
    """An architecture family: whether a model is one, and its FFN sites."""

    detect: Callable[[nn.Module], bool]
    sites: Callable[[nn.Module], list[FFNSite]]


families: Registry[Family] = Registry("transformer family")


def _activation_name(fn: nn.Module | Callable) -> str:
    return type(fn).__name__


def _bert_sites(model: nn.Module) -> list[FFNSite]:
    sites = []
    for name, layer in model.named_modules():
        intermediate, output = getattr(layer, "intermediate", None), getattr(layer, "output", None)
        if intermediate is None or output is None or not hasattr(intermediate, "dense"):
            continue
        act = _activation_name(intermediate.intermediate_act_fn)
        if act not in ("GELUActivation",) or getattr(intermediate.intermediate_act_fn, "act", F.gelu) is not F.gelu:
            raise UpcycleError(
                f"{name}.intermediate uses {act}; the MoE experts compute the exact (erf) GELU, so this FFN "
                "cannot be upcycled exactly (hidden_act: gelu)"
            )

        def install(module, layer=layer):
            layer.intermediate = module  # now returns the whole FFN's output, bias included
            layer.output.dense = nn.Identity()

        dense_in, dense_out = intermediate.dense, output.dense
        sites.append(FFNSite(f"{name}.intermediate", dense_in.weight, dense_in.bias, dense_out.weight, dense_out.bias,
                             "gelu", install))  # fmt: skip
    return sites


def _llama_sites(model: nn.Module) -> list[FFNSite]:
    sites = []
    for name, layer in model.named_modules():
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")):
            continue
        act = _activation_name(mlp.act_fn)
        if act != "SiLUActivation" and not isinstance(mlp.act_fn, nn.SiLU):
            raise UpcycleError(f"{name}.mlp uses {act}; the MoE experts compute SwiGLU with SiLU (hidden_act: silu)")
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        w_in = torch.cat([gate.weight, up.weight])
        b_in = None if gate.bias is None else torch.cat([gate.bias, up.bias])

        def install(module, layer=layer):
            layer.mlp = module

        sites.append(FFNSite(f"{name}.mlp", w_in, b_in, down.weight, down.bias, "swiglu", install))
    return sites


families.register("bert")(lambda: Family(lambda m: bool(_bert_candidates(m)), _bert_sites))
families.register("llama")(lambda: Family(lambda m: bool(_llama_candidates(m)), _llama_sites))


def _bert_candidates(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if hasattr(getattr(m, "intermediate", None), "dense")]


def _llama_candidates(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if hasattr(getattr(m, "mlp", None), "gate_proj")]


class UpcycledFFN(nn.Module):
    """An upcycled FFN: ``x [..., D] -> [..., D]`` through a modalmoe ``MoELayer``.

    Args:
        layer: the MoE layer (width ``D + 1`` when ``augment``: a constant 1 carries the FFN's
            input bias).
        bias: the FFN's output bias ``[D]`` (trained), or None.
        augment: append the constant input.
    """

    def __init__(self, layer: MoELayer, bias: Tensor | None, augment: bool) -> None:
        super().__init__()
        self.layer, self.augment = layer, augment
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        dim = x.shape[-1]
        h = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1) if self.augment else x
        lead = h.reshape(-1, h.shape[-1]) if h.dim() != 3 else h
        y = self.layer(lead).x.reshape(*x.shape[:-1], h.shape[-1])[..., :dim]
        return y if self.bias is None else y + self.bias


@dataclass
class TransformerUpcycleReport:
    """What ``upcycle_transformer`` did: the family and each replaced FFN's module path."""

    family: str
    replaced: list[str] = field(default_factory=list)
    granularity: int = 1


def detect_family(model: nn.Module) -> str:
    for name in families.names():
        if families.create(name).detect(model):
            return name
    raise UpcycleError(
        f"{type(model).__name__}: no known transformer family ({', '.join(families.names())}) has FFNs in this "
        "model; register one in modalmoe.moe.transformers_ffn.families"
    )


def upcycle_transformer(
    model: nn.Module,
    *,
    num_experts: int = 8,
    k: int = 2,
    expert_hidden: int | None = None,
    router: str = "token_choice",
    router_options: dict | None = None,
    family: str | None = None,
    noise: float = 0.0,
    seed: int = 0,
) -> TransformerUpcycleReport:
    """Replace every FFN of ``model`` by an upcycled MoE layer, in place (module docstring).

    Args:
        num_experts, k, router, router_options: the MoE layers' routing (``build_moe_layer``).
        expert_hidden: each expert's width (default: the FFN's width / k, so the active FLOPs
            equal the FFN's; the FFN's width for coarse copies).
        family: one of ``families`` (default: detected).
        noise: multiplicative noise on the copies (0: exact at step 0).
        seed: seeds the routers' init and the noise.
    """
    family = family or detect_family(model)
    sites = families.create(family).sites(model)
    if not sites:
        raise UpcycleError(f"{type(model).__name__} has no {family} FFN to upcycle")
    generator = torch.Generator().manual_seed(seed)
    report = TransformerUpcycleReport(family)
    for site in sites:
        hidden = site.w_out.shape[1]
        width = expert_hidden or max(1, hidden // k)
        granularity = check_granularity(hidden, width, num_experts, k)
        report.granularity = granularity
        w_in, w_out = site.w_in.detach().float(), site.w_out.detach().float()
        augment = site.b_in is not None
        if augment:  # the input bias as the weight of a constant 1 input; no output to that row
            w_in = torch.cat([w_in, site.b_in.detach().float().unsqueeze(1)], dim=1)
            w_out = torch.cat([w_out, w_out.new_zeros(1, hidden)], dim=0)
        dim = w_in.shape[1]
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        layer = build_moe_layer(dim=dim, hidden=width, num_experts=num_experts, router=router,
                                activation=site.activation, k=k, router_options=router_options)  # fmt: skip
        bank_in, bank_out = expert_copies(
            w_in, w_out, experts=num_experts, granularity=granularity, activation=site.activation, noise=noise,
            generator=generator,
        )  # fmt: skip
        with torch.no_grad():
            layer.experts.w_in.copy_(bank_in)
            layer.experts.w_out.copy_(bank_out)
            for param in layer.router.parameters():
                param.copy_(tie_router(param.detach(), num_experts=num_experts, granularity=granularity))
        dtype = site.w_in.dtype
        module = UpcycledFFN(layer, site.b_out, augment).to(device=site.w_in.device, dtype=dtype)
        site.install(module)
        report.replaced.append(site.name)
    return report


@dataclass
class MoEOutputs:
    """The MoE layers' outputs of the forward passes inside ``moe_outputs``."""

    outputs: list[MoEOutput] = field(default_factory=list)

    @property
    def aux_losses(self) -> dict[str, Tensor]:
        """Each auxiliary loss summed over the layers (and passes)."""
        total: dict[str, Tensor] = {}
        for out in self.outputs:
            for name, value in out.aux_losses.items():
                total[name] = total[name] + value if name in total else value
        return total

    @property
    def records(self) -> list:
        return [out.record for out in self.outputs]


@contextlib.contextmanager
def moe_outputs(model: nn.Module) -> Iterator[MoEOutputs]:
    """Collect the ``MoEOutput`` of every MoE layer of ``model`` run inside the block."""
    collected = MoEOutputs()
    handles = [
        m.register_forward_hook(lambda _m, _args, out: collected.outputs.append(out))
        for m in model.modules()
        if isinstance(m, MoELayer)
    ]
    try:
        yield collected
    finally:
        for handle in handles:
            handle.remove()
