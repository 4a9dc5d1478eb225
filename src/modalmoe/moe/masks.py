"""Expert masks: which experts a token may be routed to, given a group it belongs to.

A routing constraint is an input of the forward pass, never router state. An ``ExpertMask``
is built from ``reserved``: a few experts per member of a group (modality names, or the
labels of the tasks a model learned one after another), closed to every other member;
experts nobody reserved stay open to all. ``MoELayer`` holds one mask per group it
constrains (``"modality"``, ``"task"``), looks up each token's row from the ids the model
passes (a token's modality id, its sample's task id) and hands the router ``allowed``
[T, E]: routers that accept a mask (``Router.accepts_mask``) give disallowed experts no
weight and never choose them.

Lifelong learning uses this to keep the old modalities' and tasks' routing exactly as it
was while new experts learn the new one (``modalmoe.lifelong``), but nothing here knows
about growth: any caller can reserve experts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

#: The groups a layer can constrain, and the per-token ids that select a mask row.
GROUPS = ("modality", "task")


class ExpertMask(nn.Module):
    """[G, E] which experts each of G group members may use.

    Args:
        names: the members in id order (id i is ``names[i]``).
        reserved: member name -> expert ids only it may use.
        num_experts: E.
        group: what the members are (``"modality"`` or ``"task"``), for messages.
    """

    def __init__(
        self, *, names: Sequence[str], reserved: Mapping[str, Sequence[int]], num_experts: int, group: str
    ) -> None:
        super().__init__()
        if group not in GROUPS:
            raise ValueError(f"unknown mask group {group!r}; choose one of {GROUPS}")
        self.group, self.names = group, tuple(names)
        # Not persistent: the config's reserved ids rebuild it, so checkpoints are unchanged.
        self.register_buffer("allowed", reserved_mask(self.names, reserved, num_experts, group), persistent=False)

    @property
    def smallest(self) -> int:
        """The fewest experts any member may use (a top-k router needs at least k)."""
        return int(self.allowed.sum(-1).min())

    def forward(self, ids: Tensor) -> Tensor:
        """ids: [T] member ids -> [T, E] bool, True where the token may use the expert."""
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self.names)):
            raise ValueError(
                f"{self.group} ids must be in [0, {len(self.names)}) for the {self.group} names {list(self.names)}, "
                f"got values in [{int(ids.min())}, {int(ids.max())}]"
            )
        return self.allowed[ids]

    def extra_repr(self) -> str:
        return f"group={self.group}, names={list(self.names)}, open={self.allowed.sum(-1).tolist()}"


def reserved_mask(names: Sequence[str], reserved: Mapping[str, Sequence[int]], num_experts: int, group: str) -> Tensor:
    """[G, E] bool: experts reserved for one member are False for every other member."""
    if not names:
        raise ValueError(f"reserving experts by {group} needs the {group} names")
    if not isinstance(reserved, Mapping):
        raise ValueError(f"reserved experts by {group} map names to expert ids (e.g. image: [8, 9]), got {reserved!r}")
    unknown = sorted(set(reserved) - set(names))
    if unknown:
        raise ValueError(f"experts are reserved for {group} {unknown}, which is not among the model's {list(names)}")
    mask = torch.ones(len(names), num_experts, dtype=torch.bool)
    owner: dict[int, str] = {}
    for name, experts in reserved.items():
        ids = list(experts)
        bad = [e for e in ids if not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"experts reserved for {group} {name!r} include {bad}, outside [0, {num_experts})")
        for e in ids:
            if owner.setdefault(e, name) != name:
                raise ValueError(f"expert {e} is reserved for both {owner[e]!r} and {name!r}")
        for i, other in enumerate(names):
            if other != name:
                mask[i, ids] = False
    return mask


def combined(masks: Mapping[str, ExpertMask], ids: Mapping[str, Tensor | None]) -> Tensor | None:
    """[T, E] the experts each token may use under every mask (None: no mask)."""
    allowed = None
    for group, mask in masks.items():
        token_ids = ids.get(group)
        if token_ids is None:
            raise ValueError(
                f"this MoE layer reserves experts by {group}, so it needs each token's {group} id "
                f"(pass {group}= to the layer)"
            )
        rows = mask(token_ids)
        allowed = rows if allowed is None else allowed & rows
    return allowed


def smallest_open(masks: Sequence[ExpertMask]) -> int:
    """The fewest experts a token may use under every mask at once (over every combination
    of member rows)."""
    allowed = torch.ones(1, masks[0].allowed.shape[1], dtype=torch.bool)
    for mask in masks:
        allowed = (allowed.unsqueeze(1) & mask.allowed.unsqueeze(0)).flatten(0, 1)
    return int(allowed.sum(-1).min())


def check_overlap(reserved: Mapping[str, Mapping[str, Sequence[int]]]) -> None:
    """An expert is reserved by at most one group (a modality's expert is not also a task's)."""
    seen: dict[int, str] = {}
    for group, by_name in reserved.items():
        for e in {e for ids in by_name.values() for e in ids}:
            if seen.setdefault(e, group) != group:
                raise ValueError(f"expert {e} is reserved both by {seen[e]} and by {group}; reserve it once")
