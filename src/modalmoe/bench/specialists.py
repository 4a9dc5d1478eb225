"""Specialists and the generalist table: one model per member task against one model for all.

A suite whose tasks include a task mixture (``modalmoe.data.tasks.mixture``; the
``generalist`` suite) trains its designs as generalists (the usual design cells, one model
over every member) and, for each design in ``suite.specialists``, a **specialist** cell: per
seed, one model per member task (``member_task``: the member's own samples, modalities and
classes), each with the width the design is compute-matched to on the mixture, so a
specialist spends on each of its samples the FLOPs that design's generalist spends on them.
A specialist trains the suite's epochs over its member's samples (``epochs``: each sample
seen as often as the generalist sees it, in fewer optimiser steps) or as many optimiser steps
as the generalist (``steps``; ``SuiteConfig.specialist_budgets``).
Its record has the same per-task scores as a generalist's (``evaluation.tasks``); its cost is
the members' FLOPs per sample averaged as the generalist's cost batch averages them (each
member equally), and its parameters are all the specialists' together.

The leaderboard's "Generalist" section, one table per mixture: each design's accuracy on each
member, its mean normalised score (``modalmoe.evaluate.tasks``: 0 is the member's majority
class, 1 the best specialist design's mean accuracy over seeds, or a perfect score when the
suite trains no specialist) with its 95% interval over seeds, and its paired difference from
the best dense generalist at equal FLOPs (Holm-adjusted across designs).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from modalmoe.bench.cells import planners
from modalmoe.bench.designs import matched_config
from modalmoe.bench.stats import holm, paired_test, significance, summarize
from modalmoe.bench.suites import SuiteConfig, task_label
from modalmoe.bench.tables import markdown_table, sections, terminal_table
from modalmoe.bench.training import cell_config, cost_fields, suite_task, train_run
from modalmoe.config import ConfigError, ExperimentConfig, validate
from modalmoe.data.tasks.mixture import layout, member_task
from modalmoe.evaluate.runner import evaluate
from modalmoe.evaluate.tasks import PERFECT, TaskScore, majority_rates, mean_normalised, normalised

PREFIX = "specialists/"


def specialist_label(design: str, budget: str = "epochs") -> str:
    """The design label of a specialist cell: ``specialists/dense-early`` (the suite's epochs),
    ``specialists/dense-early@steps`` (the generalist's optimisation steps)."""
    return f"{PREFIX}{design}" + ("" if budget == "epochs" else f"@{budget}")


@dataclass(frozen=True)
class SpecialistCell:
    """One model per member task of the mixture ``task``, of ``design``, seed ``seed``;
    ``budget``: ``epochs`` or ``steps`` (``SuiteConfig.specialist_budgets``)."""

    task: str
    design: str
    seed: int
    budget: str = "epochs"

    @property
    def label(self) -> str:
        return specialist_label(self.design, self.budget)

    @property
    def key(self) -> tuple[str, str, int]:
        return task_label(self.task), self.label, self.seed

    @property
    def needs(self) -> None:
        return None

    def run(self, suite: SuiteConfig, out: Path, budget: float | None) -> dict:
        task = suite_task(suite, self.task)
        parts = layout(task.train)
        if parts is None:
            raise ConfigError(f"specialists need a task mixture; task {self.task!r} is not one (task: mixture)")
        cfg, matched = matched_config(suite, task, self.task, self.design, self.seed, budget)
        scores, costs, valid, train_seconds, eval_seconds = [], [], [], 0.0, 0.0
        batch = cfg.train.batch_size
        # Each member's majority class, as the generalist's report computes it.
        majority = majority_rates(parts, task.train, task.test)
        cell_dir = out / "runs" / task_label(self.task) / self.label / f"s{self.seed}"
        for name in parts.names:
            member = member_task(task, name)
            epochs = cfg.train.epochs
            if self.budget == "steps":  # as many optimiser steps as the generalist takes
                epochs = max(
                    1, round(epochs * math.ceil(len(task.train) / batch) / math.ceil(len(member.train) / batch))
                )
            config = _for_member(cfg, member, epochs)
            result, model, seconds = train_run(config, cell_dir / name, member)
            train_seconds += seconds
            t0 = time.perf_counter()
            report = evaluate(model, member.test, subsets=False, train_scale=member.train, seed=self.seed)
            eval_seconds += time.perf_counter() - t0
            base = majority.get(name, 0.0)
            accuracy = report.metrics["accuracy"]
            scores.append(
                TaskScore(
                    name, report.samples, report.metrics, base, PERFECT, "perfect", normalised(accuracy, base, PERFECT)
                )
            )
            costs.append(cost_fields(model, member.test))
            valid.append((result.best or {}).get("accuracy"))
        total = sum(s.samples for s in scores)
        accuracy = sum(s.metrics["accuracy"] * s.samples for s in scores) / total
        return {
            "config": cfg.model_dump(mode="json"),
            "run_dir": str(cell_dir.relative_to(out)),
            "metrics": {"accuracy": accuracy},
            "valid": {"accuracy": statistics.mean(v for v in valid if v is not None)} if any(valid) else {},
            "evaluation": {
                "kind": "classification",
                "metric": "accuracy",
                "mode": "max",
                "samples": total,
                "metrics": {"accuracy": accuracy},
                "tasks": [vars(score) for score in scores],
                "mean_normalised": mean_normalised(scores),
            },
            "matched": matched,
            "flops": statistics.mean(c["flops"] for c in costs),
            "params": sum(c["params"] for c in costs),
            "active_params": statistics.mean(c["active_params"] for c in costs),
            "latency_b1_ms": statistics.mean(c["latency_b1_ms"] for c in costs),
            "latency_b64_ms": statistics.mean(c["latency_b64_ms"] for c in costs),
            "memory_b64_mib": max(c["memory_b64_mib"] for c in costs),
            "train_seconds": round(train_seconds, 3),
            "eval_seconds": round(eval_seconds, 3),
        }


def _for_member(config: ExperimentConfig, member, epochs: int) -> ExperimentConfig:
    """The mixture's cell config for one member: only the encoders of the member's modalities,
    trained ``epochs`` epochs."""
    data = config.model_dump(mode="json")
    data["model"]["encoders"] = {k: v for k, v in data["model"]["encoders"].items() if k in member.specs}
    data["train"]["epochs"] = int(epochs)
    return validate(data, ExperimentConfig, source=f"the specialist of {member.name!r}")


@planners.register("specialists")
def plan_specialists(suite: SuiteConfig) -> list[SpecialistCell]:
    """A specialist cell per (mixture task, specialist design, seed); tasks that are not
    mixtures get none (their designs are specialists already)."""
    cells = []
    for task in suite.tasks:
        if not _is_mixture(suite, task):
            continue
        for design in suite.specialists:
            for budget in suite.specialist_budgets:
                cells += [SpecialistCell(task, design, seed, budget) for seed in suite.seeds]
    return cells


def _is_mixture(suite: SuiteConfig, task: str) -> bool:
    return cell_config(suite, task, suite.reference, 0).task == "mixture"


# --- the leaderboard's "Generalist" section ---------------------------------------------------


def _seed_scores(record: dict, reference: dict[str, float]) -> tuple[dict[str, float], float | None]:
    """A record's member accuracies and its mean normalised score against ``reference``."""
    tasks = record["evaluation"]["tasks"]
    accuracy = {t["task"]: t["metrics"]["accuracy"] for t in tasks}
    values = [normalised(accuracy[t["task"]], t["majority"], reference.get(t["task"], PERFECT)) for t in tasks]
    return accuracy, None if None in values or not values else statistics.mean(values)


def generalist_tables(records: list[dict]) -> dict[str, dict]:
    """Mixture task -> {"members", "reference", "kind", "rows"} (rows best first)."""
    by_task: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("status") == "ok" and (r.get("evaluation") or {}).get("tasks"):
            by_task[r["task"]][r["design"]].append(r)
    tables = {}
    for task, designs in by_task.items():
        members = [t["task"] for t in next(iter(designs.values()))[0]["evaluation"]["tasks"]]
        reference: dict[str, float] = {}
        for design, recs in designs.items():
            if design.startswith(PREFIX):
                for m in members:
                    mean = statistics.mean(_seed_scores(r, {})[0][m] for r in recs)
                    reference[m] = max(reference.get(m, 0.0), mean)
        rows = []
        for design, recs in designs.items():
            per_seed = {r["seed"]: _seed_scores(r, reference) for r in recs}
            scores = {s: v[1] for s, v in per_seed.items() if v[1] is not None}
            if not scores:
                continue
            rows.append(
                {
                    "design": design,
                    "accuracy": {m: [v[0][m] for v in per_seed.values()] for m in members},
                    "scores": scores,
                    "summary": summarize(list(scores.values())),
                    "dense": design.startswith("dense-")
                    and not any((r.get("matched") or {}).get("like") for r in recs),
                    "flops": statistics.mean(r["flops"] for r in recs) if all("flops" in r for r in recs) else None,
                    "params": statistics.mean(r["params"] for r in recs) if all("params" in r for r in recs) else None,
                }
            )
        rows.sort(key=lambda row: -row["summary"].mean)
        dense = [row for row in rows if row["dense"]]
        if dense:
            best = max(dense, key=lambda row: row["summary"].mean)
            raw = {}
            for row in rows:
                if row is best:
                    continue
                seeds = sorted(set(row["scores"]) & set(best["scores"]))
                row["delta"] = statistics.mean(row["scores"][s] - best["scores"][s] for s in seeds) if seeds else None
                raw[row["design"]] = paired_test([row["scores"][s] for s in seeds], [best["scores"][s] for s in seeds])
            adjusted = holm(raw)
            for row in rows:
                row["p"] = adjusted.get(row["design"])
                row["best_dense"] = row is best
        kind = "the best specialist's mean accuracy" if reference else "a perfect score (no specialists trained)"
        tables[task] = {"members": members, "reference": reference, "kind": kind, "rows": rows}
    return tables


def _row_cells(row: dict, members: list[str]) -> list[str]:
    s = row["summary"]
    accuracy = [f"{100 * statistics.mean(row['accuracy'][m]):.1f}" for m in members]
    score = f"{s.mean:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}]" if s.n > 1 else f"{s.mean:.3f}"
    if row.get("best_dense"):
        delta, p = "best dense", ""
    else:
        delta = "" if row.get("delta") is None else f"{row['delta']:+.3f}"
        p = "" if row.get("p") is None else f"{row['p']:.3g}" + ("*" if significance(row["p"]) else "")
    flops = "" if row["flops"] is None else f"{row['flops'] / 1e6:.3f}"
    params = "" if row["params"] is None else f"{row['params']:,.0f}"
    return [row["design"], *accuracy, score, delta, p, flops, params]


def _header(members: list[str]) -> list[str]:
    return ["design", *(f"{m} (%)" for m in members), "mean normalised [95% CI]", "Δ vs best dense", "p (Holm)",
            "MFLOPs", "params"]  # fmt: skip


INTRO = (
    "One model over every member task (generalists) against one model per member (specialists). Accuracy on "
    "each member's test samples in its own classes (mean over seeds); the mean normalised score scales each "
    "member between its majority class (0) and the reference (1), then averages the members with equal weight. "
    "Δ is the mean paired difference in that score from the best dense generalist at equal FLOPs, `*` where a "
    "paired t-test, Holm-adjusted across the designs, gives p < 0.05."
)


@dataclass(frozen=True)
class GeneralistSection:
    """The "Generalist" leaderboard section (``tables.sections``): one table per mixture."""

    tables: dict[str, dict]

    def markdown(self) -> str:
        if not self.tables:
            return ""
        lines = ["", "## Generalist", "", INTRO, ""]
        for task, table in self.tables.items():
            lines += [f"### {task} (normalised to {table['kind']})", ""]
            rows = [_row_cells(row, table["members"]) for row in table["rows"]]
            lines += markdown_table(_header(table["members"]), rows, left=(0,))
            lines.append("")
        return "\n".join(lines)

    def figures(self, out: Path) -> list[Path]:
        return []

    def print(self, console: Console) -> None:
        for task, table in self.tables.items():
            rows = [_row_cells(row, table["members"]) for row in table["rows"]]
            console.print(terminal_table(f"generalist {task}", _header(table["members"]), rows))


@sections.register("specialists")
def generalist_section(records: list[dict], suite: SuiteConfig | None = None) -> GeneralistSection:
    """The leaderboard's "Generalist" section (empty without mixture records)."""
    return GeneralistSection(generalist_tables(records))
