"""Grow a trained run by a task: a new head, new experts reserved for the task, the old kept.

    modalmoe train --continue-from runs/t1 --add-task t2 --task-option seed=2 --experts 4

or in memory, ``grown = add_task(model, "t2", outputs=4, experts=4)``.

A model that learned a sequence of tasks lists them in ``model.tasks`` (label, head kind,
outputs), in the order learned. The last is the task trained now and predicted by default:
its head is the model's ``head``, so training, evaluation and profiling need nothing new.
Earlier tasks keep their heads in ``task_heads``; ``model(batch, task=label)`` predicts one.

Experts added for a task are reserved for it (``model.moe.reserved.tasks``, an expert mask
the model hands each MoE layer with each sample's task id): every earlier task's pass masks
them out, so it routes exactly as before they existed and, until training changes the old
parts, predicts exactly as the run did. ``train.grow.freeze`` decides which old parts may
change (as for a new modality, ``grow.py``); earlier tasks'
heads always stay fixed, since the new task's loss never reads them.

The new task's data is the continued experiment's ``task`` and ``task_options``: it must
carry the run's modalities, each of the same kind and shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from modalmoe.config import ExperimentConfig, ModelConfig, TaskHeadConfig, validate
from modalmoe.data.tasks import load_task
from modalmoe.lifelong.grow import FREEZE, GrowError, GrowResult, check_growable, continue_with, grow_transform
from modalmoe.model.multimodal import build_model
from modalmoe.run import RunDir, experiment_task, head_outputs
from modalmoe.train.init import load_matching


def grow_task_model_config(
    config: ModelConfig,
    new: Mapping[str, Any],
    *,
    experts: int = 0,
    previous: Mapping[str, Any] | None = None,
) -> ModelConfig:
    """The model config with task ``new`` appended to ``model.tasks`` and ``experts`` more
    experts per MoE layer reserved for it.

    Args:
        config: the trained model's config.
        new: the new task's ``TaskHeadConfig`` fields (``name``, ``outputs``, ``kind``, ...).
        experts: experts added per MoE layer for it.
        previous: the ``TaskHeadConfig`` fields of the model's own task when ``config.tasks``
            is empty (a one-task model); ignored otherwise.
    """
    check_growable(config, experts, what="task")
    tasks = [t.model_dump(mode="json") for t in config.tasks]
    if not tasks:
        if previous is None:
            raise GrowError("a one-task model needs the label, head kind and outputs of its own task (previous=)")
        tasks = [validate(dict(previous), TaskHeadConfig, source="for the model's own task").model_dump(mode="json")]
    entry = validate(dict(new), TaskHeadConfig, source="for the new task").model_dump(mode="json")
    name, known = entry["name"], [t["name"] for t in tasks]
    if name in known:
        raise GrowError(f"the model already has a task {name!r} (its tasks: {known}); give the new task another label")
    tasks.append(entry)
    data = config.model_dump(mode="json")
    data["tasks"] = tasks
    if experts:
        first = config.moe.num_experts
        data["moe"]["reserved"]["tasks"][name] = list(range(first, first + experts))
        data["moe"]["num_experts"] = first + experts
    return validate(data, ModelConfig, source=f"for the model grown by task {name!r}")


def grow_task_model(
    model,
    name: str,
    *,
    outputs: int,
    kind: str = "classification",
    experts: int = 0,
    previous: str = "task0",
) -> GrowResult:
    """A new model that learns task ``name`` (see ``MultimodalModel.add_task``), carrying
    ``model``'s trained state; ``model`` is left as it is."""
    if model.config is None:
        raise GrowError("this model has no config (it was not built by build_model); it cannot be grown")
    if model.head is None:
        raise GrowError("adding a task needs a model with a prediction head")
    config = grow_task_model_config(
        model.config,
        {"name": name, "outputs": outputs, "kind": kind},
        experts=experts,
        previous={"name": previous, "kind": model.head.kind, "outputs": model.head.outputs},
    )
    specs = {m: encoder.spec for m, encoder in model.encoders.items()}
    task_type = "regression" if kind == "regression" else "classification"
    grown = build_model(config, specs, task_type=task_type, outputs=outputs).to(model._device)
    report = load_matching(grown, model.state_dict(), Path("<in-memory model>"), transform=grow_transform)
    return GrowResult(grown.train(model.training), report)


def check_same_modalities(run_specs: Mapping, new_specs: Mapping, modalities: Sequence[str], new_task: str) -> None:
    """Raise ``GrowError`` unless task ``new_task`` (``new_specs``) carries every modality
    in ``modalities`` with the kind and shape the run's (``run_specs``) has."""
    missing = [m for m in modalities if m not in new_specs]
    if missing:
        raise GrowError(
            f"task {new_task!r} has no modality {', '.join(map(repr, missing))} (it has {list(new_specs)}); "
            f"a new task must carry the run's modalities {list(modalities)}"
        )
    for m in modalities:
        a, b = run_specs[m], new_specs[m]
        if (a.kind, a.shape) != (b.kind, b.shape):
            raise GrowError(
                f"modality {m!r} is {a.kind} {list(a.shape)} in the run's task but {b.kind} {list(b.shape)} in "
                f"task {new_task!r}; the run's encoders cannot read it"
            )


