"""Lifelong protocols in the bench (issue 10): learn on some modalities, add others, measure
what is forgotten, in the same results store and leaderboard as the other cells.

A suite's ``lifelong`` protocol (``suites.LifelongProtocol``) gives two kinds of cells:

- stage 1, ``token-choice:audio``: ``<task>/<design>`` trained on ``first`` only, once per
  seed; its record is an ordinary leaderboard row (the metric with the old modalities);
- stage 2, ``token-choice:audio>+image:grow``: the stage-1 run of the same seed grown by
  ``add`` with one method (``lifelong.continue_run``: new reserved experts, what stays frozen,
  EWC), trained, evaluated on the test split with every modality subset and profiled like
  every cell. Its ``lifelong`` block keeps the primary metric on the old modalities before
  (the stage-1 model) and after (the grown model with only the old modalities), forgetting,
  the metric with all modalities and with only the new ones after, and the gain (all after
  minus old before). Forgetting and gain are taken in the metric's better direction (for
  ``mse``, forgetting is after minus before).

A stage-2 cell ``needs`` its stage-1 cell: the runner starts it once that one has finished
(``runner.run_bench``), so each stage-1 run is trained once and shared by its seed's methods.
The planner and the leaderboard section are registered under the suite field ``lifelong``.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from modalmoe.bench.cells import LifelongError, planners
from modalmoe.bench.suites import LifelongProtocol, SuiteConfig
from modalmoe.bench.tables import MethodsSection, mean_std, scale, sections
from modalmoe.bench.training import evaluate_with_axes, train_run, trained_fields
from modalmoe.data.tasks import load_task
from modalmoe.evaluate.runner import evaluate
from modalmoe.lifelong.grow import continue_run
from modalmoe.model.presets import get_preset
from modalmoe.train import load_run_model
from modalmoe.train.trainer import experiment_task


@dataclass(frozen=True)
class LifelongCell:
    """One lifelong cell: stage 1 (``method`` None) or stage 2 with ``method``.

    Attributes:
        task: the task file.
        design: the protocol's base design (the record's ``base_design``).
        seed: the seed of both stages.
        protocol: index into ``suite.lifelong``.
        method: the stage-2 method (None: stage 1).
        label: the record's design label.
        stage1: the design label of the stage-1 cell a stage-2 cell grows ("" for stage 1).
    """

    task: str
    design: str
    seed: int
    protocol: int
    method: str | None
    label: str
    stage1: str

    @property
    def key(self) -> tuple[str, str, int]:
        return self.task, self.label, self.seed

    @property
    def needs(self) -> tuple[str, str, int] | None:
        """The key of the cell that must finish first (stage 1 of the same seed)."""
        return None if self.method is None else (self.task, self.stage1, self.seed)

    def run(self, suite: SuiteConfig, out: Path, budget: float | None) -> dict:
        """Train and measure the cell (lifelong cells use the presets' sizes: no budget)."""
        return run_lifelong_cell(self, suite, out)


@planners.register("lifelong")
def plan_lifelong(suite: SuiteConfig) -> list[LifelongCell]:
    """The lifelong cells of ``suite``: per protocol, stage 1 of every seed (once, even when
    protocols share it), then every (method, seed). Checks each protocol's modalities."""
    cells, planned = [], set()
    for index, protocol in enumerate(suite.lifelong):
        check_modalities(suite, protocol)
        for seed in suite.seeds:
            cell = LifelongCell(protocol.task, protocol.design, seed, index, None, protocol.stage1_label, "")
            if cell.key not in planned:
                planned.add(cell.key)
                cells.append(cell)
        for method in protocol.methods:
            for seed in suite.seeds:
                label, stage1 = protocol.method_label(method), protocol.stage1_label
                cells.append(LifelongCell(protocol.task, protocol.design, seed, index, method, label, stage1))
    return cells


def check_modalities(suite: SuiteConfig, protocol: LifelongProtocol) -> None:
    """Raise ``LifelongError`` unless ``first`` and ``add`` are modalities of the task."""
    config = _preset(suite, protocol, 0, modalities=False)
    known = list(load_task(config.task, **config.task_options).specs)
    unknown = [m for m in [*protocol.first, *protocol.add] if m not in known]
    if unknown:
        raise LifelongError(
            f"lifelong protocol {protocol.task} {protocol.label}: task {config.task!r} has no modalities {unknown}; "
            f"its modalities are {known}"
        )


def _preset(suite: SuiteConfig, protocol: LifelongProtocol, seed: int, *, modalities: bool = True):
    overrides = [*suite.overrides, *suite.task_overrides.get(protocol.task, []), *protocol.overrides]
    overrides.append(f"train.seed={seed}")
    if modalities:
        overrides.append(f"modalities={json.dumps(protocol.first)}")
    return get_preset(f"{protocol.task}/{protocol.design}", overrides=overrides)


def run_directory(out: Path, protocol: LifelongProtocol, seed: int, method: str | None = None) -> Path:
    """``runs/<task>/lifelong/<design>/<first>/s<seed>`` for stage 1,
    ``runs/<task>/lifelong/<design>/<first>/+<add>/<method>/s<seed>`` for stage 2."""
    base = out / "runs" / protocol.task / "lifelong" / protocol.design / "+".join(protocol.first)
    if method is not None:
        base = base / f"+{'+'.join(protocol.add)}" / method
    return base / f"s{seed}"


def run_lifelong_cell(cell: LifelongCell, suite: SuiteConfig, out: Path) -> dict:
    """Train and measure one lifelong cell; returns the record's fields (raises on failure,
    which ``runner.run_cell`` records)."""
    protocol = suite.lifelong[cell.protocol]
    run_dir = run_directory(out, protocol, cell.seed, cell.method)
    if cell.method is None:
        config = _preset(suite, protocol, cell.seed)
    else:
        config = _grown(suite, protocol, cell, run_directory(out, protocol, cell.seed))
    task = experiment_task(config)
    quiet = Console(quiet=True)  # the grown runs' init and freeze notes would flood the bench's progress bar
    result, model, train_seconds = train_run(config, run_dir, task, console=quiet)
    # Stage 2 reads forgetting from the modality subsets.
    report, eval_seconds = evaluate_with_axes(
        model, task, suite, cell.seed, subsets=suite.robustness.subsets or cell.method is not None
    )
    block = {"stage": 1, "protocol": protocol.label, "modalities": list(protocol.first)}
    if cell.method is not None:
        t0 = time.perf_counter()
        before = evaluate(load_run_model(run_directory(out, protocol, cell.seed)), task.test.select(protocol.first))
        eval_seconds += time.perf_counter() - t0
        block = _lifelong_block(protocol, cell.method, report, before)
    return {
        **trained_fields(config, run_dir, out, result, report, model, task),
        "matched": None,  # lifelong cells use the presets' sizes
        "lifelong": block,
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
    }


def _grown(suite: SuiteConfig, protocol: LifelongProtocol, cell: LifelongCell, source: Path):
    """The stage-2 experiment: the stage-1 run grown by ``protocol.add`` with the cell's method."""
    if not (source / "summary.json").exists():
        raise LifelongError(
            f"stage 1 of this cell ({cell.task} {cell.stage1}, seed {cell.seed}) has no finished run at "
            f"{str(source)!r}: its cell failed or was interrupted; see its record, then run the bench again "
            "with --resume"
        )
    method = protocol.methods[cell.method]
    return continue_run(
        source.resolve(),  # the grown run's train.init_from: absolute, so it does not depend on the cwd
        add_modalities=protocol.add,
        overrides=method.overrides,
        experts=method.experts,
        freeze=method.freeze,
        ewc=method.ewc,
        dropout=protocol.dropout,
        fisher_samples=method.fisher_samples,
    )


def _subset(report, modalities: list[str]) -> float | None:
    for row in report.subsets:
        if set(row.modalities) == set(modalities):
            return row.metrics.get(report.metric)
    return None


def _lifelong_block(protocol: LifelongProtocol, method: str, report, before) -> dict:
    """The stage-2 record's ``lifelong`` block from the grown model's report (with subsets)
    and the stage-1 model's report on the same test samples (old modalities)."""
    metric = report.metric
    if metric is None or before.metric != metric:
        raise LifelongError(f"lifelong cells need a prediction head with one primary metric, got {metric!r}")
    sign = -1.0 if report.mode == "min" else 1.0  # forgetting and gain in the metric's better direction
    old_before, old_after = before.metrics[metric], _subset(report, protocol.first)
    all_after = report.metrics[metric]
    spec = protocol.methods[method]
    return {
        "stage": 2,
        "protocol": protocol.label,
        "stage1": protocol.stage1_label,
        "method": method,
        "first": list(protocol.first),
        "add": list(protocol.add),
        "options": {"experts": spec.experts, "freeze": spec.freeze, "ewc": spec.ewc, "dropout": protocol.dropout},
        "metric": metric,
        "old_before": old_before,
        "old_after": old_after,
        "forgetting": sign * (old_before - old_after),
        "all_after": all_after,
        "new_after": _subset(report, protocol.add),
        "gain": sign * (all_after - old_before),
    }


# --- the leaderboard's Lifelong tables ------------------------------------------------------

COLUMNS = ("forgetting", "old_before", "old_after", "all_after", "new_after", "gain")


def lifelong_tables(records: list[dict], suite: SuiteConfig | None = None) -> dict[tuple[str, str], list[dict]]:
    """(task, protocol) -> one row per method: its options, seeds and, per column of
    ``COLUMNS``, the values over seeds (in points for accuracy-like metrics). Methods in the
    suite's order, else as they first appear."""
    by_protocol: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        block = r.get("lifelong") or {}
        if r.get("status") == "ok" and block.get("stage") == 2:
            by_protocol[(r["task"], block["protocol"])][block["method"]].append(r)
    order = {}
    for p in suite.lifelong if suite is not None else []:
        order.setdefault((p.task, p.label), list(p.methods))
    tables = {}
    for key, methods in by_protocol.items():
        names = sorted(methods, key=lambda m: (order.get(key, []) + [m]).index(m))
        rows = []
        for method in names:
            recs = sorted(methods[method], key=lambda r: r["seed"])
            block = recs[0]["lifelong"]
            points = scale(block["metric"])
            row = {"method": method, "metric": block["metric"], "scale": points, "options": block["options"]}
            row["seeds"] = [r["seed"] for r in recs]
            for column in COLUMNS:
                row[column] = [points * r["lifelong"][column] for r in recs if r["lifelong"].get(column) is not None]
            rows.append(row)
        tables[key] = rows
    return tables


HEADER = [
    "method",
    "new experts",
    "freeze",
    "EWC λ",
    "seeds",
    "forgetting",
    "old before",
    "old after",
    "all after",
    "new only",
    "gain",
]


def _cells(row: dict) -> list[str]:
    o = row["options"]
    return [
        row["method"],
        str(o["experts"]),
        o["freeze"],
        f"{o['ewc']:g}",
        str(len(row["seeds"])),
        *(mean_std(row[c]) for c in COLUMNS),
    ]


def _title(task: str, protocol: str, rows: list[dict]) -> str:
    design, _, modalities = protocol.partition(":")
    first, _, add = modalities.partition(">")
    metric = rows[0]["metric"] + (" %" if rows[0]["scale"] == 100.0 else "")
    return f"{task}: {design}, {first.replace('+', ' + ')} → {add.replace('+', '+ ', 1)} ({metric})"


@sections.register("lifelong")
def lifelong_section(records: list[dict], suite: SuiteConfig | None = None) -> MethodsSection:
    """The leaderboard's "Lifelong" section (empty without lifelong records)."""
    intro = (
        "Stage 1 trains on the first modalities; stage 2 grows that run (the same seed) by the added ones "
        "with each method. Test split, mean ± std over seeds. old before / old after: the metric with only "
        "the old modalities, from the stage-1 model and from the grown one; forgetting: old before − old after "
        "(after − before for a lower-is-better metric); all after: with every modality; new only: with only the "
        "added ones; gain: all after − old before."
    )
    return MethodsSection("Lifelong", "lifelong", intro, lifelong_tables(records, suite), HEADER, _cells, _title)
