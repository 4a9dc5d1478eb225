"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks: The
Sparsely-Gated Mixture-of-Experts Layer", section 2.1 and appendix A).

Each token scores the experts with a clean gate and, in training only, adds Gaussian noise
whose scale is learned per token and expert::

    H(x)_i = (x W_g)_i + eps_i * softplus((x W_noise)_i),   eps ~ N(0, 1)

It keeps the k largest components of ``H`` and takes a softmax over those alone (the other
experts get gate 0). In evaluation there is no noise: ``H`` is the clean logits, and routing
is deterministic.

The router computes the paper's two balancing losses itself (they need the noise, which only
the router knows) and returns them, unweighted, in ``Routing.aux``; weight them with
``train.aux_weights`` (``importance``, ``noisy_load``):

- ``importance``: ``CV(importance)^2``, ``importance_e`` the sum over tokens of expert e's gate;
- ``noisy_load``: ``CV(load)^2`` with the paper's smooth load estimator ``load_i = sum_x
  P(x, i)``, ``P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / std_i)``: the
  probability that expert i is still in the top k when its own noise is drawn again and the
  other components' noise is held (``std_i = softplus((x W_noise)_i) + noise_eps``).

In evaluation both losses use the clean logits in place of ``H`` and the same noise scale
``std``: ``P(x, i)`` is then the chance that one draw of expert i's training noise would keep
it in the top k, so the losses stay well defined, finite and close to their training values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalmoe.moe.routers import routers
from modalmoe.moe.routers.base import Router, mask_logits
from modalmoe.moe.types import Routing

#: Added to the squared mean of the CV, so that all-zero importance or load (no tokens) gives 0.
CV_EPS = 1e-10


@routers.register("noisy_top_k")
class NoisyTopKRouter(Router):
    """Noisy top-k gating with its importance and load losses.

    Args:
        dim: token width D.
        num_experts: E.
        k: experts per token.
        noise_eps: added to ``softplus((x W_noise)_i)``, a floor on the noise scale; it keeps
            the load estimator's division finite. Must be > 0.

    Initialisation: ``W_noise`` is zero, as in the paper (noise scale ``softplus(0) + noise_eps``,
    about 0.70, for every token and expert at the start). ``W_g`` is the small normal of
    ``token_choice`` (std ``1/sqrt(D)``), not the paper's zero: with zero ``W_g`` every clean
    logit ties, so an untrained model in evaluation sends every token to the same k experts (as
    ``torch.topk`` breaks the tie, which no device promises to do the same way); in training
    the noise spreads tokens either way, so both start near equal load.

    Returns ``probs`` [T, E] = softmax over the full ``H`` (noisy in training, clean in
    evaluation; rows sum to 1) and ``logits`` = ``H`` (so the z-loss sees the noisy logits in
    training). The gate weights [T, k] are the softmax over the k kept components, i.e. the
    chosen experts' ``probs`` renormalised to sum to 1.

    Accepts an expert mask (``allowed``, ``modalmoe.moe.masks``): experts a token may not use
    get -inf in ``H``, so they get no probability, can never be chosen, and add nothing to the
    load (``P(x, i) = 0``).
    """

    accepts_mask = True
    expert_params = {"weight": 0, "noise_weight": 0}
    losses = ("importance", "noisy_load")

    def __init__(self, *, dim: int, num_experts: int, k: int = 2, noise_eps: float = 1e-2) -> None:
        super().__init__(dim=dim, num_experts=num_experts, k=k)
        if not noise_eps > 0:
            raise ValueError(f"noise_eps must be > 0 (a floor on the noise scale), got {noise_eps}")
        self.noise_eps = float(noise_eps)
        self.weight = nn.Parameter(torch.empty(num_experts, dim))  # W_g, [E, D]
        nn.init.normal_(self.weight, std=1 / math.sqrt(dim))
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, dim))  # W_noise, [E, D]

    def noise_std(self, x: Tensor) -> Tensor:
        """The noise scale ``softplus(x W_noise) + noise_eps`` [T, E] of tokens ``x`` [T, D]."""
        return F.softplus(x @ self.noise_weight.t()) + self.noise_eps

    def forward(self, x: Tensor, modality: Tensor, sample: Tensor, allowed: Tensor | None = None) -> Routing:
        """x: [T, D]; modality, sample: [T] unused; allowed: [T, E] experts each token may use (None: all)."""
        clean = x @ self.weight.t()
        noise = torch.randn_like(clean) if self.training else None
        return noisy_top_k_gating(clean, self.noise_std(x), self.k, noise=noise, allowed=allowed)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", noise_eps={self.noise_eps}"


