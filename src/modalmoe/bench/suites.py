"""Benchmark suites: YAML files under ``configs/suites/`` that say which cells to run.

A cell is (task, design, seed). A suite names the tasks (task files of the presets), the
designs (preset designs, plus ``logistic-regression`` on concatenated features), the seeds,
the compute-matching rule (every design solved to the reference design's FLOPs or
parameters per sample), overrides for all cells or per task, optional per-split sample
limits (for quick suites), and the robustness axes evaluated on every cell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from modalmoe.config import ConfigError, _Strict, read_yaml, validate
from modalmoe.model.presets import config_dir, design_names, task_files

LOGREG = "logistic-regression"


class RobustnessConfig(_Strict):
    """What each trained cell is evaluated on besides the clean test split.

    Attributes:
        subsets: every non-empty subset of modalities at test time (the others missing).
        noise: noise severities (``modalmoe.data.corrupt`` levels, 1..5) per modality and all.
        imbalance: train also with one modality kept for only this fraction of the training
            samples (one extra cell per modality and fraction; design name ``<design>@<m>=<f>``).
    """

    subsets: bool = True
    noise: list[int] = Field(default_factory=list)
    imbalance: list[float] = Field(default_factory=list)


class CompressConfig(_Strict):
    """One efficiency method applied to every trained cell it fits (``modalmoe.efficiency``);
    each gives an extra leaderboard row ``<design>+<label>`` with its own accuracy, FLOPs and
    latency, so the Pareto plots show the methods beside the designs.

    Attributes:
        method: ``int8``; ``prune-experts`` / ``merge-experts`` (MoE designs whose router
            supports it); ``tokens`` (early and late fusion); ``distill`` (MoE designs: the
            trained cell is the teacher of a dense ``student`` trained with 0.5 cross-entropy
            + 0.5 KD at ``temperature``).
        experts: experts left per layer (prune, merge).
        by: merge similarity, ``weights`` or ``outputs``.
        reduction, keep, layers, placement: token reduction (``TokenReductionConfig``).
        student: the student's design (distill), built at its preset's size plus
            ``student_overrides`` (not compute-matched: it is meant to be cheaper).
    """

    method: Literal["int8", "prune-experts", "merge-experts", "tokens", "distill"]
    experts: int | None = Field(None, ge=1)
    by: Literal["weights", "outputs"] = "weights"
    reduction: Literal["merge", "attention", "router"] = "merge"
    keep: float | dict[str, float] = 0.5
    layers: list[int] = Field(default_factory=lambda: [0])
    placement: Literal["after_block", "before_ffn"] = "after_block"
    student: str = "dense-early"
    student_overrides: list[str] = Field(default_factory=list)
    temperature: float = Field(2.0, gt=0.0)

    @model_validator(mode="after")
    def _complete(self) -> CompressConfig:
        keeps = self.keep.values() if isinstance(self.keep, dict) else [self.keep]
        if not all(0.0 < k <= 1.0 for k in keeps):
            raise ValueError(f"keep fractions must be in (0, 1], got {self.keep}")
        if self.method in ("prune-experts", "merge-experts") and self.experts is None:
            raise ValueError(f"compress method {self.method!r} needs experts: N (experts left per layer)")
        return self

    @property
    def label(self) -> str:
        if self.method == "int8":
            return "int8"
        if self.method == "prune-experts":
            return f"prune{self.experts}"
        if self.method == "merge-experts":
            return f"merge{self.experts}-{self.by}"
        if self.method == "tokens":
            if isinstance(self.keep, dict):
                keep = ",".join(f"{m}={k:g}" for m, k in self.keep.items())
            else:
                keep = f"{self.keep:g}"
            where = ",".join(map(str, self.layers)) + ("<ffn" if self.placement == "before_ffn" else "")
            return f"{self.reduction}-tokens[{keep}]@{where}"
        return f"distill-{self.student}" + ("*" if self.student_overrides else "")


class SuiteConfig(_Strict):
    """A benchmark suite.

    Attributes:
        name: the suite's name.
        description: one line.
        tasks: preset task files (``configs/tasks/<task>.yaml``).
        designs: preset designs, and ``logistic-regression``.
        seeds: seeds of every cell.
        reference: the design whose cost sets each task's budget.
        match: ``flops`` (forward FLOPs per sample), ``params`` (total parameters) or ``none``.
        tolerance: allowed relative deviation from the budget.
        overrides: ``key=value`` for every cell (``train.epochs=8``).
        task_overrides: task -> more overrides.
        limit: task -> maximum samples per split (a seeded random subset; for quick suites).
        robustness: the robustness axes.
        compress: efficiency methods applied to each trained cell (``CompressConfig``).
    """

    name: str
    description: str = ""
    tasks: list[str]
    designs: list[str]
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    reference: str = "dense-early"
    match: Literal["flops", "params", "none"] = "flops"
    tolerance: float = Field(0.05, gt=0.0, lt=1.0)
    overrides: list[str] = Field(default_factory=list)
    task_overrides: dict[str, list[str]] = Field(default_factory=dict)
    limit: dict[str, int] = Field(default_factory=dict)
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)
    compress: list[CompressConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _known_parts(self) -> SuiteConfig:
        known_tasks, known_designs = task_files(), [*design_names(), LOGREG]
        for what, names, known in (("task", self.tasks, known_tasks), ("design", self.designs, known_designs)):
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(f"unknown {what}s {unknown}; known: {', '.join(known)}")
        if self.match != "none" and self.reference not in design_names():
            raise ValueError(f"reference design {self.reference!r} is not a design ({', '.join(design_names())})")
        stray = sorted((set(self.task_overrides) | set(self.limit)) - set(self.tasks))
        if stray:
            raise ValueError(f"task_overrides/limit name tasks {stray} that the suite does not run")
        return self


def suite_names() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "suites").glob("*.yaml"))


def load_suite(name_or_path: str, overrides=()) -> SuiteConfig:
    """A suite by name (``configs/suites/<name>.yaml``) or path."""
    from modalmoe.config import apply_overrides

    path = Path(name_or_path)
    if not path.is_file():
        path = config_dir() / "suites" / f"{name_or_path}.yaml"
        if not path.is_file():
            import difflib

            close = difflib.get_close_matches(name_or_path, suite_names(), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"unknown suite {name_or_path!r}.{hint} Known suites: {', '.join(suite_names())}")
    return validate(apply_overrides(read_yaml(path), overrides), SuiteConfig, source=f"in {str(path)!r}")
