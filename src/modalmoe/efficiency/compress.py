"""Compress a trained run into a new run directory: int8, expert pruning or merging, token
reduction. The result is an ordinary run (``config.yaml``, ``task.json``,
``checkpoints/best.safetensors``, ``summary.json``) that ``modalmoe eval``, ``predict``,
``profile`` and ``analyze`` open like any other.

    modalmoe compress runs/av-digits-token-choice --method int8 --out runs/tc-int8
    modalmoe compress RUN --method prune-experts --experts 4
    modalmoe compress RUN --method merge-experts --experts 4 --by outputs
    modalmoe compress RUN --method tokens --reduction merge --keep 0.5 --layers 0

Usage and output similarity are measured on the run's validation split; the summary holds
the test metrics before and after. The directory is written in a temporary sibling and
renamed into place, so an interrupted compression leaves nothing half-written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from modalmoe.checkpoint import CheckpointError, save_checkpoint
from modalmoe.config import ConfigError, to_yaml
from modalmoe.efficiency.experts import expert_usage, merge_experts, prune_experts
from modalmoe.efficiency.quantize import MIN_WEIGHT, quantize_int8
from modalmoe.efficiency.tokens import apply_token_reduction
from modalmoe.evaluate.runner import evaluate
from modalmoe.io import atomic_write_text
from modalmoe.run import RunDir, load_run_model, read_run_config

METHODS = ("int8", "prune-experts", "merge-experts", "tokens")


def compress_model(model: nn.Module, method: str, *, data=None, **options) -> nn.Module:
    """The compressed model (a new one for int8 and expert methods; ``tokens`` changes
    ``model`` in place and returns it).

    Args:
        model: a trained ``MultimodalModel``.
        method: one of ``METHODS``.
        data: held-out data for expert usage and output similarity (the validation split).
        options: ``experts`` (prune/merge: experts left per layer), ``by`` (merge:
            ``weights`` or ``outputs``), ``reduction``/``keep``/``layers``/``placement`` (tokens: see
            ``TokenReductionConfig``), ``min_weight`` and ``patch_convs`` (int8).
    """
    if method == "int8":
        min_weight = options.get("min_weight")
        min_weight = MIN_WEIGHT if min_weight is None else min_weight
        return quantize_int8(model, min_weight=min_weight, patch_convs=bool(options.get("patch_convs")))
    if method in ("prune-experts", "merge-experts"):
        experts = options.get("experts")
        if not experts:
            raise ValueError(f"--method {method} needs --experts N (experts left per MoE layer)")
        if data is None:
            raise ValueError(f"--method {method} needs held-out data to measure expert usage")
        usage = expert_usage(model, data)
        if method == "prune-experts":
            return prune_experts(model, keep=experts, usage=usage)
        return merge_experts(model, into=experts, usage=usage, by=options.get("by") or "weights", data=data)
    if method == "tokens":
        return apply_token_reduction(
            model,
            method=options.get("reduction") or "merge",
            keep=options.get("keep") if options.get("keep") is not None else 0.5,
            layers=tuple(options.get("layers") or (0,)),
            placement=options.get("placement") or "after_block",
        )
    raise ValueError(f"unknown compression method {method!r}; choose one of {', '.join(METHODS)}")


def compress_run(
    run_dir: str | Path,
    out: str | Path,
    method: str,
    *,
    which: str = "best",
    evaluate_test: bool = True,
    data_dir: str | None = None,
    **options,
) -> dict:
    """Compress the run in ``run_dir`` into a new run directory ``out``.

    Args:
        run_dir: a trained run.
        out: the new run directory (must not exist).
        method, options: see ``compress_model``.
        which: the checkpoint to start from (``best`` or ``last``).
        evaluate_test: put test metrics before and after in ``summary.json``.
        data_dir: data to use instead of the run's recorded data (``RunDir.task``).

    Returns:
        the summary written to ``out/summary.json``.
    """
    run_dir, out = Path(run_dir), Path(out)
    if out.exists():
        raise CheckpointError(f"{str(out)!r} already exists; choose another --out (compress never overwrites)")
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; choose one of {', '.join(METHODS)}")
    config = read_run_config(run_dir)
    model = load_run_model(run_dir, which=which)
    needs_data = evaluate_test or method in ("prune-experts", "merge-experts")
    task = RunDir(run_dir).task(data_dir) if needs_data else None
    before = evaluate(model, task.test).metrics if evaluate_test else None
    compressed = compress_model(model, method, data=task.valid if task is not None else None, **options)
    new_config = config.model_copy(update={"model": compressed.config, "name": f"{config.name}-{method}"})
    config_json = new_config.model_dump(mode="json")
    summary = {
        "name": new_config.name,
        "task": new_config.task,
        "compressed_from": str(run_dir),
        "checkpoint": which,
        "method": method,
        "options": {k: v for k, v in options.items() if v is not None},
        "test_before": before,
        "test": evaluate(compressed, task.test).metrics if evaluate_test else None,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        atomic_write_text(tmp / "config.yaml", to_yaml(new_config))
        shutil.copy2(run_dir / "task.json", tmp / "task.json")
        (tmp / "checkpoints").mkdir()
        save_checkpoint(
            tmp / "checkpoints" / "best.safetensors",
            module=nn.ModuleDict({"model": compressed}),
            config=config_json,
            progress={"compressed_from": str(run_dir), "method": method},
        )
        atomic_write_text(tmp / "summary.json", json.dumps(summary, indent=2))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def parse_layers(text: str | None) -> Sequence[int] | None:
    """``"0,1"`` -> (0, 1); None or "" -> None."""
    if not text:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as error:
        raise ConfigError(f"--layers takes comma-separated block indices such as 0 or 0,1, got {text!r}") from error


def parse_keep(text: str) -> float | dict[str, float]:
    """``"0.5"`` -> 0.5; ``"image=0.75,audio=0.5"`` -> {"image": 0.75, "audio": 0.5}."""
    try:
        if "=" not in text:
            return float(text)
        return {name.strip(): float(value) for name, value in (part.split("=", 1) for part in text.split(","))}
    except ValueError as error:
        raise ConfigError(
            f"--keep takes a fraction such as 0.5 or per-modality fractions such as image=0.75,audio=0.5; got {text!r}"
        ) from error
