"""The results store: one JSON-lines record per cell, appended atomically.

Each append rewrites the file through ``modalmoe.io.atomic_path`` (temp file, fsync,
rename), so a reader or a killed bench sees every finished cell or none of a half-written
one: an interrupted bench loses at most the cells in flight. ``--resume`` skips the cells
whose record says ``"status": "ok"``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

import modalmoe
from modalmoe.io import atomic_write_text


def cell_key(record: dict) -> tuple[str, str, int]:
    return record["task"], record["design"], int(record["seed"])


class ResultsStore:
    """``results.jsonl`` in a bench directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / "results.jsonl"

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{self.path}:{number} is not valid JSON ({err}); the store is corrupt") from None
        return out

    def finished(self) -> set[tuple[str, str, int]]:
        """Keys of the cells that completed successfully."""
        return {cell_key(r) for r in self.records() if r.get("status") == "ok"}

    def append(self, record: dict) -> None:
        """Add one record; a failed earlier attempt at the same cell is replaced."""
        key = cell_key(record)
        kept = [r for r in self.records() if cell_key(r) != key]
        text = "".join(json.dumps(r) + "\n" for r in [*kept, record])
        atomic_write_text(self.path, text)

    def write_csv(self, path: str | Path | None = None) -> Path:
        """``results.csv``: one row per cell, nested fields flattened with dots (configs left out)."""
        rows = [_flatten({k: v for k, v in r.items() if k not in ("config", "environment")}) for r in self.records()]
        fields = list(dict.fromkeys(k for row in rows for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        target = Path(path) if path else self.directory / "results.csv"
        atomic_write_text(target, buffer.getvalue())
        return target


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list):
        return {prefix: json.dumps(value)}
    return {prefix: value}


def environment() -> dict:
    """Package versions, CPU, threads and the git commit, recorded with every cell."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "modalmoe": modalmoe.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        root = Path(modalmoe.__file__).resolve().parents[2]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
