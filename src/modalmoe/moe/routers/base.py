"""What every router shares: argument checks, the gating functions and jitter noise.

The router contract: ``(x [T, D], modality [T], sample [T]) -> Routing``. Routers that
declare ``accepts_mask`` also take ``allowed`` [T, E], the experts each token may use
(``modalmoe.moe.masks``), and never route a token to another; routers that declare
``accepts_task`` also take ``task`` [T], each token's task id (None outside a task mixture). Routers never touch expert
weights and hold no per-pass state: what a pass is for arrives as an argument.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GATINGS = ("softmax", "sigmoid", "laplace")


class Router(nn.Module):
    """Base class: holds E and k and checks them.

    Args:
        dim: token width D.
        num_experts: E.
        k: experts per token.
    """

    def __init__(self, *, dim: int, num_experts: int, k: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be between 1 and num_experts={num_experts}, got k={k}")
        self.dim, self.num_experts, self.k = dim, num_experts, k

    #: Parameters with one slice per expert, and the dim that indexes experts (``{"weight":
    #: 0}`` for an [E, D] projection). Routers that declare them support ``keep_experts``
    #: (expert pruning, ``modalmoe.efficiency.experts``); an empty mapping means the router's
    #: experts are tied to a structure pruning would break (e.g. modality groups).
    expert_params: dict[str, int] = {}

    #: Whether ``forward`` takes ``allowed`` [T, E] (an expert mask, ``modalmoe.moe.masks``).
    accepts_mask: bool = False

    #: Whether the number of experts a token runs depends on its routing (top-p, null experts):
    #: the FLOPs then follow what the router learns, and matching designs by the FLOPs of an
    #: untrained router measures its first guess; compare such designs at equal parameters
    #: (a suite's ``match_designs: {<design>: {match: params, like: token-choice}}``).
    adaptive: bool = False

    #: Names of the auxiliary losses this router computes itself and returns in
    #: ``Routing.aux`` (every pass), beside the layer's ``modalmoe.moe.losses``; the trainer
    #: weights them through ``train.aux_weights`` like the others.
    losses: tuple[str, ...] = ()

    #: Whether ``forward`` takes ``task`` [T], each token's task id (a task mixture's samples
    #: carry it), so the router can condition on the task as others do on the modality.
    accepts_task: bool = False

    @property
    def min_open(self) -> int:
        """The fewest experts a token must be allowed for this router to route it (k for
        top-k choice)."""
        return self.k

    def keep_experts(self, index: Tensor) -> None:
        """Keep only experts ``index`` (in that order), in place: after this the router scores
        ``len(index)`` experts, and expert ``j`` is the old ``index[j]``."""
        if not self.expert_params:
            raise NotImplementedError(
                f"{type(self).__name__} does not support dropping experts (its experts are tied to a "
                "structure such as modality groups); prune a token_choice, expert_choice, soft or "
                "per_modality model instead"
            )
        if not 1 <= len(index) <= self.num_experts or len(set(index.tolist())) != len(index):
            raise ValueError(f"keep 1..{self.num_experts} distinct experts, got {index.tolist()}")
        if self.k > len(index):
            raise ValueError(f"cannot keep {len(index)} experts with k={self.k}: keep at least k")
        for name, dim in self.expert_params.items():
            param = getattr(self, name)
            per_expert = param.shape[dim] // self.num_experts  # soft MoE: slots per expert
            rows = (index.unsqueeze(1) * per_expert + torch.arange(per_expert)).reshape(-1)
            setattr(self, name, nn.Parameter(param.detach().index_select(dim, rows.to(param.device))))
        self.num_experts = len(index)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, k={self.k}"


def check_gating(gating: str) -> None:
    if gating not in GATINGS:
        raise ValueError(f"unknown gating {gating!r}; choose one of {GATINGS}")


def jitter(x: Tensor, eps: float, training: bool) -> Tensor:
    """Switch Transformer's router noise: multiply inputs by U(1-eps, 1+eps) in training."""
    if not training or eps <= 0:
        return x
    return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)


def laplace_logits(x: Tensor, keys: Tensor) -> Tensor:
    """FuseMoE's Laplace gating: logits are negative distances to expert keys.

    x: [T, D], keys: [E, D] -> [T, E].
    """
    return -torch.cdist(x, keys)


def top_k_gating(logits: Tensor, k: int, *, gating: str = "softmax", normalize: bool = True):
    """Top-k choice from router logits.

    Args:
        logits: [T, E]. For Laplace gating, pass ``laplace_logits`` and ``gating="laplace"``.
        k: experts per token.
        gating: "softmax" (and "laplace": a softmax over negative distances) or "sigmoid"
            (independent scores, as in DeepSeek-V3).
        normalize: rescale the k chosen weights to sum to 1 (Mixtral); False keeps raw
            probabilities (Switch, GShard with k=1).

    Returns:
        (expert_index [T, k], weight [T, k], probs [T, E]); probs rows sum to 1.
    """
    if gating == "sigmoid":
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(-1, keepdim=True)
    else:
        scores = probs = F.softmax(logits, dim=-1, dtype=torch.float32).to(logits.dtype)
    weight, index = torch.topk(scores, k, dim=-1)
    if normalize:
        weight = weight / weight.sum(-1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
    return index, weight, probs


def mask_logits(logits: Tensor, allowed: Tensor | None) -> Tensor:
    """``logits`` [T, E] with experts a token may not use (``allowed`` False) set to -inf."""
    if allowed is None:
        return logits
    if allowed.shape != logits.shape:
        raise ValueError(f"allowed must be [T, E] = {tuple(logits.shape)}, got {tuple(allowed.shape)}")
    return logits.masked_fill(~allowed, float("-inf"))


def check_modality_ids(modality: Tensor, num_modalities: int) -> None:
    """Modality ids must index the router's declared modalities."""
    check_ids(modality, num_modalities, "modality", "modalities")


def check_ids(ids: Tensor, count: int, name: str, plural: str) -> None:
    """Group ids (modality, task) must index the router's ``count`` declared groups."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= count):
        raise ValueError(
            f"{name} ids must be in [0, {count}) for this router's {count} {plural}, "
            f"got values in [{int(ids.min())}, {int(ids.max())}]"
        )


def task_ids(task: Tensor | None, tasks: tuple[str, ...], tokens: int, device: torch.device) -> Tensor:
    """The task id of each of ``tokens`` tokens for a router that conditions on the task: the
    layer's ``task`` [T], or all 0 for a router declared over one task."""
    if task is None:
        if len(tasks) == 1:
            return torch.zeros(tokens, dtype=torch.long, device=device)
        raise ValueError(
            f"this router conditions on the task ({len(tasks)} tasks: {list(tasks)}) but got no task ids; "
            "train it on a task mixture (task: mixture), whose batches carry meta['task']"
        )
    check_ids(task, len(tasks), "task", "tasks")
    return task


def grouped_logits(x: Tensor, group: Tensor, weight: Tensor, gating: str) -> Tensor:
    """Router logits from one gate per group (modality or task).

    x: [T, D], group: [T] ids into ``weight`` [G, E, D] -> [T, E]. One small matmul per group
    present (G is a handful), not a [T, E, D] gather."""
    logits = x.new_empty(x.shape[0], weight.shape[1])
    for g in torch.unique(group).tolist():
        rows = (group == g).nonzero().squeeze(-1)
        xg = x.index_select(0, rows)
        part = laplace_logits(xg, weight[g]) if gating == "laplace" else xg @ weight[g].t()
        logits = logits.index_copy(0, rows, part)
    return logits
