"""What every converter hands to the writer: a ``Draft`` of the data, in input order.

A converter reads one format and returns a ``Draft``: the samples' modalities (arrays, or
column groups of one table), their labels and, where the input says so, their splits. The
writer (``write.py``) assigns the missing splits, writes the manifest directory and checks it
by loading it. Helpers here parse the options every format shares: ``--modality NAME=SPEC``
and ``--kind NAME=KIND``, and a split named in a file's name (``BasicMotions_TRAIN.ts``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modalmoe.data.batch import KINDS, TASK_TYPES
from modalmoe.data.formats.manifest import DataFormatError

SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "test": "test",
    "testing": "test",
    "valid": "valid",
    "validation": "valid",
    "val": "valid",
    "dev": "valid",
}


class ConvertError(DataFormatError):
    """Input that cannot be converted; the message names the file, option or value, and the fix."""


@dataclass
class ArrayModality:
    """A modality held as an array (written as ``<name>.npz``).

    Attributes:
        kind: one of ``KINDS``.
        x: ``[N, ...]`` float array (``[N, L, C]`` zero-padded for sequences), or ``N`` strings.
        present: ``[N]`` bool, or None for all present.
        lengths: ``[N]`` valid steps of a sequence, or None for all ``L``.
        columns: names of the last axis (features or channels), optional.
        note: one line for the summary (what the converter did to the values), optional.
    """

    kind: str
    x: np.ndarray | list[str]
    present: np.ndarray | None = None
    lengths: np.ndarray | None = None
    columns: tuple[str, ...] = ()
    note: str = ""


@dataclass
class TableModality:
    """A modality held as columns of the draft's table (written into ``data.parquet``).

    Attributes:
        kind: ``tabular``, ``vector`` or ``text``.
        columns: the table's columns (one for text).
        categorical: the columns whose values are categories (encoded from the train split).
    """

    kind: str
    columns: tuple[str, ...]
    categorical: tuple[str, ...] = ()


@dataclass
class Draft:
    """Converted data before it is written.

    Attributes:
        n: samples.
        modalities: name -> ``ArrayModality`` or ``TableModality``.
        labels: ``[N]`` strings (classification) or floats (regression), or None (unlabelled rows).
        classes: class names in order (classification), or None to sort the labels.
        split: ``[N]`` "train"/"valid"/"test" where the input assigns splits, else None.
        table: a ``pyarrow.Table`` of ``N`` rows holding the table modalities' columns, or None.
        task_type: classification or regression.
        source: one line: what was read.
    """

    n: int
    modalities: dict[str, ArrayModality | TableModality]
    labels: np.ndarray | None
    classes: list[str] | None = None
    split: np.ndarray | None = None
    table: Any = None
    task_type: str = "classification"
    source: str = ""
    notes: list[str] = field(default_factory=list)


def split_of(path: Path) -> str | None:
    """The split a file's name names (a word ``train``/``test``/``valid``/``val``/``dev``), or None."""
    words = [w for w in re.split(r"[^a-z]+", path.stem.lower()) if w]
    found = {SPLIT_WORDS[w] for w in words if w in SPLIT_WORDS}
    return found.pop() if len(found) == 1 else None


def splits_of_files(paths: Sequence[Path]) -> list[str | None]:
    """Each input file's split; several files must each name a different split in their names."""
    if len(paths) == 1:
        return [None]
    names = [split_of(p) for p in paths]
    unnamed = [str(p) for p, s in zip(paths, names, strict=True) if s is None]
    if unnamed:
        raise ConvertError(
            f"{unnamed[0]}: several input files are read as splits, so each file's name must name one "
            "(train, valid or test, e.g. Task_TRAIN.ts); rename it or convert one file"
        )
    if len(set(names)) != len(names):
        raise ConvertError(f"two input files name the same split: {', '.join(map(str, paths))}")
    if "train" not in names:
        raise ConvertError(f"no input file names the train split: {', '.join(map(str, paths))}")
    return names


def parse_assignments(values: Sequence[str], option: str) -> dict[str, str]:
    """``["acc=0-2", "gyro=3-5"]`` -> ``{"acc": "0-2", "gyro": "3-5"}`` (names unique, non-empty)."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, spec = value.partition("=")
        name, spec = name.strip(), spec.strip()
        if not sep or not name or not spec:
            raise ConvertError(f"{option} {value!r}: expected NAME=VALUE, e.g. {option} acc=0-2")
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise ConvertError(f"{option} {value!r}: a modality name is letters, digits, '_', '-' or '.'")
        if name in out:
            raise ConvertError(f"{option}: modality {name!r} is given twice")
        out[name] = spec
    return out


def parse_kinds(values: Sequence[str]) -> dict[str, str]:
    """``--kind NAME=KIND`` options, checked against ``KINDS``."""
    kinds = parse_assignments(values, "--kind")
    for name, kind in kinds.items():
        if kind not in KINDS:
            raise ConvertError(f"--kind {name}={kind}: unknown kind; choose one of {', '.join(KINDS)}")
    return kinds


def parse_indices(spec: str, count: int, what: str, option: str) -> list[int]:
    """``"0-2,5"`` -> ``[0, 1, 2, 5]``: indices into ``count`` dimensions (inclusive ranges)."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise ConvertError(f"{option} {spec!r}: expected {what} indices such as 0-2 or 0,1,4 (counted from 0)")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo or hi >= count:
            raise ConvertError(
                f"{option} {spec!r}: {what} {part} is out of range; the input has {count} (0-{count - 1})"
            )
        out += range(lo, hi + 1)
    if len(set(out)) != len(out):
        raise ConvertError(f"{option} {spec!r}: a {what} is listed twice")
    return out


def check_task_type(task_type: str) -> str:
    if task_type not in TASK_TYPES:
        raise ConvertError(f"--task {task_type!r}: choose one of {', '.join(TASK_TYPES)}")
    return task_type


def label_strings(values: Sequence[Any], where: str) -> np.ndarray:
    """Classification labels as strings (``1`` and ``1.0`` both read ``"1"``); a missing one is an error."""
    out = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and v.strip() in ("", "?")):
            raise ConvertError(f"{where}: row {i} has no label; drop unlabelled rows or convert them with --unlabelled")
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            v = int(v)
        out.append(str(v).strip())
    return np.array(out, dtype=str)


def label_numbers(values: Sequence[Any], where: str) -> np.ndarray:
    """Regression targets as float32; a missing or non-numeric one is an error."""
    try:
        out = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ConvertError(f"{where}: a regression target must be a number ({e}); or use --task classification") from e
    bad = np.flatnonzero(~np.isfinite(out))
    if len(bad):
        raise ConvertError(f"{where}: row {bad[0]} has no finite target; drop it or fill it in")
    return out.astype(np.float32)


def natural_classes(labels: np.ndarray) -> list[str]:
    """The distinct labels, in numeric order when every label is a number, else sorted as text."""
    values = sorted(set(labels.tolist()))
    try:
        return sorted(values, key=float)
    except ValueError:
        return values
