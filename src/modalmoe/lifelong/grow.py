"""Grow a trained run: more modalities, more experts reserved for them, the old parts kept.

    from modalmoe.lifelong import grow_config
    from modalmoe.train import Trainer
    config = grow_config(read_run_config("runs/audio"), run_dir="runs/audio", add_modalities=["image"],
                         experts=4, freeze="experts")
    Trainer(config, "runs/audio+image").fit()

or in memory, ``grown = add_modality(model, "image", spec, experts=4, data=task.train)``.

The continued experiment appends the new modalities (existing modality ids keep their
meaning), gives each its encoder (the run's preset's entry, else the default for its kind),
adds ``experts`` experts per MoE layer for each new modality and reserves them for it
(``model.moe.reserved``), and starts from the run (``train.init_from``, with
the experts' tensors grown, see ``state.grow_tensor``). ``train.grow`` says what stays fixed:

- ``freeze: experts``: the run's experts (their slices of the stacked banks), shared experts
  and router rows;
- ``freeze: old``: every tensor that came from the run;
- ``freeze: none``: nothing (naive fine-tuning);
- ``ewc: lambda``: Elastic Weight Consolidation on the run's tensors (``ewc.py``).

A fixed slice inside a stacked tensor gets a zero gradient (so it weighs nothing in gradient
clipping) and is copied back after every optimizer step, since AdamW's decoupled weight decay
moves parameters even with a zero gradient. Whole tensors are simply ``requires_grad=False``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from modalmoe.config import (
    ConfigError,
    EncoderConfig,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    read_yaml,
    validate,
)
from modalmoe.data.tasks import load_task
from modalmoe.lifelong.ewc import EWCPenalty
from modalmoe.lifelong.state import expert_dims, grow_tensor, head_state, shared_expert_names
from modalmoe.model.multimodal import build_model
from modalmoe.model.presets import config_dir, preset_data
from modalmoe.run import read_run_config
from modalmoe.train.callbacks import Callback
from modalmoe.train.init import load_matching, run_checkpoint

#: Routers whose experts can grow: one score row per expert, and an expert mask (``moe.masks``).
SUPPORTED_ROUTERS = ("token_choice",)
FREEZE = ("experts", "old", "none")


class GrowError(ConfigError):
    """A run cannot be grown as asked (an unsupported design, an unknown modality, ...)."""


def check_growable(config: ModelConfig, experts: int, *, what: str) -> None:
    """Raise ``GrowError`` unless a model of ``config`` can take ``experts`` more experts for
    a new ``what`` (``modality`` or ``task``)."""
    if experts < 0:
        raise GrowError(f"experts must be >= 0, got {experts}")
    moe = config.moe
    # A new modality changes what the routers see even without new experts; a new task does not.
    if moe.every and (experts or what == "modality") and moe.router not in SUPPORTED_ROUTERS:
        raise GrowError(
            f"growing a model with router {moe.router!r} is not supported; lifelong growth supports "
            f"{', '.join(SUPPORTED_ROUTERS)} (its reserved experts keep the old {what}'s routing)"
            + (f"; or add the {what} with experts=0" if what == "task" else "")
        )
    if not moe.every and experts:
        raise GrowError(f"a dense model (model.moe.every=0) has no experts to grow; add the {what} with experts=0")
    if moe.bank_experts is not None:
        raise GrowError("a model with merged experts (model.moe.bank_experts) cannot grow; grow the run it came from")
    if config.quantization.method != "none":
        raise GrowError("a quantized model cannot grow; grow the float run it was compressed from")


def grow_model_config(
    config: ModelConfig,
    modalities: Sequence[str],
    add: Mapping[str, EncoderConfig | Mapping | None],
    *,
    experts: int = 0,
) -> ModelConfig:
    """The model config with ``add``'s modalities appended to ``modalities`` and ``experts``
    more experts per MoE layer for each, reserved for it.

    Args:
        config: the trained model's config.
        modalities: its modalities, in id order.
        add: new modality -> its encoder config (None: the default for its kind).
        experts: experts added per MoE layer for each new modality.
    """
    if not add:
        raise GrowError("name at least one modality to add")
    again = [m for m in add if m in modalities]
    if again:
        raise GrowError(f"the model already has modalities {again} (it has {list(modalities)}); add a new one")
    check_growable(config, experts, what="modality")
    moe = config.moe
    if config.missing.strategy != "mask":
        raise GrowError(
            f"growing needs model.missing.strategy 'mask'; the {config.missing.strategy!r} strategy has tokens per "
            "modality set that would change for the old modalities"
        )
    data = config.model_dump(mode="json")
    for name, encoder in add.items():
        if encoder is not None:
            data["encoders"][name] = (
                encoder.model_dump(mode="json") if isinstance(encoder, EncoderConfig) else dict(encoder)
            )
    if experts:
        reserved = data["moe"]["reserved"]["modalities"]
        first = moe.num_experts
        for i, name in enumerate(add):
            reserved[name] = list(range(first + i * experts, first + (i + 1) * experts))
        data["moe"]["num_experts"] = first + experts * len(add)
    if "modalities" in data["moe"]["router_options"]:
        data["moe"]["router_options"]["modalities"] = [*modalities, *add]
    return validate(data, ModelConfig, source="for the grown model")


def _preset_encoder(config: ExperimentConfig, name: str) -> dict | None:
    """The encoder entry of modality ``name`` in the run's preset (or its task file)."""
    try:
        data = preset_data(config.name)  # the full preset: get_preset trims encoders to `modalities`
    except ConfigError:
        path = config_dir() / "tasks" / f"{config.task}.yaml"
        data = read_yaml(path) if path.is_file() else {}
    if data.get("task") != config.task:
        return None
    return ((data.get("model") or {}).get("encoders") or {}).get(name)


