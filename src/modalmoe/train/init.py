"""Start from a trained run: copy the tensors of a run's checkpoint that fit a new model.

    model = build_model(...).fit(task.train)
    report = init_from_run(model, "runs/av-digits/token-choice-s0")
    report.loaded, report.skipped          # names; "name: why" for each tensor left as it was

Tensors are matched by name and shape, so a model for another task (a head with another
number of classes) starts from everything else of the run and keeps a fresh head. The run's
fitted encoder state (input statistics, tokenizers: buffers and extra state) wins over what
``model.fit`` computed on the new data, since the run's weights were trained on that state.
The checkpoint is read with ``modalmoe.train.checkpoint`` (safetensors, no unpickling).

With ``grow=True`` (a run continued with more experts, ``modalmoe.lifelong``), a per-expert
tensor whose shape differs from the run's only in its expert dimension, which grew, takes the
run's experts in its leading slice; new router rows start at the mean of the run's rows and
new experts keep their fresh init (``modalmoe.lifelong.state.grow_tensor``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from modalmoe.train.checkpoint import CheckpointError, load_checkpoint


@dataclass
class InitReport:
    """What ``init_from_run`` did.

    Attributes:
        source: the checkpoint file read.
        loaded: model entries (tensors and extra state) taken from the checkpoint.
        skipped: ``"name: why"`` for each model entry that kept its own value.
        unused: checkpoint entries the model has no place for.
        grown: name -> ``[dim, old size, new size]`` of each tensor that took the run's
            values in its leading slice along its expert dimension ``dim`` (``grow=True``).
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


def init_from_run(model: nn.Module, run_dir: str | Path, *, which: str = "best", grow: bool = False) -> InitReport:
    """Load the entries of a run's checkpoint whose names and shapes match ``model``'s.

    Args:
        model: a built (and fitted) model, before any adapters are added.
        run_dir: a run directory (``Trainer``'s ``out``).
        which: ``best`` or ``last`` checkpoint.
        grow: also load per-expert tensors whose expert dimension grew (see the module doc).

    Returns:
        what was loaded and skipped. Raises ``CheckpointError`` when ``run_dir`` is not a
        run or when no tensor matches (another architecture: nothing would transfer).
    """
    path = run_checkpoint(run_dir, which)
    return load_matching(model, load_checkpoint(path).model_state(), path, grow=grow)


def load_matching(model: nn.Module, saved: dict[str, Any], path: Path, *, grow: bool = False) -> InitReport:
    """``init_from_run`` on a state dict ``saved`` (read from ``path``, named in reports and errors)."""
    own = model.state_dict()
    report = InitReport(source=path)
    expert_dims = {}
    if grow:
        from modalmoe.lifelong.state import expert_dims as find_expert_dims
        from modalmoe.lifelong.state import grow_tensor
        from modalmoe.lifelong.tasks import head_state

        expert_dims = find_expert_dims(model)
        saved = head_state(model, saved)  # a new task: the run's head is its own task's
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
        elif name in expert_dims and (grown := grow_tensor(value, theirs, *expert_dims[name])) is not None:
            state[name] = grown
            report.loaded.append(name)
            dim = expert_dims[name][0]
            report.grown[name] = [dim, theirs.shape[dim], value.shape[dim]]
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
