"""The routing report: one self-contained HTML page per trained run.

    modalmoe analyze runs/av --split test --out report.html

Per MoE layer: tokens per expert, expert x modality and expert x class heatmaps, router
entropy, per-expert specialisation (KL of the expert's modality or class distribution from
the marginal, LIMoE-style) with mutual information, drop rate; the load-balance and z-loss
curves of training (from ``metrics.jsonl``); how each modality's routing shifts when the
others are missing; and, for early fusion, per-sample views: which expert each image patch
went to, drawn over the image, and each sequence patch's expert along time.

Statistics come from ``modalmoe.analysis.routing`` (pure functions); figures are matplotlib
PNGs embedded as data URIs; the page is a jinja2 template with inline CSS, so opening it
makes no network request.
"""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jinja2 import Environment, FileSystemLoader
from torch import Tensor

from modalmoe.analysis.routing import (
    concat_records,
    drop_rate,
    expert_class_counts,
    expert_modality_counts,
    expert_task_counts,
    mutual_information,
    normalized_entropy,
    normalized_mutual_information,
    routing_shift,
    specialisation,
    tokens_per_expert,
)
from modalmoe.config import ConfigError
from modalmoe.data.tasks.mixture import layout
from modalmoe.evaluate.robustness import evaluated_subsets
from modalmoe.io import atomic_write_text, read_jsonl
from modalmoe.moe.types import RoutingRecord
from modalmoe.run import RunDir, load_run_model, read_run_config

MAX_VIEWS = 6  # samples drawn in the per-sample views


@dataclass
class Collected:
    """A split's routing, per MoE layer, concatenated over batches."""

    records: list[RoutingRecord]
    labels: Tensor  # [N]
    positions: list[Tensor | None] = field(default_factory=list)  # per layer: [T, 2] (modality, index) or None
    dataset: object = None  # the samples routed (those with at least one of the modalities used)


def collect(model, dataset, *, modalities=None, batch_size: int = 256) -> Collected:
    """Run ``model`` over ``dataset`` and gather each MoE layer's routing records.

    Samples that carry none of the modalities used cannot be routed and are left out; the
    ``dataset`` of the result holds the samples that were (record ``sample`` ids index it).
    """
    used = list(modalities) if modalities is not None else model.modalities
    carried = torch.zeros(len(dataset), dtype=torch.bool)
    for name in used:
        carried |= dataset.present[name]
    if not bool(carried.all()):
        dataset = dataset.subset(carried.nonzero().squeeze(1))
    per_layer: list[list[RoutingRecord]] = []
    offsets, labels, n = [], [], 0
    positions: list[list[Tensor] | None] = []
    early = type(model.fusion).__name__ == "EarlyFusion"
    model.eval()
    with torch.no_grad():
        for batch in dataset.batches(batch_size):
            out = model(batch, modalities=modalities)
            if not per_layer:
                per_layer = [[] for _ in out.records]
                positions = [[] for _ in out.records] if early else [None] * len(out.records)
            for i, record in enumerate(out.records):
                per_layer[i].append(record.detach())
                if early and out.tokens is not None:
                    positions[i].append(_token_positions(out.tokens))
            offsets.append(n)
            n += len(batch)
            labels.append(batch.target)
    records = [concat_records(layer, offsets) for layer in per_layer]
    pos = [torch.cat(p) if p else None for p in positions]
    return Collected(records, torch.cat(labels) if labels else torch.zeros(0), pos, dataset)


def _token_positions(tokens) -> Tensor:
    """[T, 2] (modality, index within the modality) of each routed token of an early-fusion
    trunk, in the order the MoE layer saw them (row-major over the concatenated mask)."""
    mask = torch.cat([t.mask for t in tokens], 1)
    modality = torch.cat([torch.full_like(t.mask, i, dtype=torch.long) for i, t in enumerate(tokens)], 1)
    index = torch.cat([torch.arange(t.mask.shape[1]).expand_as(t.mask) for t in tokens], 1)
    return torch.stack([modality[mask], index[mask]], 1)


