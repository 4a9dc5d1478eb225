"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement.

Peng et al. 2022, "Balanced Multimodal Learning via On-the-fly Gradient Modulation": in joint
training the modality that already predicts well dominates the gradients and the other
stays under-trained. Each step, every modality gets a score, the mean probability the head
gives the true class from that modality alone; the encoder of a modality that scores
above the others has its gradient scaled down, and Gaussian noise with the gradient's own
standard deviation is added back ("generalisation enhancement": modulation shrinks SGD's
gradient noise, which helps generalisation).

    loss.backward()
    coefficients = ogm_ge(model, output, batch, alpha=0.5)   # before clipping and the step
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from modalmoe.data.batch import MultimodalBatch
from modalmoe.model.multimodal import ModelOutput
from modalmoe.objectives.base import has_data, unwrap


@torch.no_grad()
def modality_scores(model: nn.Module, output: ModelOutput, batch: MultimodalBatch) -> tuple[Tensor, Tensor]:
    """Per modality, the summed true-class probability of the head applied to its pooled
    representation, over the samples that have it, and how many there are.

    Returns:
        ([M] sums, [M] counts), summed over processes under ``torch.distributed``, so every
        replica modulates its gradients alike.
    """
    head = unwrap(model).head
    have = has_data(output).to(output.pooled.dtype)  # [B, M]
    target = batch.target.long().to(output.pooled.device).unsqueeze(1)
    probs = torch.stack(
        [head(output.pooled[:, m]).softmax(-1).gather(1, target).squeeze(1) for m in range(have.shape[1])], 1
    )  # [B, M]
    stats = torch.stack([(probs * have).sum(0), have.sum(0)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    return stats[0], stats[1]


def coefficients(sums: Tensor, counts: Tensor, alpha: float) -> list[float]:
    """k_m = 1 - tanh(alpha * relu(rho_m - 1)), rho_m = s_m / mean of the other scores.

    The paper uses ``1 - tanh(alpha * rho)`` for rho > 1, which jumps from 1 to
    ``1 - tanh(alpha)`` at rho = 1; ``rho - 1`` makes the modulation continuous. A modality
    without samples, or without another modality to compare with, keeps 1.
    """
    scores = [float(s / c) if c > 0 else None for s, c in zip(sums.tolist(), counts.tolist(), strict=True)]
    out = []
    for m, score in enumerate(scores):
        others = [s for j, s in enumerate(scores) if j != m and s is not None]
        if score is None or not others or sum(others) <= 0:
            out.append(1.0)
            continue
        rho = score / (sum(others) / len(others))
        out.append(1.0 - math.tanh(alpha * max(rho - 1.0, 0.0)))
    return out


@torch.no_grad()
def ogm_ge(
    model: nn.Module,
    output: ModelOutput,
    batch: MultimodalBatch,
    *,
    alpha: float,
    noise: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Modulate the encoders' gradients in place; call after ``backward`` and before clipping.

    Every parameter gradient of encoder m becomes ``k_m * g`` plus, with ``noise``,
    ``N(0, std(g))`` noise (std of the unmodulated gradient; as in the authors' code,
    every encoder gets noise, the non-dominant ones with k = 1 too).

    Args:
        model: a classification ``MultimodalModel`` (or a DDP wrapper of one).
        output: ``model(batch)``, the pass whose loss was backpropagated.
        batch: the batch; ``target`` [B] class indices.
        alpha: modulation strength.
        noise: add the generalisation-enhancement noise. Under DDP pass a ``generator``
            seeded alike on every process, so the replicas stay identical.
        generator: for the noise (torch's global RNG if None).

    Returns:
        modality -> its coefficient k_m (1 for modalities that are not dominant).
    """
    net = unwrap(model)
    if net.head is None or net.head.kind != "classification":
        kind = None if net.head is None else net.head.kind
        raise ValueError(f"OGM-GE scores modalities by class probabilities: it needs a classification head, got {kind}")
    sums, counts = modality_scores(net, output, batch)
    ks = coefficients(sums, counts, alpha)
    for name, k in zip(net.modalities, ks, strict=True):
        for p in net.encoders[name].parameters():
            if p.grad is None:
                continue
            std = p.grad.std() if p.grad.numel() > 1 else None  # one number has no spread
            p.grad.mul_(k)
            if noise and std is not None:
                draw = torch.randn(p.grad.shape, generator=generator, device=p.grad.device, dtype=p.grad.dtype)
                p.grad.add_(draw * (std + 1e-8))
    return dict(zip(net.modalities, ks, strict=True))
