"""Write a ``Draft`` as a manifest directory, atomically, and check it by loading it back.

Splits: a draft whose input assigns every split is written as it is. Otherwise the missing
ones are carved out, seeded and stratified by class (every class keeps at least one training
sample): with no split in the input, ``test`` and ``valid`` are fractions of all samples; with
a train split only (or train and test), they are fractions of the train split. Unlabelled
rows (``Draft.labels is None``) are written without splits, as new rows for ``modalmoe
predict``.

The directory is written next to ``out`` under a temporary name and renamed into place only
once it loads, so a failed conversion leaves nothing behind, and ``overwrite`` replaces an
old directory only with a complete new one.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from modalmoe.data.convert.base import ArrayModality, ConvertError, Draft, TableModality, natural_classes
from modalmoe.data.formats.manifest import MANIFEST, SPLITS, DataFormatError, DataFormatWarning, _save_npz, load
from modalmoe.data.formats.rows import load_rows
from modalmoe.io import atomic_path, atomic_write_text

INDEX = "index.parquet"
TABLE = "data.parquet"


@dataclass
class Converted:
    """What ``write`` wrote.

    Attributes:
        path: the directory.
        samples: rows written.
        split_sizes: split -> samples (empty for unlabelled rows).
        classes: class names (classification), else None.
        modalities: name -> one line (kind, shape or columns).
        notes: what the conversion did to values (filled gaps, absent samples, carved splits).
    """

    path: Path
    samples: int
    split_sizes: dict[str, int]
    classes: list[str] | None
    modalities: dict[str, str]
    notes: list[str]


def assign_splits(draft: Draft, *, valid: float, test: float, seed: int) -> tuple[np.ndarray | None, list[str]]:
    """``[N]`` split names (None for unlabelled rows) and a note on what was carved."""
    if draft.labels is None:
        return None, []
    for name, value in (("--valid", valid), ("--test", test)):
        if not 0.0 <= value < 1.0:
            raise ConvertError(f"{name} {value}: a fraction in [0, 1)")
    if valid + test >= 1.0:
        raise ConvertError(f"--valid {valid} and --test {test} leave no training samples; their sum must be < 1")
    rng = np.random.default_rng(seed)
    stratify = draft.task_type == "classification"
    split = np.full(draft.n, "train", dtype=object) if draft.split is None else np.asarray(draft.split, dtype=object)
    unknown = sorted(set(split.tolist()) - set(SPLITS))
    if unknown:
        raise ConvertError(f"split names {unknown[:3]} are not train, valid or test")
    notes = []
    given = set(split.tolist())
    for name, fraction in (("test", test), ("valid", valid)):
        if name in given:
            continue
        pool = np.flatnonzero(split == "train")
        if draft.split is None:  # fractions of all samples
            fraction = fraction / max(1e-12, len(pool) / draft.n)
        taken = _carve(pool, draft.labels, min(fraction, 0.99), rng, stratify)
        if not len(taken):
            raise ConvertError(
                f"too few samples ({len(pool)} in train) to carve a {name} split; give more data, "
                f"a larger --{name} fraction, or a {name} file"
            )
        split[taken] = name
        how = "stratified by class" if stratify else "at random"
        notes.append(f"{name} split: {len(taken)} samples drawn from train ({how}, seed {seed})")
    return split.astype(str), notes


def _carve(rows: np.ndarray, labels: np.ndarray, fraction: float, rng, stratify: bool) -> np.ndarray:
    if fraction <= 0 or len(rows) < 2:
        return np.zeros(0, dtype=np.int64)
    groups = [rows[labels[rows] == c] for c in sorted(set(labels[rows].tolist()))] if stratify else [rows]
    taken = []
    for group in groups:
        k = min(int(np.floor(len(group) * fraction + 0.5)), len(group) - 1)  # keep one in train
        taken.append(rng.permutation(group)[:k])
    out = np.concatenate(taken) if taken else np.zeros(0, dtype=np.int64)
    if not len(out):  # tiny data: one sample from the largest group that can spare it
        largest = max(groups, key=len)
        if len(largest) >= 2:
            out = rng.permutation(largest)[:1]
    return np.sort(out)


def write(
    draft: Draft,
    out: str | Path,
    *,
    name: str | None = None,
    valid: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
    overwrite: bool = False,
) -> Converted:
    """Write ``draft`` as a manifest directory at ``out`` (see the module docstring)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out}: is a file; name a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConvertError(
            f"--out {out}: already holds files; choose a new directory or pass --overwrite to replace it"
        )
    if not draft.modalities:
        raise ConvertError("nothing to convert: no modality was found in the input")
    split, notes = assign_splits(draft, valid=valid, test=test, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.convert-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest, described, more = _write_files(draft, tmp, split, name or out.name)
        atomic_write_text(tmp / MANIFEST, yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True))
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DataFormatWarning)
                if split is None:  # new rows: their categories are coded with a run's when predicted
                    load_rows(tmp, task_type=draft.task_type, classes=manifest.get("classes"), run_specs={})
                else:
                    load(tmp)
        except DataFormatError as e:
            raise ConvertError(f"the converted data does not load: {str(e).replace(str(tmp), str(out))}") from e
        if split is not None:  # e.g. a declared class without training samples
            more += [str(w.message).replace(str(tmp), str(out)) for w in caught]
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sizes = {s: int((split == s).sum()) for s in SPLITS} if split is not None else {}
    return Converted(out, draft.n, sizes, manifest.get("classes"), described, draft.notes + more + notes)


