"""The capacity curve: test score against total parameters at fixed active FLOPs.

Switch Transformer's headline figure (Fedus et al. 2021, Fig. 1) redone at small scale: one
design (``Sweep.design``, token choice top-1 by default) is trained at each number of experts
E (``Sweep.values``) with its expert width solved to the task's FLOP budget, so every point
spends the same forward FLOPs per sample and only the parameters grow (E=1 with k=1 is the
dense model: a one-expert MoE computes a dense FFN). Beside each point, the dense design
(``Sweep.dense``) is matched to that point's total parameters: its FLOPs grow with them, the
upper reference of what the parameters could buy if compute grew too.

The leaderboard's "Capacity" section has one table and one PNG (``capacity-<task>.png``) per
(task, sweep): each point's score (accuracy, or for a task mixture the mean normalised
score against a perfect reference, ``modalmoe.evaluate.tasks``) with its 95% interval over
seeds, its parameters and FLOPs, and the slope of score against log2(E) with its interval
(least squares over every (seed, E) point).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from scipy import stats

from modalmoe.analysis.report import pyplot
from modalmoe.bench.cells import planners
from modalmoe.bench.compute import match_compute, reference_budget
from modalmoe.bench.suites import SuiteConfig, Sweep, task_label
from modalmoe.bench.tables import markdown_table, sections, terminal_table
from modalmoe.bench.training import (
    cell_config,
    cost_batch,
    evaluate_with_axes,
    fit_sample,
    suite_task,
    train_run,
    trained_fields,
)
from modalmoe.config import apply_overrides, validate
from modalmoe.evaluate.intervals import summarize
from modalmoe.io import atomic_path
from modalmoe.train.trainer import head_outputs


@dataclass(frozen=True)
class SweepCell:
    """One point of a capacity curve: sweep ``sweep`` (its index in the suite) at ``value``;
    ``dense``: the point's dense reference. ``name``: its design label (``Sweep.label``)."""

    task: str
    design: str
    seed: int
    sweep: int
    value: int
    dense: bool
    name: str

    @property
    def label(self) -> str:
        return self.name

    @property
    def key(self) -> tuple[str, str, int]:
        return task_label(self.task), self.label, self.seed

    @property
    def needs(self) -> None:
        return None

    def run(self, suite: SuiteConfig, out: Path, budget: float | None) -> dict:
        sweep = suite.sweeps[self.sweep]
        task = suite_task(suite, self.task)
        kw = dict(task_type=task.train.task_type, outputs=head_outputs(task.train), fit_data=fit_sample(task.train))
        batch = cost_batch(task, 16)
        point = point_config(suite, sweep, self.task, self.value, self.seed)
        if budget is not None:
            point = match_compute(
                point, task.specs, batch, budget=budget, mode="flops", tolerance=suite.tolerance, **kw
            )
            point = point.config
        matched = None
        cfg = point
        if self.dense:
            params = reference_budget(point, task.specs, batch, mode="params", **kw)
            dense = cell_config(suite, self.task, sweep.dense, self.seed)
            found = match_compute(
                dense, task.specs, batch, budget=params, mode="params", tolerance=suite.tolerance, **kw
            )
            cfg = found.config
            matched = {
                "field": found.width_field,
                "width": found.width,
                "mode": "params",
                "like": sweep.label(self.value),
                "target": found.target,
                "achieved": found.achieved,
                "relative_error": found.relative_error,
            }
        run_dir = out / "runs" / task_label(self.task) / self.label / f"s{self.seed}"
        result, model, train_seconds = train_run(cfg, run_dir, task)
        report, eval_seconds = evaluate_with_axes(model, task, suite, self.seed, subsets=False)
        return {
            **trained_fields(cfg, run_dir, out, result, report, model, task),
            "matched": matched,
            "sweep": {"index": self.sweep, "key": sweep.key, "value": self.value, "dense": self.dense},
            "train_seconds": round(train_seconds, 3),
            "eval_seconds": round(eval_seconds, 3),
        }


