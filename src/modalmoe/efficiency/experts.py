"""Expert pruning and merging after training.

    usage = expert_usage(model, task.valid)                 # layer -> [E] share of assignments
    pruned = prune_experts(model, keep=4, usage=usage)      # the 4 most used experts per layer
    merged = merge_experts(model, into=4, usage=usage, by="outputs", data=task.valid)

- **Pruning** drops each MoE layer's least-used experts (usage measured on held-out data)
  together with their router rows, so tokens re-route among the experts left (Lu et al.
  2024, "Not All Experts are Equal"; Chen et al. 2022, task-specific expert pruning). The
  model is an ordinary MoE with ``num_experts = keep``.
- **Merging** clusters each layer's experts into ``into`` groups and replaces every group by
  one expert, the usage-weighted average of its members after their hidden units are
  aligned to the group's most used member (MC-SMoE, Li et al. 2024, which also merges by
  usage after permutation alignment). Similarity is by ``weights`` (cosine between the
  aligned weight matrices) or by ``outputs`` (cosine between the experts' outputs on the
  layer's own input tokens). The router is kept: it still scores every original expert,
  and a per-layer ``expert_map`` sends each choice to its merged expert, so the routing
  decisions the model learned are unchanged; only the experts behind them are shared.

Both return a new model (the input is untouched) whose ``config`` describes the new
structure, so a saved copy rebuilds and loads (``modalmoe compress``).
"""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import squareform
from torch import Tensor, nn

from modalmoe.moe.experts import ExpertBank, _activate
from modalmoe.moe.layer import MoELayer


def moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """name -> MoE layer, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}


def _batches(dataset, batch_size: int):
    for start in range(0, len(dataset), batch_size):
        yield dataset.batch(range(start, min(len(dataset), start + batch_size)))


@torch.no_grad()
def expert_usage(model: nn.Module, dataset, *, batch_size: int = 256) -> dict[str, Tensor]:
    """Each MoE layer's share of (kept) token-expert assignments per router expert on
    ``dataset``: layer name -> [E] summing to 1."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers: nothing to prune or merge")
    counts = {name: torch.zeros(layer.router.num_experts) for name, layer in layers.items()}
    hooks = []
    for name, layer in layers.items():

        def count(module, _args, out, name=name):
            record = out.record
            kept = record.valid & ~record.dropped
            chosen = record.expert_index[kept].reshape(-1).cpu()
            counts[name] += torch.bincount(chosen, minlength=module.router.num_experts).float()

        hooks.append(layer.register_forward_hook(count))
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(dataset, batch_size):
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return {name: c / c.sum().clamp_min(1.0) for name, c in counts.items()}


def _check_usage(layers: dict[str, MoELayer], usage: dict[str, Tensor]) -> None:
    missing = sorted(set(layers) - set(usage))
    if missing:
        raise ValueError(f"usage lacks MoE layers {missing}; measure it with expert_usage(model, data)")


def _updated_config(model: nn.Module, **moe) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "moe"):
        model.config = config.model_copy(update={"moe": config.moe.model_copy(update=moe)})


def _plain_banks(layers: dict[str, MoELayer]) -> None:
    for name, layer in layers.items():
        if type(layer.experts) is not ExpertBank:
            raise ValueError(
                f"{name}: experts are {type(layer.experts).__name__}; prune or merge a float model before quantizing it"
            )
        if layer.expert_map is not None:
            raise ValueError(f"{name}: experts are already merged; prune or merge the original model")


