"""Named presets: a task file merged with a design file, both YAML under ``configs/``.

``configs/tasks/<task>.yaml`` holds the task and its sizes and encoders;
``configs/designs/<design>.yaml`` holds the fusion, MoE and missing-modality choices (it may
``extends:`` another design); a task may adjust every design under ``all_designs:`` and one
design under ``designs: {<design>: ...}`` (both win over the design). The
preset ``<task>/<design>`` is their merge, validated as an ``ExperimentConfig``. Nothing is
copied between files, so the recipes cannot drift apart.

    from modalmoe.model.presets import get_preset, preset_names
    cfg = get_preset("av-digits/token-choice", overrides=["model.moe.num_experts=16"])
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterable
from pathlib import Path

from modalmoe.config import ConfigError, ExperimentConfig, apply_overrides, deep_merge, read_yaml, validate
from modalmoe.data.tasks import is_bundled, load_task
from modalmoe.encoders.sizing import sized_encoder

#: ``configs/`` ships inside the package (so wheels carry it); the repository's top-level
#: ``configs`` is a link to it. ``MODALMOE_CONFIGS`` points elsewhere.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

TINY = "tiny"  # the task file of the tiny test presets
#: The task files of the presets for users' own data (``generic/<design>``, ``generic-medium/<design>``).
GENERIC = ("generic", "generic-medium")


def config_dir() -> Path:
    return Path(os.environ.get("MODALMOE_CONFIGS", CONFIG_DIR))


def _names(folder: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / folder).glob("*.yaml"))


def task_files() -> list[str]:
    """Task file names (``av-digits``, ..., ``tiny``)."""
    return _names("tasks")


def design_names() -> list[str]:
    return _names("designs")


def preset_names(*, tiny: bool = True, generic: bool = False) -> list[str]:
    """Every ``<task>/<design>`` of a bundled task; ``tiny=False`` leaves out the test presets,
    ``generic=True`` adds the presets for users' own data (they need ``data=``)."""
    tasks = [t for t in task_files() if (tiny or t != TINY) and (generic or t not in GENERIC)]
    return [f"{t}/{d}" for t in tasks for d in design_names()]


def is_generic(name: str | None) -> bool:
    """Whether preset ``name`` is one of the ``generic`` presets (for users' own data)."""
    return (name or "").partition("/")[0] in GENERIC


def _design(name: str, _seen: tuple = ()) -> dict:
    path = config_dir() / "designs" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(_unknown("design", name, design_names()))
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if parent in _seen + (name,):
        raise ConfigError(f"design {name!r} extends itself through {list(_seen + (name,))}")
    base = _design(parent, _seen + (name,))
    base = {k: v for k, v in base.items() if k != "description"}
    return deep_merge(base, data)


def _unknown(what: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"unknown {what} {name!r}.{hint} Known {what}s: {', '.join(known)}"


def preset_data(name: str) -> dict:
    """The raw merged mapping of a preset (before validation)."""
    task, sep, design = name.partition("/")
    if not sep:
        raise ConfigError(f"preset names look like <task>/<design>, e.g. av-digits/token-choice; got {name!r}")
    path = config_dir() / "tasks" / f"{task}.yaml"
    if not path.is_file():
        raise ConfigError(_unknown("preset task", task, task_files()))
    task_data = read_yaml(path)
    adjust = task_data.pop("designs", {}) or {}
    every = task_data.pop("all_designs", {}) or {}
    stray = sorted(set(adjust) - set(design_names()))
    if stray:
        raise ConfigError(f"{path} adjusts unknown designs {stray}; known designs: {', '.join(design_names())}")
    data = deep_merge(task_data, _design(design))
    data = deep_merge(data, every)
    data = deep_merge(data, adjust.get(design, {}))
    data["name"] = name
    return data


def get_preset(name: str, *, overrides: Iterable[str] = (), data: str | Path | None = None) -> ExperimentConfig:
    """A validated preset, with ``key.path=value`` overrides applied.

    Args:
        data: a data directory for a ``generic/<design>`` preset: the experiment's task becomes
            its resolved path and each modality's encoder is chosen and sized from its kind and
            shape (``encoders.sizing``). A bundled task's preset refuses other data.
    """
    if data is not None and not is_generic(name):
        raise ConfigError(borrowed_preset(name, str(data)))
    raw = preset_data(name)
    if data is not None:
        raw = generic_data(raw, data)
    data_ = apply_overrides(raw, overrides)
    return validate(data_, ExperimentConfig, source=f"for preset {name!r}")


def borrowed_preset(name: str, data: str) -> str:
    """The message refusing a bundled task's preset for other data."""
    design = name.partition("/")[2] or "token-choice"
    return (
        f"preset {name!r} is made for the bundled task {name.partition('/')[0]!r} (its encoders and sizes); for "
        f"your own data use the generic preset: modalmoe train generic/{design} --data {data} "
        "(or generic-medium/... for a larger trunk)"
    )


def generic_data(raw: dict, data: str | Path, options: dict | None = None) -> dict:
    """A generic preset's raw mapping for the data at ``data``: task and encoders filled in."""
    task = load_task(str(data), **(options or {}))
    raw = deep_merge(raw, {})
    raw["task"] = task.provenance["path"] if task.provenance else str(data)
    if options:
        raw["task_options"] = dict(options)
    model = raw.setdefault("model", {})
    encoders = model.setdefault("encoders", {})
    for name, spec in task.specs.items():
        length = task.train.inputs[name].shape[1] if spec.kind == "sequence" else None
        encoders[name] = deep_merge(sized_encoder(spec, length=length), encoders.get(name) or {})
    moe = model.setdefault("moe", {})
    if moe.get("router") == "modality_experts":  # k experts at least in each modality's group
        modalities, k = len(task.specs), moe.get("k", 2)
        experts = moe.get("num_experts", 8)
        moe["num_experts"] = modalities * max(k, math.ceil(experts / modalities))
    return raw


def check_preset_fits(config: ExperimentConfig, task=None) -> None:
    """Raise ``ConfigError`` when a bundled task's preset is used for other data (a data
    directory as ``task``, or a ``task`` given in memory that was read from a directory)."""
    name = config.name or ""
    source = config.task if not is_bundled(config.task) else None
    if source is None and task is not None and task.provenance is not None:
        source = task.provenance["path"]
    preset_task = name.partition("/")[0]
    if source is not None and preset_task in task_files() and preset_task not in GENERIC:
        raise ConfigError(borrowed_preset(name, source))
