"""The suite's design cells: every (task, design, seed) of ``tasks`` x ``designs`` x ``seeds``.

Each cell resolves the preset with the suite's overrides; solves its width so its cost
matches the task's budget (``bench/compute.py``); trains it (``modalmoe.train.Trainer``, run
directory kept under ``runs/<task>/<design>/s<seed>``); evaluates the best checkpoint on the
test split with the suite's robustness axes; measures FLOPs, parameters, latency at batch 1
and 64 and peak inference memory; and adds the suite's efficiency variants
(``bench/variants.py``). With ``robustness.imbalance``, each design is also trained with one
modality kept for a fraction of the training samples (``token-choice@audio=0.2``).
``logistic-regression`` fits scikit-learn on concatenated features, once (it is deterministic).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from modalmoe.bench.cells import planners
from modalmoe.bench.compute import match_compute, reference_budget
from modalmoe.bench.routing_table import routing_fields
from modalmoe.bench.suites import LOGREG, SuiteConfig, task_label
from modalmoe.bench.training import (
    cell_config,
    cost_batch,
    evaluate_with_axes,
    fit_sample,
    suite_task,
    train_run,
    trained_fields,
)
from modalmoe.bench.variants import run_variants
from modalmoe.data.batch import Task
from modalmoe.data.corrupt import imbalance
from modalmoe.data.describe import linear_baselines
from modalmoe.train.trainer import head_outputs


@dataclass(frozen=True)
class DesignCell:
    """One design on one task and seed. ``imbalance``: (modality, fraction) kept for training, or
    None. ``fold``: (folds, fold, fold seed) of a K-fold suite (``SuiteConfig.folds``), or None."""

    task: str
    design: str
    seed: int
    imbalance: tuple[str, float] | None = None
    fold: tuple[int, int, int] | None = None

    @property
    def fold_options(self) -> dict | None:
        """The task options of the cell's fold (``modalmoe.data.folds``), or None."""
        if self.fold is None:
            return None
        return {"folds": self.fold[0], "fold": self.fold[1], "fold_seed": self.fold[2]}

    @property
    def label(self) -> str:
        """The design as the leaderboard shows it (``token-choice@audio=0.2`` for imbalance)."""
        if self.imbalance is None:
            return self.design
        return f"{self.design}@{self.imbalance[0]}={self.imbalance[1]:g}"

    @property
    def key(self) -> tuple[str, str, int]:
        return task_label(self.task), self.label, self.seed

    @property
    def needs(self) -> None:
        return None

    def run(self, suite: SuiteConfig, out: Path, budget: float | None) -> dict:
        """Train and measure the cell (compute-matched to ``budget`` unless None)."""
        task = suite_task(suite, self.task, self.fold_options)
        fold = {} if self.fold is None else {"fold": self.fold_options}
        if self.design == LOGREG:
            return {**_logistic_regression(task, self.seed), **fold}
        cfg, matched = matched_config(suite, task, self.task, self.design, self.seed, budget, self.fold_options)
        if self.imbalance is not None:
            modality, fraction = self.imbalance
            train = imbalance(task.train, modality, fraction, seed=self.seed)
            task = Task(
                name=task.name,
                splits={**task.splits, "train": train},
                description=task.description,
                provenance=task.provenance,
            )
        name = f"s{self.seed}" if self.fold is None else f"s{self.fold[2]}-fold{self.fold[1]}"
        run_dir = out / "runs" / task_label(self.task) / self.label / name
        result, model, train_seconds = train_run(cfg, run_dir, task)

        def evaluate_model(model):
            return evaluate_with_axes(model, task, suite, self.seed)

        report, eval_seconds = evaluate_model(model)
        variants, skipped = [], {}
        if suite.compress and self.imbalance is None:
            variants, skipped = run_variants(self, suite, cfg, task, run_dir, out, evaluate_model)
        return {
            "variants": variants,  # the runner stores each as its own record
            "skipped_variants": skipped,
            **trained_fields(cfg, run_dir, out, result, report, model, task),
            "routing": routing_fields(model, task.test),
            "matched": matched,
            "train_seconds": round(train_seconds, 3),
            "eval_seconds": round(eval_seconds, 3),
            **fold,
        }


