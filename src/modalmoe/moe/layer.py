"""``MoELayer``: a router, an expert bank, optional shared experts, and dispatch between them."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modalmoe.moe.communication import NoCommunication, communications
from modalmoe.moe.dispatch import (
    dispatch_combine,
    dispatch_outputs,
    expert_capacity,
    plan_dispatch,
    soft_dispatch_combine,
    uniform_routing,
)
from modalmoe.moe.experts import ExpertBank, FeedForward
from modalmoe.moe.losses import AUX_LOSSES, aux_losses
from modalmoe.moe.masks import ExpertMask, check_overlap, combined, smallest_open
from modalmoe.moe.routers import routers
from modalmoe.moe.routers.base import Router
from modalmoe.moe.types import MoEOutput, RoutingRecord


class MoELayer(nn.Module):
    """A Mixture-of-Experts feed-forward layer.

    Returns the FFN output only (no residual): a token whose every choice is dropped by
    the capacity limit comes out as 0, so ``x + layer(x).x`` passes it through unchanged.

    Args:
        router: any registered router.
        experts: the routed expert bank.
        shared: always-on experts added to every token's output (DeepSeek-MoE), e.g. a
            ``FeedForward``; None for none.
        capacity_factor: None for dropless; a number > 0 caps tokens per expert at
            ``ceil(capacity_factor * T * k / E)``.
        uniform: force perfectly balanced routing (benchmarks only: measures the kernel
            apart from routing imbalance).
        entropy_threshold: LIMoE's threshold for the global entropy loss (None: none).
        aux: names of the aux losses to compute (``modalmoe.moe.losses.AUX_LOSSES``; all by
            default).
        communication: how a token's chosen experts exchange information before they are
            summed (``moe/communication.py``); None or ``NoCommunication`` for the plain
            gate-weighted sum, computed by the fused path (the gate scales rows inside the
            expert kernel). Not available with soft MoE, which has no per-token choices.
        expert_map: [E] the bank expert each of the router's E experts runs as (after merging
            experts, ``modalmoe.efficiency.experts``: the router still scores E experts, and a
            token that picks two merged into one gets that one at the sum of their weights);
            None: the router's experts are the bank's.
        masks: group (``"modality"``, ``"task"``) -> an ``ExpertMask``: which experts a token
            of each modality or task may use (``modalmoe.moe.masks``); the router must accept
            masks. None: every expert is open to every token.
        batch_priority: under a capacity limit, drop the assignments of the tokens with the
            lowest top gate weight first (V-MoE's batch-prioritised routing), not the last
            tokens by position.
    """

    def __init__(
        self,
        *,
        router: Router,
        experts: ExpertBank,
        shared: nn.Module | None = None,
        capacity_factor: float | None = None,
        uniform: bool = False,
        entropy_threshold: float | None = None,
        communication: nn.Module | None = None,
        aux: tuple[str, ...] = AUX_LOSSES,
        expert_map: Tensor | None = None,
        masks: dict[str, ExpertMask] | None = None,
        batch_priority: bool = False,
    ) -> None:
        super().__init__()
        self.batch_priority = batch_priority
        if expert_map is None and router.num_experts != experts.num_experts:
            raise ValueError(f"router has {router.num_experts} experts but the bank has {experts.num_experts}")
        if expert_map is not None:
            if expert_map.shape != (router.num_experts,):
                raise ValueError(f"expert_map must have one entry per router expert ({router.num_experts})")
            if int(expert_map.min()) < 0 or int(expert_map.max()) >= experts.num_experts:
                raise ValueError(f"expert_map entries must be bank experts 0..{experts.num_experts - 1}")
            if communication is not None or "slot_keys" in router.expert_params:
                raise ValueError("merged experts (expert_map) work with per-token choices and the plain combine only")
        # Persistent when set, so a merged model's checkpoint carries its map.
        self.register_buffer("expert_map", None if expert_map is None else expert_map.long().clone())
        if router.dim != experts.dim:
            raise ValueError(f"router width {router.dim} != expert width {experts.dim}")
        if communication is not None and getattr(communication, "dim", experts.dim) != experts.dim:
            raise ValueError(f"communication width {communication.dim} != expert width {experts.dim}")
        expert_capacity(1, 1, 1, capacity_factor)  # validate now, not at the first step
        self.router, self.experts, self.shared = router, experts, shared
        self.capacity_factor, self.uniform, self.entropy_threshold = capacity_factor, uniform, entropy_threshold
        self.communication = communication
        unknown = sorted(set(aux) - set(AUX_LOSSES))
        if unknown:
            raise ValueError(f"unknown aux losses {unknown}; choose from {AUX_LOSSES}")
        self.aux = tuple(aux)
        self.masks = nn.ModuleDict(masks or {})
        if self.masks:
            if not router.accepts_mask:
                accepting = [n for n in routers.names() if routers.get(n).accepts_mask]
                raise ValueError(
                    f"{type(router).__name__} does not take an expert mask (experts reserved for a modality or "
                    f"task); use one of the routers that do: {', '.join(accepting)}"
                )
            widths = {m.allowed.shape[1] for m in self.masks.values()}
            if widths != {router.num_experts}:
                raise ValueError(f"expert masks cover {sorted(widths)} experts, the router {router.num_experts}")
            open_ = smallest_open(list(self.masks.values()))
            if open_ < router.min_open:
                raise ValueError(
                    f"with the reserved experts, a token can use only {open_} experts, fewer than the "
                    f"{router.min_open} the router chooses (k); reserve fewer experts or add more"
                )

    def forward(
        self,
        x: Tensor,
        modality: Tensor | None = None,
        sample: Tensor | None = None,
        mask: Tensor | None = None,
        task: Tensor | None = None,
    ) -> MoEOutput:
        """Route and run the experts.

        Args:
            x: [T, D] or [B, N, D] tokens.
            modality: modality id per token, shaped like ``x`` without D (default: all 0).
            sample: sample id per token (default: the row of a [B, N, D] input, else all 0).
            mask: True for real tokens (default: all); padding is neither routed nor recorded,
                and comes out as 0.
            task: task id per token, shaped like ``modality``; read by a ``"task"`` expert
                mask and by routers that condition on the task (``accepts_task``), and
                recorded (None: the batch has no task ids).

        Returns:
            ``MoEOutput`` with ``x`` shaped like the input.
        """
        shape, dim = x.shape, x.shape[-1]
        lead = shape[:-1]
        if modality is None:
            modality = torch.zeros(lead, dtype=torch.long, device=x.device)
        if sample is None:
            sample = (
                torch.arange(shape[0], device=x.device).unsqueeze(-1).expand(lead)
                if x.dim() == 3
                else torch.zeros(lead, dtype=torch.long, device=x.device)
            )
        for name, t in (("modality", modality), ("sample", sample), ("mask", mask), ("task", task)):
            if t is not None and t.shape != lead:
                raise ValueError(f"{name} must have shape {tuple(lead)} (x without its last dim), got {tuple(t.shape)}")
        tokens, modality, sample = x.reshape(-1, dim), modality.reshape(-1), sample.reshape(-1)
        task = None if task is None else task.reshape(-1)
        keep = None if mask is None else mask.reshape(-1).nonzero().squeeze(-1)
        if keep is not None:
            tokens, modality, sample = tokens[keep], modality[keep], sample[keep]
            task = None if task is None else task[keep]

        given = {"task": task} if self.router.accepts_task else {}
        if self.masks:
            given["allowed"] = combined(self.masks, {"modality": modality, "task": task})
        routing = self.router(tokens, modality, sample, **given)
        if self.uniform:
            if routing.soft is not None or routing.valid is not None:
                raise ValueError(
                    "uniform=True forces token-choice assignments; it does not apply to soft or expert-choice routers"
                )
            routing = uniform_routing(routing)
        valid = routing.valid if routing.valid is not None else torch.ones_like(routing.expert_index, dtype=torch.bool)
        exchange = self.communication is not None and not isinstance(self.communication, NoCommunication)
        if routing.soft is not None:
            if exchange:
                raise ValueError(
                    "expert communication needs per-token expert choices; soft MoE has none "
                    "(use communication='none' with the soft router)"
                )
            y, capacity = soft_dispatch_combine(tokens, routing.soft, self.experts), None
            dropped = torch.zeros_like(valid)
        else:
            capacity = expert_capacity(
                tokens.shape[0], routing.expert_index.shape[1], self.experts.num_experts, self.capacity_factor
            )
            # Records and aux losses keep the router's own choices; merged experts run as one.
            chosen = routing.expert_index if self.expert_map is None else self.expert_map[routing.expert_index]
            priority = None
            if self.batch_priority and capacity is not None:
                priority = routing.weight.detach().masked_fill(~valid, float("-inf")).max(-1).values
            plan = plan_dispatch(
                chosen, self.experts.num_experts, valid=routing.valid, capacity=capacity, priority=priority
            )
            dropped = plan.dropped
            if exchange:
                outputs = dispatch_outputs(tokens, plan, self.experts, routing.expert_index.shape[1])
                y = self.communication(outputs, routing.weight, valid & ~dropped)
            else:
                y = dispatch_combine(tokens, routing.weight, plan, self.experts)
        if self.shared is not None:
            y = y + self.shared(tokens)

        record = RoutingRecord(
            expert_index=routing.expert_index,
            weight=routing.weight,
            probs=routing.probs,
            logits=routing.logits,
            modality=modality,
            sample=sample,
            task=task,
            dropped=dropped,
            valid=valid,
            num_experts=self.router.num_experts,  # the router's experts (a merged bank has fewer)
            capacity=capacity,
        )
        if keep is not None:
            y = x.new_zeros(x.shape[:-1].numel(), dim).index_copy(0, keep, y)
        return MoEOutput(
            x=y.view(shape),
            aux_losses=aux_losses(record, entropy_threshold=self.entropy_threshold, names=self.aux) | routing.aux,
            record=record,
        )


def build_moe_layer(
    *,
    dim: int,
    hidden: int,
    num_experts: int,
    router: str = "token_choice",
    activation: str = "swiglu",
    shared_experts: int = 0,
    capacity_factor: float | None = None,
    uniform: bool = False,
    entropy_threshold: float | None = None,
    communication: str = "none",
    communication_dim: int | None = None,
    aux: tuple[str, ...] = AUX_LOSSES,
    router_options: dict | None = None,
    bank_experts: int | None = None,
    reserved: dict[str, tuple[tuple[str, ...], dict[str, list[int]]]] | None = None,
    batch_priority: bool = False,
    **router_kwargs,
) -> MoELayer:
    """Component builder: an ``MoELayer`` from plain parameters.

    Args:
        dim: token width D.
        hidden: width F of each expert.
        num_experts: E routed experts.
        router: a name in ``modalmoe.moe.routers`` (its own arguments go in ``router_kwargs``,
            e.g. ``k=2``, ``modalities=("image", "text")``, or in ``router_options``, which
            also carries names the layer itself uses, such as expert choice's
            ``capacity_factor``).
        activation: "gelu" or "swiglu".
        shared_experts: number of always-on experts of width F (DeepSeek-MoE), run as one
            dense FFN of width ``shared_experts * F``.
        capacity_factor, uniform, entropy_threshold, aux, batch_priority: see ``MoELayer``.
        communication: a name in ``modalmoe.moe.communication.communications`` ("none",
            "dense", "star"); "none" builds no module and keeps the fused combine.
        communication_dim: the exchange width r of the communication module (default D // 4).
        bank_experts: experts in the bank when fewer than the router's (a merged model's
            structure; its ``expert_map`` comes from the checkpoint). None: ``num_experts``.
        reserved: group (``"modality"``, ``"task"``) -> (the group's names in id order,
            {name: expert ids only it may use}); builds the layer's ``ExpertMask``s.
    """

    if shared_experts < 0:
        raise ValueError(f"shared_experts must be >= 0, got {shared_experts}")
    communications.get(communication)  # unknown names fail here, with the known ones listed
    if communication != "none" and router == "soft":
        raise ValueError(
            f"communication={communication!r} needs per-token expert choices; the soft router has none "
            "(use communication='none' with it)"
        )
    reserved = {group: spec for group, spec in (reserved or {}).items() if spec[1]}
    check_overlap({group: by_name for group, (_, by_name) in reserved.items()})
    masks = {
        group: ExpertMask(names=names, reserved=by_name, num_experts=num_experts, group=group)
        for group, (names, by_name) in reserved.items()
    }
    return MoELayer(
        router=routers.create(router, dim=dim, num_experts=num_experts, **{**router_kwargs, **(router_options or {})}),
        experts=ExpertBank(num_experts=bank_experts or num_experts, dim=dim, hidden=hidden, activation=activation),
        shared=FeedForward(dim=dim, hidden=hidden * shared_experts, activation=activation) if shared_experts else None,
        capacity_factor=capacity_factor,
        uniform=uniform,
        entropy_threshold=entropy_threshold,
        aux=aux,
        communication=None
        if communication == "none"
        else communications.create(communication, dim=dim, hidden=communication_dim),
        expert_map=None
        if bank_experts is None or bank_experts == num_experts
        else torch.arange(num_experts) % bank_experts,
        masks=masks,
        batch_priority=batch_priority,
    )
