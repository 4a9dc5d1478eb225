"""Checkpoint checksums: what verifying (and writing) the content digest costs.

    python benchmarks/checkpoint_checksum.py
    python benchmarks/checkpoint_checksum.py --sizes 1 16 128 --preset av-digits/token-choice --repeats 15

Checkpoints of ``--sizes`` MiB of float32 tensors (a few tensors of mixed sizes each), and
one of a real model (``--preset``, built with random weights, with AdamW's moments after one
step, as a training run saves it), written into a temporary directory. For each, in one
process and interleaved, the median of ``--repeats`` runs of:

- ``load``: ``load_checkpoint`` without and with verification. safetensors maps the file
  lazily, so the plain load reads almost nothing; verification reads every byte;
- ``load + restore``: the same, then the tensors copied into the module
  (``load_state_dict``), as ``load_run_model`` and a resumed run do: reading the data is
  paid either way, and this ratio is the cost a user sees;
- ``cold``: load + restore again, with the file's pages dropped from the page cache before
  each run (``posix_fadvise(DONTNEED)``), as a first load after a reboot or on another
  machine reads it from disk;
- ``save``: ``save_checkpoint`` without and with computing the digest (both write and
  fsync the file atomically).

For the preset's model it also times the whole load of a trained run as ``load_run_model``
does it (build the model, load, restore). Ratios are with / without (1.00: free).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from modalmoe import checkpoint as ckpt

MIB = 2**20


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, before: dict[str, Callable[[], object]] | None = None
) -> dict[str, float]:
    """Median seconds of each function, run in turn ``repeats`` times (after one warm-up);
    ``before[name]`` runs untimed before each run of ``fns[name]``."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    before = before or {}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            if name in before:
                before[name]()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def tensor_module(mib: int) -> nn.Module:
    """``mib`` MiB of float32 parameters: a tensor of half the size, a quarter, ... (as a model
    has a few large matrices and many small ones), down to 8192 elements."""
    module, left = nn.ParameterDict(), mib * MIB // 4
    while left:
        numel = left // 2 if left > 8192 else left
        module[f"p{len(module)}"] = nn.Parameter(torch.randn(numel))
        left -= numel
    return module


def model_module(preset: str) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], nn.Module]]:
    """A preset's model (random weights), AdamW after one step, as a run checkpoints them, and
    a function that builds the model afresh (untrained, as ``load_run_model`` does)."""
    from modalmoe.model import build_model
    from modalmoe.model.presets import get_preset
    from modalmoe.train.trainer import experiment_task

    cfg = get_preset(preset)
    task = experiment_task(cfg)
    torch.manual_seed(0)
    train = task.train

    def build() -> nn.Module:
        return build_model(cfg.model, task.specs, task_type=train.task_type, outputs=len(train.classes))

    model = build().fit(train)
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return model, optimizer, build


def no_verify(path: Path) -> ckpt.Checkpoint:
    verify = ckpt._verify
    ckpt._verify = lambda *args: None
    try:
        return ckpt.load_checkpoint(path)
    finally:
        ckpt._verify = verify


def no_digest(save: Callable[[], object]) -> None:
    digest = ckpt.content_digest
    ckpt.content_digest = lambda tensors: "0" * 64
    try:
        save()
    finally:
        ckpt.content_digest = digest


def evict(path: Path) -> None:
    """Drop the (clean, fsynced) file's pages from the page cache: the next read hits the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def case(name: str, module: nn.Module, optimizer, directory: Path, repeats: int) -> Path:
    path = directory / f"{name}.safetensors"

    def save() -> None:
        ckpt.save_checkpoint(path, module=module, config={"name": name}, progress={"step": 1}, optimizer=optimizer)

    save()
    size = path.stat().st_size / MIB

    def restore(checkpoint: ckpt.Checkpoint) -> None:
        module.load_state_dict(checkpoint.module_state())

    t = interleaved(
        {
            "load": lambda: no_verify(path),
            "load_verified": lambda: ckpt.load_checkpoint(path),
            "restore": lambda: restore(no_verify(path)),
            "restore_verified": lambda: restore(ckpt.load_checkpoint(path)),
            "cold": lambda: restore(no_verify(path)),
            "cold_verified": lambda: restore(ckpt.load_checkpoint(path)),
            "save": lambda: no_digest(save),
            "save_checksum": save,
        },
        repeats,
        before={"cold": lambda: evict(path), "cold_verified": lambda: evict(path)},
    )
    ms = {k: 1e3 * v for k, v in t.items()}
    print(
        f"| {name} | {size:.1f} | {ms['load']:.2f} | {ms['load_verified']:.2f} | "
        f"{ms['restore']:.2f} | {ms['restore_verified']:.2f} | {t['restore_verified'] / t['restore']:.2f} | "
        f"{ms['cold']:.1f} | {ms['cold_verified']:.1f} | {t['cold_verified'] / t['cold']:.2f} | "
        f"{ms['save']:.1f} | {ms['save_checksum']:.1f} | {t['save_checksum'] / t['save']:.2f} |"
    )
    return path


def whole_load(name: str, path: Path, build: Callable[[], nn.Module], repeats: int) -> None:
    """Build the model, load and restore, as ``load_run_model`` does, without and with verifying."""

    def run(load: Callable[[Path], ckpt.Checkpoint]) -> None:
        ckpt.restore_module(build(), load(path).module_state(), str(path))

    t = interleaved({"plain": lambda: run(no_verify), "verified": lambda: run(ckpt.load_checkpoint)}, repeats)
    print(
        f"\n{name}, whole load (build + load + restore, as load_run_model): {1e3 * t['plain']:.1f} ms, "
        f"verified {1e3 * t['verified']:.1f} ms, ratio {t['verified'] / t['plain']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 16, 128], help="MiB of tensors")
    parser.add_argument("--preset", default="av-digits/token-choice", help="a real model ('' to skip)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        "| checkpoint | file MiB | load ms | + verify ms | load + restore ms | + verify ms | ratio "
        "| cold load + restore ms | + verify ms | ratio | save ms | + checksum ms | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for mib in args.sizes:
            case(f"{mib} MiB", tensor_module(mib), None, Path(tmp), args.repeats)
        if args.preset:
            model, optimizer, build = model_module(args.preset)
            path = case(args.preset.replace("/", "-"), model, optimizer, Path(tmp), args.repeats)
            whole_load(args.preset, path, build, args.repeats)
    print("(ratio: with / without the checksum; load alone maps the file lazily, verifying reads every byte)")


if __name__ == "__main__":
    main()