def matched_config(suite: SuiteConfig, task, task_file: str, design: str, seed: int, budget, fold=None):
    """A design cell's config solved to its budget: (config, the ``matched`` record field or None).

    The suite's rule (``match`` against the task's ``budget``; None: not matched) unless
    ``suite.match_designs`` gives the design its own: ``match: params, like: token-choice``
    first solves ``token-choice`` to the task's budget, then this design to that model's
    parameters."""
    cfg = cell_config(suite, task_file, design, seed, fold)
    rule = suite.match_designs.get(design)
    mode, like = (suite.match, None) if rule is None else (rule.match, rule.like)
    if budget is None or mode == "none":
        return cfg, None
    kw = dict(
        task_type=task.train.task_type,
        outputs=head_outputs(task.train),
        tolerance=suite.tolerance,
        fit_data=fit_sample(task.train),
    )
    batch = cost_batch(task, 16)
    if like is not None:
        other = cell_config(suite, task_file, like, seed, fold)
        if suite.match != "none":
            other = match_compute(other, task.specs, batch, budget=budget, mode=suite.match, **kw).config
        budget = reference_budget(
            other, task.specs, batch, mode=mode, **{k: kw[k] for k in ("task_type", "outputs", "fit_data")}
        )
    elif mode != suite.match:
        reference = cell_config(suite, task_file, suite.reference, seed, fold)
        budget = reference_budget(
            reference, task.specs, batch, mode=mode, **{k: kw[k] for k in ("task_type", "outputs", "fit_data")}
        )
    found = match_compute(cfg, task.specs, batch, budget=budget, mode=mode, **kw)
    return found.config, {
        "field": found.width_field,
        "width": found.width,
        "mode": mode,
        "like": like,
        "target": found.target,
        "achieved": found.achieved,
        "relative_error": found.relative_error,
    }


@planners.register("designs")
def plan_designs(suite: SuiteConfig) -> list[DesignCell]:
    """Every design cell of the suite, tasks outermost so early results cover a whole task."""
    cells = []
    for task in suite.tasks:
        modalities = list(suite_task(suite, task).specs) if suite.robustness.imbalance else []
        for design in suite.designs:
            for seed in suite.seeds:
                if design == LOGREG and seed != suite.seeds[0]:
                    continue  # deterministic (lbfgs on fixed features): one seed says it all
                for run_seed, fold in _replicates(suite, seed):
                    cells.append(DesignCell(task, design, run_seed, fold=fold))
                    if design == LOGREG:
                        continue
                    for m in modalities:
                        for fraction in suite.robustness.imbalance:
                            cells.append(DesignCell(task, design, run_seed, (m, fraction), fold))
    return cells


def _replicates(suite: SuiteConfig, seed: int) -> list[tuple[int, tuple[int, int, int] | None]]:
    """(training seed, fold) of each run of one suite seed: the seed itself, or with ``folds: K``
    fold ``f`` of the folds dealt by ``seed``, trained with seed ``seed * K + f``."""
    if not suite.folds:
        return [(seed, None)]
    return [(seed * suite.folds + f, (suite.folds, f, seed)) for f in range(suite.folds)]


def _logistic_regression(task, seed: int) -> dict:
    """scikit-learn's logistic regression on concatenated per-modality features."""
    t0 = time.perf_counter()
    scores = linear_baselines(task, seed=seed)
    seconds = time.perf_counter() - t0
    metric = "accuracy" if task.train.task_type == "classification" else "r2"
    return {
        "metrics": {metric: scores["all"]["test"]},
        "valid": {metric: scores["all"]["valid"]},
        "unimodal": {m: s["test"] for m, s in scores.items() if m != "all"},
        "train_seconds": round(seconds, 3),
        "eval_seconds": 0.0,
    }
