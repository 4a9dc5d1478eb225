"""Efficiency variants of a trained bench cell: the suite's ``compress`` methods (int8,
expert pruning and merging, token reduction, distillation into a dense student), each
evaluated and profiled like the cell itself and stored as its own record
``<design>+<label>``, so the leaderboard and the Pareto plots put them beside the designs.

A method that does not fit a design (pruning a dense model, token reduction with cross
fusion, distilling from a dense teacher) is skipped for that design, and the reason is kept
in the base record's ``skipped_variants``.
"""

from __future__ import annotations

import time
from pathlib import Path

from modalmoe.bench.suites import CompressConfig, SuiteConfig, task_label
from modalmoe.bench.training import cell_config, cost_fields, train_run
from modalmoe.config import ExperimentConfig, apply_overrides, validate
from modalmoe.efficiency.compress import compress_model
from modalmoe.moe.routers import routers
from modalmoe.train import load_run_model


def applies(spec: CompressConfig, config) -> str | None:
    """Why ``spec`` does not apply to a model config (None: it applies)."""
    moe = config.model.moe
    if spec.method in ("prune-experts", "merge-experts", "distill") and not moe.every:
        return "needs an MoE model"
    if spec.method in ("prune-experts", "merge-experts"):
        if not routers.get(moe.router).expert_params:
            return f"router {moe.router!r} does not support dropping experts"
        if spec.experts >= moe.num_experts:
            return f"the model has {moe.num_experts} experts, not more than {spec.experts}"
        if spec.method == "merge-experts" and (moe.router == "soft" or moe.communication != "none"):
            return "merging needs per-token choices and the plain combine"
    if spec.method == "tokens":
        if config.model.fusion.name not in ("early", "late"):
            return f"token reduction needs early or late fusion, not {config.model.fusion.name!r}"
        if spec.reduction == "router" and not moe.every:
            return "router-score reduction needs MoE blocks"
    return None


def _student(spec: CompressConfig, suite: SuiteConfig, task_file: str, seed: int, teacher: Path):
    config = cell_config(suite, task_file, spec.student, seed)
    objectives = [
        {"name": "cross_entropy", "weight": 0.5},
        {"name": "distill", "weight": 0.5, "options": {"teacher": str(teacher), "temperature": spec.temperature}},
    ]
    data = apply_overrides(config.model_dump(mode="json"), list(spec.student_overrides))
    data["train"]["objectives"] = objectives
    return validate(data, ExperimentConfig, source="distillation student")


def run_variants(
    cell, suite: SuiteConfig, config, task, run_dir: Path, out: Path, evaluate_model
) -> tuple[list[dict], dict[str, str]]:
    """Records of every applicable variant of a trained cell, and the skipped ones' reasons.

    Args:
        cell: the design cell (``designs.DesignCell``: task, design, label, seed).
        config: the cell's (compute-matched) experiment config.
        task: the cell's task.
        run_dir: the trained cell's run directory (the teacher for distillation).
        out: the bench directory.
        evaluate_model: ``model -> (EvalReport, seconds)`` with the suite's robustness axes.
    """
    records, skipped = [], {}
    for spec in suite.compress:
        reason = applies(spec, config)
        if reason is not None:
            skipped[spec.label] = reason
            continue
        started = time.perf_counter()
        record = {
            "task": task_label(cell.task),
            "design": f"{cell.label}+{spec.label}",
            "seed": cell.seed,
            "base_design": cell.design,
            "compressed": spec.model_dump(mode="json"),
        }
        train_seconds, extra = 0.0, {}
        if spec.method == "distill":
            student = _student(spec, suite, cell.task, cell.seed, run_dir)
            student_dir = out / "runs" / task_label(cell.task) / record["design"] / f"s{cell.seed}"
            result, model, train_seconds = train_run(student, student_dir, task)
            extra = {"run_dir": str(student_dir.relative_to(out)), "epochs": result.epochs, "steps": result.steps}
            variant_config = student
        else:
            model = compress_model(
                load_run_model(run_dir),
                spec.method,
                data=task.valid,
                experts=spec.experts,
                by=spec.by,
                reduction=spec.reduction,
                keep=spec.keep,
                layers=tuple(spec.layers),
                placement=spec.placement,
            )
            variant_config = config.model_copy(update={"model": model.config})
        report, eval_seconds = evaluate_model(model)
        record.update(
            config=variant_config.model_dump(mode="json"),
            metrics=report.metrics,
            evaluation=report.to_dict(),
            **cost_fields(model, task.test),
            train_seconds=round(train_seconds, 3),
            eval_seconds=round(eval_seconds, 3),
            status="ok",
            seconds=round(time.perf_counter() - started, 3),
            **extra,
        )
        records.append(record)
    return records, skipped
