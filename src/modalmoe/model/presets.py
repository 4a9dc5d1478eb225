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
import os
from collections.abc import Iterable
from pathlib import Path

from modalmoe.config import ConfigError, ExperimentConfig, apply_overrides, deep_merge, read_yaml, validate

#: ``configs/`` ships inside the package (so wheels carry it); the repository's top-level
#: ``configs`` is a link to it. ``MODALMOE_CONFIGS`` points elsewhere.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

TINY = "tiny"  # the task file of the tiny test presets


def config_dir() -> Path:
    return Path(os.environ.get("MODALMOE_CONFIGS", CONFIG_DIR))


def _names(folder: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / folder).glob("*.yaml"))


def task_files() -> list[str]:
    """Task file names (``av-digits``, ..., ``tiny``)."""
    return _names("tasks")


def design_names() -> list[str]:
    return _names("designs")


def preset_names(*, tiny: bool = True) -> list[str]:
    """Every ``<task>/<design>``; ``tiny=False`` leaves out the test presets."""
    tasks = [t for t in task_files() if tiny or t != TINY]
    return [f"{t}/{d}" for t in tasks for d in design_names()]


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


def get_preset(name: str, *, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """A validated preset, with ``key.path=value`` overrides applied."""
    data = apply_overrides(preset_data(name), overrides)
    return validate(data, ExperimentConfig, source=f"for preset {name!r}")
