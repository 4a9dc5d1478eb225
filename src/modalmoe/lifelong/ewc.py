"""Elastic Weight Consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting
in neural networks"): a quadratic pull towards the old solution, weighted per parameter by
how much the old task's likelihood depends on it.

    penalty = lambda / 2 * sum_i F_i (theta_i - theta*_i)^2

``theta*`` are the run's trained values and ``F`` the diagonal of the Fisher information of
the run's model on its own task and modalities (its training split): the mean over samples
of the squared gradient of ``log p(y | x)`` with ``y`` drawn from the model's own prediction
(the "true" Fisher, one label per sample, from a fixed generator, so it is reproducible and
leaves torch's global RNG alone). For a grown tensor the penalty covers the run's leading
slice; new experts and new router rows are free.

``F`` and ``theta*`` are buffers of the ``EWCPenalty`` objective, so a checkpoint keeps them
and a resumed run continues with exactly the same penalty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalmoe.objectives.base import Objective, unwrap
from modalmoe.run import RunDir, load_run_model


def _key(name: str) -> str:
    return name.replace(".", "__")  # buffer names cannot hold dots


class _Tensors(nn.Module):
    """Named buffers (a dotted parameter name -> a tensor)."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        super().__init__()
        for name, value in tensors.items():
            self.register_buffer(_key(name), value.detach().clone())

    def get(self, name: str) -> Tensor:
        return getattr(self, _key(name))


@torch.enable_grad()
def fisher_diagonal(model, dataset, *, samples: int = 512, seed: int = 0) -> dict[str, Tensor]:
    """The diagonal Fisher of ``model`` on ``samples`` samples of ``dataset`` (a fixed random
    subset), per parameter name.

    Args:
        model: a ``MultimodalModel`` with a prediction head (put in eval mode here).
        dataset: the ``MultimodalDataset`` of the model's own task and modalities.
        samples: how many samples the mean runs over (at most ``len(dataset)``).
        seed: picks the samples and the drawn labels.
    """
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(dataset), generator=generator)[: min(samples, len(dataset))]
    params = {n: p for n, p in model.named_parameters()}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    kind = model.head.kind
    for row in rows.tolist():
        logits = model(dataset.batch([row])).logits
        with torch.no_grad():  # the label is drawn from the model's own prediction
            scores = logits.detach().float().cpu()
            if kind == "classification":
                label = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).squeeze(1)
            elif kind == "multilabel":
                label = torch.bernoulli(torch.sigmoid(scores), generator=generator)
            else:
                label = scores + torch.randn(scores.shape, generator=generator)
        if kind == "classification":
            nll = F.cross_entropy(logits, label.to(logits.device))
        elif kind == "multilabel":
            nll = F.binary_cross_entropy_with_logits(logits, label.to(logits.device), reduction="sum")
        else:
            nll = 0.5 * ((logits - label.to(logits.device)) ** 2).sum()
        grads = torch.autograd.grad(nll, list(params.values()), allow_unused=True)
        for name, grad in zip(params, grads, strict=True):
            if grad is not None:
                fisher[name] += grad.detach() ** 2
    return {n: f / len(rows) for n, f in fisher.items()}


class EWCPenalty(Objective):
    """``lambda / 2 * sum F (theta - theta*)^2`` over the named parameters of the model.

    Not registered as a config objective: ``train.grow.ewc`` adds it (``prepare_growth``),
    since it needs the run and what the grown model took from it.

    Args:
        fisher: parameter name -> diagonal Fisher, shaped like the run's tensor.
        anchor: parameter name -> the run's value theta*.
        strength: lambda.
        grown: name -> ``[dim, old size, new size]`` for tensors whose expert dimension grew
            (the penalty covers their leading ``old size`` slice).
    """

    def __init__(
        self,
        *,
        fisher: Mapping[str, Tensor],
        anchor: Mapping[str, Tensor],
        strength: float,
        grown: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        if set(fisher) != set(anchor):
            raise ValueError("EWC: the Fisher and the anchor must name the same parameters")
        if strength < 0:
            raise ValueError(f"EWC: strength must be >= 0, got {strength}")
        self.names = list(fisher)
        self.strength = float(strength)
        self.grown = {n: (int(v[0]), int(v[1])) for n, v in (grown or {}).items() if n in fisher}
        self.fisher, self.anchor = _Tensors(fisher), _Tensors(anchor)

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        *,
        names: Sequence[str],
        grown: Mapping[str, Sequence[int]] | None = None,
        strength: float,
        samples: int = 512,
    ) -> EWCPenalty:
        """The penalty for parameters ``names``, with the Fisher of run ``run_dir``'s best
        model on its own task and modalities (training split)."""

        with torch.random.fork_rng(devices=[]):  # building the run's model draws an init: keep the RNG as it was
            model = load_run_model(run_dir)
        task = RunDir(run_dir).task()
        fisher = fisher_diagonal(model, task.train, samples=samples)
        theirs = dict(model.named_parameters())
        missing = [n for n in names if n not in theirs]
        if missing:
            raise ValueError(f"EWC: run {str(run_dir)!r} has no parameters {missing[:4]}; it is not this model's run")
        return cls(
            fisher={n: fisher[n] for n in names},
            anchor={n: theirs[n].detach() for n in names},
            strength=strength,
            grown=grown,
        )

    def penalty(self, model: nn.Module) -> Tensor:
        """The unscaled ``sum F (theta - theta*)^2`` for ``model`` (a ``MultimodalModel``)."""
        params = dict(model.named_parameters())
        total = next(iter(params.values())).new_zeros(())
        for name in self.names:
            value = params[name]
            if name in self.grown:
                dim, size = self.grown[name]
                value = value.narrow(dim, 0, size)
            total = total + (self.fisher.get(name) * (value - self.anchor.get(name)) ** 2).sum()
        return total

    def forward(self, output, batch, model) -> dict[str, Tensor]:
        return {"loss": 0.5 * self.strength * self.penalty(unwrap(model))}

    def extra_repr(self) -> str:
        return f"strength={self.strength:g}, tensors={len(self.names)}"