def grow_config(
    config: ExperimentConfig,
    *,
    run_dir: str | Path,
    add_modalities: Sequence[str],
    experts: int = 0,
    freeze: str = "experts",
    ewc: float = 0.0,
    encoders: Mapping[str, EncoderConfig | Mapping] | None = None,
    dropout: float | None = None,
    fisher_samples: int | None = None,
) -> ExperimentConfig:
    """The experiment that continues run ``run_dir`` (whose config is ``config``) with more
    modalities and experts.

    Args:
        config: the run's experiment (``read_run_config(run_dir)``).
        run_dir: the run; it becomes ``train.init_from``.
        add_modalities: modalities of the run's task to add, in order.
        experts: experts added per MoE layer for each added modality, reserved for it.
        freeze: ``experts``, ``old`` or ``none`` (see the module doc).
        ewc: EWC strength lambda (0: off).
        encoders: modality -> encoder config for the added modalities (default: the run's
            preset's, from ``configs/tasks/<task>.yaml``, else the default for its kind).
        dropout: ``model.missing.dropout`` of the continued run (None: the run's).
        fisher_samples: training samples for EWC's Fisher (None: ``GrowConfig``'s default).
    """
    if freeze not in FREEZE:
        raise GrowError(f"freeze must be one of {', '.join(FREEZE)}, got {freeze!r}")
    if config.train.lora.rank:
        raise GrowError("the run was trained with LoRA adapters; continue from a run without train.lora")
    task_modalities = list(load_task(config.task, **config.task_options).specs)
    current = list(config.modalities or task_modalities)
    unknown = [m for m in add_modalities if m not in task_modalities]
    if unknown:
        raise GrowError(
            f"task {config.task!r} has no modality {', '.join(map(repr, unknown))} (it has {task_modalities}); "
            "a run can only grow into modalities of its own task"
        )
    if len(set(add_modalities)) != len(add_modalities):
        raise GrowError(f"modalities to add are listed twice: {list(add_modalities)}")
    again = [m for m in add_modalities if m in current]
    if again:
        raise GrowError(
            f"run {str(run_dir)!r} already has {', '.join(map(repr, again))} (its modalities: {current}); add another"
        )
    encoders = dict(encoders or {})
    add = {m: encoders.get(m, _preset_encoder(config, m)) for m in add_modalities}
    model = grow_model_config(config.model, current, add, experts=experts)
    data = config.model_dump(mode="json")
    data["model"] = model.model_dump(mode="json")
    if dropout is not None:
        data["model"]["missing"]["dropout"] = dropout
    data["modalities"] = [*current, *add_modalities]
    data["description"] = (config.description + "; " if config.description else "") + (
        f"grown: + {', '.join(add_modalities)} ({experts} experts each, freeze {freeze}, ewc {ewc:g})"
    )
    data["train"]["init_from"] = str(run_dir)
    grow = {"modalities": list(add_modalities), "experts": experts, "freeze": freeze, "ewc": ewc}
    if fisher_samples is not None:
        grow["fisher_samples"] = fisher_samples
    data["train"]["grow"] = grow
    return validate(data, ExperimentConfig, source=f"for the run grown from {str(run_dir)!r}")


