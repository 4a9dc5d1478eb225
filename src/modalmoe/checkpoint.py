"""Checkpoints: one safetensors file each, written atomically, loaded without unpickling.

A checkpoint holds every tensor of a training run (model and objective parameters and
buffers, AdamW's moments, the torch RNG state) as safetensors tensors, and everything else
(the experiment config, progress: step, epoch, position in the epoch, early-stopping state;
the scheduler; optimizer hyper-parameters; modules' extra state such as a trained tokenizer)
as JSON strings in the safetensors metadata. One file per checkpoint means one atomic
rename (``modalmoe.io.atomic_path``: temp file, fsync, rename): a reader, or a run resumed
after SIGKILL, sees the previous checkpoint or the complete new one, never a mixture.

Loading never unpickles: safetensors parses a JSON header and raw tensor bytes, and the
metadata is JSON. A truncated or foreign file, a file from another format version, or a
checkpoint whose config or tensor shapes differ from the model is refused with a message
that says what differs.

A file that parses can still be damaged: safetensors checks the header, not the bytes it
points to, so a flipped bit in the tensor data loads silently as a different model. Each
checkpoint therefore stores an XXH3-128 digest (``checksum``) of its contents in the
metadata, and loading recomputes and compares it. XXH3 (the ``xxhash`` package) detects
corruption, not tampering, at ~24 GB/s here: faster than copying the tensors into a model,
where SHA-256 (1.6 GB/s) cost 4-6x a warm load of a large checkpoint
(``benchmarks/checkpoint_checksum.py``). The digest is canonical (``content_digest``: tensors
by sorted name, each as name, dtype, shape and raw bytes), so it does not depend on how
safetensors lays the file out. It covers the tensors only: the JSON metadata is checked when
parsed, the config against the run's own (``check_config``), and editing it by hand stays
possible. Files written before the checksum existed load unverified.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn

from modalmoe.config import ExperimentConfig
from modalmoe.io import atomic_path

FORMAT = "modalmoe-checkpoint/1"
# Metadata key of the content digest, "<algorithm>:<hex>"; not a JSON section.
CHECKSUM = "checksum"
_ALGORITHM = "xxh3_128"
_MODEL, _OPTIM, _RNG = "module/", "optimizer/", "rng/torch"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        path: where it came from.
        tensors: name -> tensor, as stored.
        config: the experiment config (a JSON mapping).
        progress: step, epoch, batch, early-stopping state, ...
        meta: the other JSON sections (``extra_state``, ``optimizer``, ``scheduler``).
    """

    path: Path
    tensors: dict[str, Tensor]
    config: dict
    progress: dict
    meta: dict

    def module_state(self) -> dict[str, Any]:
        """The container module's ``state_dict`` (tensors plus extra state)."""
        state: dict[str, Any] = {k[len(_MODEL) :]: v for k, v in self.tensors.items() if k.startswith(_MODEL)}
        state.update(self.meta.get("extra_state", {}))
        return state

    def model_state(self, prefix: str = "model.") -> dict[str, Any]:
        """The model's own ``state_dict`` (the container's entries under ``prefix``)."""
        return {k[len(prefix) :]: v for k, v in self.module_state().items() if k.startswith(prefix)}