def grow_task_config(
    config: ExperimentConfig,
    *,
    run_dir: str | Path,
    label: str,
    task: str | None = None,
    task_options: Mapping[str, Any] | None = None,
    experts: int = 0,
    freeze: str = "experts",
    ewc: float = 0.0,
    previous: str | None = None,
    fisher_samples: int | None = None,
    inherit_options: bool = True,
) -> ExperimentConfig:
    """The experiment that continues run ``run_dir`` (whose config is ``config``) with a new
    task labelled ``label``.

    Args:
        config: the run's experiment (``read_run_config(run_dir)``).
        run_dir: the run; it becomes ``train.init_from``.
        label: the new task's label (``model.tasks``).
        task: the bundled task whose data the new task trains on (None: the run's).
        task_options: that task's options, over the run's when ``task`` is the run's task
            and ``inherit_options``, e.g. ``{"seed": 2, "mode": "unique", "num_classes": 8}``
            for ``synthetic``.
        experts: experts added per MoE layer, reserved for the new task.
        freeze: ``experts``, ``old`` or ``none`` (``grow.py``).
        ewc: EWC strength lambda (0: off).
        previous: the run's own task's label when it has none yet (default: its task name).
        fisher_samples: training samples for EWC's Fisher (None: ``GrowConfig``'s default).
        inherit_options: start from the run's task options (when the task is the same);
            False: ``task_options`` are all the new task's options.
    """
    if freeze not in FREEZE:
        raise GrowError(f"freeze must be one of {', '.join(FREEZE)}, got {freeze!r}")
    if config.train.lora.rank:
        raise GrowError("the run was trained with LoRA adapters; continue from a run without train.lora")
    if config.model.head.embed_dim is not None:
        raise GrowError("adding a task to a model with an embedding head is not supported")
    new_task = task or config.task
    options = dict(config.task_options) if new_task == config.task and inherit_options else {}
    options.update(task_options or {})
    old = load_task(config.task, **config.task_options)
    new = load_task(new_task, **options)
    modalities = list(config.modalities or old.specs)
    check_same_modalities(old.specs, new.specs, modalities, new_task)

    def kind(split) -> str:
        return config.model.head.kind or ("classification" if split.task_type == "classification" else "regression")

    model = grow_task_model_config(
        config.model,
        {"name": label, "kind": kind(new.train), "outputs": head_outputs(new.train), "data": new_task,
         "data_options": options},
        experts=experts,
        previous={"name": previous or config.task, "kind": kind(old.train), "outputs": head_outputs(old.train),
                  "data": config.task, "data_options": dict(config.task_options)},
    )  # fmt: skip
    data = config.model_dump(mode="json")
    data["model"] = model.model_dump(mode="json")
    data["task"], data["task_options"] = new_task, options
    data["modalities"] = modalities
    data["description"] = (config.description + "; " if config.description else "") + (
        f"grown: + task {label} ({new_task}{' ' + str(options) if options else ''}; {experts} experts, "
        f"freeze {freeze}, ewc {ewc:g})"
    )
    data["train"]["init_from"] = str(run_dir)
    grow = {"task": label, "experts": experts, "freeze": freeze, "ewc": ewc}
    if fisher_samples is not None:
        grow["fisher_samples"] = fisher_samples
    data["train"]["grow"] = grow
    return validate(data, ExperimentConfig, source=f"for the run grown from {str(run_dir)!r}")


def continue_task(run_dir: str | Path, *, label: str, overrides: Sequence[str] = (), **options) -> ExperimentConfig:
    """``grow_task_config`` for run directory ``run_dir`` (its config and best checkpoint are
    checked first), then ``--set`` style ``overrides`` on the grown experiment."""
    return continue_with(grow_task_config, run_dir, overrides, label=label, **options)


def task_data(config: ExperimentConfig, label: str | None = None, *, run: str | Path | None = None, data=None):
    """The data of task ``label`` of a run's experiment ``config`` (None: the task it trains):
    an earlier task's bundled task and options from ``model.tasks``, restricted to the run's
    modalities. The task it trains is the run's recorded data (``RunDir.task``: ``data``
    overrides it) when ``run`` is given."""
    names = [t.name for t in config.model.tasks]
    if label is None or (names and label == names[-1]):
        return RunDir(run).task(data) if run is not None else experiment_task(config)
    if label not in names:
        known = f"its tasks are {names}" if names else "it learned one task"
        raise GrowError(f"the run has no task {label!r}: {known}")
    entry = config.model.tasks[names.index(label)]
    if entry.data is None:
        raise GrowError(f"the run does not record which data task {label!r} learned (model.tasks[].data is unset)")
    task = load_task(entry.data, **entry.data_options)
    return task.select(config.modalities) if config.modalities else task
