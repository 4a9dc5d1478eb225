"""Start from a trained run: copy the tensors of a run's checkpoint that fit a new model.

    model = build_model(...).fit(task.train)
    report = init_from_run(model, "runs/av-digits/token-choice-s0")
    report.loaded, report.skipped          # names; "name: why" for each tensor left as it was

Tensors are matched by name and shape, so a model for another task (a head with another
number of classes) starts from everything else of the run and keeps a fresh head. The run's
fitted encoder state (input statistics, tokenizers: buffers and extra state) wins over what
``model.fit`` computed on the new data, since the run's weights were trained on that state.
The checkpoint is read with ``modalmoe.checkpoint`` (safetensors, no unpickling).

A ``transform`` adapts the run's state to the model before matching: growing a run
(``modalmoe.lifelong.grow.grow_transform``) gives a per-expert tensor whose expert
dimension grew the run's experts in its leading slice, new router rows at the mean of the
run's rows, and new experts their fresh init.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from modalmoe.checkpoint import CheckpointError, load_checkpoint


@dataclass
class InitReport:
    """What ``init_from_run`` did.

    Attributes:
        source: the checkpoint file read.
        loaded: model entries (tensors and extra state) taken from the checkpoint.
        skipped: ``"name: why"`` for each model entry that kept its own value.
        unused: checkpoint entries the model has no place for.
        grown: name -> ``[dim, old size, new size]`` of each tensor that took the run's
            values in its leading slice along its expert dimension ``dim`` (from the transform).
    """

    source: Path
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    grown: dict[str, list[int]] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the console."""
        line = f"initialised from {str(self.source)!r}: {len(self.loaded)} entries loaded"
        if self.skipped:
            shown = ", ".join(self.skipped[:6]) + (" ..." if len(self.skipped) > 6 else "")
            line += f"; {len(self.skipped)} kept their fresh values ({shown})"
        if self.unused:
            line += f"; {len(self.unused)} checkpoint entries unused"
        if self.grown:
            line += f"; {len(self.grown)} grown along their expert dimension"
        return line

    def to_json(self) -> dict[str, Any]:
        out = {"source": str(self.source), "loaded": len(self.loaded), "skipped": self.skipped, "unused": self.unused}
        return out | ({"grown": self.grown} if self.grown else {})


# A checkpoint transform: (model, the run's state) -> (the state as this model names and shapes
# it, {name: [dim, old size, new size]} for each tensor it grew along ``dim``).
Transform = Callable[[nn.Module, dict[str, Any]], tuple[dict[str, Any], dict[str, list[int]]]]


def run_checkpoint(run_dir: str | Path, which: str = "best") -> Path:
    """``<run_dir>/checkpoints/<which>.safetensors``, or a clear error when ``run_dir`` is not a run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(
            f"{str(run_dir)!r} is not a run directory (no config.yaml); point train.init_from at the "
            "--out directory of a `modalmoe train` run"
        )
    path = run_dir / "checkpoints" / f"{which}.safetensors"
    if not path.is_file():
        raise CheckpointError(
            f"run {str(run_dir)!r} has no {which} checkpoint ({str(path)!r} is missing); was it trained to the end?"
        )
    return path


def init_from_run(
    model: nn.Module, run_dir: str | Path, *, which: str = "best", transform: Transform | None = None
) -> InitReport:
    """Load the entries of a run's checkpoint whose names and shapes match ``model``'s.

    Args:
        model: a built (and fitted) model, before any adapters are added.
        run_dir: a run directory (``Trainer``'s ``out``).
        which: ``best`` or ``last`` checkpoint.
        transform: adapts the run's state to ``model`` before matching (a grown run's
            expert tensors, ``modalmoe.lifelong.grow.grow_transform``); see ``Transform``.

    Returns:
        what was loaded and skipped. Raises ``CheckpointError`` when ``run_dir`` is not a
        run or when no tensor matches (another architecture: nothing would transfer).
    """
    path = run_checkpoint(run_dir, which)
    return load_matching(model, load_checkpoint(path).model_state(), path, transform=transform)


def load_matching(
    model: nn.Module, saved: dict[str, Any], path: Path, *, transform: Transform | None = None
) -> InitReport:
    """``init_from_run`` on a state dict ``saved`` (read from ``path``, named in reports and errors)."""
    own = model.state_dict()
    report = InitReport(source=path)
    if transform is not None:
        saved, report.grown = transform(model, saved)
    state: dict[str, Any] = {}
    for name, value in own.items():
        if name not in saved:
            report.skipped.append(f"{name}: not in the checkpoint")
            state[name] = value
            continue
        theirs = saved[name]
        if isinstance(value, Tensor) != isinstance(theirs, Tensor):
            report.skipped.append(f"{name}: a tensor in one and extra state in the other")
            state[name] = value
        elif isinstance(value, Tensor) and value.shape != theirs.shape:
            report.skipped.append(f"{name}: shape {tuple(theirs.shape)} in the checkpoint, {tuple(value.shape)} here")
            state[name] = value
        else:
            state[name] = theirs.to(dtype=value.dtype) if isinstance(value, Tensor) else theirs
            report.loaded.append(name)
    report.unused = sorted(set(saved) - set(own))
    parameters = {name for name, _ in model.named_parameters()}
    if not parameters.intersection(report.loaded):  # input statistics alone transfer nothing learned
        raise CheckpointError(
            f"no parameter of {str(path)!r} matches this model by name and shape ({len(saved)} entries in the "
            f"checkpoint, {len(own)} in the model, e.g. {sorted(parameters)[:3]}); init_from needs a run of the "
            "same architecture (model.dim, depth, fusion, MoE layout)"
        )
    model.load_state_dict(state)
    return report
