"""Upcycling protocols in the bench (issue 20): sparse upcycling against continuing the dense
run for the same extra epochs, seed for seed, in the same results store and leaderboard.

A suite's ``upcycle`` protocol (``suites.UpcycleProtocol``) gives three cells per seed:

- the parent, ``dense-early:10ep``: ``<task>/<dense>`` trained ``epochs`` epochs;
- ``dense-early:10ep>continued+10``: the parent trained ``extra_epochs`` more (``train.init_from``);
- ``dense-early:10ep>upcycled+10``: the parent upcycled into an MoE model
  (``modalmoe.model.upcycle.upcycled_experiment``: an MoE FFN in every block whose experts
  are the parent's FFN shards, active FLOPs equal to the dense model's) and trained
  ``extra_epochs``.

Both arms ``need`` the parent cell of their seed; their records name it (``upcycle.parent``,
its run directory). Every cell is evaluated with the suite's robustness axes and profiled like
every cell, so each arm is also a leaderboard row. The "Upcycling" section gives each arm's
test metric over seeds and the paired difference upcycled − continued with its 95% Student-t
interval and paired t-test p-value, Holm-adjusted across the suite's protocols.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from modalmoe.bench.cells import LifelongError, planners
from modalmoe.bench.stats import holm, paired_test, summarize
from modalmoe.bench.suites import SuiteConfig, UpcycleProtocol
from modalmoe.bench.tables import MethodsSection, mean_std, scale, sections
from modalmoe.bench.training import evaluate_with_axes, limit_task, train_run, trained_fields
from modalmoe.model.presets import get_preset
from modalmoe.model.upcycle import upcycled_experiment
from modalmoe.train.trainer import experiment_task

ARMS = ("parent", "continued", "upcycled")


@dataclass(frozen=True)
class UpcycleCell:
    """One cell of an upcycling protocol: the parent, or one arm after it.

    Attributes:
        task: the task file.
        design: the protocol's dense design (the record's ``base_design``).
        seed: the seed of every stage.
        protocol: index into ``suite.upcycle``.
        arm: ``parent``, ``continued`` or ``upcycled``.
        label: the record's design label.
        parent: the parent cell's design label.
    """

    task: str
    design: str
    seed: int
    protocol: int
    arm: str
    label: str
    parent: str

    @property
    def key(self) -> tuple[str, str, int]:
        return self.task, self.label, self.seed

    @property
    def needs(self) -> tuple[str, str, int] | None:
        return None if self.arm == "parent" else (self.task, self.parent, self.seed)

    def run(self, suite: SuiteConfig, out: Path, budget: float | None) -> dict:
        """Train and measure the cell (the presets' sizes: no budget)."""
        return run_upcycle_cell(self, suite, out)


@planners.register("upcycle")
def plan_upcycle(suite: SuiteConfig) -> list[UpcycleCell]:
    """Per protocol: every seed's parent, then both arms of every seed."""
    cells = []
    for index, p in enumerate(suite.upcycle):
        parent = p.arm_label("parent")
        cells += [UpcycleCell(p.task, p.dense, seed, index, "parent", parent, parent) for seed in suite.seeds]
        for arm in ARMS[1:]:
            cells += [UpcycleCell(p.task, p.dense, seed, index, arm, p.arm_label(arm), parent) for seed in suite.seeds]
    return cells


def run_directory(out: Path, protocol: UpcycleProtocol, seed: int, arm: str) -> Path:
    """``runs/<task>/upcycle/<dense>-<epochs>ep/<arm>/s<seed>``."""
    return out / "runs" / protocol.task / "upcycle" / f"{protocol.dense}-{protocol.epochs}ep" / arm / f"s{seed}"


def _overrides(suite: SuiteConfig, protocol: UpcycleProtocol, seed: int, epochs: int) -> list[str]:
    return [
        *suite.overrides,
        *suite.task_overrides.get(protocol.task, []),
        *protocol.overrides,
        f"train.seed={seed}",
        f"train.epochs={epochs}",
    ]


def cell_experiment(cell: UpcycleCell, suite: SuiteConfig, out: Path):
    """The experiment of a cell: the parent's preset, or an arm starting from the parent's run."""
    protocol = suite.upcycle[cell.protocol]
    if cell.arm == "parent":
        overrides = _overrides(suite, protocol, cell.seed, protocol.epochs)
        return get_preset(f"{protocol.task}/{protocol.dense}", overrides=overrides)
    parent = run_directory(out, protocol, cell.seed, "parent").resolve()
    if not (parent / "summary.json").is_file():
        raise LifelongError(
            f"the parent of this cell ({cell.task} {cell.parent}, seed {cell.seed}) has no finished run at "
            f"{str(parent)!r}: its cell failed or was interrupted; see its record, then run the bench again "
            "with --resume"
        )
    extra = _overrides(suite, protocol, cell.seed, protocol.extra_epochs)
    if cell.arm == "continued":
        return get_preset(f"{protocol.task}/{protocol.dense}", overrides=[*extra, f"train.init_from={parent}"])
    return upcycled_experiment(parent, overrides=[*extra, *protocol.moe_overrides])


def run_upcycle_cell(cell: UpcycleCell, suite: SuiteConfig, out: Path) -> dict:
    """Train and measure one cell; returns the record's fields (a failure raises, and
    ``runner.run_cell`` records it)."""
    protocol = suite.upcycle[cell.protocol]
    config = cell_experiment(cell, suite, out)
    run_dir = run_directory(out, protocol, cell.seed, cell.arm)
    task = limit_task(experiment_task(config), suite.limit.get(protocol.task))
    result, model, train_seconds = train_run(config, run_dir, task, console=Console(quiet=True))
    report, eval_seconds = evaluate_with_axes(model, task, suite, cell.seed)
    parent = run_directory(out, protocol, cell.seed, "parent")
    block = {
        "protocol": protocol.label,
        "arm": cell.arm,
        "parent": None if cell.arm == "parent" else str(parent.relative_to(out)),
        "epochs": protocol.epochs,
        "extra_epochs": protocol.extra_epochs,
        "metric": report.metric,
    }
    return {
        **trained_fields(config, run_dir, out, result, report, model, task),
        "matched": None,
        "upcycle": block,
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
    }


# --- the leaderboard's Upcycling tables -----------------------------------------------------


def upcycle_tables(records: list[dict], suite: SuiteConfig | None = None) -> dict[tuple[str, str], list[dict]]:
    """(task, protocol) -> rows: each arm's values over seeds (points for accuracy-like metrics),
    then the paired difference upcycled − continued (mean, 95% interval, p, Holm-adjusted p)."""
    by_protocol: dict[tuple[str, str], dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    metrics = {}
    for r in records:
        block = r.get("upcycle") or {}
        if r.get("status") != "ok" or not block:
            continue
        metric = block["metric"]
        value = (r.get("metrics") or {}).get(metric)
        if value is not None:
            by_protocol[(r["task"], block["protocol"])][block["arm"]][r["seed"]] = value
            metrics[(r["task"], block["protocol"])] = metric
    tables, pvalues = {}, {}
    for key, arms in by_protocol.items():
        points = scale(metrics[key])
        rows = [
            {"arm": arm, "metric": metrics[key], "scale": points, "values": [points * v for v in arms[arm].values()]}
            for arm in ARMS
            if arm in arms
        ]
        seeds = sorted(set(arms.get("upcycled", {})) & set(arms.get("continued", {})))
        if seeds:
            diffs = [points * (arms["upcycled"][s] - arms["continued"][s]) for s in seeds]
            d = summarize(diffs)
            pvalues[key] = paired_test([arms["upcycled"][s] for s in seeds], [arms["continued"][s] for s in seeds])
            rows.append({"arm": "upcycled − continued", "metric": metrics[key], "scale": points, "values": diffs,
                         "difference": d, "p": pvalues[key]})  # fmt: skip
        tables[key] = rows
    adjusted = holm(pvalues)
    for key, rows in tables.items():
        for row in rows:
            if "difference" in row:
                row["p_holm"] = adjusted.get(key)
    return tables


HEADER = ["arm", "seeds", "test (mean ± std)", "paired difference [95% CI]", "p", "p (Holm)"]


def _p(value) -> str:
    return "" if value is None else f"{value:.3g}"


def _cells(row: dict) -> list[str]:
    if "difference" not in row:
        return [row["arm"], str(len(row["values"])), mean_std(row["values"]), "", "", ""]
    d = row["difference"]
    return [row["arm"], str(d.n), "", f"{d.mean:+.2f} [{d.ci_low:+.2f}, {d.ci_high:+.2f}]", _p(row["p"]),
            _p(row.get("p_holm"))]  # fmt: skip


def _title(task: str, protocol: str, rows: list[dict]) -> str:
    metric = rows[0]["metric"] + (" %" if rows[0]["scale"] == 100.0 else "")
    return f"{task}: upcycling {protocol} ({metric})"


@sections.register("upcycle")
def upcycle_section(records: list[dict], suite: SuiteConfig | None = None) -> MethodsSection:
    """The leaderboard's "Upcycling" section (empty without upcycling records)."""
    intro = (
        "The parent trains the dense design; then, seed for seed and for the same extra epochs, it either continues "
        "as it is (continued) or is upcycled into an MoE model whose experts start as its FFN shards and whose "
        "active FLOPs equal its own (upcycled). Test split, mean ± std over seeds; the paired difference "
        "upcycled − continued with its 95% Student-t interval and paired t-test p, Holm-adjusted across protocols."
    )
    return MethodsSection("Upcycling", "upcycle", intro, upcycle_tables(records, suite), HEADER, _cells, _title)
