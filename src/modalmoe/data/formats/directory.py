"""A data directory as a task: which layout it holds, and a fingerprint of its content.

    from modalmoe.data.formats.directory import load_directory, fingerprint
    task = load_directory("path/to/my-task")     # manifest, or a MultiBench layout
    task.provenance                               # {"kind": "directory", "path": ..., "hash": ...}

What a path may be:

- a directory with ``manifest.yaml`` (or that file itself): the documented format
  (``manifest.py``); option ``data_roots``;
- a directory in MultiBench's AV-MNIST layout (``image/train_data.npy``,
  ``audio/train_data.npy``, ``train_labels.npy``, ...): ``load_multibench_avmnist``, options
  ``valid_fraction``, ``seed``, ``scale``;
- a MultiBench affect pickle (``.pkl``): ``load_multibench_affect``; it runs code when
  loaded, so it needs the option ``trust: true``.

The fingerprint is an XXH3-128 digest over the files the task is read from (the manifest
and every file it names, or the layout's arrays), each with its path relative to the data
directory: a run records it, and the commands that read the run's data again refuse data
that changed since (``modalmoe.run.RunDir.task``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import xxhash

from modalmoe.data.batch import Task
from modalmoe.data.formats.manifest import (
    MANIFEST,
    SPLITS,
    DataFormatError,
    _data_roots,
    _manifest_path,
    _read_manifest,
    _resolve_files,
    load,
)
from modalmoe.data.formats.multibench import load_multibench_affect, load_multibench_avmnist

_CHUNK = 1 << 22


def layout(path: str | Path) -> str:
    """``manifest``, ``avmnist`` or ``affect``: the layout at ``path`` (``DataFormatError``
    naming what a data directory holds when it is none of them)."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.name == MANIFEST:
            return "manifest"
        if path.suffix == ".pkl":
            return "affect"
    elif path.is_dir():
        if (path / MANIFEST).is_file():
            return "manifest"
        if (path / "image" / "train_data.npy").is_file() and (path / "audio" / "train_data.npy").is_file():
            return "avmnist"
    elif not path.exists():
        raise DataFormatError(f"{path}: no such file or directory")
    raise DataFormatError(
        f"{path}: not a data directory: it holds no {MANIFEST} (the documented format: the README's "
        "'Your own data'), no MultiBench AV-MNIST layout "
        "(image/train_data.npy, audio/train_data.npy), and is not a MultiBench affect pickle (.pkl); "
        f"to make one from .npy arrays, CSV/Parquet tables or .ts/.arff series: modalmoe data convert {path} --out DIR"
    )


def load_directory(path: str | Path, **options) -> Task:
    """The task stored at ``path`` (see the module docstring), with its ``provenance``."""
    path = Path(path).expanduser()
    kind = layout(path)
    if kind == "manifest":
        unknown = sorted(set(options) - {"data_roots"})
        if unknown:
            raise DataFormatError(f"{path}: a manifest directory takes only the option data_roots, got {unknown}")
        task = load(path, **options)
    elif kind == "avmnist":
        task = load_multibench_avmnist(path, **options)
    else:
        task = load_multibench_affect(path, **options)
    task.provenance = fingerprint(path, **({"data_roots": options["data_roots"]} if "data_roots" in options else {}))
    return task


def data_files(path: str | Path, *, data_roots=()) -> tuple[Path, list[Path]]:
    """The base directory of the data at ``path`` and the files a task is read from."""
    path = Path(path).expanduser()
    kind = layout(path)
    if kind == "manifest":
        manifest_path = _manifest_path(path)
        manifest = _read_manifest(manifest_path)
        roots = _data_roots(manifest, manifest_path, data_roots)
        files = [manifest_path]
        entries = [("splits.file", (manifest.get("splits") or {}).get("file"))]
        modalities = manifest.get("modalities") or {}
        if isinstance(modalities, Mapping):
            entries += [(f"modalities.{m}.file", (e or {}).get("file")) for m, e in modalities.items()]
        for field, value in entries:
            if value is None:
                continue
            resolved = _resolve_files(value, manifest_path, field, roots)
            files += [resolved[s] for s in SPLITS] if isinstance(resolved, dict) else [resolved]
        return manifest_path.parent, _unique(files)
    if kind == "avmnist":
        return path, sorted(p for p in path.rglob("*.npy") if p.is_file())
    return path.parent, [path]


def fingerprint(path: str | Path, *, data_roots=()) -> dict:
    """``{"kind": "directory", "path", "layout", "hash", "files", "bytes"}`` of the data at ``path``."""
    base, files = data_files(path, data_roots=data_roots)
    digest = xxhash.xxh3_128()
    size = 0
    for file in files:
        try:
            name = file.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:  # a file under data_roots, outside the directory
            name = str(file.resolve())
        digest.update(name.encode() + b"\0")
        with open(file, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        digest.update(b"\0")
    return {
        "kind": "directory",
        "path": str(Path(path).expanduser().resolve()),
        "layout": layout(path),
        "hash": f"xxh3-128:{digest.hexdigest()}",
        "files": len(files),
        "bytes": size,
    }


def _unique(files: list[Path]) -> list[Path]:
    seen, out = set(), []
    for file in files:
        key = file.resolve()
        if key not in seen:
            seen.add(key)
            out.append(file)
    return out
