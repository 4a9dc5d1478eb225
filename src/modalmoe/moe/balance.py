"""Auxiliary-loss-free load balancing (DeepSeek-V3, Wang et al. 2024 "Auxiliary-Loss-Free Load
Balancing Strategy for Mixture-of-Experts").

A router that balances this way adds a per-expert bias ``b`` to its scores only to *choose*
experts; the gate weights come from the unbiased scores, so ``b`` never enters the forward
output nor receives a gradient. Outside backprop, once per optimizer step, each expert's bias
moves by ``rate * sign(mean_load - load_e)`` (underloaded experts up, overloaded down) and
the biases are re-centred to mean 0.

``ExpertBias`` holds the two buffers a router needs: ``bias`` [E] and ``load`` [E], the
assignments counted since the last update. Both are persistent, so a checkpoint carries them
and a resumed run continues bit for bit. The pitfalls other implementations hit are handled
here, each tested:

- only training passes count (``count`` is a no-op in eval mode or under ``no_grad``, so
  validation, prediction and FLOPs counting never move the bias);
- under gradient accumulation the micro-batches' counts add up and the bias moves once per
  optimizer step (``update`` is called after the step, ``train/callbacks/balance.py``);
- in a distributed run ``update_biases`` sums the counts over every rank before the update,
  so all ranks apply the same step from the global load (DDP must not broadcast these
  buffers from rank 0: ``balance_keys`` names them for DDP to ignore).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class ExpertBias(nn.Module):
    """A router's load-balancing bias over ``num_experts`` experts.

    Args:
        num_experts: E.
        rate: the bias step per update (Megatron-Core's default is 1e-3); must be > 0.
    """

    def __init__(self, num_experts: int, rate: float = 1e-3) -> None:
        super().__init__()
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
            raise ValueError(f"bias_rate must be a number > 0 (the bias step per optimizer step), got {rate!r}")
        self.rate = float(rate)
        self.register_buffer("bias", torch.zeros(num_experts))
        self.register_buffer("load", torch.zeros(num_experts))

    @property
    def num_experts(self) -> int:
        return self.bias.shape[0]

    def choose(self, scores: Tensor) -> Tensor:
        """The scores [T, E] to choose experts by: ``scores + bias`` (never the gate weights)."""
        return scores + self.bias.to(scores.dtype)

    def count(self, index: Tensor, valid: Tensor | None = None) -> None:
        """Add a training pass's chosen experts ``index`` [T, k] (``valid`` [T, k] marks real
        choices) to the load; eval passes and passes without gradients count nothing."""
        if not (self.training and torch.is_grad_enabled()):
            return
        weights = None if valid is None else valid.reshape(-1).to(self.load.dtype)
        counts = torch.bincount(index.reshape(-1), weights=weights, minlength=self.num_experts)
        self.load += counts[: self.num_experts].to(self.load.dtype)

    @torch.no_grad()
    def update(self, load: Tensor | None = None) -> None:
        """One step: ``bias += rate * sign(mean(load) - load)``, re-centred to mean 0; then
        the counts start again. ``load``: the (globally summed) counts; default this module's.
        No step when nothing was counted."""
        load = self.load if load is None else load.to(self.load.dtype)
        if float(load.sum()) > 0:
            self.bias += self.rate * torch.sign(load.mean() - load)
            self.bias -= self.bias.mean()
        self.load.zero_()

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, rate={self.rate}"


def expert_biases(model: nn.Module) -> list[ExpertBias]:
    """Every ``ExpertBias`` in ``model``, in module order (the same on every rank)."""
    return [module for module in model.modules() if isinstance(module, ExpertBias)]


def balance_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the balancing buffers: DDP must leave them alone (it would overwrite
    each rank's counts with rank 0's at every forward)."""
    return [
        f"{name}.{buffer}" if name else buffer
        for name, module in model.named_modules()
        if isinstance(module, ExpertBias)
        for buffer in ("bias", "load")
    ]


def update_biases(model: nn.Module, group=None) -> int:
    """After an optimizer step: update every balancing bias in ``model`` from its counts,
    summed over the ranks of ``group`` (the default group when distributed). Returns the
    number of biases updated."""
    biases = expert_biases(model)
    if not biases:
        return 0
    loads = torch.cat([b.load for b in biases])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        loads = loads.clone()
        dist.all_reduce(loads, group=group)
    for bias, load in zip(biases, torch.split(loads, [b.num_experts for b in biases]), strict=True):
        bias.update(load)
    return len(biases)