def noisy_top_k_gating(
    clean: Tensor, noise_std: Tensor, k: int, *, noise: Tensor | None = None, allowed: Tensor | None = None
) -> Routing:
    """Noisy top-k gating from its parts (the router's ``forward``, with the noise given).

    Args:
        clean: [T, E] clean logits ``x W_g``.
        noise_std: [T, E] noise scale, > 0.
        k: experts per token.
        noise: [T, E] standard normal draws (``H = clean + noise * noise_std``); None: no noise
            (evaluation, ``H = clean``).
        allowed: [T, E] experts each token may use (None: all); each token needs at least k.

    Returns:
        ``Routing`` with ``aux`` = {"importance", "noisy_load"} (float32 scalars).
    """
    h = clean if noise is None else clean + noise * noise_std
    h = mask_logits(h, allowed)
    values, index = _top(h, k)
    weight = F.softmax(values[:, :k], dim=-1, dtype=torch.float32).to(h.dtype)
    probs = F.softmax(h, dim=-1, dtype=torch.float32).to(h.dtype)
    expert_index = index[:, :k]
    gates = torch.zeros_like(h, dtype=torch.float32).scatter(1, expert_index, weight.float())
    p = load_probability(clean, h, noise_std, k, allowed=allowed, top=(values, index))
    aux = {"importance": cv_squared(gates.sum(0)), "noisy_load": cv_squared(p.sum(0))}
    return Routing(expert_index=expert_index, weight=weight, probs=probs, logits=h, aux=aux)


def kth_excluding(h: Tensor, k: int, *, top: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """[T, E]: for each token and expert i, the k-th largest of ``h`` [T, E] over the experts
    other than i: the k-th largest overall if i is not among the top k, else the (k+1)-th;
    -inf where that does not exist (k = E: every expert is always chosen).

    ``top``: ``_top(h, k)`` when the caller has it, so ties resolve as in its choice.
    """
    tokens, experts = h.shape
    values, index = _top(h, k) if top is None else top
    kth = values[:, k - 1 : k]
    if experts > k:
        after = values[:, k : k + 1]
    else:
        after = h.new_full((tokens, 1), float("-inf"))
    in_top = torch.zeros_like(h, dtype=torch.bool).scatter(1, index[:, :k], True)
    return torch.where(in_top, after, kth)


def load_probability(
    clean: Tensor,
    h: Tensor,
    noise_std: Tensor,
    k: int,
    *,
    allowed: Tensor | None = None,
    top: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The paper's smooth load estimator ``P(x, i)`` [T, E] (float32): the probability that
    expert i is in the top k of ``H`` when its own noise is drawn again and the others' kept.

    Args:
        clean: [T, E] clean logits ``x W_g``.
        h: [T, E] the (masked) ``H`` the choice was made on.
        noise_std: [T, E] noise scale, > 0.
        k: experts per token.
        allowed: [T, E] experts each token may use; the others get P = 0.
        top: ``_top(h, k)`` when the caller has it.

    An expert with no k-th competitor (k = E, or only k experts allowed) is always chosen: P = 1.
    """
    threshold = kth_excluding(h.float(), k, top=None if top is None else (top[0].float(), top[1]))
    compete = torch.isfinite(threshold)
    # Where there is no competitor the formula is not evaluated on -inf, so no NaN gradient leaks.
    z = (clean.float() - threshold.where(compete, 0.0)) / noise_std.float()
    p = torch.where(compete, torch.special.ndtr(z), torch.ones_like(z))
    return p if allowed is None else p.masked_fill(~allowed, 0.0)


def cv_squared(values: Tensor) -> Tensor:
    """The squared coefficient of variation ``var / mean^2`` of ``values`` [E] (population
    variance), in float32: 0 when all are equal, 0 for one value (E = 1) and for all zeros."""
    values = values.float()
    if values.numel() <= 1:
        return (values * 0).sum()  # 0, still on the graph
    mean = values.mean()
    return (values - mean).square().mean() / (mean.square() + CV_EPS)


def _top(h: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k + 1 largest components of ``h`` [T, E] (k when k = E), largest first."""
    return torch.topk(h, min(k + 1, h.shape[-1]), dim=-1)
