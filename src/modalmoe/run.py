"""A run directory: what ``modalmoe train`` writes and every other command reads.

    run = RunDir("runs/av")
    config = run.config()            # config.yaml, validated
    model = run.load_model("best")   # built from task.json, restored from checkpoints/best.safetensors

A run directory holds ``config.yaml`` (the resolved experiment), ``task.json`` (modality
specs, task type, outputs, class names: the model is rebuilt without its training data),
``metrics.jsonl``, ``tb/`` (TensorBoard event files), ``checkpoints/{last,best}.safetensors``
and ``summary.json``. Train, eval, predict, compress, distillation, the routing report and
the bench all go through ``RunDir``, so a new file or a changed layout is one edit here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from modalmoe.checkpoint import Checkpoint, CheckpointError, check_config, load_checkpoint, restore_module
from modalmoe.config import ExperimentConfig, load_config, to_yaml
from modalmoe.data.batch import ModalitySpec
from modalmoe.data.formats import DataFormatError
from modalmoe.data.tasks import is_bundled, load_task
from modalmoe.data.tasks.mixture import layout
from modalmoe.io import atomic_write_text
from modalmoe.lock import DirectoryLock
from modalmoe.model.lora import apply_lora
from modalmoe.model.multimodal import MultimodalModel, build_model
from modalmoe.model.quantized import int8_structure


def head_outputs(dataset) -> int | dict[str, int] | None:
    """The prediction head's outputs for a training split: its classes, or its targets; for a
    task mixture, each member task's classes (one head per task)."""
    parts = layout(dataset)
    if parts is not None:
        return dict(zip(parts.names, parts.sizes, strict=True))
    if dataset.task_type == "classification":
        return dataset.num_classes
    return 1 if dataset.target.dim() == 1 else dataset.target.shape[1]


def experiment_task(config: ExperimentConfig):
    """The task an experiment trains on: the bundled task or data directory ``config.task``,
    restricted to ``config.modalities``."""
    task = load_task(config.task, **config.task_options)
    return task.select(config.modalities) if config.modalities else task


def check_data_specs(run_specs: dict, data_specs: dict, source: str, *, every: bool = True) -> None:
    """Raise ``DataFormatError`` unless the data (``data_specs``) carries the run's modalities
    (every one, or with ``every=False`` at least one) with the kind and shape it trained on."""
    shared = [m for m in run_specs if m in data_specs]
    missing = [m for m in run_specs if m not in data_specs]
    if not shared or (every and missing):
        raise DataFormatError(
            f"{source!r} lacks the run's modalities {missing} (the run has {list(run_specs)}, the data "
            f"{list(data_specs)})"
        )
    for name in shared:
        a, b = run_specs[name], data_specs[name]
        if a.kind != b.kind or tuple(a.shape) != tuple(b.shape):
            raise DataFormatError(
                f"{source!r}: modality {name!r} is {b.kind} {tuple(b.shape)} but the run was trained on "
                f"{a.kind} {tuple(a.shape)}"
            )