# --- figures -------------------------------------------------------------------------------------


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    # local import: pyplot costs ~0.5 s to import, and the CLI imports this module at startup
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _heatmap(counts: Tensor, rows: str, columns: list[str], title: str) -> str:
    plt = pyplot()
    share = counts / counts.sum(1, keepdim=True).clamp_min(1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(columns), 0.6 + 0.32 * counts.shape[0]))
    image = ax.imshow(share.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(counts.shape[0]), [f"{rows} {e}" for e in range(counts.shape[0])], fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the expert's tokens")
    return _png(fig)


def _bars(values: Tensor, title: str, ylabel: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 2.6))
    ax.bar(range(len(values)), values.numpy(), color="tab:blue")
    ax.set_xlabel("expert")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(len(values)))
    return _png(fig)


def _histogram(values: Tensor, title: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 2.6))
    ax.hist(values.numpy(), bins=30, range=(0, 1), color="tab:purple")
    ax.set_xlabel("router entropy / log E")
    ax.set_ylabel("tokens")
    ax.set_title(title, fontsize=9)
    return _png(fig)


def _curves(run_dir: Path) -> str | None:
    plt = pyplot()
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [record for _, record in read_jsonl(path) if record.get("split") == "train"]
    keys = [k for k in ("aux/load_balance", "aux/z_loss") if any(k in r for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 2.6))
    axes = [axes] if len(keys) == 1 else list(axes)
    for ax, key in zip(axes, keys, strict=True):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points, strict=True), linewidth=1)
        ax.set_xlabel("step")
        ax.set_title(f"{key.split('/')[1]} (sum over MoE layers)", fontsize=9)
        ax.grid(alpha=0.3)
    return _png(fig)


