"""New rows to predict: a manifest directory whose splits and labels are optional.

    from modalmoe.data.formats.rows import load_rows
    rows = load_rows("path/to/new-rows", classes=("walk", "run"))
    rows.dataset, rows.index, rows.split, rows.labelled

A directory of new samples needs no train/valid/test assignment and no labels: leave out
``splits`` (every modality is then one file of all rows, matched by position), or give
``splits: {file: ...}`` whose file holds the labels (``target``) and, optionally, the
``split`` field. Labels, when there, are read as the run's classes (``classes``), never
re-encoded from the new file's own labels; a label the run does not know is an error naming
it. Categorical columns are coded with the categories the run recorded in training
(``ModalitySpec.categories``), so a category keeps its code; one the run never saw gets the
"unseen" code. ``index`` is each sample's row in the input files (per split file, with one file per
split), so predictions can be joined back to the input.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modalmoe.data.batch import ModalitySpec, MultimodalDataset
from modalmoe.data.formats.manifest import (
    _SPLITS_KEYS,
    SPLITS,
    DataFormatError,
    DataFormatWarning,
    _check_keys,
    _data_roots,
    _error,
    _Layout,
    _load_modality,
    _manifest_path,
    _open_npz,
    _read_column,
    _read_manifest,
    _resolve_files,
)

ALL = "all"


@dataclass
class Rows:
    """Rows to predict, in input order.

    Attributes:
        dataset: every row (``target`` -1 or NaN where unlabelled).
        index: ``[N]`` each row's position in its input file.
        split: ``[N]`` each row's split when the manifest assigns one, else "".
        labelled: the rows carry labels.
        name: the manifest's name.
    """

    dataset: MultimodalDataset
    index: np.ndarray
    split: np.ndarray
    labelled: bool
    name: str


def load_rows(
    path: str | Path,
    *,
    task_type: str = "classification",
    classes: Sequence[str] | None = None,
    run_specs: Mapping[str, ModalitySpec] | None = None,
    data_roots=(),
) -> Rows:
    """The rows of the manifest at ``path`` (see the module docstring).

    Args:
        task_type: the run's task type (a manifest that says otherwise is an error).
        classes: the run's class names; labels are read as these.
        run_specs: the run's modality specs; their ``categories`` code the rows' categorical
            columns as in training (a run that did not record them: coded from these rows, with
            a warning).
    """
    manifest_path = _manifest_path(path)
    manifest = _read_manifest(manifest_path)
    declared = manifest.get("task", task_type)
    if declared != task_type:
        raise _error(manifest_path, "task", f"is {declared!r}, but the run predicts {task_type!r}")
    modalities = manifest.get("modalities")
    if not isinstance(modalities, dict) or not modalities:
        raise _error(manifest_path, "modalities", "must map each modality's name to {kind: ..., file: ...}")
    roots = _data_roots(manifest, manifest_path, data_roots)
    layout, assigned = _rows_layout(manifest, manifest_path, roots, modalities)
    specs, parts = {}, {}
    for name, entry in modalities.items():
        vocabularies = _vocabularies((run_specs or {}).get(name))
        specs[name], parts[name] = _load_modality(str(name), entry, manifest_path, layout, roots, vocabularies)
        coded = isinstance((entry or {}).get("categorical"), dict)
        if (entry or {}).get("categorical") and not coded and not vocabularies:
            warnings.warn(
                f"{manifest_path}: modalities.{name}.categorical: the run did not record its categories (it was "
                "trained before modalmoe recorded them), so they are coded from these rows and a code may name "
                "another category than in training; retrain, or give the codes in the file (categorical: {column: K})",
                DataFormatWarning,
                stacklevel=2,
            )
    keys = list(layout.rows)
    index = np.concatenate([layout.rows[k] for k in keys])
    split = np.concatenate([np.full(len(layout.rows[k]), k if assigned else "", dtype=object) for k in keys])
    labelled = bool(layout.target)
    target = _targets(layout, keys, task_type, classes, manifest_path) if labelled else None
    n = len(index)
    if target is None:
        target = np.full(n, -1, np.int64) if task_type == "classification" else np.full(n, np.nan, np.float32)

    def cat(m, attr):
        values = [getattr(parts[m][k], attr) for k in keys]
        if values[0] is None:
            return None
        if isinstance(values[0], list):
            return [v for chunk in values for v in chunk]
        return np.concatenate(values)

    dataset = MultimodalDataset(
        specs=specs,
        inputs={m: cat(m, "x") for m in specs},
        target=target,
        present={m: cat(m, "present") for m in specs},
        lengths={m: cat(m, "lengths") for m in specs if cat(m, "lengths") is not None},
        classes=tuple(classes) if classes else None,
        task_type=task_type,
    )
    return Rows(dataset, index, split, labelled, str(manifest.get("name", manifest_path.parent.name)))


def _vocabularies(spec: ModalitySpec | None) -> dict[str | int, tuple] | None:
    """A run's categories of one modality, keyed by column name (index when unnamed)."""
    if spec is None or not spec.categories:
        return None
    return {
        (spec.columns[j] if j < len(spec.columns) and spec.columns[j] else j): v for j, v in spec.categories.items()
    }


