"""A processed task on disk: one ``.npz`` (no pickles) that loads in well under a second.

Bundled tasks are built once from their raw sources (parsing CSVs, pairing, windowing)
and cached in this form, keyed by the task's processing version and the hashes of its
sources, so a changed source or processing step never reuses a stale file.

Layout: ``__header__`` (UTF-8 JSON: name, description, specs, classes, task type, which
arrays exist) and arrays named ``{split}/{field}/{modality}``; text is stored as one UTF-8
blob plus offsets, so nothing needs ``allow_pickle``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from modalmoe.data.batch import ModalitySpec, MultimodalDataset, Task
from modalmoe.io import atomic_path

FORMAT_VERSION = 1


def save_task(task: Task, path: str | os.PathLike) -> None:
    """Write ``task`` to ``path`` atomically."""
    arrays: dict[str, np.ndarray] = {}
    splits = {}
    for split, data in task.splits.items():
        splits[split] = {"groups": data.groups is not None, "extras": sorted(data.extras)}
        for key, value in data.extras.items():
            arrays[f"{split}/extras/{key}"] = value.numpy()
        arrays[f"{split}/target"] = data.target.numpy()
        if data.groups is not None:
            arrays[f"{split}/groups"] = data.groups.numpy()
        for name, value in data.inputs.items():
            if isinstance(value, list):
                encoded = [s.encode("utf-8") for s in value]
                arrays[f"{split}/text/{name}"] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
                arrays[f"{split}/offsets/{name}"] = np.cumsum([0] + [len(b) for b in encoded]).astype(np.int64)
            else:
                arrays[f"{split}/inputs/{name}"] = value.numpy()
            arrays[f"{split}/present/{name}"] = data.present[name].numpy()
        for name, lengths in data.lengths.items():
            arrays[f"{split}/lengths/{name}"] = lengths.numpy()
    first = next(iter(task.splits.values()))
    header = {
        "format": FORMAT_VERSION,
        "name": task.name,
        "description": task.description,
        "task_type": first.task_type,
        "classes": list(first.classes) if first.classes is not None else None,
        "specs": [
            {
                "name": s.name,
                "kind": s.kind,
                "shape": list(s.shape),
                "categorical": {str(k): v for k, v in s.categorical.items()},
                "columns": list(s.columns),
                "description": s.description,
            }
            for s in task.specs.values()
        ],
        "splits": splits,
    }
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_task_file(path: str | os.PathLike) -> Task:
    """Read a task written by ``save_task``; raises ``ValueError`` for a file of another format."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    try:
        header = json.loads(arrays.pop("__header__").tobytes().decode("utf-8"))
    except KeyError:
        raise ValueError(f"{path} is not a modalmoe task file (no __header__)") from None
    if header.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} has task file format {header.get('format')}, expected {FORMAT_VERSION}")
    specs = {
        s["name"]: ModalitySpec(
            s["name"],
            s["kind"],
            tuple(s["shape"]),
            categorical={int(k): v for k, v in s["categorical"].items()},
            columns=tuple(s["columns"]),
            description=s["description"],
        )
        for s in header["specs"]
    }
    splits = {}
    for split, info in header["splits"].items():
        inputs = {}
        for name, spec in specs.items():
            if spec.kind == "text":
                blob, offsets = arrays[f"{split}/text/{name}"].tobytes(), arrays[f"{split}/offsets/{name}"]
                inputs[name] = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
            else:
                inputs[name] = arrays[f"{split}/inputs/{name}"]
        splits[split] = MultimodalDataset(
            specs=specs,
            inputs=inputs,
            target=arrays[f"{split}/target"],
            present={name: arrays[f"{split}/present/{name}"] for name in specs},
            lengths={name: arrays[f"{split}/lengths/{name}"] for name, s in specs.items() if s.variable_length},
            classes=header["classes"],
            task_type=header["task_type"],
            groups=arrays[f"{split}/groups"] if info["groups"] else None,
            extras={key: arrays[f"{split}/extras/{key}"] for key in info["extras"]},
        )
    return Task(name=header["name"], splits=splits, description=header["description"])
