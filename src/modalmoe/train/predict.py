"""Predictions of a trained run on new data, to CSV or JSON.

The input is a directory in the manifest format (``modalmoe.data.formats``; new rows need
no splits and no labels, see ``data.formats.rows``) or a bundled task name. From a
directory, rows come in input order and ``index`` is each row's position in its input file;
``target`` is written only when the rows carry labels, read as the run's classes.

Its modalities are matched to the model's by name: a modality the input lacks is absent
for every sample (the model predicts from any non-empty subset), and each one it has must be
of the same kind and shape as in training.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from modalmoe.data.formats import DataFormatError
from modalmoe.data.formats.rows import load_rows
from modalmoe.data.tasks import load_task, tasks
from modalmoe.io import atomic_write_text
from modalmoe.run import check_data_specs, load_run_model, read_run_config, read_task_info


def _input_task(source: str, run_dir: str | Path):
    if source in tasks:
        config = read_run_config(run_dir)  # the run's own task comes with the run's task options
        return load_task(source, **(config.task_options if source == config.task else {}))
    raise DataFormatError(
        f"--input {source!r} is neither a data directory (with manifest.yaml) nor a bundled task "
        f"({', '.join(tasks.names())})"
    )


def _inputs(source: str, run_dir: str | Path, info: dict, split: str):
    """``(split name, dataset, input row of each sample, labelled)`` per part of the input."""
    path = Path(source).expanduser()
    if path.exists():  # new rows: splits and labels optional, labels read as the run's classes
        rows = load_rows(path, task_type=info["task_type"], classes=info.get("classes"), run_specs=info["specs"])
        keep = np.arange(len(rows.index)) if split == "all" else np.flatnonzero(rows.split == split)
        if split != "all" and not len(keep):
            assigned = sorted({s for s in rows.split.tolist() if s})
            raise DataFormatError(
                f"{source!r} assigns no row to split {split!r}"
                + (f" (its splits: {assigned})" if assigned else " (it has no splits: use --split all)")
            )
        dataset = rows.dataset.subset(keep.tolist()) if len(keep) < len(rows.index) else rows.dataset
        return [(rows.split[keep], dataset, rows.index[keep], rows.labelled)]
    task = _input_task(source, run_dir)
    names = list(task.splits) if split == "all" else [split]
    unknown = [n for n in names if n not in task.splits]
    if unknown:
        raise DataFormatError(f"{source!r} has no split {unknown[0]!r}; it has {list(task.splits)}")
    out = []
    for name in names:
        dataset = task.splits[name]
        out.append((np.full(len(dataset), name, dtype=object), dataset, np.arange(len(dataset)), True))
    return out


def predict_rows(
    run_dir: str | Path,
    source: str,
    *,
    split: str = "all",
    modalities: Sequence[str] | None = None,
    batch_size: int = 256,
) -> list[dict]:
    """One dict per sample: split, index (the input row), prediction, class probabilities or
    values, and the target when the input is labelled."""

    info = read_task_info(run_dir)
    model = load_run_model(run_dir)
    parts = _inputs(source, run_dir, info, split)
    check_data_specs(info["specs"], parts[0][1].specs, source, every=False)
    classes = info.get("classes")
    rows = []
    with torch.no_grad():
        for splits, dataset, index, labelled in parts:
            for start in range(0, len(dataset), batch_size):
                positions = torch.arange(start, min(start + batch_size, len(dataset)))
                batch = dataset.batch(positions)
                for m in model.modalities:  # modalities the input lacks: absent for every sample
                    batch.present.setdefault(m, torch.zeros(len(positions), dtype=torch.bool))
                batch.inputs = {k: v for k, v in batch.inputs.items() if k in model.modalities}
                output = model(batch, modalities=modalities)
                chunk = _rows(
                    splits[start : start + len(positions)],
                    torch.as_tensor(index[start : start + len(positions)]),
                    output.logits,
                    batch.target,
                    model.head.kind,
                    classes,
                )
                if not labelled:
                    for row in chunk:
                        for key in [k for k in row if k == "target" or k.startswith("target_")]:
                            del row[key]
                rows.extend(chunk)
    return rows


def _rows(splits, index, logits, target, kind, classes) -> list[dict]:
    rows = _prediction_rows(splits, index, logits, target, kind, classes)
    finite = torch.isfinite(logits).reshape(logits.shape[0], -1).all(1).tolist()
    for row, ok in zip(rows, finite, strict=True):
        row["finite"] = ok  # NaN/Inf outputs (a broken run, out-of-range inputs) are marked, never hidden
    return rows


def _prediction_rows(splits, index, logits, target, kind, classes) -> list[dict]:
    out = []
    if kind == "classification":
        probs = logits.softmax(-1)
        for split, i, p, t in zip(splits, index.tolist(), probs, target.tolist(), strict=True):
            label = int(p.argmax())
            row = {"split": split, "index": i, "prediction": classes[label] if classes else label}
            row.update({f"p_{classes[c] if classes else c}": round(float(v), 6) for c, v in enumerate(p)})
            row["target"] = classes[t] if classes and isinstance(t, int) and 0 <= t < len(classes) else t
            out.append(row)
    elif kind == "multilabel":
        probs = logits.sigmoid()
        for split, i, p in zip(splits, index.tolist(), probs, strict=True):
            row = {"split": split, "index": i}
            row.update({f"p_{c}": round(float(v), 6) for c, v in enumerate(p)})
            out.append(row)
    else:
        values = logits if logits.dim() > 1 else logits.unsqueeze(-1)
        targets = target if target.dim() > 1 else target.unsqueeze(-1)
        for split, i, v, t in zip(splits, index.tolist(), values.tolist(), targets.tolist(), strict=True):
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
