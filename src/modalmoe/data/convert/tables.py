"""CSV, TSV and Parquet tables with one column group per modality.

    modalmoe data convert patients.csv --out patients --label outcome \\
        --modality vitals='hr,bp_*' --modality labs='lab_*' --modality notes=note

``--modality NAME=COLUMNS`` names a group: comma-separated column names or globs (``px_*``),
matched in the table's order. Without ``--modality``, every column but the label and split
columns is one modality named ``table``. Kinds, unless ``--kind NAME=KIND`` says otherwise:
a group of one text column whose values run to three words or more (median) is ``text``; a
group of more than 64 numeric columns is ``vector``; any other group is ``tabular``, its text
and boolean columns categorical (coded from the train split's values). A null (an empty CSV
cell) makes the sample lack that modality.

``--label COLUMN`` (default ``label``) holds the target; ``--split-column COLUMN`` optionally
holds train/valid/test. Several input files are splits named by their file names
(``train.csv test.csv``), read with one schema.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import numpy as np

from modalmoe.data.convert.base import (
    ConvertError,
    Draft,
    TableModality,
    check_task_type,
    label_numbers,
    label_strings,
    parse_assignments,
    parse_kinds,
    splits_of_files,
)

SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
VECTOR_ABOVE = 64


def detect(paths: list[Path]) -> bool:
    return all(p.is_file() and p.suffix.lower() in SUFFIXES for p in paths)


def convert(
    paths: list[Path],
    *,
    modality=(),
    kind=(),
    label=None,
    split_column=None,
    task="classification",
    unlabelled=False,
    **unused,
) -> Draft:

    given = sorted(k for k, v in unused.items() if v not in (None, (), [], False))
    if given:
        raise ConvertError(f"--{given[0].replace('_', '-')} does not apply to a table")
    names = splits_of_files(paths)
    tables = [_read(p) for p in paths]
    return from_tables(
        tables,
        paths,
        names,
        modality=modality,
        kind=kind,
        label=label,
        split_column=split_column,
        task=task,
        unlabelled=unlabelled,
    )


def from_tables(
    tables,
    paths: list[Path],
    names: list[str | None],
    *,
    modality=(),
    kind=(),
    label=None,
    split_column=None,
    task="classification",
    unlabelled=False,
    classes=None,
) -> Draft:
    """The draft of ``tables`` (``pyarrow.Table``s, one per input file, the splits ``names``)."""
    import pyarrow as pa  # local import: pyarrow is imported only when data is read or written

    task = check_task_type(task)
    if split_column and len(paths) > 1:
        raise ConvertError("--split-column: the input files are the splits already; give one of the two")
    first = tables[0].schema.names
    for p, t in zip(paths[1:], tables[1:], strict=True):
        if t.schema.names != first:
            raise ConvertError(f"{p}: columns {t.schema.names[:6]} differ from {paths[0].name}'s {first[:6]}")
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    source = ", ".join(map(str, paths))
    label = label or "label"
    if unlabelled:
        label_col = None
    elif label not in table.schema.names:
        raise ConvertError(
            f"{paths[0]}: no label column {label!r}; its columns: {', '.join(first[:20])}. "
            "Name it with --label COLUMN, or pass --unlabelled for new rows to predict"
        )
    else:
        label_col = label
    split = None
    if split_column:
        if split_column not in table.schema.names:
            raise ConvertError(f"--split-column {split_column}: no such column in {paths[0]}")
        split = np.array(
            [str(v).strip().lower() if v is not None else "" for v in table.column(split_column).to_pylist()]
        )
        split = np.array([{"val": "valid", "validation": "valid", "dev": "valid"}.get(s, s) for s in split])
        bad = sorted(set(split.tolist()) - {"train", "valid", "test"})
        if bad:
            raise ConvertError(f"{paths[0]}: column {split_column!r} holds {bad[:3]}, not train, valid or test")
    elif len(paths) > 1:
        split = np.concatenate([np.full(t.num_rows, s) for t, s in zip(tables, names, strict=True)])
    reserved = {c for c in (label_col, split_column) if c}
    groups = _groups(table.schema.names, parse_assignments(modality, "--modality"), reserved, paths[0])
    kinds = parse_kinds(kind)
    unknown = sorted(set(kinds) - set(groups))
    if unknown:
        raise ConvertError(f"--kind {unknown[0]}: no such modality; the modalities are {', '.join(groups)}")
    modalities = {name: _modality(name, cols, table, kinds.get(name), paths[0]) for name, cols in groups.items()}
    y = None
    if label_col is not None:
        raw = table.column(label_col).to_pylist()
        where = f"{paths[0]}: column {label_col!r}"
        y = label_strings(raw, where) if task == "classification" else label_numbers(raw, where)
    used = [c for m in modalities.values() for c in m.columns]
    notes = [] if modality else [f"one modality 'table' of {len(used)} columns; split it with --modality NAME=COLUMNS"]
    return Draft(
        table.num_rows,
        modalities,
        y,
        classes=classes if task == "classification" else None,
        split=split,
        table=table.select(list(dict.fromkeys(used))),
        task_type=task,
        source=source,
        notes=notes,
    )


def _read(path: Path):
    import pyarrow as pa
    import pyarrow.csv as csv
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pq.read_table(path)
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        return csv.read_csv(path, parse_options=csv.ParseOptions(delimiter=delimiter))
    except (OSError, pa.ArrowException) as e:
        raise ConvertError(f"{path}: cannot be read as a table: {' '.join(str(e).split())}") from e


def _groups(columns: list[str], selected: dict[str, str], reserved: set[str], path: Path) -> dict[str, list[str]]:
    available = [c for c in columns if c not in reserved]
    if not selected:
        if not available:
            raise ConvertError(f"{path}: no columns besides the label and split columns")
        return {"table": available}
    out, owner = {}, {}
    for name, spec in selected.items():
        cols: list[str] = []
        for item in (s.strip() for s in spec.split(",")):
            matched = (
                [c for c in available if fnmatch.fnmatchcase(c, item)]
                if any(ch in item for ch in "*?[")
                else ([item] if item in available else [])
            )
            if not matched:
                why = "is the label or split column" if item in reserved else "matches no column"
                raise ConvertError(f"--modality {name}={spec}: {item!r} {why}; columns: {', '.join(available[:20])}")
            cols += [c for c in matched if c not in cols]
        for c in cols:
            if c in owner:
                raise ConvertError(f"--modality {name}: column {c!r} is in modality {owner[c]!r} too")
            owner[c] = name
        out[name] = cols
    return out


def _modality(name: str, cols: list[str], table, kind: str | None, path: Path) -> TableModality:
    import pyarrow as pa

    def textual(c):
        t = table.schema.field(c).type
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)

    def numeric(c):
        t = table.schema.field(c).type
        return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_null(t)

    if kind is None:
        if len(cols) == 1 and textual(cols[0]) and _words(table.column(cols[0])) >= 3:
            kind = "text"
        elif len(cols) > VECTOR_ABOVE and all(numeric(c) for c in cols):
            kind = "vector"
        else:
            kind = "tabular"
    if kind == "text":
        if len(cols) != 1 or not textual(cols[0]):
            raise ConvertError(f"--modality {name}: a text modality is one column of text, got {cols}")
        return TableModality("text", tuple(cols))
    if kind not in ("tabular", "vector"):
        raise ConvertError(f"--kind {name}={kind}: a table's column group is tabular, vector or text")
    other = [c for c in cols if not numeric(c)]
    if kind == "vector" and other:
        raise ConvertError(
            f"{path}: column {other[0]!r} of vector modality {name!r} is not numeric; "
            f"use --kind {name}=tabular to code it as a category"
        )
    return TableModality(kind, tuple(cols), tuple(other))


def _words(column) -> float:
    values = [v for v in column.to_pylist() if v]
    return float(np.median([len(str(v).split()) for v in values])) if values else 0.0
