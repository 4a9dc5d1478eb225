"""What every kind of bench cell does with a model: resolve its config from the suite, train
it into a run directory, evaluate it with the suite's robustness axes and measure its cost.
Also the task of a suite (with its sample limit), shared with the runner's budgets.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from rich.console import Console

from modalmoe.bench.suites import SuiteConfig
from modalmoe.data.folds import fold_task
from modalmoe.data.splits import limit_task
from modalmoe.data.tasks.mixture import task_groups
from modalmoe.efficiency.profile import profile_model
from modalmoe.evaluate.runner import evaluate
from modalmoe.lifelong import growth_callbacks
from modalmoe.model.presets import get_preset, task_files
from modalmoe.train import Trainer, load_run_model
from modalmoe.train.trainer import experiment_task


def cell_config(suite: SuiteConfig, task: str, design: str, seed: int, fold: dict | None = None):
    """``<task>/<design>`` with the suite's and the task's overrides and ``train.seed``; for a
    data directory, ``generic/<design>`` sized for its data. ``fold`` (``folds``, ``fold``,
    ``fold_seed``) goes into the task options, so the run directory names its fold."""
    overrides = [*suite.overrides, *suite.task_overrides.get(task, []), f"train.seed={seed}"]
    overrides += [f"task_options.{k}={v}" for k, v in (fold or {}).items()]
    if task not in task_files():
        return get_preset(f"generic/{design}", overrides=overrides, data=task)
    return get_preset(f"{task}/{design}", overrides=overrides)


def suite_task(suite: SuiteConfig, task_file: str, fold: dict | None = None):
    """The task of a preset task file, limited to ``suite.limit[task]`` samples per split;
    with ``fold`` (``folds``, ``fold``, ``fold_seed``), that fold of the limited task."""
    task = _limited_task(suite, task_file)
    return fold_task(task, **fold) if fold else task


def _limited_task(suite: SuiteConfig, task_file: str):
    return limit_task(experiment_task(cell_config(suite, task_file, suite.reference, 0)), suite.limit.get(task_file))


def fit_sample(train, size: int = 512):
    """The training samples that fit encoders for FLOP counting (tokenizers, statistics): a
    fixed subset, the same for every design, so matching stays cheap."""
    if len(train) <= size:
        return train
    return train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:size].sort().values)


def cost_rows(data, size: int = 64):
    """The rows whose cost the bench measures: the first ``size``; for a task mixture, the first
    ``ceil(size / G)`` of each of its G members, so that every member's samples (their own
    modalities and token counts) weigh equally in the FLOPs per sample."""
    groups = task_groups(data)
    per = -(-size // len(groups))
    return torch.cat([rows[:per] for rows in groups])


def cost_batch(task, size: int = 64):
    """The batch whose cost compute matching measures (``cost_rows`` of the test split)."""
    return task.test.batch(cost_rows(task.test, size))


def train_run(config, run_dir: Path, task, *, console: Console | None = None):
    """Train ``config`` into ``run_dir`` (an attempt interrupted by a kill is started again)
    and reload its best checkpoint: (TrainResult, model, training seconds)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    callbacks = growth_callbacks(config, console)  # lifelong cells train grown runs
    result = Trainer(config, run_dir, task=task, progress=False, console=console, callbacks=callbacks).fit()
    seconds = time.perf_counter() - t0
    return result, load_run_model(run_dir), seconds


def evaluate_with_axes(model, task, suite: SuiteConfig, seed: int, *, subsets: bool | None = None):
    """The model on the test split with the suite's robustness axes: (EvalReport, seconds)."""
    t0 = time.perf_counter()
    report = evaluate(
        model,
        task.test,
        subsets=suite.robustness.subsets if subsets is None else subsets,
        noise_levels=[0, *suite.robustness.noise] if suite.robustness.noise else [],
        train_scale=task.train,
        seed=seed,
    )
    return report, time.perf_counter() - t0


def trained_fields(config, run_dir: Path, out: Path, result, report, model, task) -> dict:
    """The record fields every trained cell has: config, run directory, test metrics and
    evaluation, the best validation metrics, epochs and steps, and the cost fields."""
    return {
        "config": config.model_dump(mode="json"),
        "run_dir": str(run_dir.relative_to(out)),
        "metrics": report.metrics,
        "valid": result.best,
        "evaluation": report.to_dict(),
        "epochs": result.epochs,
        "steps": result.steps,
        **cost_fields(model, task.test),
    }


def cost_fields(model, data) -> dict:
    """A trained model's cost fields of a bench record, measured by ``profile_model`` (the
    numbers ``modalmoe profile`` prints): FLOPs, parameters, latency, memory."""
    if "task" in data.extras:  # a mixture: profile a batch with every member's samples
        data = data.subset(cost_rows(data))
    numbers = profile_model(model, data, repeats=10)
    size = numbers["batch_size"]
    return {
        "flops": numbers["flops_per_sample"],
        "params": numbers["params"],
        "active_params": numbers["active_params"],
        "flops_components": numbers["flops_by_component"],
        "latency_b1_ms": numbers["latency_b1_ms"]["p50_ms"],
        "latency_b64_ms": numbers[f"latency_b{size}_ms"]["p50_ms"],
        "memory_b64_mib": numbers[f"memory_b{size}_mib"],
    }