def sweep_cell(task: str, sweep: Sweep, index: int, seed: int, value: int, dense: bool = False) -> SweepCell:
    design, name = (sweep.dense, sweep.dense_label(value)) if dense else (sweep.design, sweep.label(value))
    return SweepCell(task, design, seed, index, value, dense, name)


def point_config(suite: SuiteConfig, sweep: Sweep, task: str, value: int, seed: int):
    """The swept design at ``value`` (before compute matching)."""
    cfg = cell_config(suite, task, sweep.design, seed)
    data = apply_overrides(cfg.model_dump(), [*sweep.overrides, f"{sweep.key}={value}"])
    return validate(data, type(cfg), source=f"for the sweep point {sweep.label(value)}")


@planners.register("sweeps")
def plan_sweeps(suite: SuiteConfig) -> list[SweepCell]:
    """Every point of every sweep on every task, per seed; each followed by its dense reference."""
    cells = []
    for task in suite.tasks:
        for index, sweep in enumerate(suite.sweeps):
            for value in sweep.values:
                for seed in suite.seeds:
                    cells.append(sweep_cell(task, sweep, index, seed, value))
                    if sweep.dense is not None:
                        cells.append(sweep_cell(task, sweep, index, seed, value, dense=True))
    return cells


# --- the leaderboard's "Capacity" section -------------------------------------------------------


def _score(record: dict) -> float | None:
    """A record's score: the mean normalised score of a mixture (against a perfect score, as
    its evaluation stored it), else its primary metric."""
    evaluation = record.get("evaluation") or {}
    if evaluation.get("tasks"):
        return evaluation.get("mean_normalised")
    metric = evaluation.get("metric") or "accuracy"
    return (record.get("metrics") or {}).get(metric)


