"""The results store: one JSON-lines record per cell, appended atomically.

Each append rewrites the file through ``modalmoe.io.atomic_path`` (temp file, fsync,
rename), so a reader or a killed bench sees every finished cell or none of a half-written
one: an interrupted bench loses at most the cells in flight. ``--resume`` skips the cells
whose record says ``"status": "ok"``.

A record is a plain JSON object (``Record`` documents its fields): the store reads and writes
the file as it always has, so a ``results.jsonl`` of an older version still loads.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Literal, Required, TypedDict

import torch

import modalmoe
from modalmoe.io import atomic_write_text


class Record(TypedDict, total=False):
    """One line of ``results.jsonl``: what a cell (or an efficiency variant of one) measured.

    A dict, not a dataclass: records go to and from JSON unchanged (an old file loads as it
    is, and a kind of cell adds its own block, ``lifelong`` or ``sequence``, without a new
    type), and the leaderboard reads them with ``.get``.

    Every record (``runner.run_cell`` writes these around the cell's own fields):
        task: the task file; with ``design`` and ``seed`` the cell's key (``cell_key``).
        design: the design label (``token-choice``, ``token-choice@m0=0.2``, ``...:grow``).
        seed: the seed.
        base_design: the preset design the label derives from.
        status: ``ok``, or ``failed`` with ``error`` (one line) and ``traceback``.
        seconds: wall-clock seconds of the whole cell.
        overhead_seconds: ``seconds`` less ``train_seconds`` and ``eval_seconds``.
        environment: package versions, CPU, threads, git commit (``environment()``).

    Every finished record: ``metrics`` (test split, by name), ``train_seconds``,
    ``eval_seconds``; ``valid`` (best validation metrics) where the cell trains or fits.
    A trained model's record (``training.trained_fields``) adds ``config``, ``run_dir``,
    ``evaluation`` (``EvalReport.to_dict``), ``epochs``, ``steps``, the cost fields
    (``training.cost_fields``) and ``matched`` (compute matching, or None). The kinds add:
    ``unimodal`` (logistic regression), ``skipped_variants`` (designs), ``compressed``
    (efficiency variants, ``bench/variants.py``), ``lifelong`` (``bench/lifelong.py``),
    ``sequence`` (``bench/sequence.py``); a new kind's block is just another key.
    """

    task: Required[str]
    design: Required[str]
    seed: Required[int]
    base_design: str
    status: Literal["ok", "failed"]
    error: str
    traceback: str
    seconds: float
    overhead_seconds: float
    environment: dict[str, Any] | None
    metrics: dict[str, float]
    valid: dict[str, float]
    train_seconds: float
    eval_seconds: float
    config: dict[str, Any]
    run_dir: str
    evaluation: dict[str, Any]
    epochs: int
    steps: int
    flops: float
    params: int
    active_params: float
    flops_components: dict[str, float]
    latency_b1_ms: float
    latency_b64_ms: float
    memory_b64_mib: float
    matched: dict[str, Any] | None
    unimodal: dict[str, float]
    skipped_variants: dict[str, str]
    compressed: dict[str, Any]
    lifelong: dict[str, Any]
    sequence: dict[str, Any]


def cell_key(record: Record) -> tuple[str, str, int]:
    return record["task"], record["design"], int(record["seed"])


class ResultsStore:
    """``results.jsonl`` in a bench directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / "results.jsonl"

    def records(self) -> list[Record]:
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

    def append(self, record: Record) -> None:
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
