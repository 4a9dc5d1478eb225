"""The contracts between routers, dispatch, the MoE layer, losses and analysis."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class SoftSlots:
    """Soft MoE's slot weights (Puigcerver et al. 2024), formed within each sample.

    Tokens are laid out per sample as ``[B, N]`` (``N`` = longest sample); ``S = E * p`` slots.

    Attributes:
        dispatch: [B, N, S] each slot's weights over its sample's tokens (sum to 1 over N; 0 on padding).
        combine: [B, N, S] each token's weights over its sample's slots (sum to 1 over S).
        batch_index: [T] which row of ``B`` each flat token occupies.
        position: [T] which column of ``N`` each flat token occupies.
        slots_per_expert: p.
    """

    dispatch: Tensor
    combine: Tensor
    batch_index: Tensor
    position: Tensor
    slots_per_expert: int


@dataclass(frozen=True)
class Routing:
    """What a router decides for ``T`` tokens and ``E`` experts.

    Attributes:
        expert_index: [T, k] chosen experts per token.
        weight: [T, k] gate weight of each choice (0 where ``valid`` is False).
        probs: [T, E] the router's distribution over experts (rows sum to 1).
        logits: [T, E] raw router logits, for the z-loss; None if the router has none.
        valid: [T, k] which choices are real; None means all. Expert-choice routing gives a
            token anywhere from 0 to E experts and marks the rest invalid.
        soft: slot weights for soft MoE; when set, the layer mixes tokens into slots instead of
            dispatching them, and ``expert_index``/``weight`` only summarise routing for analysis.
        aux: the router's own auxiliary losses, unweighted, by name (noisy top-k's load loss,
            which needs the noise that only the router knows); the layer passes them on
            beside the losses of ``modalmoe.moe.losses`` and the trainer weights them alike.
    """

    expert_index: Tensor
    weight: Tensor
    probs: Tensor
    logits: Tensor | None = None
    valid: Tensor | None = None
    soft: SoftSlots | None = None
    aux: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]


@dataclass(frozen=True)
class RoutingRecord:
    """Everything analysis and the aux losses need to know about one MoE layer's routing.

    Attributes:
        expert_index: [T, k] chosen experts.
        weight: [T, k] gate weights.
        probs: [T, E] router distribution (keeps its graph so losses can be trained).
        logits: [T, E] raw logits or None.
        modality: [T] modality id per token.
        sample: [T] sample id per token.
        dropped: [T, k] choices dropped by the capacity limit (False everywhere when dropless).
        valid: [T, k] choices that were made (see ``Routing.valid``).
        num_experts: E.
        capacity: tokens per expert allowed, or None when dropless.
        task: [T] task id per token (a task mixture's samples), or None.
    """

    expert_index: Tensor
    weight: Tensor
    probs: Tensor
    logits: Tensor | None
    modality: Tensor
    sample: Tensor
    dropped: Tensor
    valid: Tensor
    num_experts: int
    capacity: int | None = None
    task: Tensor | None = None

    @property
    def num_dropped(self) -> int:
        """Number of (token, expert) assignments dropped by the capacity limit."""
        return int(self.dropped.sum())

    def detach(self) -> RoutingRecord:
        """A copy without autograd history, for storage and analysis."""
        kw = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return RoutingRecord(**kw)


@dataclass(frozen=True)
class MoEOutput:
    """What ``MoELayer.forward`` returns.

    Attributes:
        x: output tokens, same shape as the input (the FFN's output, without the residual).
        aux_losses: named auxiliary losses (unweighted; the trainer applies weights).
        record: routing record for analysis.
    """

    x: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    record: RoutingRecord | None = None
