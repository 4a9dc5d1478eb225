"""Expert communication: let a token's k chosen experts exchange information before they are summed.

In a top-k MoE the k expert outputs of a token never see each other; the layer just returns
``sum_j w_j o_j``. Multimodal MoE papers route modalities to different experts (LIMoE, VLMo,
FuseMoE) but still combine those experts' views by a weighted sum. The topologies here add a
learned exchange among the k outputs of *one* token (never across tokens, so the layer stays
per token wherever its router is), then take the same gate-weighted sum.

Every topology takes ``(outputs [T, k, D] ungated expert outputs, weight [T, k] gates,
keep [T, k] bool)`` and returns ``[T, D]``. Choices with ``keep`` False (invalid under expert
choice, or dropped by a capacity limit) are neither senders nor receivers, and a token with
no kept choice comes out as 0, exactly like the plain sum. Each topology's output projection
starts at zero, so a fresh layer with communication computes the same function as ``none``
and training grows the exchange from there.

Cost of the exchange, forward FLOPs per token (a multiply-add counts 2, matmuls only, as
``torch.utils.flop_counter`` counts them; the LayerNorm, softmax, GELU and the weighted sum are
elementwise and not counted). ``D`` is the model width, ``r`` the exchange width (``hidden``,
default ``D // 4``), ``k`` the choices per token:

============  ===========================  ==================================================
topology      FLOPs per token              what it computes
============  ===========================  ==================================================
``none``      0                            ``sum_j w_j o_j``
``dense``     ``8*k*D*r + 4*k**2*r``       one attention head over the k outputs (q, k, v:
                                           ``6kDr``; out: ``2kDr``; scores and mixing:
                                           ``4k^2 r``), residual, then the weighted sum
``star``      ``4*D*r``                    the top-weighted kept output (the hub) sends one
                                           low-rank message (``D->r->D``) to every other kept
                                           output; independent of k
============  ===========================  ==================================================

Expert-choice routing presents each token's choices as all ``E`` experts with a ``valid``
mask, so there ``k = E`` in the table (``dense`` then costs ``O(E^2 r)`` per token).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalmoe.registry import Registry

communications = Registry("communication")


def gated_sum(outputs: Tensor, weight: Tensor, keep: Tensor) -> Tensor:
    """``sum_j w_j o_j`` over kept choices.

    Args:
        outputs: [T, k, D] ungated expert outputs.
        weight: [T, k] gate weights.
        keep: [T, k] choices that count.

    Returns:
        [T, D]. Elementwise product and sum (not a matmul), so it adds no counted FLOPs.
    """
    w = torch.where(keep, weight, 0).to(outputs.dtype)
    return (outputs * w.unsqueeze(-1)).sum(1)


class Communication(nn.Module):
    """Base class: holds D and r and checks them.

    Args:
        dim: model width D.
        hidden: exchange width r (default ``max(1, D // 4)``).
    """

    def __init__(self, *, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = max(1, dim // 4) if hidden is None else hidden
        if dim < 1 or hidden < 1:
            raise ValueError(f"communication dim and hidden must be >= 1, got dim={dim}, hidden={hidden}")
        self.dim, self.hidden = dim, hidden

    def flops_per_token(self, dim: int, k: int) -> int:
        """Forward matmul FLOPs per token for width ``dim`` (must be this module's) and k choices."""
        if dim != self.dim:
            raise ValueError(f"this {type(self).__name__} was built for dim={self.dim}, asked about dim={dim}")
        return self._flops(dim, self.hidden, k)

    @staticmethod
    def _flops(dim: int, hidden: int, k: int) -> int:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}"


@communications.register("none")
class NoCommunication(Communication):
    """The usual MoE combine: ``sum_j w_j o_j``. ``MoELayer`` recognises it and keeps its fused
    path (the gate scales rows inside the expert kernel), so this forward is only a reference."""

    @staticmethod
    def _flops(dim: int, hidden: int, k: int) -> int:
        return 0

    def forward(self, outputs: Tensor, weight: Tensor, keep: Tensor) -> Tensor:
        """outputs: [T, k, D], weight: [T, k], keep: [T, k] -> [T, D]."""
        return gated_sum(outputs, weight, keep)


@communications.register("dense")
class DenseCommunication(Communication):
    """All-to-all: the k outputs of a token attend to each other, then the weighted sum.

    ``z_j = o_j + W_o attn(LN(o))_j`` with one head of width r; kept choices are the only keys.
    As in a transformer a choice is also its own key, so a lone kept choice still gets a
    (residual) update. The output projection starts at zero (so ``z = o`` at init).
    """

    def __init__(self, *, dim: int, hidden: int | None = None) -> None:
        super().__init__(dim=dim, hidden=hidden)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * self.hidden)  # q, k and v in one matmul: same FLOPs, one call
        self.out = nn.Linear(self.hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @staticmethod
    def _flops(dim: int, hidden: int, k: int) -> int:
        return 8 * k * dim * hidden + 4 * k * k * hidden

    def forward(self, outputs: Tensor, weight: Tensor, keep: Tensor) -> Tensor:
        """outputs: [T, k, D], weight: [T, k], keep: [T, k] -> [T, D]."""
        q, k, v = self.qkv(self.norm(outputs)).chunk(3, dim=-1)  # [T, k, r] each
        # A token with no kept choice would softmax over nothing (NaN); let it attend to all
        # its (zero) rows instead: its every output is then multiplied by a zero gate.
        key_ok = keep | ~keep.any(-1, keepdim=True)
        scores = (q * (1 / math.sqrt(self.hidden))) @ k.transpose(1, 2)  # [T, k, k]
        attn = scores.masked_fill(~key_ok.unsqueeze(1), float("-inf")).softmax(-1)
        return gated_sum(outputs + self.out(attn @ v), weight, keep)


@communications.register("star")
class StarCommunication(Communication):
    """Hub and spokes: the top-weighted kept choice broadcasts a message to the other kept ones.

    ``m = W_2 GELU(W_1 LN(o_hub))``, ``z_j = o_j + m`` for kept ``j != hub``, ``z_hub = o_hub``;
    then the weighted sum. One message per token, so the cost does not grow with k; with a
    single kept choice there is nobody to talk to and the result is the plain sum. ``W_2``
    starts at zero (so ``z = o`` at init).
    """

    def __init__(self, *, dim: int, hidden: int | None = None) -> None:
        super().__init__(dim=dim, hidden=hidden)
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, self.hidden)
        self.up = nn.Linear(self.hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @staticmethod
    def _flops(dim: int, hidden: int, k: int) -> int:
        return 4 * dim * hidden

    def forward(self, outputs: Tensor, weight: Tensor, keep: Tensor) -> Tensor:
        """outputs: [T, k, D], weight: [T, k], keep: [T, k] -> [T, D]."""
        hub = torch.where(keep, weight, float("-inf")).argmax(-1)  # [T]; any index if nothing is kept
        hub_out = outputs.gather(1, hub.view(-1, 1, 1).expand(-1, 1, outputs.shape[-1])).squeeze(1)
        message = self.up(F.gelu(self.down(self.norm(hub_out))))  # [T, D]
        receive = keep.clone()
        receive.scatter_(1, hub.unsqueeze(1), False)
        return gated_sum(outputs + receive.unsqueeze(-1).to(outputs.dtype) * message.unsqueeze(1), weight, keep)