def _write_files(draft: Draft, directory: Path, split: np.ndarray | None, name: str):
    entries, described, notes = {}, {}, []
    table_columns: list[str] = []
    for modality, part in draft.modalities.items():
        if isinstance(part, TableModality):
            entry = {"kind": part.kind, "file": TABLE}
            if part.kind == "text":
                entry["column"] = part.columns[0]
                described[modality] = f"text (column {part.columns[0]})"
            else:
                entry["columns"] = list(part.columns)
                if part.categorical:
                    entry["categorical"] = list(part.categorical)
                cats = f", {len(part.categorical)} categorical" if part.categorical else ""
                described[modality] = f"{part.kind} ({len(part.columns)} columns{cats})"
            table_columns += [c for c in part.columns if c not in table_columns]
        else:
            entry, line, note = _write_array(modality, part, directory, draft.n)
            described[modality] = line
            notes += [note] if note else []
        entries[modality] = entry
    if table_columns:
        _write_parquet(draft.table.select(table_columns), directory / TABLE)
    manifest: dict = {
        "name": name,
        "description": f"converted by modalmoe data convert from {draft.source}",
        "task": draft.task_type,
    }
    if draft.labels is not None:
        manifest["target"] = "label"
        if draft.task_type == "classification":
            classes = draft.classes or natural_classes(draft.labels)
            unknown = sorted(set(draft.labels.tolist()) - set(classes))
            if unknown:
                raise ConvertError(f"labels {unknown[:5]} are not among the declared classes {classes}")
            manifest["classes"] = list(classes)
    manifest["modalities"] = entries
    if split is not None:
        import pyarrow as pa  # local import: pyarrow is imported only when data is read or written

        _write_parquet(pa.table({"split": split.tolist(), "label": draft.labels.tolist()}), directory / INDEX)
        manifest["splits"] = {"file": INDEX, "field": "split"}
    return manifest, described, notes


def _write_array(name: str, part: ArrayModality, directory: Path, n: int) -> tuple[dict, str, str]:
    file = f"{name}.npz"
    arrays: dict[str, np.ndarray] = {}
    note = part.note
    if isinstance(part.x, list) or (isinstance(part.x, np.ndarray) and part.x.dtype.kind in "UO"):
        values = [str(v) for v in part.x]
        present = np.ones(n, bool) if part.present is None else part.present.copy()
        arrays["x"] = np.array(values, dtype=str)
        shape = "strings"
    else:
        x = np.asarray(part.x, dtype=np.float32)
        present = np.ones(n, bool) if part.present is None else part.present.copy()
        flat = x.reshape(n, -1) if n else x.reshape(0, 0)
        finite = np.isfinite(flat)
        empty = present & ~finite.any(axis=1) & (flat.shape[1] > 0)
        if empty.any():  # a sample that is NaN throughout lacks the modality
            present &= ~empty
            note = (
                note + "; " if note else ""
            ) + f"{name}: {int(empty.sum())} samples with no finite value marked absent"
        partial = present & ~finite.all(axis=1)
        if partial.any():
            row = int(np.flatnonzero(partial)[0])
            raise ConvertError(
                f"modality {name!r}: sample {row} holds NaN or Inf among finite values; clean it, or make the "
                "whole sample NaN to mark it absent"
            )
        x = np.where(present.reshape((n,) + (1,) * (x.ndim - 1)), x, 0).astype(np.float32)
        arrays["x"] = x
        shape = "[" + ", ".join(["N", *map(str, x.shape[1:])]) + "]"
    arrays["present"] = present
    if part.lengths is not None:
        arrays["lengths"] = np.asarray(part.lengths, dtype=np.int64)
        valid = arrays["lengths"][present]
        if len(valid):
            shape += f", lengths {int(valid.min())}-{int(valid.max())}"
    _save_npz(directory / file, **arrays)
    entry: dict = {"kind": part.kind, "file": file}
    if part.columns:
        entry["columns"] = list(part.columns)
    absent = int((~present).sum())
    line = f"{part.kind} {shape}" + (f", {absent} absent" if absent else "")
    return entry, line, note


def _write_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq  # local import: see _write_files

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