def capacity_tables(records: list[dict], suite: SuiteConfig | None) -> dict[tuple[str, int], dict]:
    """(task, sweep index) -> {"sweep", "metric", "points": [...], "slope"}."""
    groups: dict[tuple[str, int], dict[tuple[int, bool], list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("status") == "ok" and r.get("sweep"):
            groups[(r["task"], r["sweep"]["index"])][(r["sweep"]["value"], r["sweep"]["dense"])].append(r)
    tables = {}
    for (task, index), points in groups.items():
        sweep = suite.sweeps[index] if suite is not None and index < len(suite.sweeps) else None
        mixture = any((r.get("evaluation") or {}).get("tasks") for recs in points.values() for r in recs)
        rows = []
        for (value, dense), recs in sorted(points.items()):
            scores = [s for s in (_score(r) for r in recs) if s is not None]
            if not scores:
                continue
            rows.append({
                "value": value, "dense": dense, "label": recs[0]["design"], "scores": scores,
                "summary": summarize(scores), "params": statistics.mean(r["params"] for r in recs),
                "flops": statistics.mean(r["flops"] for r in recs),
            })  # fmt: skip
        xs = [math.log2(row["value"]) for row in rows if not row["dense"] for _ in row["scores"]]
        ys = [s for row in rows if not row["dense"] for s in row["scores"]]
        slope = None
        if len(set(xs)) >= 2 and len(xs) >= 3:
            fit = stats.linregress(xs, ys)
            half = stats.t.ppf(0.975, len(xs) - 2) * fit.stderr
            slope = {"slope": fit.slope, "low": fit.slope - half, "high": fit.slope + half, "points": len(xs)}
        moe = [row for row in rows if not row["dense"]]
        peak = max(moe, key=lambda row: row["summary"].mean)["value"] if moe else None
        tables[(task, index)] = {
            "short": sweep.short if sweep else "E",
            "metric": "mean normalised score" if mixture else "accuracy",
            "rows": rows,
            "slope": slope,
            "peak": peak,
        }
    return tables


def _cells(row: dict) -> list[str]:
    s = row["summary"]
    score = f"{s.mean:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}]" if s.n > 1 else f"{s.mean:.3f}"
    kind = "dense, params matched" if row["dense"] else "MoE, FLOPs matched"
    return [row["label"], kind, str(row["value"]), score, f"{row['params']:,.0f}", f"{row['flops'] / 1e6:.3f}"]


def _header(short: str, metric: str) -> list[str]:
    return ["cell", "kind", short, f"{metric} [95% CI]", "params", "MFLOPs"]


def _slope_line(table: dict) -> str:
    slope = table["slope"]
    if slope is None:
        return "Slope: too few points."
    return (
        f"Slope of the MoE points against log2({table['short']}): {slope['slope']:+.4f} per doubling "
        f"[{slope['low']:+.4f}, {slope['high']:+.4f}] ({slope['points']} points); the highest mean is at "
        f"{table['short']}={table['peak']}."
    )


INTRO = (
    "Test score against total parameters: the MoE points keep the task's forward FLOPs per sample (the reference "
    "design's) while the experts grow; each dense reference point has the parameters of the MoE point beside it, "
    "and FLOPs that grow with them. Mean over seeds with a 95% Student-t interval; the slope is a least-squares "
    "fit over every (seed, point) of the MoE curve, with its 95% interval. A task mixture is scored by its mean "
    "normalised score against a perfect score."
)


@dataclass(frozen=True)
class CapacitySection:
    """The "Capacity" leaderboard section (``tables.sections``) and its plots."""

    tables: dict[tuple[str, int], dict]

    def markdown(self) -> str:
        if not self.tables:
            return ""
        lines = ["", "## Capacity", "", INTRO, ""]
        for (task, index), table in self.tables.items():
            lines += [
                f"### {task}: sweep {index} ({table['metric']})",
                "",
                f"![capacity](capacity-{task}-{index}.png)",
                "",
            ]
            rows = [_cells(row) for row in table["rows"]]
            lines += markdown_table(_header(table["short"], table["metric"]), rows, left=(0, 1))
            lines += ["", _slope_line(table), ""]
        return "\n".join(lines)

    def print(self, console: Console) -> None:
        for (task, index), table in self.tables.items():
            rows = [_cells(row) for row in table["rows"]]
            console.print(terminal_table(f"capacity {task} sweep {index}", _header(table["short"], table["metric"]),
                                         rows, left=(0, 1)))  # fmt: skip
            console.print(_slope_line(table), highlight=False)

    def figures(self, out: Path) -> list[Path]:
        """``capacity-<task>-<sweep>.png``: score against total parameters, MoE and dense."""
        plt = pyplot() if self.tables else None
        paths = []
        for (task, index), table in self.tables.items():
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            for dense, color, name in (
                (False, "tab:blue", "MoE (fixed FLOPs)"),
                (True, "tab:gray", "dense (params matched)"),
            ):
                rows = [row for row in table["rows"] if row["dense"] == dense]
                if not rows:
                    continue
                xs = [row["params"] for row in rows]
                ys = [row["summary"].mean for row in rows]
                err = [[row["summary"].mean - row["summary"].ci_low for row in rows],
                       [row["summary"].ci_high - row["summary"].mean for row in rows]]  # fmt: skip
                ax.errorbar(xs, ys, yerr=err, color=color, marker="o", capsize=3, label=name)
                if not dense:
                    for x, y, row in zip(xs, ys, rows, strict=True):
                        ax.annotate(f"{table['short']}={row['value']}", (x, y), fontsize=7, xytext=(3, 3),
                                    textcoords="offset points")  # fmt: skip
            ax.set_xscale("log")
            ax.set_xlabel("total parameters")
            ax.set_ylabel(table["metric"])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            ax.set_title(f"{task}: capacity at fixed active FLOPs")
            fig.tight_layout()
            path = out / f"capacity-{task}-{index}.png"
            with atomic_path(path, suffix=".png") as tmp:
                fig.savefig(tmp, dpi=110, format="png")
            plt.close(fig)
            paths.append(path)
        return paths


@sections.register("sweeps")
def capacity_section(records: list[dict], suite: SuiteConfig | None = None) -> CapacitySection:
    """The leaderboard's "Capacity" section (empty without sweep records)."""
    return CapacitySection(capacity_tables(records, suite))