def save_checkpoint(
    path: str | Path,
    *,
    module: nn.Module,
    config: dict,
    progress: dict,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    state: dict[str, Any] | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write a checkpoint atomically.

    Args:
        path: the ``.safetensors`` file to (re)place.
        module: the module whose ``state_dict`` is saved (model and objectives).
        config: the experiment config as a JSON-safe mapping.
        progress: JSON-safe training progress.
        optimizer, scheduler: saved when given.
        state, optimizer_state: saved instead of ``module.state_dict()`` and
            ``optimizer.state_dict()`` when given (a distributed run passes them with its
            sharded experts gathered, ``modalmoe.train.distributed``).
    """
    tensors: dict[str, Tensor] = {}
    extra: dict[str, Any] = {}
    for key, value in (module.state_dict() if state is None else state).items():
        if isinstance(value, Tensor):
            # Clone: safetensors refuses tensors that share storage (views, tied weights).
            tensors[_MODEL + key] = value.detach().cpu().contiguous().clone()
        else:
            extra[key] = _json_safe(value, f"extra state {key!r}")
    meta: dict[str, Any] = {"extra_state": extra}
    if optimizer is not None:
        state = optimizer.state_dict() if optimizer_state is None else optimizer_state
        plain: dict[str, dict] = {}
        for index, entries in state["state"].items():
            for name, value in entries.items():
                if isinstance(value, Tensor):
                    tensors[f"{_OPTIM}{index}/{name}"] = value.detach().cpu().contiguous().clone()
                else:
                    plain.setdefault(str(index), {})[name] = _json_safe(value, f"optimizer state {name!r}")
        meta["optimizer"] = {"param_groups": _json_safe(state["param_groups"], "param_groups"), "plain": plain}
    if scheduler is not None:
        meta["scheduler"] = _json_safe(scheduler.state_dict(), "scheduler state")
    tensors[_RNG] = torch.get_rng_state()
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:  # a checkpoint must be something worth going back to
        shown = ", ".join(bad[:3]) + (f", ... ({len(bad)} in all)" if len(bad) > 3 else "")
        raise CheckpointError(
            f"refusing to write {str(path)!r}: {shown} hold NaN or Inf; the file there (if any) is kept. Lower "
            "train.lr, enable train.clip_norm, or check the inputs"
        )
    metadata = {
        "format": FORMAT,
        "config": json.dumps(config),
        "progress": json.dumps(progress),
        **{k: json.dumps(v) for k, v in meta.items()},
    }
    metadata[CHECKSUM] = f"{_ALGORITHM}:{content_digest(tensors)}"
    path = Path(path)
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint; refuse missing, truncated, foreign or other-version files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{str(path)!r} is not a readable checkpoint (truncated or not a safetensors file: {err}); "
            "use another checkpoint (best/last) or retrain"
        ) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a {FORMAT} checkpoint (format {metadata.get('format')!r}); "
            "it was not written by this version of modalmoe's trainer"
        )
    _verify(path, tensors, metadata)
    try:
        sections = {k: json.loads(v) for k, v in metadata.items() if k not in ("format", CHECKSUM)}
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{str(path)!r} has corrupt metadata ({err})") from None
    config, progress = sections.pop("config", None), sections.pop("progress", None)
    if config is None or progress is None:
        raise CheckpointError(f"{str(path)!r} lacks its config or progress section")
    return Checkpoint(path=path, tensors=tensors, config=config, progress=progress, meta=sections)


def content_digest(tensors: dict[str, Tensor]) -> str:
    """XXH3-128 hex digest of a checkpoint's tensors, independent of the file layout.

    Every tensor, by sorted name, as its name, dtype, shape and raw bytes. Each field is
    length-prefixed, so no two different sets of tensors share one byte stream. The bytes are
    hashed through a zero-copy ``uint8`` view: hashing costs one read of the data, no copy.

    Args:
        tensors: name -> CPU tensor (any dtype and shape, 0-d included).
    """
    digest = xxhash.xxh3_128()

    def field(data: bytes | memoryview) -> None:
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        field(name.encode())
        field(f"{tensor.dtype} {tuple(tensor.shape)}".encode())
        # reshape(-1): a 0-d tensor cannot be viewed as bytes of another element size.
        field(memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def _verify(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Refuse a checkpoint whose tensors do not match the checksum stored with them."""
    stored = metadata.get(CHECKSUM)
    if stored is None:
        return  # written before checksums existed: nothing to verify against
    algorithm, _, expected = stored.partition(":")
    if algorithm != _ALGORITHM:
        raise CheckpointError(
            f"{str(path)!r} carries a {algorithm!r} checksum that this version of modalmoe cannot verify; "
            "upgrade modalmoe to load it"
        )
    if content_digest(tensors) != expected:
        raise CheckpointError(
            f"{str(path)!r} is corrupt: its tensor data does not match its checksum (damaged on disk or in "
            "transfer); use the other checkpoint (best/last) or retrain"
        )


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two JSON configs (``key: saved -> current``)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved:
                out.append(f"{where}: (absent) -> {current[key]!r}")
            elif key not in current:
                out.append(f"{where}: {saved[key]!r} -> (absent)")
            else:
                out.extend(config_differences(saved[key], current[key], where))
        return out
    return [] if saved == current else [f"{prefix}: {saved!r} -> {current!r}"]


def check_config(
    checkpoint: Checkpoint, config: dict, *, sections: tuple[str, ...] = ("task", "task_options", "model")
):
    """Refuse a checkpoint whose config differs from ``config`` in ``sections``.

    A key the saved config lacks counts as its default: the run was written before that
    option existed, so it ran with the behaviour the default keeps (a run from before
    ``train.lora`` existed resumes, one trained with another value does not)."""
    saved = _with_defaults(checkpoint.config)
    diffs = []
    for section in sections:
        diffs += config_differences(saved.get(section), config.get(section), section)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 8 else "")
        raise CheckpointError(
            f"{str(checkpoint.path)!r} was written for a different config ({shown}); "
            "resume with the run's own config, or start a new run in another --out directory"
        )


def _with_defaults(saved: dict) -> dict:
    """The saved experiment config with the keys it lacks filled with their defaults (as it
    was, when it does not validate as a current config)."""
    try:
        return ExperimentConfig.model_validate(saved).model_dump(mode="json")
    except Exception:  # another version's config: compare it as it is, key by key
        return saved


def restore_module(module: nn.Module, state: dict[str, Any], source: str) -> None:
    """``load_state_dict`` that explains mismatches instead of raising PyTorch's wall of text."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
        for k in sorted(set(own) & set(state))
        if isinstance(own[k], Tensor) and isinstance(state[k], Tensor) and own[k].shape != state[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:5]))
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    module.load_state_dict(state)


def restore_training(
    checkpoint: Checkpoint,
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> None:
    """Put module, optimizer, scheduler and the torch RNG back exactly as they were saved."""
    restore_module(module, checkpoint.module_state(), f"checkpoint {str(checkpoint.path)!r}")
    saved = checkpoint.meta.get("optimizer")
    if saved is None:
        raise CheckpointError(f"{str(checkpoint.path)!r} has no optimizer state; it cannot be resumed")
    state: dict[int, dict] = {}
    for key, value in checkpoint.tensors.items():
        if key.startswith(_OPTIM):
            index, name = key[len(_OPTIM) :].split("/", 1)
            state.setdefault(int(index), {})[name] = value
    for index, entries in saved["plain"].items():
        state.setdefault(int(index), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    if scheduler is not None and "scheduler" in checkpoint.meta:
        scheduler.load_state_dict(checkpoint.meta["scheduler"])
    torch.set_rng_state(checkpoint.tensors[_RNG])


def _json_safe(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{what} cannot be stored as JSON ({err}); checkpoints never pickle") from None