def continue_run(
    run_dir: str | Path, *, add_modalities: Sequence[str], overrides: Sequence[str] = (), **options
) -> ExperimentConfig:
    """``grow_config`` for run directory ``run_dir`` (its config and best checkpoint are
    checked first), then ``--set`` style ``overrides`` on the grown experiment."""
    return continue_with(grow_config, run_dir, overrides, add_modalities=add_modalities, **options)


def continue_with(grow, run_dir: str | Path, overrides: Sequence[str], **options) -> ExperimentConfig:
    """``grow(read_run_config(run_dir), run_dir=run_dir, **options)`` once ``run_dir`` is
    checked to be a finished run, then ``--set`` style ``overrides`` on the result."""
    run_checkpoint(run_dir)  # a clear error when run_dir is not a finished run
    grown = grow(read_run_config(run_dir), run_dir=run_dir, **options)
    if not overrides:
        return grown
    data = apply_overrides(grown.model_dump(mode="json"), overrides)
    return validate(data, ExperimentConfig, source=f"for the run grown from {str(run_dir)!r}")


# --- in memory ------------------------------------------------------------------------------


@dataclass
class GrowResult:
    """What ``grow_model`` returns: the new model and what it took from the old one."""

    model: nn.Module
    report: Any  # modalmoe.train.init.InitReport


def grow_model(
    model,
    specs: Mapping,
    *,
    encoders: Mapping[str, EncoderConfig | Mapping | None] | None = None,
    experts: int = 0,
    data=None,
) -> GrowResult:
    """A new model with ``specs``' modalities added to ``model``'s and ``experts`` more
    experts per MoE layer for each (reserved for it), carrying ``model``'s trained state.

    ``model`` is left as it is. Before training, the new model's outputs on inputs without
    the new modalities equal ``model``'s.

    Args:
        model: a ``MultimodalModel`` built by ``build_model`` (it keeps its ``config``).
        specs: new modality name -> ``ModalitySpec``.
        encoders: new modality -> encoder config (None: the default for its kind).
        experts: experts added per MoE layer for each new modality.
        data: a ``MultimodalDataset`` (the training split) to fit the new encoders'
            input statistics on; None leaves them unfitted (call their ``fit`` yourself).
    """
    if model.config is None:
        raise GrowError("this model has no config (it was not built by build_model); it cannot be grown")
    if model.head is None:
        raise GrowError("growing needs a model with a prediction head")
    add = {name: (encoders or {}).get(name) for name in specs}
    config = grow_model_config(model.config, model.modalities, add, experts=experts)
    all_specs = {name: encoder.spec for name, encoder in model.encoders.items()} | dict(specs)
    task_type = "regression" if model.head.kind == "regression" else "classification"
    grown = build_model(config, all_specs, task_type=task_type, outputs=model.head.outputs).to(model._device)
    if data is not None:
        grown.fit(data, modalities=list(specs))
    report = load_matching(grown, model.state_dict(), Path("<in-memory model>"), transform=grow_transform)
    return GrowResult(grown.train(model.training), report)


# --- in the trainer -------------------------------------------------------------------------