def _sample_views(model, dataset, collected: Collected, layer: int, names: list[str]) -> list[dict]:
    """Per-sample pictures for the image and sequence modalities (early fusion only)."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap  # local import: see pyplot()

    positions = collected.positions[layer] if collected.positions else None
    if positions is None:
        return []
    record = collected.records[layer]
    first = record.expert_index[:, 0]
    cmap = ListedColormap(plt.get_cmap("tab20").colors[: record.num_experts])
    views = []
    for m, name in enumerate(names):
        spec = dataset.specs[name]
        if spec.kind not in ("image", "sequence"):
            continue
        encoder = model.encoders[name]
        patch = getattr(encoder, "patch", 1)
        shown = 0
        for sample in range(len(dataset)):
            if shown >= MAX_VIEWS:
                break
            rows = (record.sample == sample) & (positions[:, 0] == m)
            if not bool(rows.any()) or not bool(dataset.present[name][sample]):
                continue
            experts = torch.full((int(positions[rows, 1].max()) + 1,), -1, dtype=torch.long)
            experts[positions[rows, 1]] = first[rows]
            x = dataset.inputs[name][sample]
            fig, ax = plt.subplots(figsize=(2.6, 2.6) if spec.kind == "image" else (5, 2.2))
            if spec.kind == "image":
                _, height, width = x.shape
                grid = experts[: (height // patch) * (width // patch)].view(height // patch, width // patch)
                ax.imshow(x.mean(0).numpy(), cmap="gray", extent=(0, width, height, 0))
                masked = torch.where(grid >= 0, grid, 0).float().numpy()
                extent = (0, width, height, 0)
                top = record.num_experts - 0.5
                ax.imshow(masked, cmap=cmap, alpha=0.45, vmin=-0.5, vmax=top, extent=extent, interpolation="nearest")
                for r in range(grid.shape[0]):
                    for c in range(grid.shape[1]):
                        if int(grid[r, c]) >= 0:
                            ax.text((c + 0.5) * patch, (r + 0.5) * patch, str(int(grid[r, c])), ha="center",
                                    va="center", fontsize=7)  # fmt: skip
                ax.axis("off")
            else:
                length = int(dataset.lengths[name][sample]) if name in dataset.lengths else x.shape[0]
                signal = x[:length]
                ax.plot(signal.numpy(), linewidth=0.8)
                for t, e in enumerate(experts.tolist()):
                    if e >= 0:
                        ax.axvspan(t * patch, min((t + 1) * patch, length), color=cmap(e), alpha=0.25, linewidth=0)
                ax.set_xlim(0, length)
                ax.set_xlabel("time step (shading: expert of each patch)")
            label = dataset.classes[int(dataset.target[sample])] if dataset.classes else int(dataset.target[sample])
            ax.set_title(f"{name}, sample {sample} (class {label})", fontsize=8)
            views.append({"modality": name, "sample": sample, "image": _png(fig)})
            shown += 1
    return views


# --- the page ------------------------------------------------------------------------------------


def build_report(run_dir: str | Path, *, split: str = "test", which: str = "best", data: str | None = None) -> str:
    """The HTML of a run's routing report, on the run's recorded data (``data``: other data
    with the run's modalities, see ``RunDir.task``)."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    model = load_run_model(run_dir, which=which)
    task = RunDir(run_dir).task(data)
    dataset = task.splits[split]
    names = model.modalities
    if not config.model.moe.every:
        raise ConfigError(f"{str(run_dir)!r} trained a dense model ({config.name}): it has no router to report on")
    full = collect(model, dataset)
    classes = list(dataset.classes) if dataset.classes else [str(c) for c in range(int(full.labels.max()) + 1)]
    parts = layout(dataset)  # a task mixture: routing by task as well as by modality
    tasks = list(parts.names) if parts is not None else []
    layers = []
    for i, record in enumerate(full.records):
        by_modality = expert_modality_counts(record, len(names))
        by_class = expert_class_counts(record, full.labels, len(classes))
        by_task = expert_task_counts(record, len(tasks)) if tasks and record.task is not None else None
        spec_m, spec_c = specialisation(by_modality), specialisation(by_class)
        experts = []
        for e in range(record.num_experts):
            row_m = by_modality[e] / by_modality[e].sum().clamp_min(1)
            top = int(row_m.argmax())
            experts.append(
                {
                    "id": e,
                    "tokens": int(tokens_per_expert(record)[e]),
                    "top_modality": names[top] if by_modality[e].sum() > 0 else "-",
                    "top_share": float(row_m[top]),
                    "spec_modality": float(spec_m[e]),
                    "spec_class": float(spec_c[e]),
                }
            )
        layers.append(
            {
                "index": i,
                "num_experts": record.num_experts,
                "tokens": int(record.modality.numel()),
                "drop_rate": drop_rate(record),
                "mi_modality": mutual_information(by_modality),
                "nmi_modality": normalized_mutual_information(by_modality),
                "mi_class": mutual_information(by_class),
                "nmi_class": normalized_mutual_information(by_class),
                "mean_entropy": float(normalized_entropy(record).mean()) if record.modality.numel() else 0.0,
                "experts": experts,
                "tokens_figure": _bars(
                    tokens_per_expert(record).float(), f"layer {i}: tokens per expert", "assignments"
                ),
                "modality_figure": _heatmap(by_modality, "expert", names, f"layer {i}: expert x modality"),
                "class_figure": _heatmap(by_class, "expert", classes, f"layer {i}: expert x class"),
                "entropy_figure": _histogram(normalized_entropy(record), f"layer {i}: router entropy per token"),
                "views": _sample_views(model, full.dataset, full, i, names),
                **(
                    {}
                    if by_task is None
                    else {
                        "mi_task": mutual_information(by_task),
                        "nmi_task": normalized_mutual_information(by_task),
                        "task_figure": _heatmap(by_task, "expert", tasks, f"layer {i}: expert x task"),
                    }
                ),
            }
        )
    shifts = []
    if len(names) > 1:
        for subset in evaluated_subsets(names, dataset):
            if len(subset) == len(names):
                continue
            partial = collect(model, dataset, modalities=subset)
            for m in subset:
                index = names.index(m)
                for i, (a, b) in enumerate(zip(full.records, partial.records, strict=True)):
                    try:
                        shift = routing_shift(a, b, index)
                    except ValueError:
                        continue
                    shifts.append({"modality": m, "kept": " + ".join(subset), "layer": i, "shift": shift})
    environment = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True)
    return environment.get_template("report.html.j2").render(
        name=config.name or run_dir.name,
        run=str(run_dir),
        data=task.name,
        data_source=task.provenance["path"] if task.provenance else "bundled task",
        split_sizes=", ".join(f"{name} {len(d)}" for name, d in task.splits.items()),
        split=split,
        samples=len(full.dataset),
        modalities=names,
        router=config.model.moe.router,
        fusion=config.model.fusion.name,
        layers=layers,
        tasks=tasks,
        shifts=shifts,
        curves=_curves(run_dir),
        early=type(model.fusion).__name__ == "EarlyFusion",
        seconds=f"{time.perf_counter() - started:.1f}",
    )


def write_report(run_dir: str | Path, out: str | Path | None = None, **kwargs) -> Path:
    """Write the report atomically (default ``RUN_DIR/report.html``)."""
    target = Path(out) if out else Path(run_dir) / "report.html"
    atomic_write_text(target, build_report(run_dir, **kwargs))
    return target
