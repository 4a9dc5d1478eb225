"""Run a model over a split and report: metrics on all modalities, on every modality subset,
under graded noise (with MultiBench's robustness measures), and cross-modal retrieval.

    from modalmoe.evaluate import evaluate
    report = evaluate(model, task.test, kind="classification", noise_levels=(0, 2, 4),
                      train_scale=task.train)
    report.print()                       # rich tables
    json.dumps(report.to_dict())         # JSON-safe

A sample that carries none of the modalities being evaluated cannot be predicted (the model
refuses it); such samples are skipped, and every row records how many samples it used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from modalmoe.data.batch import MultimodalDataset
from modalmoe.data.corrupt import LEVELS, NOISE_STD, add_noise, feature_std
from modalmoe.data.tasks.mixture import layout as mixture_layout
from modalmoe.evaluate.metrics import METRICS, PRIMARY, task_metrics
from modalmoe.evaluate.retrieval import cross_modal_retrieval
from modalmoe.evaluate.robustness import effective_robustness, evaluated_subsets, relative_robustness
from modalmoe.evaluate.tasks import TaskScore, majority_rates, mean_normalised, task_scores
from modalmoe.model.multimodal import MultimodalModel

ALL = "all"
"""Name of the noise row where every noisy-able modality is corrupted at once."""


def nonfinite_rows(outputs: Tensor | None) -> int:
    """outputs: [N, ...] -> how many rows hold a NaN or an infinity."""
    if outputs is None or outputs.numel() == 0:
        return 0
    return int((~torch.isfinite(outputs)).reshape(outputs.shape[0], -1).any(1).sum())


@dataclass
class Predictions:
    """A model's outputs over a split, in dataset order.

    Attributes:
        logits: [N, C] or [N] head outputs (None for an embedding-only model).
        target: [N] or [N, L] targets.
        present: [N, M] bool, which of the model's modalities each sample carried (restricted
            to the modalities predicted from).
        modalities: the model's modalities, naming the columns of ``present``.
        index: [N] the dataset rows predicted (samples with none of the modalities are skipped).
        embeddings: modality -> [N, E] embeddings (0 where absent), or None.
    """

    logits: Tensor | None
    target: Tensor
    present: Tensor
    modalities: list[str]
    index: Tensor
    embeddings: dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return int(self.index.shape[0])


@dataclass
class SubsetRow:
    """Metrics when the model sees only ``modalities``, over the ``samples`` that carry one of them."""

    modalities: tuple[str, ...]
    samples: int
    metrics: dict[str, float]


@dataclass
class NoiseRow:
    """Metrics on all modalities with ``noisy`` (a modality, or ``ALL``) corrupted at ``level``."""

    noisy: str
    level: int
    samples: int
    metrics: dict[str, float]


@dataclass
class Robustness:
    """MultiBench's robustness measures of the primary metric over the noise levels.

    Attributes:
        noisy: the modality corrupted, or ``ALL``.
        metric: the metric the curve follows.
        levels: noise levels, clean (0) first.
        scores: the metric at each level.
        relative: area under the curve, levels mapped to ``level / max(LEVELS)`` in [0, 1].
        effective: excess over the reference curve, or None without a reference.
    """

    noisy: str
    metric: str
    levels: list[int]
    scores: list[float]
    relative: float
    effective: float | None = None


@dataclass
class EvalReport:
    """Everything ``evaluate`` measured.

    Attributes:
        kind: "classification", "multilabel", "regression" (None for an embedding-only model).
        metric: the primary metric and ``mode``, "max" or "min" (``PRIMARY[kind]``).
        modalities: the model's modalities.
        samples: samples in the all-modality row.
        metrics: metrics with all modalities.
        subsets: one row per non-empty modality subset, full set first (empty if not asked).
        noise: one row per (level, noisy modality), ``ALL`` last within a level.
        robustness: one entry per noisy modality and ``ALL``.
        retrieval: (query modality, gallery modality) -> retrieval metrics and ``samples``.
        nonfinite: samples of the all-modality row whose outputs are NaN or infinite (a
            broken model or out-of-range inputs; their metrics mean nothing).
        tasks: for a task mixture, each member scored alone (``modalmoe.evaluate.tasks``).
        mean_normalised: for a task mixture, the mean of the members' normalised scores.
    """

    kind: str | None
    metric: str | None
    mode: str | None
    modalities: list[str]
    samples: int
    metrics: dict[str, float]
    subsets: list[SubsetRow] = field(default_factory=list)
    noise: list[NoiseRow] = field(default_factory=list)
    robustness: list[Robustness] = field(default_factory=list)
    retrieval: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    nonfinite: int = 0
    tasks: list[TaskScore] = field(default_factory=list)
    mean_normalised: float | None = None

    def to_dict(self) -> dict:
        """A JSON-safe dict (NaN and infinities become None)."""
        return _json(
            {
                "kind": self.kind,
                "metric": self.metric,
                "mode": self.mode,
                "modalities": list(self.modalities),
                "samples": self.samples,
                "nonfinite": self.nonfinite,
                "metrics": self.metrics,
                "subsets": [
                    {"modalities": list(r.modalities), "samples": r.samples, "metrics": r.metrics} for r in self.subsets
                ],
                "noise": [
                    {"noisy": r.noisy, "level": r.level, "samples": r.samples, "metrics": r.metrics} for r in self.noise
                ],
                "robustness": [vars(r) for r in self.robustness],
                "retrieval": [{"query": a, "gallery": b, **m} for (a, b), m in self.retrieval.items()],
                **(
                    {"tasks": [vars(t) for t in self.tasks], "mean_normalised": self.mean_normalised}
                    if self.tasks
                    else {}
                ),
            }
        )

    def print(self, console: Console | None = None) -> None:
        """Print the report as rich tables: subsets, noise and robustness, retrieval."""
        console = console or Console()
        names = list(METRICS.get(self.kind, ()))
        if self.tasks:
            table = Table(title="Tasks of the mixture (each in its own classes)", title_justify="left")
            for column in ("task", "samples", *names, "majority", "reference", "normalised"):
                table.add_column(column, justify="left" if column == "task" else "right")
            for t in self.tasks:
                reference = f"{t.reference:.4f} ({t.reference_kind})"
                table.add_row(
                    t.task,
                    str(t.samples),
                    *_cells(t.metrics, names),
                    _format(t.majority),
                    reference,
                    _format(t.normalised),
                )
            console.print(table)
            console.print(f"mean normalised score: {_format(self.mean_normalised)}", highlight=False)
        table = Table(title="Modality subsets", title_justify="left")
        for column in ("modalities", "samples", *names):
            table.add_column(column, justify="left" if column == "modalities" else "right")
        rows = self.subsets or [SubsetRow(tuple(self.modalities), self.samples, self.metrics)]
        for row in rows:
            table.add_row(" + ".join(row.modalities), str(row.samples), *_cells(row.metrics, names))
        console.print(table)
        if self.noise:
            table = Table(title="Gaussian noise (std relative to each feature's std)", title_justify="left")
            for column in ("noisy", "level (std)", "samples", *names):
                table.add_column(column, justify="left" if column == "noisy" else "right")
            for row in self.noise:
                level = f"{row.level} ({NOISE_STD[row.level]:g})"
                table.add_row(row.noisy, level, str(row.samples), *_cells(row.metrics, names))
            console.print(table)
        if self.robustness:
            better = "higher" if self.mode == "max" else "lower"
            table = Table(title=f"MultiBench robustness of {self.metric} ({better} is better)", title_justify="left")
            for column in ("noisy", "levels", "scores", "relative", "effective"):
                table.add_column(column, justify="left" if column == "noisy" else "right")
            for r in self.robustness:
                table.add_row(
                    r.noisy,
                    " ".join(map(str, r.levels)),
                    " ".join(_format(s) for s in r.scores),
                    _format(r.relative),
                    _format(r.effective),
                )
            console.print(table)
        if self.retrieval:
            first = next(iter(self.retrieval.values()))
            columns = [k for k in first if k != "samples"]
            table = Table(title="Cross-modal retrieval (cosine similarity)", title_justify="left")
            for column in ("query", "gallery", "samples", *columns):
                table.add_column(column, justify="left" if column in ("query", "gallery") else "right")
            for (a, b), m in self.retrieval.items():
                table.add_row(a, b, str(m["samples"]), *_cells(m, columns))
            console.print(table)


def predict(
    model: MultimodalModel,
    dataset: MultimodalDataset,
    *,
    batch_size: int = 256,
    modalities: Sequence[str] | None = None,
    task: str | None = None,
) -> Predictions:
    """The model's outputs over a dataset, in eval mode without gradients.

    Samples are visited in dataset order; those that carry none of ``modalities`` are skipped
    (``Predictions.index`` lists the rows kept). The model's training flag is restored after.

    Args:
        model: a fitted ``MultimodalModel``.
        dataset: the split.
        batch_size: samples per forward pass.
        modalities: predict from these modalities only (None: all the model's).
        task: an earlier task of a model grown by ``add_task`` (None: the current one).

    Returns:
        The ``Predictions``, on CPU.
    """
    names = model.modalities if modalities is None else list(modalities)
    unknown = sorted(set(names) - set(model.modalities))
    if unknown or not names:
        raise ValueError(f"modalities {names} must be a non-empty subset of the model's {model.modalities}")
    keep = torch.zeros(len(dataset), dtype=torch.bool)
    for name in names:
        keep |= dataset.present[name].cpu()
    index = keep.nonzero().squeeze(1)
    device = next(model.parameters()).device
    logits, present, embeddings = [], [], {}
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(index), batch_size):
                batch = dataset.batch(index[start : start + batch_size]).to(device)
                out = model(batch, modalities=names, task=task)
                present.append(model.presence(batch, names).cpu())
                if out.logits is not None:
                    logits.append(out.logits.cpu())
                for name, value in (out.embeddings or {}).items():
                    embeddings.setdefault(name, []).append(value.cpu())
    finally:
        model.train(training)
    has_logits = model.head is not None
    return Predictions(
        logits=(torch.cat(logits) if logits else torch.empty(0)) if has_logits else None,
        target=dataset.target[index],
        present=torch.cat(present) if present else torch.zeros(0, len(model.modalities), dtype=torch.bool),
        modalities=model.modalities,
        index=index,
        embeddings={k: torch.cat(v) for k, v in embeddings.items()} if embeddings else None,
    )


def evaluate(
    model: MultimodalModel,
    dataset: MultimodalDataset,
    *,
    kind: str | None = None,
    subsets: bool = True,
    noise_levels: Sequence[int] = (),
    noise_modalities: Sequence[str] | None = None,
    train_scale: MultimodalDataset | None = None,
    reference: Mapping[str, Sequence[float]] | None = None,
    seed: int = 0,
    batch_size: int = 256,
    ks: Sequence[int] = (1, 5, 10),
    task: str | None = None,
    specialists: Mapping[str, float] | None = None,
) -> EvalReport:
    """Evaluate a model on a split.

    1. Metrics with all modalities.
    2. With ``subsets``, metrics for every non-empty subset of the model's modalities
       (``model(batch, modalities=subset)``), over the samples carrying one of them.
    3. For each level in ``noise_levels`` (``data.corrupt`` levels, 0 = clean), metrics with
       one modality noisy (``add_noise``), for each noisy-able modality, then with all of
       them noisy (row ``ALL``); then MultiBench's relative robustness of the primary metric
       over ``0 + noise_levels`` for each, and its effective robustness where ``reference``
       gives a reference curve (e.g. a late-fusion model's ``Robustness.scores``).
    4. Cross-modal retrieval when the model outputs embeddings.
    5. For a task mixture (``modalmoe.data.tasks.mixture``): each member task scored alone
       and the mean normalised score (``modalmoe.evaluate.tasks``); the modality subsets are
       then each member's subsets of its own modalities (not every subset of the union).

    Args:
        model: a fitted ``MultimodalModel``.
        dataset: the split to evaluate (a test or validation split).
        kind: "classification", "multilabel" or "regression" (default: the head's kind).
        subsets: evaluate every modality subset.
        noise_levels: noise levels to evaluate (``corrupt.LEVELS``).
        noise_modalities: modalities to corrupt (default: every non-text modality).
        train_scale: the training split, whose per-feature std scales the noise (default: the
            evaluated split's own std).
        reference: ``ALL`` or modality -> reference scores at ``[0, *sorted(noise_levels)]``,
            for effective robustness.
        seed: noise seed.
        batch_size: samples per forward pass.
        ks: recall cut-offs for retrieval.
        task: for a model grown by ``add_task``, the task to evaluate (its head and routing;
            ``dataset`` must be that task's data); None: the current task.
        specialists: for a task mixture, member -> its best specialist's accuracy, the top of
            each member's normalised scale (a member left out is normalised to 1.0).

    Returns:
        The ``EvalReport``.
    """
    head = model.head if task is None else model.task_head(task)[0]
    if kind is None and head is not None:
        kind = head.kind
    metric, mode = PRIMARY[kind] if kind is not None else (None, None)
    full = predict(model, dataset, batch_size=batch_size, task=task)
    report = EvalReport(kind, metric, mode, model.modalities, len(full), _metrics(full, kind))
    report.nonfinite = nonfinite_rows(full.logits)
    parts = mixture_layout(dataset) if kind == "classification" else None
    if parts is not None and full.logits is not None and len(full):
        ids = torch.as_tensor(dataset.extras["task"]).reshape(-1)
        majority = majority_rates(parts, train_scale if train_scale is not None else dataset, dataset)
        report.tasks = task_scores(
            full.logits, full.target, ids[full.index], parts, majority=majority, reference=specialists
        )
        report.mean_normalised = mean_normalised(report.tasks)
    if subsets:
        for subset in evaluated_subsets(model.modalities, dataset):
            pred = (
                full
                if list(subset) == model.modalities
                else predict(model, dataset, batch_size=batch_size, modalities=subset, task=task)
            )
            report.subsets.append(SubsetRow(subset, len(pred), _metrics(pred, kind)))
    levels = sorted(set(noise_levels))
    if levels:
        noisy = _noisy_modalities(model, dataset, noise_modalities)
        scale = {m: None if train_scale is None else feature_std(train_scale, m) for m in noisy}
        for level in levels:
            for target in [*noisy, ALL]:
                corrupted = dataset
                for m in noisy if target == ALL else [target]:
                    corrupted = add_noise(corrupted, m, level, seed=seed, scale=scale[m])
                pred = predict(model, corrupted, batch_size=batch_size, task=task)
                report.noise.append(NoiseRow(target, level, len(pred), _metrics(pred, kind)))
        if metric is not None and metric in report.metrics:
            report.robustness = _robustness(report, [*noisy, ALL], reference or {})
    if full.embeddings is not None:
        present = {m: full.present[:, i] for i, m in enumerate(full.modalities)}
        report.retrieval = cross_modal_retrieval(full.embeddings, present, ks)
    return report


def _metrics(pred: Predictions, kind: str | None) -> dict[str, float]:
    if kind is None or pred.logits is None or len(pred) == 0:
        return {}
    return task_metrics(pred.logits, pred.target, kind)


def _noisy_modalities(model: MultimodalModel, dataset: MultimodalDataset, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [m for m in model.modalities if dataset.specs[m].kind != "text"]
    names = list(names)
    for name in names:
        if name not in model.modalities:
            raise ValueError(f"unknown noise modality {name!r}; the model has {model.modalities}")
        if dataset.specs[name].kind == "text":
            raise ValueError(f"modality {name!r} is text: Gaussian noise does not apply")
    return names


def _robustness(report: EvalReport, targets: list[str], reference: Mapping[str, Sequence[float]]) -> list[Robustness]:
    """Per noisy target, the clean score then the score at each non-zero level."""
    by_key = {(r.noisy, r.level): r for r in report.noise}
    levels = [0, *sorted({r.level for r in report.noise} - {0})]
    out = []
    for target in targets:
        rows = [by_key[(target, level)] for level in levels[1:]]
        if any(report.metric not in r.metrics for r in rows):
            continue
        scores = [report.metrics[report.metric], *(r.metrics[report.metric] for r in rows)]
        # Our severities 0..max(LEVELS) mapped onto MultiBench's imperfection axis [0, 1].
        relative = relative_robustness(scores, [level / max(LEVELS) for level in levels])
        ref = reference.get(target)
        effective = None if ref is None else effective_robustness(scores, ref)
        out.append(Robustness(target, report.metric, levels, scores, relative, effective))
    return out


def _format(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4f}"


def _cells(metrics: Mapping[str, float], names: Sequence[str]) -> list[str]:
    return [_format(metrics.get(name)) for name in names]


def _json(value):
    """Recursively JSON-safe: tuples to lists, non-finite floats to None, tensors to numbers."""
    if isinstance(value, Mapping):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    if isinstance(value, Tensor):
        return _json(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value
