"""The leaderboard: per task, each design's test metric over seeds (mean, 95% CI), its paired
difference from the best dense baseline (Holm-adjusted p-value, significance marked),
robustness, and cost; written as a terminal table, ``leaderboard.md``, ``results.csv`` and
Pareto plots (metric against active FLOPs and against batch-1 latency). Each kind of cell
with a section of its own adds it after these (``tables.sections``): lifelong protocols a
"Lifelong" table each (forgetting and gain per method, ``bench/lifelong.py``), task sequences
a "Task sequences" table each (``bench/sequence.py``).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from modalmoe.analysis.report import pyplot
from modalmoe.bench.cells import in_suite_order
from modalmoe.bench.stats import holm, paired_test, significance, summarize
from modalmoe.bench.store import Record, ResultsStore
from modalmoe.bench.tables import markdown_table, scale, sections, terminal_table
from modalmoe.evaluate.metrics import direction
from modalmoe.evaluate.robustness import effective_robustness
from modalmoe.evaluate.runner import ALL
from modalmoe.io import atomic_path, atomic_write_text


@dataclass
class Row:
    """One design of one task."""

    design: str
    values: dict[int, float]  # seed -> primary metric
    summary: object
    dense: bool
    delta: float | None = None
    p: float | None = None
    significant: bool = False
    missing: float | None = None  # mean metric over subsets with a modality missing
    noise_rr: float | None = None  # relative robustness, all modalities noisy
    noise_er: float | None = None  # effective robustness against dense-late (MultiBench)
    cost: dict = field(default_factory=dict)


def _metric(records: list[dict]) -> str:
    for r in records:
        if r.get("status") == "ok" and "evaluation" in r:
            return r["evaluation"].get("metric") or "accuracy"
    return "accuracy"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def task_rows(records: list[dict], metric: str) -> list[Row]:
    """The leaderboard rows of one task's records."""
    by_design: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("status") == "ok":
            by_design[r["design"]].append(r)
    rows = []
    for design, recs in by_design.items():
        values = {r["seed"]: r["metrics"].get(metric) for r in recs if r["metrics"].get(metric) is not None}
        if not values:
            continue
        # A lifelong row (``dense-early:audio``) is never the dense baseline: it sees fewer modalities.
        dense = design.startswith("dense-") and "+" not in design and ":" not in design
        # A design matched to another design's cost (the parameter-matched dense control) is not
        # the equal-FLOPs baseline either.
        dense = dense and not any((r.get("matched") or {}).get("like") for r in recs)
        row = Row(design, values, summarize(list(values.values())), dense=dense)
        missing, rr = [], []
        for r in recs:
            ev = r.get("evaluation") or {}
            full = len(ev.get("modalities", []))
            subset_scores = [s["metrics"].get(metric) for s in ev.get("subsets", []) if len(s["modalities"]) < full]
            missing.append(_mean(subset_scores))
            rr.append(next((x["relative"] for x in ev.get("robustness", []) if x["noisy"] == ALL), None))
        row.missing, row.noise_rr = _mean(missing), _mean(rr)
        row.cost = {
            key: _mean(r.get(key) for r in recs)
            for key in ("flops", "params", "active_params", "latency_b1_ms", "latency_b64_ms", "memory_b64_mib")
        }
        row.cost["train_seconds"] = _mean(r.get("train_seconds") for r in recs)
        rows.append(row)
    sign = -1 if direction(metric) == "min" else 1
    rows.sort(key=lambda row: -sign * row.summary.mean)
    dense = [row for row in rows if row.dense]
    if dense:
        best = max(dense, key=lambda row: sign * row.summary.mean)
        raw = {}
        for row in rows:
            if row is best:
                continue
            seeds = sorted(set(row.values) & set(best.values))
            row.delta = statistics.mean(row.values[s] - best.values[s] for s in seeds) if seeds else None
            raw[row.design] = paired_test([row.values[s] for s in seeds], [best.values[s] for s in seeds])
        adjusted = holm({k: v for k, v in raw.items() if v is not None})
        for row in rows:
            if row.design in adjusted:
                row.p = adjusted[row.design]
                row.significant = significance(row.p)
        # MultiBench's effective robustness: against late fusion's noise curve, seed by seed.
        late = _curves(records, "dense-late")
        for row in rows:
            curves = _curves(records, row.design)
            er = [effective_robustness(curves[s], late[s]) for s in curves if s in late]
            row.noise_er = _mean(er)
    return rows


