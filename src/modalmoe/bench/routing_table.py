"""What a trained MoE cell's routing did on the test split, and the leaderboard's "Routing"
section (suite field ``routing_table``).

Every trained cell of an MoE design records ``routing`` (``routing_fields``): over its MoE
layers, the max/mean expert load (1 is perfectly balanced; E when one expert takes every
assignment), the fraction of assignments a capacity limit dropped, and the experts a token
actually ran (kept assignments per routed token: k for top-k, fewer for top-p or null
experts), per layer and per modality, so an adaptive router shows where it spends its FLOPs.
The section puts these beside the metric, the metric with a modality missing and the FLOPs
actually spent (``flops``: counted on the trained model, only experts that ran).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

import torch
from rich.console import Console

from modalmoe.analysis.report import collect
from modalmoe.analysis.routing import drop_rate, kept, tokens_per_expert
from modalmoe.bench.suites import SuiteConfig
from modalmoe.bench.tables import markdown_table, scale, sections, terminal_table
from modalmoe.bench.training import cost_rows
from modalmoe.moe.layer import MoELayer

SAMPLES = 512  # test samples routed for the statistics (the first ones, of every member of a
# task mixture alike: the same for every design)


def routing_fields(model, data) -> dict:
    """The ``routing`` field of a trained cell's record ({} for a dense model)."""
    if not any(isinstance(m, MoELayer) for m in model.modules()):
        return {}
    if "task" in data.extras:  # a task mixture: the first samples of every member alike
        data = data.subset(cost_rows(data, SAMPLES))
    elif len(data) > SAMPLES:
        data = data.subset(torch.arange(SAMPLES))
    records = collect(model, data).records
    if not records:
        return {}
    names = list(model.modalities)
    layers = []
    for record in records:
        load = tokens_per_expert(record).double()
        per_token = kept(record).sum(1).double()
        by_modality = {}
        for m, name in enumerate(names):
            mine = record.modality == m
            if bool(mine.any()):
                by_modality[name] = float(per_token[mine].mean())
        layers.append(
            {
                "max_mean_load": float(load.max() / load.mean()) if float(load.sum()) else None,
                "dropped": drop_rate(record),
                "experts_per_token": float(per_token.mean()) if per_token.numel() else 0.0,
                "experts_per_token_by_modality": by_modality,
            }
        )
    loads = [layer["max_mean_load"] for layer in layers if layer["max_mean_load"] is not None]
    modalities = {n for layer in layers for n in layer["experts_per_token_by_modality"]}
    return {
        "max_mean_load": statistics.mean(loads) if loads else None,
        "dropped": statistics.mean(layer["dropped"] for layer in layers),
        "experts_per_token": statistics.mean(layer["experts_per_token"] for layer in layers),
        "experts_per_token_by_modality": {
            n: statistics.mean(
                layer["experts_per_token_by_modality"][n]
                for layer in layers
                if n in layer["experts_per_token_by_modality"]
            )
            for n in sorted(modalities)
        },
        "layers": layers,
    }


HEADER = [
    "design",
    "metric",
    "missing",
    "max/mean load",
    "dropped %",
    "experts/token",
    "MFLOPs",
    "by modality",
    "by layer",
    "without each modality",
]
INTRO = (
    "Each MoE design's routing on the first test samples, mean over seeds (± std over seeds): max/mean "
    "expert load averaged over layers (1 = balanced), the share of assignments a capacity limit dropped, "
    "the experts a token ran (mean over layers; per modality and per MoE layer in later columns), and the "
    "forward FLOPs per sample the trained model actually spent (only experts that ran count). missing: the "
    "metric averaged over test runs with a modality missing; without each modality: the metric with only "
    "that one missing."
)


def _mean_std(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _without_each(record: dict, metric: str) -> dict[str, float]:
    """Modality -> the metric with only that modality missing (the subsets one short)."""
    ev = record.get("evaluation") or {}
    every = ev.get("modalities", [])
    out = {}
    for s in ev.get("subsets", []):
        absent = sorted(set(every) - set(s["modalities"]))
        if len(absent) == 1 and s["metrics"].get(metric) is not None:
            out[absent[0]] = s["metrics"][metric]
    return out


def _missing(record: dict, metric: str) -> float | None:
    ev = record.get("evaluation") or {}
    full = len(ev.get("modalities", []))
    scores = [s["metrics"].get(metric) for s in ev.get("subsets", []) if len(s["modalities"]) < full]
    scores = [s for s in scores if s is not None]
    return statistics.mean(scores) if scores else None


def routing_tables(records: list[dict]) -> dict[str, list[list[str]]]:
    """task -> one row per MoE design (``HEADER``)."""
    by_cell: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        if r.get("status") == "ok" and r.get("routing"):
            by_cell[(r["task"], r["design"])].append(r)
    tables: dict[str, list[list[str]]] = defaultdict(list)
    for (task, design), recs in by_cell.items():
        metric = (recs[0].get("evaluation") or {}).get("metric") or "accuracy"
        k = scale(metric)
        scores = [r["metrics"].get(metric) for r in recs]
        scores = [s * k for s in scores if s is not None]
        missing = [m * k for m in (_missing(r, metric) for r in recs) if m is not None]
        routing = [r["routing"] for r in recs]
        modalities = sorted({n for x in routing for n in x.get("experts_per_token_by_modality", {})})
        spent = {
            n: statistics.mean(
                x["experts_per_token_by_modality"][n] for x in routing if n in x["experts_per_token_by_modality"]
            )
            for n in modalities
        }
        by_modality = ", ".join(f"{n} {v:.2f}" for n, v in spent.items())
        depth = min(len(x.get("layers", [])) for x in routing)
        by_layer = ", ".join(
            f"L{i} {statistics.mean(x['layers'][i]['experts_per_token'] for x in routing):.2f}" for i in range(depth)
        )
        dropped_one = defaultdict(list)
        for r in recs:
            for n, v in _without_each(r, metric).items():
                dropped_one[n].append(v * k)
        without = ", ".join(f"{n} {statistics.mean(v):.1f}" for n, v in sorted(dropped_one.items()))
        tables[task].append(
            [
                design,
                _mean_std(scores, 1),
                _mean_std(missing, 1),
                _mean_std([x.get("max_mean_load") for x in routing]),
                _mean_std([100 * x["dropped"] for x in routing], 1),
                _mean_std([x["experts_per_token"] for x in routing]),
                _mean_std([r["flops"] / 1e6 for r in recs if r.get("flops") is not None], 3),
                by_modality,
                by_layer,
                without,
            ]
        )
    return {task: sorted(rows) for task, rows in sorted(tables.items())}


@dataclass(frozen=True)
class RoutingSection:
    """The "Routing" leaderboard section."""

    tables: dict[str, list[list[str]]]

    def markdown(self) -> str:
        if not self.tables:
            return ""
        lines = ["", "## Routing", "", INTRO, ""]
        for task, rows in self.tables.items():
            lines += [f"### {task}", "", *markdown_table(HEADER, rows, left=(0, 7, 8, 9)), ""]
        return "\n".join(lines)

    def print(self, console: Console) -> None:
        for task, rows in self.tables.items():
            console.print(terminal_table(f"routing {task}", HEADER[:7], [row[:7] for row in rows]))

    def figures(self, out) -> list:
        return []


@sections.register("routing_table")
def routing_section(records: list[dict], suite: SuiteConfig | None = None) -> RoutingSection:
    """The leaderboard's "Routing" section, for suites that ask for it (``routing_table: true``)."""
    return RoutingSection(routing_tables(records) if suite is not None and suite.routing_table else {})
