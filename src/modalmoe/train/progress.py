"""Where a training run is: the state a checkpoint carries so that ``--resume`` continues
exactly, typed.

A checkpoint stores it as a JSON mapping (``Progress.to_dict``): the fields below by name, and
each trainer callback's state under the callback's name (``train.callbacks``), the layout
checkpoints have always had, so runs written before this type existed resume unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class Progress:
    """A run's position and early-stopping state.

    Attributes:
        step: optimizer updates done.
        epoch: epochs finished.
        batch: the next batch of the current epoch (0 at an epoch's start).
        best: the best validation value of the early-stopping metric so far (None: none yet).
        bad_evals: validations since the last improvement.
        stopped_early: early stopping ended the run.
        best_metrics: every validation metric at the best checkpoint (None: none yet).
        history: config changes made on ``--resume`` (``train.resume``), each
            ``{"step": ..., "changes": {key: [old, new]}}``.
        callbacks: a callback's name -> its state (``Callback.state_dict``).
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    best: float | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    best_metrics: dict[str, float] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    callbacks: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``progress`` mapping (optional fields only when set)."""
        data = {k: v for k, v in asdict(self).items() if k != "callbacks"}
        if data["best_metrics"] is None:
            data.pop("best_metrics")
        if not data["history"]:
            data.pop("history")
        clash = sorted(set(self.callbacks) & set(data))
        if clash:
            raise ValueError(f"callbacks named {clash} would overwrite progress fields; rename them")
        return data | self.callbacks

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        """The progress a checkpoint holds; keys that are not fields are callbacks' states."""
        names = {f.name for f in fields(cls)} - {"callbacks"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, callbacks={k: v for k, v in data.items() if k not in names})