def _curves(records: list[dict], design: str) -> dict[int, list[float]]:
    out = {}
    for r in records:
        if r.get("design") == design and r.get("status") == "ok":
            for x in (r.get("evaluation") or {}).get("robustness", []):
                if x["noisy"] == ALL:
                    out[r["seed"]] = x["scores"]
    return out


def _fmt(value, scale: float = 1.0, digits: int = 1) -> str:
    return "" if value is None else f"{value * scale:,.{digits}f}"


def table_rows(rows: list[Row], metric: str) -> tuple[list[str], list[list[str]]]:
    points = scale(metric)
    unit = " (%)" if points == 100.0 else ""
    header = [
        "design",
        f"{metric}{unit} ± 95% CI",
        "Δ vs best dense",
        "p (Holm)",
        "missing",
        "noise RR",
        "noise ER",
        "MFLOPs",
        "params",
        "active",
        "b1 ms",
        "b64 ms",
        "mem MiB",
        "train s",
    ]
    out = []
    for row in rows:
        s = row.summary
        ci = f"{s.mean * points:.1f} ± {(s.ci_high - s.mean) * points:.1f}" if s.n > 1 else f"{s.mean * points:.1f}"
        delta = "" if row.delta is None else f"{row.delta * points:+.1f}" + (" *" if row.significant else "")
        out.append(
            [
                row.design + (" (dense)" if row.dense else ""),
                ci,
                "best dense" if row.dense and row.delta is None and row.p is None else delta,
                "" if row.p is None else f"{row.p:.3f}",
                _fmt(row.missing, points),
                _fmt(row.noise_rr, points, 2),
                _fmt(row.noise_er, points, 2),
                _fmt(row.cost.get("flops"), 1e-6, 3),
                _fmt(row.cost.get("params"), 1, 0),
                _fmt(row.cost.get("active_params"), 1, 0),
                _fmt(row.cost.get("latency_b1_ms"), 1, 2),
                _fmt(row.cost.get("latency_b64_ms"), 1, 1),
                _fmt(row.cost.get("memory_b64_mib"), 1, 1),
                _fmt(row.cost.get("train_seconds"), 1, 1),
            ]
        )
    return header, out