@torch.no_grad()
def prune_experts(model: nn.Module, *, keep: int, usage: dict[str, Tensor]) -> nn.Module:
    """A copy of ``model`` with each MoE layer's ``keep`` most used experts (and their router
    rows) only.

    Args:
        model: a trained model.
        keep: experts left per layer (>= the router's k).
        usage: from ``expert_usage`` (on held-out data).
    """
    out = copy.deepcopy(model)
    layers = moe_layers(out)
    _check_usage(layers, usage)
    _plain_banks(layers)
    for name, layer in layers.items():
        if layer.masks:  # experts reserved for a modality or task (moe.masks)
            raise ValueError(
                f"{name}: the router reserves experts for a modality or task (a run grown by modalmoe.lifelong); "
                "pruning keeps other experts in each layer, which one config's reserved ids cannot describe. "
                "Merge its experts instead (--method merge-experts keeps the router and its reservations)"
            )
        bank = layer.experts
        if not 1 <= keep <= bank.num_experts:
            raise ValueError(f"keep must be in 1..{bank.num_experts} (the experts {name} has), got {keep}")
        index = torch.sort(torch.argsort(usage[name], descending=True, stable=True)[:keep]).values
        layer.router.keep_experts(index)
        pruned = ExpertBank(num_experts=keep, dim=bank.dim, hidden=bank.hidden, activation=bank.activation)
        pruned.w_in.copy_(bank.w_in[index])
        pruned.w_out.copy_(bank.w_out[index])
        layer.experts = pruned
    _updated_config(out, num_experts=keep)
    return out.eval()


def _unit_features(bank: ExpertBank, expert: int) -> Tensor:
    """One row per hidden unit: its input weights (gate and up for SwiGLU) and output
    weights, [F, ...]; hidden units are interchangeable, so experts compare only after
    their units are matched."""
    w_in, w_out = bank.w_in[expert], bank.w_out[expert]  # [D, W], [F, D]
    f = bank.hidden
    parts = [w_in[:, :f].t(), w_in[:, f:].t()] if bank.activation == "swiglu" else [w_in.t()]
    return torch.cat([*parts, w_out], 1)


def _align(bank: ExpertBank, reference: int, expert: int) -> Tensor:
    """The permutation of ``expert``'s hidden units that best matches ``reference``'s
    (Hungarian assignment on unit-feature inner products)."""
    ref, other = _unit_features(bank, reference), _unit_features(bank, expert)
    _, columns = linear_sum_assignment(-(ref @ other.t()).double().numpy())
    return torch.as_tensor(columns, dtype=torch.long)


def _permuted(bank: ExpertBank, expert: int, perm: Tensor) -> tuple[Tensor, Tensor]:
    """(w_in [D, W], w_out [F, D]) of ``expert`` with hidden units reordered by ``perm``."""
    w_in, w_out = bank.w_in[expert], bank.w_out[expert]
    if bank.activation == "swiglu":
        w_in = torch.cat([w_in[:, : bank.hidden][:, perm], w_in[:, bank.hidden :][:, perm]], 1)
    else:
        w_in = w_in[:, perm]
    return w_in, w_out[perm]