class RunDir:
    """One run directory (it need not exist yet).

    Args:
        path: the directory.
    """

    # What a run directory holds (``clear`` deletes exactly these; other files are the user's).
    FILES = ("config.yaml", "task.json", "metrics.jsonl", "summary.json", "tb", "checkpoints")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics = self.path / "metrics.jsonl"
        self.summary = self.path / "summary.json"

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def checkpoint(self, which: str = "best") -> Path:
        """The path of the ``best`` or ``last`` checkpoint."""
        return self.checkpoints / f"{which}.safetensors"

    def files(self) -> list[str]:
        """The run artefacts present (empty: no run here)."""
        return [name for name in self.FILES if (self.path / name).exists()]

    def clear(self) -> None:
        """Delete the run's artefacts, so that a fresh start leaves no old log behind."""
        for name in self.files():
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

    def lock(self) -> DirectoryLock:
        """The directory's exclusive lock (``with run.lock(): ...``)."""
        return DirectoryLock(self.path, what="run directory")

    # --- config and task ------------------------------------------------------------------

    def config(self) -> ExperimentConfig:
        """The experiment config (``config.yaml``)."""
        path = self.path / "config.yaml"
        if not path.is_file():
            raise CheckpointError(f"{str(self.path)!r} is not a run directory (no config.yaml); see `modalmoe train`")
        return load_config(path)

    def write_config(self, config: ExperimentConfig) -> None:
        atomic_write_text(self.path / "config.yaml", to_yaml(config))

    def write_task_info(self, task) -> None:
        """``task.json``: what a trained model needs to be rebuilt without its training data."""
        train = task.train
        info = {
            "task": task.name,
            # Where the data came from: a data directory's path and content hash (``RunDir.task``
            # refuses it once changed); a bundled task's data is pinned by its sources' hashes.
            "data": task.provenance or ({"kind": "bundled", "name": task.name} if is_bundled(task.name) else None),
            "task_type": train.task_type,
            "outputs": head_outputs(train),
            "classes": list(train.classes) if train.classes is not None else None,
            "specs": {name: dataclasses.asdict(spec) for name, spec in task.specs.items()},
        }
        atomic_write_text(self.path / "task.json", json.dumps(info, indent=2))

    def task_info(self) -> dict:
        """``task.json``, with ``specs`` as ``ModalitySpec`` objects."""
        path = self.path / "task.json"
        if not path.is_file():
            raise CheckpointError(f"{str(self.path)!r} is not a run directory (no task.json); see `modalmoe train`")
        try:
            info = json.loads(path.read_bytes())
            info["specs"] = {name: ModalitySpec(**spec) for name, spec in info["specs"].items()}
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise CheckpointError(
                f"{str(path)!r} is damaged ({type(err).__name__}: {err}); it is written by `modalmoe train`: "
                "restore it from a copy of the run, or retrain"
            ) from None
        return info

    def task(self, data: str | None = None):
        """The data the run was trained on, as it records it (``task.json``'s ``data``),
        restricted to the run's modalities; ``data`` (a data directory or a bundled task)
        overrides it, checked against the run's modalities.

        Raises ``DataFormatError`` when the recorded data directory is gone or changed since
        training (its content hash differs), or when the run does not record its data (trained
        on a task built in memory, or before runs recorded their data) and ``data`` is None."""
        config, info = self.config(), self.task_info()
        if data is not None:
            options = config.task_options if str(data) == config.task else {}
            task = load_task(str(data), **options)
            check_data_specs(info["specs"], task.specs, str(data))
        else:
            task = self._recorded_task(config, info)
        return task.select(list(info["specs"])) if set(task.specs) != set(info["specs"]) else task

    def _recorded_task(self, config: ExperimentConfig, info: dict):
        record = info.get("data")
        hint = "pass --data DIR (the data to use; it must carry the run's modalities)"
        if record is None:
            if is_bundled(config.task) and info.get("task") == config.task:
                return load_task(config.task, **config.task_options)  # written before runs recorded their data
            raise DataFormatError(
                f"{str(self.path)!r} does not record which data it was trained on (its task {info.get('task')!r} "
                f"was built in memory or by an older modalmoe; its config names {config.task!r}); {hint}"
            )
        if record.get("kind") == "bundled":
            return load_task(record["name"], **config.task_options)
        path = Path(record["path"])
        if not path.exists():
            raise DataFormatError(f"{str(self.path)!r} was trained on {str(path)!r}, which no longer exists; {hint}")
        task = load_task(str(path), **config.task_options)  # its provenance: the data's hash as it is now
        now = task.provenance
        if now["hash"] != record["hash"]:
            raise DataFormatError(
                f"the data in {str(path)!r} changed since {str(self.path)!r} was trained on it (content hash "
                f"{record['hash']} then, {now['hash']} now; {now['files']} files); "
                f"pass --data {str(path)!r} to use it as it is now, or restore the data"
            )
        return task

    # --- the model ------------------------------------------------------------------------

    def load_checkpoint(self, which: str = "best") -> Checkpoint:
        """The ``best`` or ``last`` checkpoint, checked against the run's model config."""
        checkpoint = load_checkpoint(self.checkpoint(which))
        check_config(checkpoint, self.config().model_dump(mode="json"))
        return checkpoint

    def load_model(self, which: str = "best") -> MultimodalModel:
        """The trained model (``best`` or ``last`` checkpoint), in eval mode; the training
        data is not needed."""
        config, info = self.config(), self.task_info()
        checkpoint = self.load_checkpoint(which)
        model = build_model(config.model, info["specs"], task_type=info["task_type"], outputs=info["outputs"])
        # The structure the checkpoint was saved from, rebuilt before its tensors are loaded.
        if config.train.lora.rank:  # an adapted model: its adapters
            apply_lora(model, config.train.lora)
        quantization = config.model.quantization
        if quantization.method == "int8":  # a compressed run: its int8 layers
            int8_structure(model, min_weight=quantization.min_weight, patch_convs=quantization.patch_convs)
        restore_module(model, checkpoint.model_state(), f"checkpoint {str(checkpoint.path)!r}")
        return model.eval()


def load_run_model(run_dir: str | Path, *, which: str = "best") -> MultimodalModel:
    """``RunDir(run_dir).load_model(which)``."""
    return RunDir(run_dir).load_model(which)


def read_run_config(run_dir: str | Path) -> ExperimentConfig:
    """``RunDir(run_dir).config()``."""
    return RunDir(run_dir).config()


def read_task_info(run_dir: str | Path) -> dict:
    """``RunDir(run_dir).task_info()``."""
    return RunDir(run_dir).task_info()