def _rows_layout(manifest, manifest_path: Path, roots, modalities) -> tuple[_Layout, bool]:
    """The layout of new rows and whether the manifest assigns them to splits."""
    target_field = manifest.get("target", "label")
    entry = manifest.get("splits")
    if entry is None:
        first = next(iter(modalities.values())) or {}
        files = _resolve_files(first.get("file"), manifest_path, f"modalities.{next(iter(modalities))}.file", roots)
        if isinstance(files, dict):
            raise _error(manifest_path, "splits", "files per split need 'splits' ({file: {train: ..., ...}})")
        n = _row_count(files)
        return _Layout(False, {ALL: np.arange(n)}, {ALL: files}, target_field, {}, n), False
    if not isinstance(entry, dict) or "file" not in entry:
        raise _error(manifest_path, "splits", "expected {file: ...} (or leave 'splits' out for unlabelled rows)")
    _check_keys(entry, _SPLITS_KEYS, manifest_path, "splits")
    files = _resolve_files(entry["file"], manifest_path, "splits.file", roots)
    if isinstance(files, dict):
        target = {s: _read_column(files[s], target_field) for s in SPLITS if _has_field(files[s], target_field)}
        rows = {s: np.arange(_row_count(files[s])) for s in SPLITS}
        if target and len(target) < len(SPLITS):
            raise _error(manifest_path, "splits.file", f"field {target_field!r} is in some split files, not all")
        return _Layout(True, rows, files, target_field, target), True
    field = str(entry.get("field", "split"))
    n = _row_count(files)
    target = {}
    if _has_field(files, target_field):
        target = {ALL: _read_column(files, target_field)}
    if _has_field(files, field):
        assignment = _read_column(files, field).astype(str)
        names = [s for s in SPLITS if (assignment == s).any()] + sorted(set(assignment.tolist()) - set(SPLITS))
        rows = {s: np.flatnonzero(assignment == s) for s in names}
        target = {s: target[ALL][rows[s]] for s in rows} if target else {}
        return _Layout(False, rows, dict.fromkeys(rows, files), target_field, target, n), True
    return _Layout(False, {ALL: np.arange(n)}, {ALL: files}, target_field, target, n), False


def _has_field(path: Path, field: str) -> bool:
    if path.suffix == ".npz":
        with _open_npz(path) as npz:
            return field in npz.files
    return field in _parquet_metadata(path).schema.names


def _row_count(path: Path) -> int:
    if path.suffix == ".npz":
        with _open_npz(path) as npz:
            key = "x" if "x" in npz.files else npz.files[0]
            return len(npz[key])
    return _parquet_metadata(path).num_rows


def _parquet_metadata(path: Path):
    # local import: as in manifest.py, pyarrow is imported only when a Parquet file is read
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path)
    except (OSError, pa.ArrowException) as e:
        raise DataFormatError(f"{path}: not a Parquet file, or a damaged one ({e}); re-export it") from e


def _targets(layout: _Layout, keys, task_type: str, classes, manifest_path: Path) -> np.ndarray:
    raw = np.concatenate([layout.target[k] for k in keys])
    file = next(iter(layout.index.values()))
    if task_type != "classification":
        if raw.dtype.kind not in "biuf":
            raise _error(file, layout.field, f"a regression target must be numeric, got dtype {raw.dtype}")
        return raw.astype(np.float32)
    if raw.dtype.kind in "UO":
        if not classes:
            raise _error(file, layout.field, "string labels, but the run's classes are not known (its task.json)")
        lookup = {str(c): i for i, c in enumerate(classes)}
        unknown = sorted({str(x) for x in raw.tolist()} - set(lookup))
        if unknown:
            raise _error(file, layout.field, f"labels {unknown[:5]} are not among the run's classes {list(classes)}")
        return np.array([lookup[str(x)] for x in raw.tolist()], dtype=np.int64)
    values = raw.astype(np.int64)
    count = len(classes) if classes else None
    if (values < 0).any() or (count is not None and (values >= count).any()):
        raise _error(file, layout.field, f"integer labels must be class indices 0..{(count or 1) - 1}")
    return values
