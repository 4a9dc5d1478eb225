"""Routing across a benchmark: consistency over seeds and designs, and an index page.

    modalmoe analyze bench/standard            # writes bench/standard/routing/index.html

For every task and MoE design of a bench directory, each seed's best checkpoint routes the
test split and gives permutation-free statistics per MoE layer (expert ids are arbitrary
across seeds, so only quantities that do not depend on them are compared): NMI between
expert and modality, NMI between expert and class, mean normalised router entropy, and
the top expert's token share. Their mean and spread over seeds say how consistently a
design routes. For each task, the best MoE design's first seed gets a full routing report,
and ``index.html`` links them all.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from jinja2 import Environment, FileSystemLoader

from modalmoe.analysis.report import collect, write_report
from modalmoe.analysis.routing import (
    expert_class_counts,
    expert_modality_counts,
    expert_task_counts,
    normalized_entropy,
    normalized_mutual_information,
    token_share,
)
from modalmoe.bench.leaderboard import leaderboards
from modalmoe.bench.store import ResultsStore
from modalmoe.config import ConfigError
from modalmoe.data.tasks.mixture import layout
from modalmoe.io import atomic_write_text
from modalmoe.run import RunDir, load_run_model


def run_statistics(run_dir: Path) -> list[dict]:
    """Per MoE layer of one run: NMI(expert; modality), NMI(expert; class), entropy, top share."""
    model = load_run_model(run_dir)
    test = RunDir(run_dir).task().test
    collected = collect(model, test)
    classes = int(collected.labels.max()) + 1 if collected.labels.numel() else 1
    parts = layout(test)
    out = []
    for record in collected.records:
        by_task = None
        if parts is not None and record.task is not None:
            by_task = normalized_mutual_information(expert_task_counts(record, len(parts.names)))
        out.append(
            {
                "nmi_modality": normalized_mutual_information(expert_modality_counts(record, len(model.modalities))),
                "nmi_class": normalized_mutual_information(expert_class_counts(record, collected.labels, classes)),
                **({} if by_task is None else {"nmi_task": by_task}),
                "entropy": float(normalized_entropy(record).mean()) if record.modality.numel() else 0.0,
                "top_share": float(token_share(record).max()),
            }
        )
    return out


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else ""
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def write_bench_index(bench_dir: str | Path, *, console=None) -> Path:
    """``routing/index.html`` for a bench directory (and one report per task)."""
    bench_dir = Path(bench_dir)
    records = [r for r in ResultsStore(bench_dir).records() if r.get("status") == "ok" and r.get("run_dir")]
    moe = [r for r in records if r["config"]["model"]["moe"]["every"]]
    if not moe:
        raise ConfigError(f"{str(bench_dir)!r} has no finished MoE runs to analyse")
    out = bench_dir / "routing"
    boards = leaderboards(records)
    tasks = []
    for task in sorted({r["task"] for r in moe}):
        rows = []
        designs = sorted({r["design"] for r in moe if r["task"] == task})
        for design in designs:
            runs = sorted((r for r in moe if r["task"] == task and r["design"] == design), key=lambda r: r["seed"])
            per_seed = [run_statistics(bench_dir / r["run_dir"]) for r in runs]
            for layer in range(len(per_seed[0])):
                values = {k: [s[layer][k] for s in per_seed] for k in per_seed[0][layer]}
                rows.append({"design": design, "layer": layer, "seeds": len(per_seed)} | {
                    k: _spread(v) for k, v in values.items()
                })  # fmt: skip
        ranked = [row.design for row in boards[task][1] if row.design in designs] if task in boards else designs
        best = ranked[0]
        first = min((r for r in moe if r["task"] == task and r["design"] == best), key=lambda r: r["seed"])
        report = write_report(bench_dir / first["run_dir"], out / f"{task}.html")
        if console is not None:
            console.print(f"{task}: report of {best} (seed {first['seed']}) -> {report}")
        tasks.append({"task": task, "rows": rows, "report": report.name, "design": best, "seed": first["seed"]})
    environment = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True)
    html = environment.get_template("bench_index.html.j2").render(bench=str(bench_dir), tasks=tasks)
    path = out / "index.html"
    atomic_write_text(path, html)
    return path
