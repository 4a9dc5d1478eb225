"""``modalmoe presets [NAME] [--cost] [--set key=value]``: the named model presets."""

from __future__ import annotations

import click
import torch
from rich.console import Console
from rich.table import Table

from modalmoe.config import ConfigError, to_yaml
from modalmoe.data.tasks import load_task
from modalmoe.efficiency import measure_cost
from modalmoe.model.multimodal import build_model
from modalmoe.model.presets import design_names, get_preset, preset_data, preset_names, task_files

console = Console()


def register(group: click.Group) -> None:
    """Attach ``presets`` to the main command group."""
    group.add_command(presets)


@click.command(
    help="List model presets (<task>/<design>), show one as YAML, or measure their cost. "
    "Presets merge configs/tasks/<task>.yaml with configs/designs/<design>.yaml."
)
@click.argument("name", required=False)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config value")
@click.option("--cost", is_flag=True, help="build the models and count params, active params, FLOPs")
@click.option("--tiny", is_flag=True, help="include the tiny test presets")
def presets(name, overrides, cost, tiny) -> int:
    if name and "/" in name and not cost:
        print(to_yaml(get_preset(name, overrides=overrides)), end="")
        return 0
    names = _select(name, tiny=tiny)
    return _cost(names, list(overrides)) if cost else _list(names)


def _select(name: str | None, *, tiny: bool) -> list[str]:
    names = preset_names(tiny=tiny or name == "tiny")
    if not name:
        return names
    if "/" in name:
        get_preset(name)  # unknown names fail with suggestions
        return [name]
    chosen = [n for n in names if name in n.split("/")]
    if not chosen:
        raise ConfigError(
            f"{name!r} is neither a preset, a task file ({', '.join(task_files())}) "
            f"nor a design ({', '.join(design_names())})"
        )
    return chosen


def _list(names: list[str]) -> int:
    table = Table(title=f"{len(names)} presets")
    table.add_column("preset", no_wrap=True)
    for column in ("fusion", "moe", "missing", "what"):
        table.add_column(column)
    for name in names:
        m = get_preset(name).model
        moe = "dense" if not m.moe.every else f"{m.moe.router} E={m.moe.num_experts} k={m.moe.k}"
        if m.moe.every and m.moe.communication != "none":
            moe += f" comm={m.moe.communication}"
        missing = m.missing.strategy + (f"+drop {m.missing.dropout:g}" if m.missing.dropout else "")
        table.add_row(name, m.fusion.name, moe, missing, preset_data(name).get("description", ""))
    console.print(table)
    return 0


def _cost(names: list[str], overrides: list[str]) -> int:
    table = Table(title="cost per sample (forward, measured on 256 test samples)")
    table.add_column("preset", no_wrap=True)
    for column in ("params", "active params", "MFLOPs / sample"):
        table.add_column(column, justify="right")
    loaded = {}
    for name in names:
        cfg = get_preset(name, overrides=overrides)
        key = (cfg.task, tuple(sorted(cfg.task_options.items())))
        if key not in loaded:
            with console.status(f"loading {cfg.task}"):
                task = load_task(cfg.task, **cfg.task_options)
            loaded[key] = (task, task.train.subset(range(min(len(task.train), 2000))))
        task, train = loaded[key]
        torch.manual_seed(0)
        model = build_model(
            cfg.model,
            task.specs,
            task_type=train.task_type,
            outputs=train.num_classes,
        ).fit(train)
        cost = measure_cost(model, task.test.batch(range(min(len(task.test), 256))))
        table.add_row(name, f"{cost.params:,d}", f"{cost.active_params:,.0f}", f"{cost.flops / 1e6:.3f}")
    console.print(table)
    return 0
