"""A directory of NumPy arrays, one file per modality, plus a labels file.

    my-arrays/
      audio.npy        [N, L, C]  -> sequence  (or audio.npz with x, and optionally lengths, present)
      image.npy        [N, C, H, W] or [N, H, W, C] -> image
      clinical.npy     [N, F]     -> vector (--kind clinical=tabular for a table of numbers)
      notes.npy        [N] strings -> text
      labels.npy       [N] (or labels.txt / labels.csv: one label per line)
      split.npy        optional: [N] train/valid/test (or split.txt)

Each file's name is its modality. ``--labels FILE`` and ``--splits FILE`` name the label and
split files (default: ``labels``/``label``/``y``/``target`` and ``split``/``splits`` with any
of the suffixes ``.npy``, ``.txt``, ``.csv``). ``--modality NAME=FILE`` or ``NAME=FILE:DIMS``
renames a file's modality or splits its last axis (features or channels) into several
modalities (``acc=imu.npy:0-2 gyro=imu.npy:3-5``); with any ``--modality``, only the named
modalities are converted. A 3-D array is a sequence unless ``--kind NAME=image`` (then
``[N, H, W]`` is a one-channel image). An ``[N, H, W, C]`` array with ``C`` in 1, 3 or 4 is
moved to channels-first. Arrays are loaded with ``allow_pickle=False``: store strings as a
NumPy string array, not objects.
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
    parse_kinds,
)

SUFFIXES = (".npy", ".npz", ".txt", ".csv")
LABEL_STEMS = ("labels", "label", "y", "target", "targets")
SPLIT_STEMS = ("split", "splits")


def detect(paths: list[Path]) -> bool:
    return len(paths) == 1 and paths[0].is_dir() and any(p.suffix in (".npy", ".npz") for p in paths[0].iterdir())


def convert(
    paths: list[Path],
    *,
    modality=(),
    kind=(),
    labels=None,
    splits=None,
    task="classification",
    unlabelled=False,
    **unused,
) -> Draft:
    if len(paths) != 1 or not paths[0].is_dir():
        raise ConvertError(f"{', '.join(map(str, paths))}: the arrays format reads one directory of .npy/.npz files")
    _refuse(unused, "the arrays format")
    task = check_task_type(task)
    root = paths[0]
    kinds = parse_kinds(kind)
    label_file = None if unlabelled else _find(root, labels, LABEL_STEMS, "--labels")
    split_file = _find(root, splits, SPLIT_STEMS, "--splits", required=False)
    if unlabelled and split_file is not None and splits is not None:
        raise ConvertError("--splits: unlabelled rows have no splits; leave --splits out")
    taken = {p.resolve() for p in (label_file, split_file) if p is not None}
    files = sorted(p for p in root.iterdir() if p.suffix in (".npy", ".npz") and p.resolve() not in taken)
    selected = parse_assignments(modality, "--modality")
    chosen = _choose(root, files, selected)
    modalities: dict[str, ArrayModality] = {}
    n = None
    notes = []
    for name, (file, dims) in chosen.items():
        x, present, lengths = _read_array(file)
        if n is None:
            n = len(x)
        elif len(x) != n:
            raise ConvertError(
                f"{file}: {len(x)} rows, but {next(iter(chosen.values()))[0].name} has {n}; "
                "row i of every file is sample i"
            )
        part = _modality(name, file, x, present, lengths, dims, kinds.get(name))
        modalities[name] = part
        if part.note:
            notes.append(part.note)
            part.note = ""
    unknown = sorted(set(kinds) - set(modalities))
    if unknown:
        raise ConvertError(f"--kind {unknown[0]}: no such modality; the modalities are {', '.join(modalities)}")
    y = None
    if label_file is not None:
        raw = _read_vector(label_file)
        if len(raw) != n:
            raise ConvertError(f"{label_file}: {len(raw)} labels for {n} samples")
        y = label_strings(raw, str(label_file)) if task == "classification" else label_numbers(raw, str(label_file))
    split = None
    if split_file is not None and not unlabelled:
        split = np.array([str(s).strip().lower() for s in _read_vector(split_file)], dtype=object)
        if len(split) != n:
            raise ConvertError(f"{split_file}: {len(split)} split names for {n} samples")
        split = np.array([{"val": "valid", "validation": "valid", "dev": "valid"}.get(s, s) for s in split])
        bad = sorted(set(split.tolist()) - {"train", "valid", "test"})
        if bad:
            raise ConvertError(f"{split_file}: split names {bad[:3]} are not train, valid or test")
    return Draft(n or 0, dict(modalities), y, split=split, task_type=task, source=str(root), notes=notes)


def _refuse(unused: dict, what: str) -> None:
    given = sorted(k for k, v in unused.items() if v not in (None, (), [], False))
    if given:
        raise ConvertError(f"--{given[0].replace('_', '-')} does not apply to {what}")


def _find(root: Path, given: str | None, stems, option: str, required: bool = True) -> Path | None:
    if given is not None:
        path = Path(given).expanduser()
        path = path if path.is_absolute() or path.exists() else root / path
        if not path.is_file():
            raise ConvertError(f"{option} {given}: no such file (relative names are read in {root})")
        return path
    found = [root / f"{s}{x}" for s in stems for x in SUFFIXES if (root / f"{s}{x}").is_file()]
    if not found and required:
        raise ConvertError(
            f"{root}: no labels file ({', '.join(f'{s}.npy' for s in stems[:2])}, or .txt/.csv); name it with "
            "--labels FILE, or pass --unlabelled for new rows to predict"
        )
    return found[0] if found else None


def _choose(root: Path, files: list[Path], selected: dict[str, str]) -> dict[str, tuple[Path, str | None]]:
    if not selected:
        if not files:
            raise ConvertError(f"{root}: no .npy or .npz modality files besides the labels and splits")
        return {p.stem: (p, None) for p in files}
    out = {}
    for name, spec in selected.items():
        file, _, dims = spec.partition(":")
        path = root / file if (root / file).is_file() else root / f"{file}.npy"
        if not path.is_file():
            names = ", ".join(p.name for p in files)
            raise ConvertError(f"--modality {name}={spec}: no file {file!r} in {root} (it holds {names})")
        out[name] = (path, dims or None)
    return out


def _read_array(path: Path) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False), None, None
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            if "x" not in keys and len(keys) != 1:
                raise ConvertError(
                    f"{path}: an .npz modality holds 'x' (and optionally 'lengths', 'present'); it holds {keys}"
                )
            x = npz["x" if "x" in keys else keys[0]]
            return (
                x,
                npz["present"].astype(bool) if "present" in keys else None,
                (npz["lengths"] if "lengths" in keys else None),
            )
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise ConvertError(
                f"{path}: holds Python objects (pickled); save strings as np.array(values, "
                "dtype=str) and numbers as a numeric array"
            ) from e
        raise ConvertError(f"{path}: not a NumPy array file ({e})") from e
    except OSError as e:
        raise ConvertError(f"{path}: cannot be read ({e})") from e


def _read_vector(path: Path) -> np.ndarray:
    if path.suffix in (".npy", ".npz"):
        x, _, _ = _read_array(path)
        x = x[:, 0] if x.ndim == 2 and x.shape[1] == 1 else x
        if x.ndim != 1:
            raise ConvertError(f"{path}: expected one value per sample [N], got shape {x.shape}")
        return x
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: cannot be read as UTF-8 text ({e})") from e
    while lines and not lines[-1].strip():
        lines.pop()
    return np.array([line.strip() for line in lines], dtype=object)


def _modality(name: str, file: Path, x: np.ndarray, present, lengths, dims: str | None, kind: str | None):
    where = f"{file} (modality {name!r})"
    if x.dtype.kind in "UO" or x.dtype.kind == "S":
        if x.ndim != 1 or kind not in (None, "text"):
            raise ConvertError(f"{where}: strings must be one per sample [N] (text), got shape {x.shape}")
        return ArrayModality("text", [v.decode() if isinstance(v, bytes) else str(v) for v in x.tolist()], present)
    if x.dtype.kind not in "biuf":
        raise ConvertError(f"{where}: dtype {x.dtype} is neither numbers nor strings")
    note = ""
    if x.ndim == 3 and kind == "image":
        x = x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = np.moveaxis(x, -1, 1)
        note = f"{name}: [N, H, W, C] moved to channels-first [N, C, H, W]"
    inferred = {2: "vector", 3: "sequence", 4: "image"}.get(x.ndim)
    if inferred is None:
        raise ConvertError(f"{where}: shape {x.shape}: expected [N, F], [N, L, C], [N, C, H, W] or [N] strings")
    kind = kind or inferred
    fits = {"vector": 2, "tabular": 2, "sequence": 3, "image": 4}
    if fits.get(kind) != x.ndim:
        raise ConvertError(f"{where}: --kind {kind} does not fit an array of shape {x.shape}")
    if dims is not None:
        axis = 1 if kind == "image" else -1
        keep = parse_indices(dims, x.shape[axis], "channel" if kind != "vector" else "feature", f"--modality {name}")
        x = np.take(x, keep, axis=axis)
    if lengths is not None and kind != "sequence":
        raise ConvertError(f"{where}: 'lengths' belongs to a sequence [N, L, C]")
    return ArrayModality(kind, x.astype(np.float32), present, lengths, note=note)
