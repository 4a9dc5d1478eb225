"""Users' own data: the documented directory format (``manifest.yaml`` plus data files).

``load`` returns a ``Task`` whose ``splits`` hold "train", "valid" and "test"
``MultimodalDataset``s. Every problem raises ``DataFormatError`` with a message that names
the offending file and field (``<file>: field '<field>': <problem>``).

The directory format
--------------------

A directory holds ``manifest.yaml`` (UTF-8 text) and the data files it names (paths relative
to the directory)::

    name: my-task                     # optional; default: the directory's name
    description: where the data is from, its license
    task: classification              # or regression; default classification
    target: label                     # the target's field in the split files; default "label"
    classes: [neg, pos]               # optional, classification only
    modalities:
      image: {kind: image, file: image.npz}
      audio: {kind: sequence, file: audio.npz}
      clinical: {kind: tabular, file: clinical.parquet, columns: [age, bmi, sex], categorical: [sex]}
      notes: {kind: text, file: notes.parquet, column: text}
    splits: {file: splits.parquet, field: split}
    data_roots: [../shared-features]  # optional: directories outside this one that files may be in

Keys of a modality: ``kind`` (one of ``KINDS``), ``file``, and optionally ``description``,
``columns`` (tabular: the columns; vector and sequence: names of the features or channels),
``categorical`` (tabular) and ``column`` (text in Parquet). An unknown key is an error that
names the closest valid one.

Every ``file`` must lie inside the manifest's directory (subdirectories included) once
resolved: ``..``, an absolute path, or a symlink that leads outside is refused, as a safe
archive extractor refuses such members, so a copied or downloaded manifest reads only the
files it ships with. Data shared between tasks is opted in explicitly: list its directories
under ``data_roots`` (absolute, ``~``, or relative to the manifest's directory; each must exist), or
pass ``load(path, data_roots=[...])``.

Two layouts, chosen by the form of ``file`` (every ``file`` of a manifest takes the same form):

- **One file per modality for all samples.** ``splits.file`` is the index file: it holds
  ``splits.field`` (default ``"split"``), one of ``train``/``valid``/``test`` per sample
  (strings), and the target field. Row ``i`` of every file is sample ``i``: files are
  matched by position, so they must all hold the same number of rows.
- **One file per modality per split.** Every ``file`` is a mapping
  ``{train: a.npz, valid: b.npz, test: c.npz}``; ``splits.file`` maps each split to the
  file holding its target (``splits.field`` is not used).

The target lives in the split files and nowhere else, so a modality file never carries
(and can never leak) the label; a split file may be one of the modality files too.
Classification targets are integers ``0..K-1`` or strings (mapped to ``classes``, or to the
sorted set of labels when ``classes`` is absent); regression targets are numbers. Every class
must occur in the train split: when the classes are inferred from the labels, a label that
only valid or test holds (or an integer class index no split holds, as labels counted from 1
leave class 0) is an error; a class listed in ``classes`` without a training sample is
allowed with a ``DataFormatWarning``.

NPZ files (always read with ``allow_pickle=False``; store strings as ``np.array(values, dtype=str)``):

- ``x``: ``[N, C, H, W]`` image; ``[N, L, C]`` sequence, zero-padded to ``L``;
  ``[N, F]`` vector or tabular; ``[N]`` strings for text.
- ``lengths`` (sequence only, optional; default ``L``): ``[N]`` valid steps, ``1..L`` for
  present samples.
- ``present`` (optional): ``[N]`` bool; False marks a sample that lacks the modality. Its row
  may hold anything (NaN included): ``MultimodalDataset`` replaces it with zeros.

Parquet files (read with ``pyarrow.parquet.read_table``) hold tabular, vector or text
modalities. Tabular and vector list their ``columns`` (always: a table often holds the
label too). Text reads ``column`` (default: the modality's name); a null means the sample
lacks the modality.

Tabular modalities (NPZ or Parquet):

- numeric columns become float. A null (Parquet) makes the sample lack the modality: the
  batch contract has no per-feature mask, and a filled-in value would be a zero pretending
  to be data. A NaN or Inf in a present sample is an error.
- ``categorical: [sex]``: the column's values (any type) become integer codes ``0..K-1``
  over the sorted values seen in the train split's present samples; unseen values and
  missing ones (a Parquet null, an NPZ NaN) get code ``K``. The spec records cardinality
  ``K + 1``, its ``categories`` the values in code order (a run records them, and
  ``modalmoe predict`` codes new rows with them), and the modality's ``description`` lists them.
- ``categorical: {sex: 3}``: the column already holds integer codes ``0..2``.
- ``categorical: {sex: [F, M]}``: the column already holds codes ``0..2`` of these categories
  (2: unseen or missing), as ``save`` writes them.

A sample lacking a modality is recorded in ``present``; a NaN or Inf in a present sample of a
numeric modality is an error (clean the data, or mark the sample absent).

A damaged or truncated file (a bad zip directory or CRC in an NPZ, an unreadable Parquet
page, or a page checksum that fails where the writer stored them) is an error naming the
file: re-export it.

``save(task, directory)`` writes any ``Task`` in this format (one NPZ per modality per split),
so a pickle-based dataset can be converted once and loaded without pickle from then on.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from modalmoe.data.batch import KINDS, TASK_TYPES, ModalitySpec, MultimodalDataset, Task
from modalmoe.io import atomic_path, atomic_write_text

SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.yaml"

_TOP_KEYS = ("name", "description", "task", "target", "classes", "modalities", "splits", "data_roots")
_MODALITY_KEYS = ("kind", "file", "columns", "categorical", "column", "description")
_SPLITS_KEYS = ("file", "field")
_PARQUET = (".parquet", ".pq")


class DataFormatError(ValueError):
    """Data that does not follow its documented layout; the message names the file and the field."""


class DataFormatWarning(UserWarning):
    """Data that loads but is likely not what was meant (a declared class without training samples)."""


class UntrustedPickleError(DataFormatError):
    """A pickle file was not loaded because the caller did not vouch for it (``trust=True``)."""


def _error(file: Path | str, field: str, problem: str) -> DataFormatError:
    return DataFormatError(f"{file}: field {field!r}: {problem}")


# ---------------------------------------------------------------------------------------------
# In-memory pieces
# ---------------------------------------------------------------------------------------------


@dataclass
class _Part:
    """One file's rows of one modality.

    Attributes:
        x: ``[n, ...]`` float32 array, or ``n`` strings for text.
        present: ``[n]`` bool.
        lengths: ``[n]`` valid steps (sequences only).
    """

    x: np.ndarray | list[str]
    present: np.ndarray
    lengths: np.ndarray | None = None

    def take(self, rows: np.ndarray) -> _Part:
        x = [self.x[i] for i in rows.tolist()] if isinstance(self.x, list) else self.x[rows]
        return _Part(x, self.present[rows], None if self.lengths is None else self.lengths[rows])


@dataclass
class _Table:
    """Raw tabular columns before encoding.

    Attributes:
        names: column names ("" when an NPZ file's columns are unnamed).
        fields: how each column is named in errors (a Parquet column, or ``x[:, j]``).
        values: per column ``[n]``: float64 for numbers, objects for Parquet categories.
        null: per column ``[n]`` bool.
        present: ``[n]`` bool from an NPZ ``present`` key (all True for Parquet).
    """

    names: list[str]
    fields: list[str]
    values: list[np.ndarray]
    null: list[np.ndarray]
    present: np.ndarray


@dataclass
class _Source:
    """One modality file, the index file it matches row for row, and split -> its rows in the file."""

    path: Path
    index: Path
    rows: dict[str, np.ndarray]
    count: int


@dataclass
class _Layout:
    """Where each split's samples are.

    Attributes:
        per_split: one file per split (True) or one file for all samples (False).
        rows: split -> its rows in its file.
        index: split -> the file holding its target (the same file for all when not per_split).
        field: the target's field name.
        target: split -> raw target values ``[N_split]`` as stored.
        total: rows of the one index file (when not per_split).
    """

    per_split: bool
    rows: dict[str, np.ndarray]
    index: dict[str, Path]
    field: str
    target: dict[str, np.ndarray]
    total: int = 0

    def sources(self, files: Path | dict[str, Path]) -> list[_Source]:
        if isinstance(files, Path):
            return [_Source(files, next(iter(self.index.values())), self.rows, self.total)]
        return [_Source(files[s], self.index[s], {s: self.rows[s]}, len(self.rows[s])) for s in self.rows]


# ---------------------------------------------------------------------------------------------
# The directory format
# ---------------------------------------------------------------------------------------------


def load(path: str | Path, *, data_roots: Iterable[str | Path] = ()) -> Task:
    """Load a data directory described by a ``manifest.yaml`` (see the module docstring).

    Args:
        path: the directory, or its ``manifest.yaml``.
        data_roots: more directories (besides the manifest's and its ``data_roots``) that the
            manifest's files may be in, for data shared between tasks; relative to the
            current directory.

    Returns:
        The task; each split a ``MultimodalDataset`` (sequences ``[N, Lmax, C]`` with lengths).

    Raises:
        DataFormatError: naming the file and field of the first problem found.
    """
    manifest_path = _manifest_path(path)
    manifest = _read_manifest(manifest_path)
    task_type = manifest.get("task", "classification")
    if task_type not in TASK_TYPES:
        raise _error(manifest_path, "task", f"unknown task {task_type!r}; choose one of {', '.join(TASK_TYPES)}")
    modalities = manifest.get("modalities")
    if not isinstance(modalities, Mapping) or not modalities:
        raise _error(manifest_path, "modalities", "must map each modality's name to {kind: ..., file: ...}")
    roots = _data_roots(manifest, manifest_path, data_roots)
    layout = _read_layout(manifest, manifest_path, roots)
    targets, classes = _read_targets(manifest, manifest_path, layout, task_type)
    specs: dict[str, ModalitySpec] = {}
    parts: dict[str, dict[str, _Part]] = {}
    for name, entry in modalities.items():
        specs[name], parts[name] = _load_modality(str(name), entry, manifest_path, layout, roots)
    splits = {
        s: MultimodalDataset(
            specs=specs,
            inputs={m: parts[m][s].x for m in specs},
            target=targets[s],
            present={m: parts[m][s].present for m in specs},
            lengths={m: parts[m][s].lengths for m in specs if parts[m][s].lengths is not None},
            classes=classes,
            task_type=task_type,
        )
        for s in SPLITS
    }
    name = str(manifest.get("name", manifest_path.parent.name))
    return Task(name, splits, str(manifest.get("description", f"loaded from {manifest_path}")))


def _manifest_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise DataFormatError(
            f"{path}: manifest not found (a data directory holds a {MANIFEST}; see modalmoe.data.formats)"
        )
    return path


def _read_manifest(path: Path) -> dict:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataFormatError(f"{path}: cannot be read: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8")  # YAML itself drops a leading byte-order mark
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataFormatError(
            f"{path}: not UTF-8 text (byte {data[e.start]:#04x} on line {line}); save it as UTF-8 "
            "(for a Latin-1 file: iconv -f latin1 -t utf-8)"
        ) from e
    try:
        manifest = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DataFormatError(f"{path}: not valid YAML: {_yaml_problem(e)}") from e
    if not isinstance(manifest, dict):
        raise DataFormatError(f"{path}: must be a mapping with keys {', '.join(_TOP_KEYS)}")
    _check_keys(manifest, _TOP_KEYS, path, "(top level)")
    return manifest


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's error on one line: what is wrong and where (its own message spans several lines)."""

    def at(mark) -> str:
        return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

    problem = getattr(error, "problem", None)
    if problem is None:
        return " ".join(str(error).split())
    context = getattr(error, "context", None)
    context = f" ({context}{at(getattr(error, 'context_mark', None))})" if context else ""
    return f"{problem}{at(getattr(error, 'problem_mark', None))}{context}"


def _data_roots(manifest: Mapping, manifest_path: Path, extra: Iterable[str | Path]) -> tuple[Path, ...]:
    """The resolved directories the manifest's files may be in: its own first, then ``data_roots``."""
    value = manifest.get("data_roots", [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _error(
            manifest_path, "data_roots", f"expected a list of directories that files may be read from, got {value!r}"
        )
    roots = [manifest_path.parent.resolve()]
    for v in value:
        root = (manifest_path.parent / Path(v).expanduser()).resolve()  # an absolute path stays as it is
        if not root.is_dir():
            raise _error(manifest_path, "data_roots", f"{v!r} ({root}) is not a directory")
        roots.append(root)
    for v in extra:
        root = Path(v).expanduser().resolve()
        if not root.is_dir():
            raise DataFormatError(f"load(data_roots=...): {v} is not a directory")
        roots.append(root)
    return tuple(roots)


def _check_keys(entry: Mapping, allowed: Sequence[str], file: Path, where: str) -> None:
    for key in entry:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _error(file, where, f"unknown key {key!r}{hint} (valid keys: {', '.join(allowed)})")


def _resolve_files(value: Any, manifest_path: Path, field: str, roots: Sequence[Path]) -> Path | dict[str, Path]:
    """A ``file`` entry as one path or split -> path, each checked to be inside ``roots``, to
    exist and to be NPZ or Parquet."""
    if isinstance(value, Mapping):
        _check_split_names(value, manifest_path, field)
        return {s: _resolve_file(value[s], manifest_path, f"{field}.{s}", roots) for s in SPLITS}
    return _resolve_file(value, manifest_path, field, roots)


def _resolve_file(value: Any, manifest_path: Path, field: str, roots: Sequence[Path]) -> Path:
    if not isinstance(value, str) or not value:
        raise _error(manifest_path, field, f"expected a file name, got {value!r}")
    path = manifest_path.parent / value
    # As a safe archive extractor does: the resolved path (``..``, absolute paths and symlinks
    # followed) must stay inside the data directory, so a manifest copied or downloaded from
    # elsewhere reads no file it does not ship with, unless it says so in ``data_roots``.
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        raise _error(
            manifest_path,
            field,
            f"{value!r} resolves to {resolved}, outside the manifest's directory {roots[0]}; move the file into "
            "it, or list the file's directory under the manifest's top-level key 'data_roots' "
            "(or pass load(..., data_roots=[...]))",
        )
    if not path.is_file():
        raise _error(manifest_path, field, f"file not found: {path}")
    if path.suffix not in (".npz", *_PARQUET):
        raise _error(manifest_path, field, f"{path.name}: unsupported file type; use .npz or .parquet")
    return path


def _check_split_names(names: Iterable, file: Path | str, field: str) -> None:
    names = list(names)
    for name in names:
        if name not in SPLITS:
            close = difflib.get_close_matches(str(name), SPLITS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _error(file, field, f"unknown split {name!r}{hint} (splits are {', '.join(SPLITS)})")
    for split in SPLITS:
        if split not in names:
            raise _error(file, field, f"split {split!r} is missing (every task has {', '.join(SPLITS)})")


def _read_layout(manifest: Mapping, manifest_path: Path, roots: Sequence[Path]) -> _Layout:
    entry = manifest.get("splits")
    if not isinstance(entry, Mapping) or "file" not in entry:
        raise _error(
            manifest_path, "splits", "expected {file: splits.npz} or {file: {train: ..., valid: ..., test: ...}}"
        )
    _check_keys(entry, _SPLITS_KEYS, manifest_path, "splits")
    target_field = manifest.get("target", "label")
    if not isinstance(target_field, str):
        raise _error(manifest_path, "target", f"expected the target's field name, got {target_field!r}")
    files = _resolve_files(entry["file"], manifest_path, "splits.file", roots)
    if isinstance(files, dict):
        if "field" in entry:
            raise _error(manifest_path, "splits.field", "applies to one index file only (files per split need none)")
        target = {s: _read_column(files[s], target_field) for s in SPLITS}
        for s in SPLITS:
            if len(target[s]) == 0:
                raise _error(files[s], target_field, f"split {s!r} is empty: the file holds no sample")
        return _Layout(True, {s: np.arange(len(target[s])) for s in SPLITS}, files, target_field, target)
    field = str(entry.get("field", "split"))
    assignment = _read_strings(files, field)
    bad = sorted(set(assignment.tolist()) - set(SPLITS))
    if bad:
        raise _error(files, field, f"unknown split names {bad[:5]} (allowed: {', '.join(SPLITS)})")
    rows = {s: np.flatnonzero(assignment == s) for s in SPLITS}
    for s in SPLITS:
        if len(rows[s]) == 0:
            raise _error(files, field, f"split {s!r} is empty: no sample is assigned to it")
    values = _read_column(files, target_field)
    if len(values) != len(assignment):
        raise _error(files, target_field, f"{len(values)} values, but field {field!r} has {len(assignment)}")
    target = {s: values[rows[s]] for s in SPLITS}
    return _Layout(False, rows, dict.fromkeys(SPLITS, files), target_field, target, len(assignment))


def _read_targets(
    manifest: Mapping, manifest_path: Path, layout: _Layout, task_type: str
) -> tuple[dict[str, np.ndarray], tuple[str, ...] | None]:
    """Split -> target ``[N_split]`` (class indices or values) and the class names."""
    raw = layout.target
    classes = manifest.get("classes")
    if task_type == "regression":
        if classes is not None:
            raise _error(manifest_path, "classes", "applies to classification only (task is regression)")
        return {s: _numeric_target(raw[s], layout.index[s], layout.field) for s in SPLITS}, None
    if classes is not None and (not isinstance(classes, list) or not classes):
        raise _error(manifest_path, "classes", f"expected a non-empty list of class names, got {classes!r}")
    return _class_targets(raw, layout, None if classes is None else tuple(str(c) for c in classes))


def _numeric_target(values: np.ndarray, file: Path, field: str) -> np.ndarray:
    if values.dtype.kind not in "biuf":
        raise _error(file, field, f"a regression target must be numeric, got dtype {values.dtype}")
    _check_finite(values, file, field)
    return values.astype(np.float32)


def _class_targets(
    raw: Mapping[str, np.ndarray], layout: _Layout, classes: tuple[str, ...] | None
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    declared = classes is not None
    if all(v.dtype.kind in "UO" for v in raw.values()):
        if classes is None:
            classes = tuple(sorted({str(x) for v in raw.values() for x in v.tolist()}))
        lookup = {c: i for i, c in enumerate(classes)}
        out = {}
        for s, v in raw.items():
            unknown = sorted({str(x) for x in v.tolist()} - set(lookup))
            if unknown:
                raise _error(
                    layout.index[s], layout.field, f"labels {unknown[:5]} are not among classes {list(classes)}"
                )
            out[s] = np.array([lookup[str(x)] for x in v.tolist()], dtype=np.int64)
        _check_classes_in_train(out, classes, layout.index, layout.field, declared=declared, names=True)
        return out, classes
    out = {}
    for s, v in raw.items():
        file = layout.index[s]
        v = v.astype(np.int64) if v.dtype.kind == "b" else v
        if v.dtype.kind not in "biuf":
            raise _error(file, layout.field, f"class labels must be integers or strings, got dtype {v.dtype}")
        _check_finite(v, file, layout.field)
        if v.size and (np.any(v != np.round(v)) or v.min() < 0):
            raise _error(file, layout.field, "integer class labels must be whole numbers >= 0")
        out[s] = v.astype(np.int64)
    top = max(int(v.max()) for v in out.values())
    if classes is None:
        # Named here, not per split, so that every split reports the same number of classes.
        classes = tuple(str(i) for i in range(top + 1))
    elif top >= len(classes):
        s = next(s for s in SPLITS if int(out[s].max()) == top)
        raise _error(layout.index[s], layout.field, f"label {top} but only {len(classes)} classes are listed")
    _check_classes_in_train(out, classes, layout.index, layout.field, declared=declared, names=False)
    return out, classes


_DECLARE = "or list every class under the manifest's 'classes' to keep one that training lacks"


def _check_classes_in_train(
    target: Mapping[str, np.ndarray],
    classes: Sequence[str],
    files: Mapping[str, Path | str],
    field: str,
    *,
    declared: bool,
    names: bool,
    declare: str = _DECLARE,
) -> None:
    """Every class needs a training sample, or the model silently gets a class it never learns.

    Inferred classes (from the labels) without one are an error naming the labels, file and
    split; declared ones (the user listed them) a ``DataFormatWarning``.

    Args:
        target: split -> class indices ``[N_split]``.
        classes: the class names.
        files: split -> the file holding its labels (for messages).
        field: the labels' field.
        declared: the classes were listed by the user, not inferred from the labels.
        names: the files hold class names (True) or integer indices (False).
        declare: how to declare classes in this format ("" where it cannot).
    """
    untrained = sorted(set(range(len(classes))) - set(np.unique(target["train"]).tolist()))
    if not untrained:
        return
    if declared:
        warnings.warn(
            f"{files['train']}: field {field!r}: classes {[classes[i] for i in untrained][:5]} have no sample in "
            "the train split; a model trained on it never learns them",
            DataFormatWarning,
            stacklevel=2,
        )
        return
    hint = f" ({declare})" if declare else ""
    for s in ("valid", "test"):
        held = sorted(set(untrained) & set(np.unique(target[s]).tolist()))
        if held:
            labels = [classes[i] if names else i for i in held][:5]
            raise _error(
                files[s],
                field,
                f"labels {labels} occur in split {s!r} but never in the train split; every class must occur in "
                f"the train split{hint}",
            )
    raise _error(
        files["train"],
        field,
        f"class indices {untrained[:5]} have no sample in any split: integer labels are class indices "
        f"0..{len(classes) - 1}, every one in the train split (labels counted from 1? subtract 1){hint}",
    )


def _load_modality(
    name: str,
    entry: Any,
    manifest_path: Path,
    layout: _Layout,
    roots: Sequence[Path],
    vocabularies: Mapping[str | int, Sequence] | None = None,
) -> tuple[ModalitySpec, dict[str, _Part]]:
    """One modality's spec and its rows per split; ``vocabularies`` (column name, or index when
    unnamed -> values) codes categorical columns as a run did, instead of from these rows."""
    where = f"modalities.{name}"
    if not isinstance(entry, Mapping):
        raise _error(manifest_path, where, "expected a mapping {kind: ..., file: ...}")
    _check_keys(entry, _MODALITY_KEYS, manifest_path, where)
    kind = entry.get("kind")
    if kind not in KINDS:
        raise _error(manifest_path, f"{where}.kind", f"unknown modality kind {kind!r}; known kinds: {', '.join(KINDS)}")
    if "file" not in entry:
        raise _error(manifest_path, f"{where}.file", "missing: name the file holding this modality")
    files = _resolve_files(entry["file"], manifest_path, f"{where}.file", roots)
    if isinstance(files, dict) != layout.per_split:
        form = "one file per split" if layout.per_split else "one file for all samples"
        raise _error(manifest_path, f"{where}.file", f"'splits.file' gives {form}; use the same form here")
    _check_kind_keys(entry, kind, files, manifest_path, where)
    sources = layout.sources(files)
    if kind == "tabular" or (kind == "vector" and _is_parquet(sources[0].path)):
        extra, parts = _load_table_modality(entry, sources, manifest_path, where, layout.field, vocabularies)
    else:
        parts = [_read_part(source.path, kind, entry, name) for source in sources]
        extra = {"columns": _channel_names(entry, parts[0], kind, manifest_path, where)}
    fields = {"x"} | set(entry.get("columns") or []) | ({entry.get("column", name)} if kind == "text" else set())
    shape = _check_parts(parts, sources, kind, layout.field, fields)
    names = ", ".join(sorted({source.path.name for source in sources}))
    description = str(entry.get("description", f"{kind} from {names}"))
    if extra.get("described"):
        description += f"; categories: {extra['described']}"
    spec = ModalitySpec(
        name,
        kind,
        shape,
        categorical=extra.get("categorical", {}),
        columns=extra.get("columns", ()),
        description=description,
        categories=extra.get("categories", {}),
    )
    return spec, {
        s: part.take(rows) for part, source in zip(parts, sources, strict=True) for s, rows in source.rows.items()
    }


def _channel_names(entry: Mapping, part: _Part, kind: str, manifest_path: Path, where: str) -> tuple[str, ...]:
    """Names of an NPZ vector's features or a sequence's channels (the last axis of ``x``)."""
    columns = entry.get("columns")
    if columns is None:
        return ()
    if not isinstance(columns, list) or len(columns) != part.x.shape[-1]:
        raise _error(manifest_path, f"{where}.columns", f"must name the {part.x.shape[-1]} {kind} channels of 'x'")
    return tuple(str(c) for c in columns)


def _is_parquet(path: Path) -> bool:
    return path.suffix in _PARQUET


def _check_kind_keys(entry: Mapping, kind: str, files: Path | dict, manifest_path: Path, where: str) -> None:
    paths = list(files.values()) if isinstance(files, dict) else [files]
    parquet = any(_is_parquet(p) for p in paths)
    if parquet and kind in ("image", "sequence"):
        raise _error(manifest_path, f"{where}.file", f"{kind} modalities are read from .npz files (key 'x')")
    rules = {"columns": ("tabular", "vector", "sequence"), "categorical": ("tabular",), "column": ("text",)}
    for key, kinds in rules.items():
        if key in entry and kind not in kinds:
            raise _error(manifest_path, f"{where}.{key}", f"applies to {' and '.join(kinds)} modalities only")
    if "column" in entry and not parquet:
        raise _error(manifest_path, f"{where}.column", "applies to Parquet files only (NPZ text is key 'x')")
    if parquet and kind in ("tabular", "vector") and not isinstance(entry.get("columns"), list):
        raise _error(manifest_path, f"{where}.columns", "a Parquet table modality must list its columns")


def _check_count(n: int, source: _Source, field: str, target_field: str) -> None:
    if n != source.count:
        raise _error(
            source.path,
            field,
            f"{n} samples, but {source.index} field {target_field!r} has {source.count} (rows are matched by position)",
        )


def _check_parts(
    parts: Sequence[_Part], sources: Sequence[_Source], kind: str, target_field: str, fields: set[str]
) -> tuple[int | None, ...]:
    """Check row counts against the index files and per-sample shapes across files; the spec's shape."""
    shape = None
    for part, source in zip(parts, sources, strict=True):
        field = "x" if source.path.suffix == ".npz" else ", ".join(sorted(fields - {"x"}))
        _check_count(len(part.present), source, field, target_field)
        if kind == "text":
            this = ()
        elif kind == "sequence":
            this = (None, *part.x.shape[2:])
        else:
            this = tuple(part.x.shape[1:])
        if shape is not None and this != shape:
            raise _error(source.path, field, f"per-sample shape {this} differs from {shape} in {sources[0].path}")
        shape = this
    return shape


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------


def _reason(error: BaseException, limit: int = 120) -> str:
    """An exception's message on one line, cut to ``limit`` characters (some quote raw bytes)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _damaged(path: Path, error: BaseException, field: str | None = None) -> DataFormatError:
    where = f"field {field!r}: " if field else ""
    return DataFormatError(f"{path}: {where}the file is damaged or truncated ({_reason(error)}); re-export it")


def _open_npz(path: Path):
    try:
        npz = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e):  # neither a zip nor a .npy: numpy would have tried pickle
            raise DataFormatError(f"{path}: not an .npz archive (write one with np.savez); re-export it") from e
        raise _damaged(path, e) from e
    except OSError as e:
        raise DataFormatError(f"{path}: not a readable .npz file: {e}") from e
    except MemoryError:
        raise
    except Exception as e:  # BadZipFile (truncated), EOFError (empty), NotImplementedError (a garbled version)
        raise _damaged(path, e) from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataFormatError(
            f"{path}: holds a single .npy array, not an .npz archive; save it with np.savez(path, x=array)"
        )
    return npz


def _intact(npz) -> bool:
    """Whether every member of the archive passes its CRC check (reads the whole file)."""
    try:
        return npz.zip.testzip() is None
    except Exception:
        return False


def _npz_get(npz, path: Path, key: str, *, required: bool = True) -> np.ndarray | None:
    if key not in npz.files:
        if not required:
            return None
        close = difflib.get_close_matches(key, npz.files, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise _error(path, key, f"missing{hint} (keys in the file: {', '.join(npz.files) or 'none'})")
    member = f"{key}.npy" if f"{key}.npy" in npz.zip.namelist() else key
    try:
        with npz.zip.open(member) as f:
            array = np.lib.format.read_array(f, allow_pickle=False)
            # zipfile checks a member's CRC only on reaching its end, which read_array does not
            # when a damaged header claims fewer values than the file holds.
            trailing = len(f.read())
    except MemoryError:
        raise
    except Exception as e:
        # A damaged member fails here, not at opening: a bad CRC, or a header that numpy
        # cannot parse (ValueError, tokenize and zlib errors).
        if isinstance(e, ValueError) and "allow_pickle" in str(e) and _intact(npz):
            # numpy refuses object arrays when allow_pickle=False: loading them would run pickle.
            raise _error(
                path, key, "holds Python objects, which would need pickle; store strings as np.array(values, dtype=str)"
            ) from e
        raise _damaged(path, e, key) from e
    if trailing:
        raise _damaged(path, ValueError(f"{trailing} bytes after the array its header describes"), key)
    return array


def _read_parquet(path: Path, columns: Sequence[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq  # optional dependency, needed only for Parquet files

    unreadable = (OSError, pa.ArrowException)  # ArrowInvalid, ArrowIOError, thrift and decoding errors
    try:
        names = pq.read_schema(path).names
    except unreadable as e:
        raise DataFormatError(f"{path}: not a Parquet file, or a damaged one ({_reason(e)}); re-export it") from e
    for column in columns:
        if column not in names:
            close = difflib.get_close_matches(column, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _error(path, column, f"no such column{hint} (columns: {', '.join(names)})")
    try:
        # Damaged pages fail only here; page checksums, where the writer stored them, catch
        # damage that would otherwise decode into wrong values.
        return pq.read_table(path, columns=list(columns), page_checksum_verification=True)
    except unreadable as e:
        raise _damaged(path, e) from e


def _read_column(path: Path, field: str) -> np.ndarray:
    """One index field (target or split) ``[N]``; nulls are errors."""
    if path.suffix == ".npz":
        with _open_npz(path) as npz:
            values = _npz_get(npz, path, field)
    else:
        column = _read_parquet(path, [field]).column(field)
        if _is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        if column.null_count:
            raise _error(path, field, f"{column.null_count} null values; every sample needs one")
        values = np.asarray(column.to_pylist()) if _is_text_type(column.type) else column.to_numpy()
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise _error(path, field, f"expected one value per sample [N], got shape {values.shape}")
    return values


def _read_strings(path: Path, field: str) -> np.ndarray:
    values = _read_column(path, field)
    if values.dtype.kind not in "UO":
        raise _error(path, field, f"expected split names as strings (train/valid/test), got dtype {values.dtype}")
    return values.astype(str)


def _is_dictionary(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_dictionary(arrow_type)


def _is_text_type(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _check_finite(
    values: np.ndarray, file: Path | str, field: str, hint: str = "clean them, or mark those samples absent ('present')"
) -> None:
    """Raise naming how many NaN and Inf values ``values`` holds, if any."""
    if values.dtype.kind != "f":
        return
    finite = np.isfinite(values)
    if finite.all():
        return
    nan = int(np.isnan(values).sum())
    inf = int(values.size - finite.sum() - nan)
    rows = int((~finite).reshape(len(values), -1).any(axis=1).sum()) if values.ndim else 1
    raise _error(
        file,
        field,
        f"{nan} NaN and {inf} Inf values in {rows} samples; {hint}",
    )


def _read_part(path: Path, kind: str, entry: Mapping, name: str) -> _Part:
    """An NPZ image, sequence, vector or text modality, or a Parquet text column."""
    if _is_parquet(path):
        return _read_parquet_text(path, str(entry.get("column", name)))
    with _open_npz(path) as npz:
        x = _npz_get(npz, path, "x")
        present = _read_present(npz, path, len(x))
        lengths = _npz_get(npz, path, "lengths", required=False)
    if lengths is not None and kind != "sequence":
        raise _error(path, "lengths", f"applies to sequence modalities only (this one is {kind})")
    if kind == "text":
        if x.ndim != 1 or x.dtype.kind != "U":
            raise _error(path, "x", f"text must be [N] strings (dtype str), got dtype {x.dtype} and shape {x.shape}")
        return _Part([str(v) if p else "" for v, p in zip(x.tolist(), present.tolist(), strict=True)], present)
    x = _numeric_x(x, kind, path, present)
    if kind == "sequence":
        return _Part(x, present, _read_lengths(lengths, x, present, path))
    return _Part(x, present)


_NDIM = {
    "image": (4, "[N, C, H, W] (add a channel axis for grey images: x[:, None])"),
    "sequence": (3, "[N, L, C] zero-padded to L"),
    "vector": (2, "[N, F]"),
}


def _numeric_x(x: np.ndarray, kind: str, path: Path, present: np.ndarray) -> np.ndarray:
    ndim, layout = _NDIM[kind]
    if x.ndim != ndim:
        raise _error(path, "x", f"kind {kind!r} needs {layout}, got shape {x.shape}")
    if x.dtype.kind not in "biuf":
        raise _error(path, "x", f"kind {kind!r} needs numbers, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    # Absent rows may hold anything (MultimodalDataset zeroes them); only present samples must be finite.
    _check_finite(x[present] if not present.all() else x, path, "x")
    return x


def _read_present(npz, path: Path, n: int) -> np.ndarray:
    present = _npz_get(npz, path, "present", required=False)
    if present is None:
        return np.ones(n, dtype=bool)
    if present.shape != (n,) or present.dtype.kind not in "biu" or not np.isin(present, (0, 1)).all():
        raise _error(path, "present", f"expected [{n}] booleans, got dtype {present.dtype} and shape {present.shape}")
    return present.astype(bool)


def _read_lengths(lengths: np.ndarray | None, x: np.ndarray, present: np.ndarray, path: Path) -> np.ndarray:
    n, steps = x.shape[:2]
    if lengths is None:
        return np.where(present, steps, 0)
    if lengths.shape != (n,) or lengths.dtype.kind not in "iu":
        raise _error(path, "lengths", f"expected [{n}] integers, got dtype {lengths.dtype} and shape {lengths.shape}")
    lengths = np.where(present, lengths, 0).astype(np.int64)
    if (lengths > steps).any():
        i = int(np.argmax(lengths > steps))
        count = int((lengths > steps).sum())
        raise _error(
            path, "lengths", f"{count} lengths are longer than the padded axis L={steps} of 'x' (row {i}: {lengths[i]})"
        )
    short = present & (lengths < 1)
    if short.any():
        raise _error(
            path, "lengths", f"{int(short.sum())} present samples have length < 1; mark them absent in 'present'"
        )
    return lengths


def _read_parquet_text(path: Path, column: str) -> _Part:
    values = _read_parquet(path, [column]).column(column)
    if not _is_text_type(values.type):
        raise _error(path, column, f"a text column must hold strings, got {values.type}")
    strings = values.to_pylist()
    present = np.array([s is not None for s in strings], dtype=bool)
    return _Part([s if s is not None else "" for s in strings], present)


# ---------------------------------------------------------------------------------------------
# Tabular data
# ---------------------------------------------------------------------------------------------


def _load_table_modality(
    entry: Mapping,
    sources: Sequence[_Source],
    manifest_path: Path,
    where: str,
    target_field: str,
    vocabularies: Mapping[str | int, Sequence] | None = None,
) -> tuple[dict, list[_Part]]:
    """Read tabular (or Parquet vector) files; categories come from the train split's rows
    (or from ``vocabularies``, a run's, keyed by column name or index)."""
    tables = [_read_table(source.path, entry, manifest_path, where) for source in sources]
    for table, source in zip(tables, sources, strict=True):
        # Checked before the train rows index the table for its categories.
        field = "x" if source.path.suffix == ".npz" else ", ".join(table.names)
        _check_count(len(table.present), source, field, target_field)
    names = tables[0].names
    categorical, named = _categorical(entry.get("categorical", []), names, manifest_path, f"{where}.categorical")
    # New rows to predict (``rows.py``) may have no train split: their own rows then.
    split = "train" if any("train" in s.rows for s in sources) else next(iter(sources[0].rows))
    train_table, train_rows = next((t, s.rows[split]) for t, s in zip(tables, sources, strict=True) if split in s.rows)
    given = vocabularies or {}
    vocab = {
        j: list(given.get(names[j] or j, ())) or _vocabulary(train_table, j, train_rows)
        for j, k in categorical.items()
        if k is None
    }
    parts = [_encode_table(t, categorical, vocab, source.path) for t, source in zip(tables, sources, strict=True)]
    cards = {j: (k if k is not None else len(vocab[j]) + 1) for j, k in categorical.items()}
    described = "; ".join(
        f"{names[j] or j}={[str(v) for v in vocab[j]]} (code {len(vocab[j])}: unseen or missing)" for j in vocab
    )
    columns = tuple(names) if all(names) else ()
    categories = {j: tuple(_plain(v) for v in values) for j, values in (named | vocab).items()}
    return {"categorical": cards, "columns": columns, "described": described, "categories": categories}, parts


def _plain(value: Any) -> str | int | float | bool:
    """A category as JSON stores it (a run's task.json records them); other types as text."""
    return value if isinstance(value, (str, int, float, bool)) else str(value)


def _read_table(path: Path, entry: Mapping, manifest_path: Path, where: str) -> _Table:
    columns = entry.get("columns")
    if _is_parquet(path):
        table = _read_parquet(path, [str(c) for c in columns])
        values, null = zip(*(_arrow_values(table.column(str(c))) for c in columns), strict=True)
        n = table.num_rows
        return _Table([str(c) for c in columns], [str(c) for c in columns], list(values), list(null), np.ones(n, bool))
    with _open_npz(path) as npz:
        x = _npz_get(npz, path, "x")
        present = _read_present(npz, path, len(x))
    if x.ndim != 2 or x.dtype.kind not in "biuf":
        raise _error(path, "x", f"a tabular modality must be numeric [N, F], got dtype {x.dtype} and shape {x.shape}")
    if columns is not None and (not isinstance(columns, list) or len(columns) != x.shape[1]):
        raise _error(manifest_path, f"{where}.columns", f"must name the {x.shape[1]} columns of {path.name} 'x'")
    names = [str(c) for c in columns] if columns is not None else [""] * x.shape[1]
    x = x.astype(np.float64)
    fields = [f"x[:, {j}]" + (f" ({names[j]})" if names[j] else "") for j in range(x.shape[1])]
    return _Table(names, fields, list(x.T), [np.zeros(len(x), bool)] * x.shape[1], present)


def _arrow_values(column) -> tuple[np.ndarray, np.ndarray]:
    """A Parquet column as ``(values [n], null [n])``: float64 for numbers, else Python objects."""
    import pyarrow as pa
    import pyarrow.compute as pc

    null = column.is_null().to_numpy(zero_copy_only=False)
    kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    if (
        pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_decimal(kind)
    ):
        if pa.types.is_dictionary(column.type):
            column = column.cast(kind)
        filled = pc.fill_null(column, False if pa.types.is_boolean(kind) else 0)
        return filled.cast(pa.float64()).to_numpy(), null
    return np.array(column.to_pylist(), dtype=object), null


def _categorical(
    value: Any, names: Sequence[str], manifest_path: Path, field: str
) -> tuple[dict[int, int | None], dict[int, list]]:
    """Column index -> declared cardinality (codes already in the file) or None (encode from
    train); and column index -> the categories a declared list names (codes ``0..K-1``, ``K``
    unseen or missing: cardinality ``K + 1``)."""
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list):
        items = [(v, None) for v in value]
    else:
        raise _error(
            manifest_path, field, f"expected a list of columns or a mapping column -> cardinality, got {value!r}"
        )
    out, named = {}, {}
    for column, card in items:
        if column in names and column != "":
            j = list(names).index(column)
        elif isinstance(column, int) and 0 <= column < len(names):
            j = column
        else:
            raise _error(manifest_path, field, f"{column!r} is not one of the columns {list(names)}")
        if isinstance(card, list) and card:
            named[j], card = card, len(card) + 1
        if card is not None and (isinstance(card, bool) or not isinstance(card, int) or card < 1):
            raise _error(
                manifest_path,
                field,
                f"cardinality of {column!r} must be a positive integer (or the list of its categories), got {card!r}",
            )
        out[j] = card
    return out, named


def _vocabulary(table: _Table, j: int, rows: np.ndarray) -> list:
    values, null = table.values[j], table.null[j]
    if values.dtype.kind == "f":
        null = null | np.isnan(values)
    keep = rows[table.present[rows] & ~null[rows]]
    return sorted(set(values[keep].tolist()))


def _encode_table(table: _Table, categorical: Mapping[int, int | None], vocab: Mapping[int, list], path: Path) -> _Part:
    n = len(table.present)
    plain = [j for j in range(len(table.values)) if categorical.get(j) is None and j not in vocab]
    coded = [j for j, k in categorical.items() if k is not None]
    all_null = np.logical_and.reduce(table.null) if table.null else np.zeros(n, bool)
    present = table.present & ~all_null
    for j in plain + coded:
        present &= ~table.null[j]
    x = np.zeros((n, len(table.values)), dtype=np.float32)
    for j in plain + coded:
        values = table.values[j][present]
        if values.dtype.kind not in "biuf":
            raise _error(path, table.fields[j], "holds non-numeric values; list the column under 'categorical'")
        _check_finite(values, path, table.fields[j])
        if j in coded and (
            (values != np.round(values)).any() or (values < 0).any() or (values >= categorical[j]).any()
        ):
            raise _error(path, table.fields[j], f"categorical codes must be integers in [0, {categorical[j]})")
        x[present, j] = values
    for j, categories in vocab.items():
        x[:, j] = _codes(table.values[j], table.null[j], categories)
    return _Part(x, present)  # MultimodalDataset zeroes the rows of absent samples


def _codes(values: np.ndarray, null: np.ndarray, categories: list) -> np.ndarray:
    """Integer codes ``[n]``: the index in ``categories``; unseen, null or NaN -> ``len(categories)``."""
    lookup = {v: i for i, v in enumerate(categories)}
    lookup.update({str(v): i for i, v in enumerate(categories) if not isinstance(v, str) and str(v) not in lookup})
    unseen = len(categories)
    if values.dtype.kind == "f":
        null = null | np.isnan(values)
    return np.array(
        [
            unseen if missing else lookup.get(v, lookup.get(_plain(v), unseen))
            for v, missing in zip(values.tolist(), null.tolist(), strict=True)
        ],
        dtype=np.float32,
    )


# ---------------------------------------------------------------------------------------------
# Writing the directory format
# ---------------------------------------------------------------------------------------------


def save(task: Task, directory: str | Path) -> Path:
    """Write ``task`` in the directory format: one NPZ per modality per split, and the manifest.

    Files are written atomically: ``target.{split}.npz`` and ``modality-{name}.{split}.npz``
    (the prefix keeps a modality named "target" apart). Tabular categorical columns are
    declared with their cardinality (codes are stored as they are), so ``load(save(task, d))``
    gives back the same specs, tensors, present flags, lengths, targets and class names (a
    task without class names is saved with classes "0".."K-1"). ``groups`` and ``extras`` are not written.

    Args:
        task: any task (the output of any loader here or a bundled task).
        directory: created if needed.

    Returns:
        The path of the manifest written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    modalities = {name: _save_modality(task, name, directory) for name in task.modalities}
    for s in SPLITS:
        _save_npz(directory / f"target.{s}.npz", label=task.splits[s].target.numpy())
    classes = task.train.classes
    if classes is None and task.train.task_type == "classification":
        # Declared, so that a class the train split lacks loads back (with a warning) as it was.
        top = max((int(task.splits[s].target.max()) for s in SPLITS if len(task.splits[s].target)), default=-1)
        classes = tuple(str(i) for i in range(top + 1)) or None
    manifest = {
        "name": task.name,
        "description": task.description,
        "task": task.train.task_type,
        "target": "label",
        **({"classes": list(classes)} if classes is not None else {}),
        "modalities": modalities,
        "splits": {"file": {s: f"target.{s}.npz" for s in SPLITS}},
    }
    atomic_write_text(directory / MANIFEST, yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True))
    return directory / MANIFEST


def _save_modality(task: Task, name: str, directory: Path) -> dict:
    spec = task.specs[name]
    for s in SPLITS:
        data = task.splits[s]
        arrays = {"present": data.present[name].numpy()}
        value = data.inputs[name]
        arrays["x"] = np.array(value, dtype=str) if isinstance(value, list) else value.numpy()
        if name in data.lengths:
            arrays["lengths"] = data.lengths[name].numpy()
        _save_npz(directory / f"modality-{name}.{s}.npz", **arrays)
    entry: dict[str, Any] = {"kind": spec.kind, "file": {s: f"modality-{name}.{s}.npz" for s in SPLITS}}
    if spec.columns and spec.kind in ("tabular", "vector", "sequence"):
        entry["columns"] = list(spec.columns)
    if spec.categorical:
        entry["categorical"] = {
            (spec.columns[j] if spec.columns else j): list(spec.categories[j]) if j in spec.categories else k
            for j, k in spec.categorical.items()
        }
    if spec.description:
        entry["description"] = spec.description
    return entry


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # a file object: given a path, numpy would append ".npz" to the temp name