def leaderboards(records: list[dict]) -> dict[str, tuple[str, list[Row]]]:
    """task -> (metric, rows)."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    out = {}
    for task, recs in by_task.items():
        metric = _metric(recs)
        out[task] = (metric, task_rows(recs, metric))
    return out


def markdown(boards: dict, suite_name: str, environment: dict | None, folds: int | None = None) -> str:
    lines = [f"# Leaderboard: suite `{suite_name}`", ""]
    if environment:
        lines += [
            f"Machine: {environment.get('cpu')}, {environment.get('cores')} cores; torch {environment.get('torch')}; "
            f"modalmoe {environment.get('modalmoe')} (commit {str(environment.get('git_commit'))[:10]}).",
            "",
        ]
    over = "seeds" if not folds else f"seeds x {folds} folds (fold f of seed s trained with seed s*{folds}+f)"
    lines += [
        f"Mean over {over} with a 95% Student-t interval; Δ is the mean paired difference from the best dense "
        "design (same seeds), `*` where a paired t-test, Holm-adjusted across the task's designs, gives p < 0.05. "
        "missing: mean metric over test runs with at least one modality missing. noise RR/ER: "
        "MultiBench's relative and effective (vs dense-late) robustness with every modality noisy. MFLOPs: "
        "forward FLOPs per sample (only experts that run count); active: parameters per token; b1/b64 ms: "
        "inference latency (median) at batch 1 and 64; mem: peak inference memory at batch 64; train s: "
        "training time per cell.",
        "",
    ]
    for task, (metric, rows) in boards.items():
        header, body = table_rows(rows, metric)
        lines += [f"## {task}", "", *markdown_table(header, body), ""]
    return "\n".join(lines)


TERMINAL = (0, 1, 2, 3, 4, 5, 7, 9, 10, 13)  # the columns that fit a terminal; leaderboard.md has all


def print_boards(boards: dict, console: Console) -> None:
    for task, (metric, rows) in boards.items():
        header, body = table_rows(rows, metric)
        columns = [header[i] for i in TERMINAL]
        console.print(terminal_table(f"{task} ({metric})", columns, [[cells[i] for i in TERMINAL] for cells in body]))


def pareto_plots(boards: dict, out: Path) -> list[Path]:
    """PNG per task: the metric against active FLOPs and against batch-1 latency, with the
    Pareto front (no other design is both cheaper and better) drawn as a line."""
    plt = pyplot()
    paths = []
    for task, (metric, rows) in boards.items():
        points = [r for r in rows if r.cost.get("flops") is not None]
        if not points:
            continue
        sign = -1 if direction(metric) == "min" else 1
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, key, label in ((axes[0], "flops", "MFLOPs per sample"), (axes[1], "latency_b1_ms", "latency b1 (ms)")):
            xs = [r.cost[key] * (1e-6 if key == "flops" else 1) for r in points]
            ys = [r.summary.mean for r in points]
            ax.scatter(xs, ys, color=["tab:gray" if r.dense else "tab:blue" for r in points])
            for x, y, r in zip(xs, ys, points, strict=True):
                ax.annotate(r.design, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            front, best = [], None
            # Cheapest first; at equal cost the best first, so a worse point at the same cost is dominated.
            for x, y in sorted(zip(xs, ys, strict=True), key=lambda p: (p[0], -sign * p[1])):
                if best is None or sign * y > sign * best:
                    front.append((x, y))
                    best = y
            ax.plot(*zip(*front, strict=True), color="tab:red", linewidth=1, label="Pareto front")
            ax.set_xlabel(label)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{task}: {metric} against cost (gray: dense)")
        fig.tight_layout()
        path = out / f"pareto-{task}.png"
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


def write_outputs(out: Path, records: list[Record], suite, *, console: Console | None = None) -> dict:
    """leaderboard.md (the boards, then each kind's section), results.csv, Pareto PNGs; prints
    the leaderboard."""
    boards = leaderboards(records)
    kinds = [sections.get(name)(records, suite) for name in in_suite_order(sections.names())]
    env = next((r.get("environment") for r in records if r.get("environment")), None)
    text = markdown(boards, suite.name, env, suite.folds) + "".join(section.markdown() for section in kinds)
    atomic_write_text(out / "leaderboard.md", text)
    ResultsStore(out).write_csv()
    pareto_plots(boards, out)
    for section in kinds:  # a section's own plots (the capacity curves)
        section.figures(out)
    if console is not None:
        print_boards(boards, console)
        for section in kinds:
            section.print(console)
    return boards


def compare(a: list[dict], b: list[dict]) -> list[dict]:
    """Per (task, design): the mean primary metric and cost in two bench directories."""
    boards_a, boards_b = leaderboards(a), leaderboards(b)
    out = []
    for task in sorted(set(boards_a) | set(boards_b)):
        metric = (boards_a.get(task) or boards_b.get(task))[0]
        rows_a = {r.design: r for r in boards_a.get(task, (metric, []))[1]}
        rows_b = {r.design: r for r in boards_b.get(task, (metric, []))[1]}
        for design in sorted(set(rows_a) | set(rows_b)):
            ra, rb = rows_a.get(design), rows_b.get(design)
            out.append(
                {
                    "task": task,
                    "design": design,
                    "metric": metric,
                    "a": None if ra is None else ra.summary.mean,
                    "b": None if rb is None else rb.summary.mean,
                    "delta": None if ra is None or rb is None else rb.summary.mean - ra.summary.mean,
                    "flops_a": None if ra is None else ra.cost.get("flops"),
                    "flops_b": None if rb is None else rb.cost.get("flops"),
                }
            )
    return out
