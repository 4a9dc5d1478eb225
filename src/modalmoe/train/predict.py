"""Predictions of a trained run on new data, to CSV or JSON.

The input is a directory in the manifest format (``modalmoe.data.formats``) or a bundled
task name. Its modalities are matched to the model's by name: a modality the input lacks is
absent for every sample (the model predicts from any non-empty subset), and each one it has
must be of the same kind and shape as in training.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from modalmoe.data.formats import DataFormatError, load
from modalmoe.data.tasks import load_task, tasks
from modalmoe.io import atomic_write_text
from modalmoe.run import load_run_model, read_run_config, read_task_info


def _input_task(source: str, run_dir: str | Path):
    path = Path(source)
    if path.exists():
        return load(path)
    if source in tasks:
        config = read_run_config(run_dir)  # the run's own task comes with the run's task options
        return load_task(source, **(config.task_options if source == config.task else {}))
    raise DataFormatError(
        f"--input {source!r} is neither a data directory (with manifest.yaml) nor a bundled task "
        f"({', '.join(tasks.names())})"
    )


def _check_specs(model_specs: dict, data_specs: dict, source: str) -> None:
    shared = [m for m in model_specs if m in data_specs]
    if not shared:
        raise DataFormatError(
            f"{source!r} has none of the model's modalities {list(model_specs)} (it has {list(data_specs)})"
        )
    for name in shared:
        a, b = model_specs[name], data_specs[name]
        if a.kind != b.kind or tuple(a.shape) != tuple(b.shape):
            raise DataFormatError(
                f"{source!r}: modality {name!r} is {b.kind} {tuple(b.shape)} but the model was trained on "
                f"{a.kind} {tuple(a.shape)}"
            )


def predict_rows(
    run_dir: str | Path,
    source: str,
    *,
    split: str = "all",
    modalities: Sequence[str] | None = None,
    batch_size: int = 256,
) -> list[dict]:
    """One dict per sample: split, index, prediction (and class probabilities or values)."""

    info = read_task_info(run_dir)
    model = load_run_model(run_dir)
    task = _input_task(source, run_dir)
    _check_specs(info["specs"], task.specs, source)
    names = list(task.splits) if split == "all" else [split]
    unknown = [n for n in names if n not in task.splits]
    if unknown:
        raise DataFormatError(f"{source!r} has no split {unknown[0]!r}; it has {list(task.splits)}")
    classes = info.get("classes")
    rows = []
    with torch.no_grad():
        for name in names:
            dataset = task.splits[name]
            for start in range(0, len(dataset), batch_size):
                index = torch.arange(start, min(start + batch_size, len(dataset)))
                batch = dataset.batch(index)
                for m in model.modalities:  # modalities the input lacks: absent for every sample
                    batch.present.setdefault(m, torch.zeros(len(index), dtype=torch.bool))
                batch.inputs = {k: v for k, v in batch.inputs.items() if k in model.modalities}
                output = model(batch, modalities=modalities)
                rows.extend(_rows(name, index, output.logits, batch.target, model.head.kind, classes))
    return rows


def _rows(split, index, logits, target, kind, classes) -> list[dict]:
    rows = _prediction_rows(split, index, logits, target, kind, classes)
    finite = torch.isfinite(logits).reshape(logits.shape[0], -1).all(1).tolist()
    for row, ok in zip(rows, finite, strict=True):
        row["finite"] = ok  # NaN/Inf outputs (a broken run, out-of-range inputs) are marked, never hidden
    return rows


def _prediction_rows(split, index, logits, target, kind, classes) -> list[dict]:
    out = []
    if kind == "classification":
        probs = logits.softmax(-1)
        for i, p, t in zip(index.tolist(), probs, target.tolist(), strict=True):
            label = int(p.argmax())
            row = {"split": split, "index": i, "prediction": classes[label] if classes else label}
            row.update({f"p_{classes[c] if classes else c}": round(float(v), 6) for c, v in enumerate(p)})
            row["target"] = classes[t] if classes and isinstance(t, int) and 0 <= t < len(classes) else t
            out.append(row)
    elif kind == "multilabel":
        probs = logits.sigmoid()
        for i, p in zip(index.tolist(), probs, strict=True):
            row = {"split": split, "index": i}
            row.update({f"p_{c}": round(float(v), 6) for c, v in enumerate(p)})
            out.append(row)
    else:
        values = logits if logits.dim() > 1 else logits.unsqueeze(-1)
        targets = target if target.dim() > 1 else target.unsqueeze(-1)
        for i, v, t in zip(index.tolist(), values.tolist(), targets.tolist(), strict=True):
            row = {"split": split, "index": i}
            row.update({f"prediction_{c}" if len(v) > 1 else "prediction": x for c, x in enumerate(v)})
            row.update({f"target_{c}" if len(t) > 1 else "target": x for c, x in enumerate(t)})
            out.append(row)
    return out


def predict_to_file(
    run_dir: str | Path,
    source: str,
    *,
    split: str = "all",
    modalities: Sequence[str] | None = None,
    out: str | Path | None = None,
) -> tuple[int, int]:
    """Write predictions to ``out`` (``.csv`` or ``.json``, atomically) or CSV to stdout.

    Returns:
        (rows written, rows whose outputs are NaN or infinite: ``finite`` is false there).
    """
    if out is not None and Path(out).suffix not in (".csv", ".json"):
        raise DataFormatError(f"--out {str(out)!r}: write predictions to a .csv or .json file")
    rows = predict_rows(run_dir, source, split=split, modalities=modalities)
    bad = sum(not row["finite"] for row in rows)
    if out is not None and Path(out).suffix == ".json":
        plain = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in rows]
        atomic_write_text(out, json.dumps(plain, indent=1))  # strict JSON: NaN and Inf become null
        return len(rows), bad
    buffer = io.StringIO()
    fields = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    if out is None:
        sys.stdout.write(buffer.getvalue())
    else:
        atomic_write_text(out, buffer.getvalue())
    return len(rows), bad
