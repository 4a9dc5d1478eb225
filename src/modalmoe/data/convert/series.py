"""Multivariate time series in the UEA/UCR archive's formats: ``.ts`` (sktime's text format)
and ``.arff`` (Weka's, with a relational attribute holding the dimensions).

    modalmoe data convert BasicMotions_TRAIN.ts BasicMotions_TEST.ts --out basic-motions \\
        --modality accel=0-2 --modality gyro=3-5

``--modality NAME=DIMS`` makes a sequence modality of the dimensions ``DIMS`` (counted from
0: ``0-2``, ``0,1,4``); without it, every dimension goes into one modality ``series``. The
files' names name their splits (``_TRAIN``, ``_TEST``); the valid split is carved from train.
Series may differ in length: each sample's length is its last time step with a value in any
of the modality's dimensions, and gaps inside a series (``?``, NaN) are filled by linear
interpolation along time (the summary counts them; a dimension with no value at all in a
sample is zeros). A sample with no value in any of a modality's dimensions lacks it.

Labels: ``.ts`` files read ``@classLabel true a b c`` (classes in that order) or
``@targetLabel true`` (regression); ``.arff`` files the attribute ``--label NAME`` (default: the
one named class, target or label, else the last one), classes in the order it declares. An
``.arff`` file without a relational attribute is a table (each attribute a column, as in
``tables.py``: ``--modality NAME=COLUMNS``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from modalmoe.data.convert.base import (
    ArrayModality,
    ConvertError,
    Draft,
    check_task_type,
    label_numbers,
    label_strings,
    parse_assignments,
    parse_indices,
    splits_of_files,
)
from modalmoe.data.convert.tables import from_tables


def detect_ts(paths: list[Path]) -> bool:
    return all(p.is_file() and p.suffix.lower() == ".ts" for p in paths)


def detect_arff(paths: list[Path]) -> bool:
    return all(p.is_file() and p.suffix.lower() == ".arff" for p in paths)


def convert_ts(paths: list[Path], *, modality=(), task=None, unlabelled=False, **unused) -> Draft:
    _refuse(unused, ".ts files")
    names = splits_of_files(paths)
    series, labels, split, classes, kinds = [], [], [], None, set()
    for path, name in zip(paths, names, strict=True):
        s, y, c, k = _read_ts(path, unlabelled)
        if classes is not None and c is not None and c != classes:
            raise ConvertError(f"{path}: @classLabel lists {c}, but {paths[0].name} lists {classes}")
        classes = classes or c
        kinds.add(k)
        series += s
        labels += y
        split += [name] * len(s)
    if len(kinds) > 1:
        raise ConvertError(f"{', '.join(map(str, paths))}: some files are labelled and some are not")
    kind = kinds.pop()
    task = check_task_type(task or ("regression" if kind == "regression" else "classification"))
    return _draft(series, labels if kind != "none" else None, classes, split, names, paths, modality, task)


def convert_arff(
    paths: list[Path], *, modality=(), kind=(), label=None, task="classification", unlabelled=False, **unused
) -> Draft:
    _refuse(unused, ".arff files")
    names = splits_of_files(paths)
    loaded = [_read_arff(p) for p in paths]
    relational = [any(t == "relational" for t in meta.types()) for _, meta in loaded]
    if len(set(relational)) > 1:
        raise ConvertError(f"{', '.join(map(str, paths))}: some files hold series (a relational attribute), some not")
    if not relational[0]:
        import pyarrow as pa  # local import: pyarrow is imported only when data is read or written

        tables = [pa.table({f: _column(data[f], meta[f][0]) for f in meta.names()}) for data, meta in loaded]
        meta = loaded[0][1]
        label = label or _default_label(meta.names())
        classes = _nominal_classes(meta, label)
        return from_tables(
            tables,
            paths,
            names,
            modality=modality,
            kind=kind,
            label=label,
            task=task,
            unlabelled=unlabelled,
            classes=classes,
        )
    if kind:
        raise ConvertError("--kind: the modalities of series are sequences")
    series, labels, split, classes = [], [], [], None
    for (data, meta), path, name in zip(loaded, paths, names, strict=True):
        rel = next(f for f in meta.names() if meta[f][0] == "relational")
        others = [f for f in meta.names() if f != rel]
        target = None if unlabelled else (label or _default_label(others) if others else None)
        if not unlabelled and target not in others:
            raise ConvertError(
                f"{path}: no label attribute {target!r}; its attributes: {', '.join(others)}; "
                "name one with --label NAME, or pass --unlabelled"
            )
        for row in data:
            block = row[rel]
            values = np.array([[float(v) for v in step] for step in block.tolist()], dtype=np.float64)
            series.append([values[d] for d in range(values.shape[0])])
        if target is not None:
            labels += [v.decode() if isinstance(v, bytes) else v for v in data[target].tolist()]
            classes = classes or _nominal_classes(meta, target)
        split += [name] * len(data)
    task = check_task_type(task)
    return _draft(series, None if unlabelled else labels, classes, split, names, paths, modality, task)


def _refuse(unused: dict, what: str) -> None:
    given = sorted(k for k, v in unused.items() if v not in (None, (), [], False))
    if given:
        raise ConvertError(f"--{given[0].replace('_', '-')} does not apply to {what}")


def _default_label(names: list[str]) -> str:
    for name in names:
        if name.lower() in ("class", "target", "label", "classattribute"):
            return name
    return names[-1]


def _nominal_classes(meta, name: str) -> list[str] | None:
    if name not in meta.names():
        return None
    kind, values = meta[name]
    return [str(v) for v in values] if kind == "nominal" and values else None


def _column(values: np.ndarray, kind: str) -> list:
    if kind == "nominal":
        out = [v.decode() if isinstance(v, bytes) else str(v) for v in values.tolist()]
        return [None if v == "?" else v for v in out]
    return [None if isinstance(v, float) and np.isnan(v) else v for v in values.tolist()]


def _read_arff(path: Path):
    from scipy.io import arff  # local import: scipy's ARFF reader is needed only here (~0.3 s)

    try:
        return arff.loadarff(path)
    except (OSError, ValueError, NotImplementedError, arff.ArffError) as e:
        raise ConvertError(f"{path}: cannot be read as ARFF: {' '.join(str(e).split())}") from e


def _read_ts(path: Path, unlabelled: bool) -> tuple[list[list[np.ndarray]], list, list[str] | None, str]:
    """``(series: per sample, per dimension [L], labels, classes, "classification"|"regression"|"none")``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: cannot be read as UTF-8 text ({e})") from e
    header: dict[str, list[str]] = {}
    lines = text.splitlines()
    start = None
    for i, raw in enumerate(lines):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower() == "@data":
            start = i + 1
            break
        if not line.startswith("@"):
            raise ConvertError(f"{path}: line {i + 1}: expected a header line (@key value) before @data")
        key, *values = line.split()
        header[key[1:].lower()] = values
    if start is None:
        raise ConvertError(f"{path}: no @data line; is this a .ts file of the UEA/UCR archive?")
    if (header.get("timestamps") or ["false"])[0].lower() == "true":
        raise ConvertError(f"{path}: @timeStamps true series are not supported; export them without timestamps")
    class_label = header.get("classlabel") or ["false"]
    target_label = header.get("targetlabel") or ["false"]
    if class_label[0].lower() == "true":
        kind, classes = "classification", class_label[1:] or None
    elif target_label[0].lower() == "true":
        kind, classes = "regression", None
    else:
        kind, classes = "none", None
    dims = int((header.get("dimensions") or ["0"])[0]) or None
    series, labels = [], []
    for i in range(start, len(lines)):
        line = lines[i].strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if kind != "none":
            *parts, label = parts
            labels.append(label.strip())
        if dims is not None and len(parts) != dims:
            raise ConvertError(f"{path}: line {i + 1}: {len(parts)} dimensions, but @dimensions says {dims}")
        try:
            series.append(
                [
                    np.array(
                        [np.nan if v.strip() in ("?", "NaN", "nan", "") else float(v) for v in p.split(",")],
                        dtype=np.float64,
                    )
                    for p in parts
                ]
            )
        except ValueError as e:
            raise ConvertError(f"{path}: line {i + 1}: a value is not a number ({e})") from e
        if len(series) > 1 and len(series[-1]) != len(series[0]):
            raise ConvertError(
                f"{path}: line {i + 1}: {len(series[-1])} dimensions, the first series has {len(series[0])}"
            )
    if not series:
        raise ConvertError(f"{path}: no series after @data")
    if unlabelled:
        labels, kind = [], "none"
    return series, labels, classes, kind


