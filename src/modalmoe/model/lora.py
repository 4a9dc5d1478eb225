"""LoRA: fine-tune low-rank adapters on a frozen base (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models").

    report = apply_lora(model, LoRAConfig(rank=4))    # in place; the base is frozen
    report.trainable, report.total, report.fraction
    ...train...
    plain = merge_lora(model)                          # adapters folded into the base weights

Two kinds of adapter:

- ``nn.Linear`` (and ``Conv1d``/``Conv2d``) modules named by ``targets`` get Hugging Face
  ``peft``'s LoRA layers (``y = W x + (alpha/r) B A dropout(x)``), so their init, merge and
  dropout are peft's, well tested and maintained;
- every ``ExpertBank`` (stacked expert weights ``w_in`` [E, D, W], ``w_out`` [E, F, D], which
  peft cannot see) gets per-expert factors ``A`` [E, in, r] and ``B`` [E, r, out]: the bank
  reads ``w + (alpha/r) A @ B`` through a ``torch.nn.utils.parametrize`` parametrization,
  computed once per forward and handed to the grouped expert kernel, so the fast path runs
  unchanged. Each expert has its own adapter, as each has its own weights.

``B`` starts at zero in both, so the adapted model starts equal to the base. Everything else
is frozen except the heads with ``train_heads`` (a new task needs a new head). Heads are
never adapted. Checkpoints store the adapted model's ``state_dict`` (base and adapter
tensors); ``apply_lora`` with the run's config rebuilds the same modules before loading.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from modalmoe.config import LoRAConfig
from modalmoe.moe.experts import ExpertBank

#: Module types peft's LoRA adapts here.
ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: Top-level submodules that are heads (trained whole or frozen, never adapted).
HEADS = ("head", "embedding_head")


@dataclass
class LoRAReport:
    """What ``apply_lora`` did.

    Attributes:
        modules: the ``nn.Linear``/conv modules given a peft adapter.
        experts: the ``ExpertBank`` s given stacked adapters.
        trainable: trainable parameters after freezing.
        total: all parameters (base, adapters, heads).
    """

    modules: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)
    trainable: int = 0
    total: int = 0

    @property
    def fraction(self) -> float:
        """trainable / total."""
        return self.trainable / max(1, self.total)

    def summary(self) -> str:
        """One line for the console."""
        return (
            f"LoRA: {len(self.modules)} linear/conv modules and {len(self.experts)} expert banks adapted; "
            f"trainable parameters {self.trainable:,} of {self.total:,} ({100 * self.fraction:.2f}%)"
        )


class StackedLoRA(nn.Module):
    """The parametrization ``w -> w + (alpha/r) A @ B`` of a stacked weight ``w`` [E, in, out].

    Args:
        weight: the base weight (for shape, dtype and device).
        rank: r.
        alpha: scale numerator.
    """

    def __init__(self, weight: Tensor, *, rank: int, alpha: float) -> None:
        super().__init__()
        experts, fan_in, fan_out = weight.shape
        self.scaling = alpha / rank
        # peft's init: A like nn.Linear's weight (uniform +-1/sqrt(fan_in)), B zero.
        bound = 1 / math.sqrt(fan_in)
        like = dict(dtype=weight.dtype, device=weight.device)
        self.lora_A = nn.Parameter(torch.empty(experts, fan_in, rank, **like).uniform_(-bound, bound))
        self.lora_B = nn.Parameter(torch.zeros(experts, rank, fan_out, **like))

    def forward(self, weight: Tensor) -> Tensor:
        """weight: [E, in, out] -> the adapted weight, same shape."""
        return weight + self.scaling * torch.bmm(self.lora_A, self.lora_B)

    def extra_repr(self) -> str:
        experts, fan_in, rank = self.lora_A.shape
        return f"experts={experts}, in={fan_in}, out={self.lora_B.shape[-1]}, rank={rank}, scaling={self.scaling:g}"


def is_head(name: str) -> bool:
    """Whether a parameter or module name lies in a head."""
    return name.split(".", 1)[0] in HEADS


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a LoRA factor (peft's ``lora_A``/``lora_B`` or ours)."""
    return any(part.startswith("lora_") for part in name.split("."))


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters."""
    return any(is_adapter(name) for name, _ in model.named_parameters())


def lora_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the ``nn.Linear``/conv modules outside the heads that ``targets`` name
    (a target matches a module whose name equals it or ends with ``"." + target``)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, ADAPTABLE)
        and not is_head(name)
        and any(name == t or name.endswith("." + t) for t in targets)
    ]


class _Holder(nn.Module):
    """A config-free parent for peft: peft reads ``model.config`` as a Hugging Face config,
    which a ``MultimodalModel``'s pydantic config is not. Adapters land in ``model`` itself."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def apply_lora(model: nn.Module, config: LoRAConfig) -> LoRAReport:
    """Add LoRA adapters to ``model`` in place and freeze everything else (heads excepted
    with ``config.train_heads``).

    Args:
        model: a built model (after ``init_from_run`` when starting from a run).
        config: ``train.lora``; ``rank`` must be > 0.

    Returns:
        the adapted modules and the trainable parameter count.
    """
    if config.rank < 1:
        raise ValueError("apply_lora needs lora.rank >= 1 (rank 0 means LoRA is off)")
    if has_lora(model):
        raise ValueError("this model already has LoRA adapters; merge_lora it first or build a fresh one")
    report = LoRAReport(modules=lora_targets(model, config.targets))
    if report.modules:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as err:  # a declared dependency; a broken install says so
            raise ImportError(f"LoRA on nn.Linear modules needs the peft package ({err}); pip install peft") from None
        peft_config = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=[f"model.{name}" for name in report.modules],
            bias="none",
        )
        inject_adapter_in_model(peft_config, _Holder(model))
    if config.experts:
        for name, module in model.named_modules():
            if isinstance(module, ExpertBank) and not is_head(name):
                for weight in ("w_in", "w_out"):
                    adapter = StackedLoRA(getattr(module, weight), rank=config.rank, alpha=config.alpha)
                    parametrize.register_parametrization(module, weight, adapter)
                report.experts.append(name)
    if not report.modules and not report.experts:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, ADAPTABLE)})
        raise ValueError(
            f"lora.targets {config.targets} match no module of this model and lora.experts "
            f"{'finds no expert bank' if config.experts else 'is off'}; its linear/conv modules are named {linear}"
        )
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name) or (config.train_heads and is_head(name)))
    report.trainable, report.total = count_parameters(model)
    return report


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place, and return the plain model: the
    modules and ``state_dict`` names of a model that never had adapters, every parameter
    trainable again, and the same outputs (up to float rounding)."""
    peft_layers = []
    if "peft" in sys.modules:  # no peft layer can exist before peft is imported
        from peft.tuners.tuners_utils import BaseTunerLayer

        peft_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in peft_layers:
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for weight in list(module.parametrizations):
                if all(isinstance(p, StackedLoRA) for p in module.parametrizations[weight]):
                    parametrize.remove_parametrizations(module, weight, leave_parametrized=True)
    for param in model.parameters():
        param.requires_grad_(True)
    return model