def _layer_inputs(model: nn.Module, layers: dict[str, MoELayer], data, limit: int, batch_size: int):
    """Up to ``limit`` real input tokens per MoE layer, [N, D]."""
    seen: dict[str, list[Tensor]] = {name: [] for name in layers}
    hooks = []
    for name, layer in layers.items():

        def grab(module, args, kwargs, _out, name=name):
            x = args[0] if args else kwargs["x"]
            mask = kwargs.get("mask")
            rows = x.reshape(-1, x.shape[-1])
            if mask is not None:
                rows = rows[mask.reshape(-1)]
            if sum(t.shape[0] for t in seen[name]) < limit:
                seen[name].append(rows.detach())

        hooks.append(layer.register_forward_hook(grab, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(data, batch_size):
            model(batch)
            if all(sum(t.shape[0] for t in v) >= limit for v in seen.values()):
                break
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return {name: torch.cat(v)[:limit] for name, v in seen.items()}


def _similarity(features: Tensor) -> np.ndarray:
    """Cosine similarity between rows, [E, E]."""
    unit = torch.nn.functional.normalize(features.double(), dim=1)
    return (unit @ unit.t()).clamp(-1, 1).numpy()


def _groups(similarity: np.ndarray, into: int) -> list[int]:
    """Average-linkage clustering of experts into exactly ``into`` groups."""
    n = similarity.shape[0]
    if into == n:
        return list(range(n))
    distance = 1.0 - similarity
    np.fill_diagonal(distance, 0.0)
    tree = linkage(squareform((distance + distance.T) / 2, checks=False), method="average")
    return [int(g) for g in cut_tree(tree, n_clusters=into).reshape(-1)]


@torch.no_grad()
def merge_experts(
    model: nn.Module,
    *,
    into: int,
    usage: dict[str, Tensor],
    by: Literal["weights", "outputs"] = "weights",
    data=None,
    tokens: int = 2048,
    batch_size: int = 256,
) -> nn.Module:
    """A copy of ``model`` whose MoE layers have ``into`` experts each, merged from groups of
    similar experts; the routers are kept (see the module docstring).

    Args:
        model: a trained model with token-choice-style routing (per-token expert choices).
        into: experts left per layer.
        usage: from ``expert_usage``; weights each member in its group's average.
        by: ``weights`` or ``outputs`` similarity (``outputs`` needs ``data``).
        data: a dataset whose tokens the layers' outputs are compared on (held-out data).
        tokens: tokens per layer for ``outputs``.
    """
    if by not in ("weights", "outputs"):
        raise ValueError(f"by must be 'weights' or 'outputs', got {by!r}")
    if by == "outputs" and data is None:
        raise ValueError("merging by outputs needs data (a dataset the layers' outputs are compared on)")
    out = copy.deepcopy(model)
    layers = moe_layers(out)
    _check_usage(layers, usage)
    _plain_banks(layers)
    for name, layer in layers.items():
        if layer.communication is not None or "slot_keys" in layer.router.expert_params:
            raise ValueError(f"{name}: merging needs per-token expert choices and the plain combine (no soft MoE)")
    inputs = _layer_inputs(out, layers, data, tokens, batch_size) if by == "outputs" else {}
    for name, layer in layers.items():
        bank = layer.experts
        if not 1 <= into <= bank.num_experts:
            raise ValueError(f"into must be in 1..{bank.num_experts} (the experts {name} has), got {into}")
        weight = usage[name].double() + 1e-6  # an unused expert still counts a little in its group
        if by == "weights":
            top = int(torch.argmax(weight))
            perms = [_align(bank, top, e) for e in range(bank.num_experts)]
            flat = [torch.cat([w.reshape(-1) for w in _permuted(bank, e, perms[e])]) for e in range(bank.num_experts)]
            similarity = _similarity(torch.stack(flat))
        else:
            x = inputs[name]
            outs = [_activate(x @ bank.w_in[e], bank.activation) @ bank.w_out[e] for e in range(bank.num_experts)]
            similarity = _similarity(torch.stack([o.reshape(-1) for o in outs]))
        groups = _groups(similarity, into)
        merged = ExpertBank(num_experts=into, dim=bank.dim, hidden=bank.hidden, activation=bank.activation)
        for g in range(into):
            members = [e for e in range(bank.num_experts) if groups[e] == g]
            lead = max(members, key=lambda e: float(weight[e]))
            total = sum(float(weight[e]) for e in members)
            w_in = torch.zeros_like(bank.w_in[0])
            w_out = torch.zeros_like(bank.w_out[0])
            for e in members:
                a, b = _permuted(bank, e, _align(bank, lead, e))
                share = float(weight[e]) / total
                w_in += share * a
                w_out += share * b
            merged.w_in[g].copy_(w_in)
            merged.w_out[g].copy_(w_out)
        layer.experts = merged
        layer.register_buffer("expert_map", torch.tensor(groups, dtype=torch.long, device=bank.w_in.device))
    _updated_config(out, bank_experts=into)
    return out.eval()