def _draft(series, labels, classes, split, names, paths, modality, task) -> Draft:
    count = len(series[0])
    for s, path in ((s, p) for s in series for p in paths[:1]):
        if len(s) != count:
            raise ConvertError(f"{path}: series have {len(s)} and {count} dimensions; every series needs the same")
    groups = parse_assignments(modality, "--modality")
    chosen = {n: parse_indices(spec, count, "dimension", f"--modality {n}") for n, spec in groups.items()} or {
        "series": list(range(count))
    }
    owner = {}
    for name, dims in chosen.items():
        for d in dims:
            if d in owner:
                raise ConvertError(f"--modality {name}: dimension {d} is in modality {owner[d]!r} too")
            owner[d] = name
    modalities, notes = {}, []
    for name, dims in chosen.items():
        part, filled = _sequence([[s[d] for d in dims] for s in series])
        modalities[name] = part
        if filled:
            notes.append(f"{name}: {filled} missing values inside series filled by linear interpolation")
    y = None
    where = ", ".join(map(str, paths))
    if labels is not None:
        y = label_strings(labels, where) if task == "classification" else label_numbers(labels, where)
    if not groups:
        notes.append(f"one modality 'series' of {count} dimensions; split it with --modality NAME=DIMS")
    split_array = np.array(split) if names[0] is not None else None
    return Draft(
        len(series),
        modalities,
        y,
        classes=classes if task == "classification" else None,
        split=split_array if labels is not None else None,
        task_type=task,
        source=where,
        notes=notes,
    )


def _sequence(samples: list[list[np.ndarray]]) -> tuple[ArrayModality, int]:
    """``[N, L, C]`` zero-padded, with lengths and present; gaps filled along time."""
    n, channels = len(samples), len(samples[0])
    steps = max(len(v) for s in samples for v in s)
    x = np.zeros((n, steps, channels), dtype=np.float32)
    lengths = np.ones(n, dtype=np.int64)
    present = np.ones(n, dtype=bool)
    filled = 0
    for i, sample in enumerate(samples):
        last = max((int(np.flatnonzero(np.isfinite(v))[-1]) + 1 for v in sample if np.isfinite(v).any()), default=0)
        if last == 0:
            present[i] = False
            continue
        lengths[i] = last
        for c, values in enumerate(sample):
            values = values[:last]
            ok = np.isfinite(values)
            if not ok.any():
                filled += len(values)
                continue
            if not ok.all():
                filled += int((~ok).sum())
                t = np.arange(len(values))
                values = np.interp(t, t[ok], values[ok])
            x[i, : len(values), c] = values
    return ArrayModality("sequence", x, present, lengths), filled