@dataclass
class Growth:
    """What a grown run keeps fixed.

    Attributes:
        frozen: whole parameters set to ``requires_grad=False``.
        slices: name -> (parameter, expert dim, old size, the run's values [.., old, ..]):
            leading slices of grown tensors kept at the run's values.
        ewc: names of the parameters under the EWC penalty (empty when off).
        fixed: how many parameter elements stay fixed (frozen tensors and slices).
    """

    frozen: list[str] = field(default_factory=list)
    slices: dict[str, tuple[nn.Parameter, int, int, Tensor]] = field(default_factory=dict)
    ewc: list[str] = field(default_factory=list)
    fixed: int = 0

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the run's values back into the fixed slices (after an optimizer step)."""
        for param, dim, size, value in self.slices.values():
            param.narrow(dim, 0, size).copy_(value)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Restore the fixed slices after every step of ``optimizer``."""
        if self.slices:
            optimizer.register_step_post_hook(lambda *_: self.restore())

    def summary(self) -> str:
        line = f"grown run: {len(self.frozen)} tensors frozen, {len(self.slices)} with their old experts fixed"
        return line + (f", EWC on {len(self.ewc)} tensors" if self.ewc else "")


def _zero_slice(dim: int, size: int):
    def hook(grad: Tensor) -> Tensor:
        grad = grad.clone()
        grad.narrow(dim, 0, size).zero_()
        return grad

    return hook


def freeze_old(model: nn.Module, report, mode: str) -> Growth:
    """Freeze what ``mode`` says of the tensors ``model`` took from a run (``report``: the
    ``InitReport`` of ``init_from_run(..., transform=grow_transform)``)."""
    if mode not in FREEZE:
        raise GrowError(f"freeze must be one of {', '.join(FREEZE)}, got {mode!r}")
    params = dict(model.named_parameters())
    from_run = [name for name in report.loaded if name in params]
    if mode == "experts":
        experts = set(expert_dims(model)) | shared_expert_names(model)
        targets = [name for name in from_run if name in experts]
    else:
        targets = from_run if mode == "old" else []
    # Earlier tasks' heads (a new task, ``tasks.py``): the new task's loss never reads them.
    targets += [name for name in from_run if name.startswith("task_heads.") and name not in targets]
    growth = Growth()
    for name in targets:
        param = params[name]
        if name in report.grown:
            dim, old, _ = report.grown[name]
            growth.slices[name] = (param, dim, old, param.detach().narrow(dim, 0, old).clone())
            param.register_hook(_zero_slice(dim, old))
            growth.fixed += growth.slices[name][3].numel()
        else:
            param.requires_grad_(False)
            growth.frozen.append(name)
            growth.fixed += param.numel()
    return growth


def prepare_growth(model: nn.Module, objectives: nn.Module, train: TrainConfig, report, task=None) -> Growth:
    """Freeze and regularise a grown run's model as ``train.grow`` says; with EWC, add an
    ``ewc`` term to ``objectives`` (an ``ObjectiveSet``), whose Fisher and anchor are buffers
    the checkpoint keeps.

    Args:
        model: the built model, after ``init_from_run(..., transform=grow_transform)``.
        objectives: the trainer's ``ObjectiveSet``.
        train: the train config (``grow`` and ``init_from`` set).
        report: ``init_from_run``'s report.
    """
    grow = train.grow
    if grow is None or report is None:
        raise GrowError("prepare_growth needs train.grow and the init_from report of the grown model")
    growth = freeze_old(model, report, grow.freeze)
    if grow.ewc > 0:
        params = dict(model.named_parameters())
        names = [n for n in report.loaded if n in params and params[n].requires_grad]
        penalty = EWCPenalty.from_run(
            train.init_from, names=names, grown=report.grown, strength=grow.ewc, samples=grow.fisher_samples
        )
        if "ewc" in objectives.objectives:
            raise GrowError("train.objectives already has an objective named 'ewc'; remove it to use train.grow.ewc")
        objectives.objectives["ewc"] = penalty.to(next(model.parameters()).device)
        objectives.weights["ewc"] = 1.0
        growth.ewc = names
    return growth


def grow_transform(model: nn.Module, saved: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """``train.init.Transform`` of a grown run: the run's state as the grown ``model`` names and
    shapes it. A new task's head is renamed (``state.head_state``); each per-expert tensor whose
    expert dimension grew takes the run's experts in its leading slice (``state.grow_tensor``)."""
    dims = expert_dims(model)
    saved = head_state(model, saved)  # a new task: the run's head is its own task's
    grown: dict[str, list[int]] = {}
    for name, value in model.state_dict().items():
        theirs = saved.get(name)
        if name not in dims or not isinstance(value, Tensor) or not isinstance(theirs, Tensor):
            continue
        bigger = grow_tensor(value, theirs, *dims[name])
        if bigger is not None:
            dim = dims[name][0]
            grown[name] = [dim, theirs.shape[dim], value.shape[dim]]
            saved[name] = bigger
    return saved, grown


class GrowthCallback(Callback):
    """``train.grow``: a grown run's trainer part. Its checkpoint transform loads the run into
    the grown model; then what came from the run is frozen or regularised (``prepare_growth``)
    and the fixed old-expert slices are put back after every optimizer step."""

    name, handles = "growth", ("train.grow",)

    def __init__(self, train: TrainConfig, console=None) -> None:
        self.train, self.console = train, console
        self.growth: Growth | None = None

    def init_transform(self):
        return grow_transform

    def on_objectives(self, model, objectives, init_report) -> None:
        self.growth = prepare_growth(model, objectives, self.train, init_report)
        self.fixed_parameters = self.growth.fixed
        if self.console is not None:
            self.console.print(self.growth.summary())

    def on_optimizer(self, optimizer) -> None:
        self.growth.attach(optimizer)  # puts fixed old-expert slices back after each step


def growth_callbacks(config, console=None) -> list[Callback]:
    """The trainer callbacks of an experiment that grows a run (none when ``train.grow`` is unset)."""
    return [GrowthCallback(config.train, console)] if config.train.grow is not None else []
