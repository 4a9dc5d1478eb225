"""What ``--resume`` may change: keys that only lengthen training.

A resumed run replays the interrupted one exactly, so every key that shapes the model, the
data or the recipe must be the saved one. A few keys only decide how long training goes
on; changing them on ``--resume`` trains the same run further, as a user who wants "20 more
epochs" expects:

- ``train.epochs`` may only grow. Training continues to the new epoch count; the
  learning-rate schedule (warmup + cosine) is stretched to the new length from the resume
  step on (the steps already taken keep the rates they had).
- ``train.early_stopping.patience`` may only grow, or become 0 (never stop). A run stopped
  early by the old patience goes on while the new one allows.

Each change is recorded in the run's history (``Progress.history``, ``train.progress``, in every later
checkpoint, ``history`` in ``summary.json``) and ``config.yaml`` is rewritten with the new
values. Every other difference is refused, as before.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from modalmoe.checkpoint import CheckpointError


def _grows(old: Any, new: Any) -> bool:
    return isinstance(old, int) and isinstance(new, int) and new >= old


def _patience_grows(old: Any, new: Any) -> bool:
    return isinstance(old, int) and isinstance(new, int) and (new == 0 or (old != 0 and new >= old))


# key path -> (test that the new value only lengthens training, what a user may do)
EXTENDABLE: dict[tuple[str, ...], tuple[Callable[[Any, Any], bool], str]] = {
    ("train", "epochs"): (_grows, "only grow"),
    ("train", "early_stopping", "patience"): (_patience_grows, "only grow, or become 0 (never stop)"),
}


def _get(config: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def _set(config: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        config = config[key]
    config[path[-1]] = value


def extensions(saved: dict, current: dict, *, source: str) -> tuple[dict, dict[str, list]]:
    """Split a resume's config changes into allowed extensions and the rest.

    Args:
        saved: the checkpoint's experiment config (JSON).
        current: the config the run is resumed with (JSON).
        source: the checkpoint's path, for errors.

    Returns:
        (``current`` with every extendable key set back to its saved value, so that the
        usual all-keys comparison sees only the other changes; ``{"train.epochs": [old, new]}``
        for each extendable key that changed).

    Raises:
        CheckpointError: an extendable key changed in a way that would not only lengthen
            training (fewer epochs, a shorter patience).
    """
    compared, changes = copy.deepcopy(current), {}
    for path, (allowed, rule) in EXTENDABLE.items():
        old, new = _get(saved, path), _get(current, path)
        if old is None or new is None or old == new:
            continue
        name = ".".join(path)
        if not allowed(old, new):
            raise CheckpointError(
                f"{source!r} was trained with {name}={old}; on --resume {name} may {rule} (got {new}). "
                "Start a new run in another --out for a shorter one"
            )
        _set(compared, path, old)
        changes[name] = [old, new]
    return compared, changes
