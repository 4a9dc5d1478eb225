"""The trainer: one config in, a run directory out; resumable, exactly.

    from modalmoe.model.presets import get_preset
    from modalmoe.train import Trainer
    result = Trainer(get_preset("av-digits/token-choice"), out="runs/av").fit()

A run directory holds ``config.yaml`` (the resolved experiment), ``metrics.jsonl`` (one JSON
object per logged step and per evaluation), ``tb/`` (TensorBoard event files),
``checkpoints/last.safetensors`` and ``checkpoints/best.safetensors``, and, when training
ends, ``summary.json`` (best validation and test metrics).

Exact resume: data order is a function of (seed, epoch), every random draw goes through
torch's global RNG, whose state is checkpointed, and checkpoints are taken only between
optimiser steps, so a resumed run replays the same batches with the same random numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from modalmoe.config import ExperimentConfig, to_yaml
from modalmoe.data.batch import ModalitySpec
from modalmoe.data.tasks import load_task
from modalmoe.io import atomic_write_text, read_jsonl
from modalmoe.lock import DirectoryLock
from modalmoe.model.multimodal import MultimodalModel, build_model
from modalmoe.train.checkpoint import (
    CheckpointError,
    check_config,
    load_checkpoint,
)
from modalmoe.train.distributed import NullLog, setup_parallel, torchrun_world
from modalmoe.train.resume import extensions

# What a run directory holds (``clear_run`` deletes exactly these; other files are the user's).
RUN_FILES = ("config.yaml", "task.json", "metrics.jsonl", "summary.json", "tb", "checkpoints")


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, ...); the message names the step and the cause."""


@dataclass
class TrainResult:
    """What ``Trainer.fit`` returns."""

    run_dir: Path
    steps: int
    epochs: int
    best: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)
    stopped_early: bool = False


def experiment_task(config: ExperimentConfig):
    """The task an experiment trains on: the bundled task, restricted to ``config.modalities``."""
    task = load_task(config.task, **config.task_options)
    return task.select(config.modalities) if config.modalities else task


def warmup_cosine(total_steps: int, warmup: float, min_ratio: float):
    """LR multiplier: linear warmup over ``warmup * total`` steps, then cosine to ``min_ratio``."""
    warm = max(1, round(warmup * total_steps)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def seed_everything(seed: int) -> None:
    """Seed torch (the only RNG the library draws from)."""
    torch.manual_seed(seed)


def epoch_order(num_samples: int, seed: int, epoch: int) -> Tensor:
    """The training order of an epoch: a permutation that depends only on (seed, epoch)."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class Trainer:
    """Train one experiment into a run directory.

    Args:
        config: the experiment (task, model, training recipe).
        out: the run directory (created; an existing run is resumed only with ``fit(resume=True)``).
        task: an already loaded task (default: ``load_task(config.task, **config.task_options)``).
        progress: show a progress bar.
        console: where to print.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        out: str | Path,
        *,
        task=None,
        progress: bool = True,
        console: Console | None = None,
    ) -> None:
        self.config, self.out = config, Path(out)
        self.console = console or Console()
        self.show_progress = progress
        self.task = task if task is not None else experiment_task(config)
        self.checkpoints = self.out / "checkpoints"

    # --- building -------------------------------------------------------------------------

    def build(self) -> tuple[MultimodalModel, nn.Module]:
        """The model (fitted on the training split) and the objectives, seeded."""
        from modalmoe.objectives import build_objectives

        seed_everything(self.config.train.seed)
        train = self.task.train
        model = build_model(
            self.config.model, self.task.specs, task_type=train.task_type, outputs=head_outputs(train)
        ).fit(train)
        cfg = self.config.train
        self.init_report = None
        if cfg.init_from is not None:  # after fit: the run's encoder statistics and tokenizers win
            from modalmoe.train.init import init_from_run

            self.init_report = init_from_run(model, cfg.init_from, grow=cfg.grow is not None)
            self.console.print(self.init_report.summary())
        if cfg.lora.rank:
            from modalmoe.efficiency.lora import apply_lora

            self.console.print(apply_lora(model, cfg.lora).summary())
        objectives = build_objectives(cfg.objectives, head_kind=model.head.kind, dim=model.fusion.dim)
        self.growth = None
        if cfg.grow is not None:  # a grown run (modalmoe.lifelong): freeze / regularise what came from the run
            from modalmoe.lifelong.grow import prepare_growth

            self.growth = prepare_growth(model, objectives, cfg, self.init_report)
            self.console.print(self.growth.summary())
        for objective in objectives.objectives.values():
            check = getattr(objective, "check_task", None)  # objectives that read another run (distill)
            if check is not None:
                check(self.task)
        return model, objectives

    def _optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        # No weight decay on biases, norms, embeddings-as-vectors and scalars (the usual AdamW recipe).
        decay, no_decay = [], []
        for p in module.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        cfg = self.config.train
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
        )
        if getattr(self, "growth", None) is not None:
            self.growth.attach(optimizer)  # puts fixed old-expert slices back after each step
        return optimizer

    # --- the loop -------------------------------------------------------------------------

    def fit(self, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
        """Train; with ``resume``, continue exactly from ``checkpoints/last.safetensors``.

        The run directory is locked for the whole call (``modalmoe.lock``): a second trainer
        into it is refused. A fresh start into a directory that already holds a run is refused
        unless ``overwrite``, which deletes that run's checkpoints and logs first.
        """
        if resume and overwrite:
            raise CheckpointError("--resume continues the run in the directory, --overwrite deletes it: pass one")
        main = torchrun_world() is None or torchrun_world()[0] == 0
        with DirectoryLock(self.out, what="run directory") if main else contextlib.nullcontext():
            return self._fit(resume=resume, overwrite=overwrite, main=main)

    def _fit(self, *, resume: bool, overwrite: bool, main: bool) -> TrainResult:
        cfg = self.config.train
        config_json = self.config.model_dump(mode="json")
        last_path, best_path = self.checkpoints / "last.safetensors", self.checkpoints / "best.safetensors"
        if main and not resume:  # rank 0 decides; torchrun stops the others if it fails
            existing = run_files(self.out)
            if existing and not overwrite:
                raise CheckpointError(
                    f"{str(self.out)!r} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                    "--overwrite to start it over (its checkpoints and logs are deleted), or choose another --out"
                )
            clear_run(self.out)
        if main and resume and not last_path.is_file():
            raise CheckpointError(
                f"{str(self.out)!r} has no checkpoint to resume (checkpoints/last.safetensors: the run stopped "
                "before its first one); start it over with --overwrite"
            )
        model, objectives = self.build()
        train = self.task.train
        # Under torchrun: shard experts, wrap in DDP (modalmoe.train.distributed); else a no-op.
        parallel = setup_parallel(self.config, len(train))
        forward_model = parallel.prepare(model)
        module = nn.ModuleDict({"model": model, "objectives": objectives})
        optimizer = self._optimizer(module)
        batches_per_epoch = math.ceil(len(train) / cfg.batch_size)
        steps_per_epoch = math.ceil(batches_per_epoch / cfg.accumulate)
        total_steps = cfg.epochs * steps_per_epoch
        # Resuming with more epochs stretches the schedule from here on: the lambda is not saved.
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(total_steps, cfg.warmup, cfg.min_lr_ratio)
        )
        progress = {"step": 0, "epoch": 0, "batch": 0, "best": None, "bad_evals": 0, "stopped_early": False}
        self.saved = {}  # which checkpoint holds which step, for messages about what is kept
        if resume:
            checkpoint = load_checkpoint(last_path)
            compared, changes = extensions(checkpoint.config, config_json, source=str(last_path))
            check_config(checkpoint, compared, sections=("task", "task_options", "model", "train"))
            parallel.restore_training(checkpoint, module=module, optimizer=optimizer, scheduler=scheduler)
            progress = checkpoint.progress
            self.saved = {"last": progress["step"]}
            if best_path.is_file():
                self.saved["best"] = None
            if changes:
                progress.setdefault("history", []).append({"step": progress["step"], "changes": changes})
                patience = self.config.train.early_stopping
                if progress["stopped_early"] and patience is not None:
                    progress["stopped_early"] = bool(patience.patience) and progress["bad_evals"] >= patience.patience
                if main:
                    atomic_write_text(self.out / "config.yaml", to_yaml(self.config))
                shown = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())
                self.console.print(f"extending the run: {shown}")
            self.console.print(f"resuming {self.out} at step {progress['step']} (epoch {progress['epoch']})")
        elif main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", to_yaml(self.config))
            write_task_info(self.out, self.task)
        log = (
            _Log(self.out, purge_after=progress["step"] if resume else None, console=self.console)
            if main
            else NullLog()
        )
        monitor = self._collapse_monitor()
        if monitor is not None and progress.get("collapse"):
            monitor.load_state_dict(progress["collapse"])
        params = [p for p in module.parameters()]

        def checkpoint_to(path: Path) -> None:
            if monitor is not None:
                progress["collapse"] = monitor.state_dict()
            parallel.save_checkpoint(
                path, module=module, config=config_json, progress=progress, optimizer=optimizer, scheduler=scheduler
            )
            self.saved[path.stem] = progress["step"]

        started = time.perf_counter()
        terms: dict[str, float] = {"loss": float("nan")}
        bar = _bar(self.console, total_steps, self.show_progress and parallel.is_main)
        try:
            with bar:
                task_id = bar.add_task("train", total=total_steps, completed=progress["step"], info="")
                while progress["epoch"] < cfg.epochs and not progress["stopped_early"]:
                    epoch = progress["epoch"]
                    order = epoch_order(len(train), cfg.seed, epoch)
                    module.train()
                    micro = 0
                    for index in range(progress["batch"], batches_per_epoch):
                        rows = order[index * cfg.batch_size : (index + 1) * cfg.batch_size]
                        batch = train.batch(parallel.shard(rows))  # this rank's slice of the global batch
                        scale = parallel.loss_scale(rows) / cfg.accumulate
                        terms, records = self._backward(forward_model, objectives, batch, progress["step"], scale=scale)
                        terms = parallel.reduce_terms(terms, rows)
                        micro += 1
                        if micro % cfg.accumulate and index + 1 < batches_per_epoch:
                            continue
                        modulation = self._modulate(model, batch)
                        parallel.sync_gradients(module, forward_model)
                        if cfg.clip_norm is not None:
                            parallel.clip_grad_norm_(module, cfg.clip_norm)
                        optimizer.step()
                        self._check_weights(module, params, progress["step"] + 1)
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                        progress["step"] += 1
                        progress["batch"] = index + 1
                        record = {"step": progress["step"], "epoch": epoch, "lr": scheduler.get_last_lr()[0], **terms}
                        log.write("train", record | modulation)
                        alarm = ""
                        if monitor is not None:
                            for message in monitor.update(records, step=progress["step"]):
                                self.console.print(f"[yellow]warning:[/yellow] step {progress['step']}: {message}")
                                log.write("alarm", {"step": progress["step"], "epoch": epoch, "message": message})
                            if monitor.alarming:
                                alarm = " | [yellow]router collapse[/yellow]"
                        bar.update(task_id, advance=1, info=f"loss {terms['loss']:.4f}{alarm}")
                        if cfg.checkpoint_every and progress["step"] % cfg.checkpoint_every == 0:
                            checkpoint_to(last_path)
                    progress["epoch"], progress["batch"] = epoch + 1, 0
                    if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                        metrics = parallel.broadcast(self.validate(model))  # rank 0's, so all stop alike
                        log.write("valid", {"step": progress["step"], "epoch": epoch + 1, **metrics})
                        improved = self._early_stopping(progress, metrics)
                        if improved:
                            progress["best_metrics"] = metrics
                            checkpoint_to(best_path)
                        shown = f"{self._metric_name()} {metrics[self._metric_name()]:.4f}"
                        bar.update(task_id, info=f"loss {terms['loss']:.4f} | valid {shown}")
                    checkpoint_to(last_path)
        finally:
            log.close()
        parallel.close()
        if not parallel.is_main:  # rank 0 evaluates the best checkpoint and writes the summary
            best = progress.get("best_metrics", {})
            return TrainResult(self.out, progress["step"], progress["epoch"], best, {}, progress["stopped_early"])
        if not best_path.is_file():
            name = self._metric_name()
            raise TrainingError(
                f"no validation of this run gave a finite {name}, so there is no best checkpoint; "
                f"{self._kept()}. Lower train.lr, enable train.clip_norm, or check the inputs for NaN/Inf"
            )
        return self._finish(progress, time.perf_counter() - started)

    def _kept(self) -> str:
        """What this run has on disk, for messages when training stops."""
        shown = []
        for name in ("last", "best"):
            path = self.checkpoints / f"{name}.safetensors"
            if path.is_file():
                step = self.saved.get(name) if hasattr(self, "saved") else None
                shown.append(f"{str(path)!r}" + (f" (step {step})" if step is not None else ""))
        if not shown:
            return "no checkpoint was written before it stopped"
        return "the checkpoints kept are " + " and ".join(shown)

    def _check_weights(self, module: nn.Module, params: list[Tensor], step: int) -> None:
        """Stop when an optimizer step made a parameter non-finite (the loss can be finite
        while the update blows up: a huge learning rate without clipping)."""
        if not params:
            return
        # One fused norm per step (~0.15 ms on the presets); the exact check only on alarm,
        # since the norm of huge but finite weights may overflow.
        if bool(torch.isfinite(torch.stack(torch._foreach_norm([p.detach() for p in params]))).all()):
            return
        bad = [name for name, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise TrainingError(
                f"step {step}: the optimizer update made {len(bad)} parameter tensors non-finite "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) while the loss was finite; training stopped "
                f"and {self._kept()}. Lower train.lr or enable train.clip_norm"
            )

    def _collapse_monitor(self):
        collapse = self.config.train.collapse
        if not (collapse.enabled and self.config.model.moe.every):
            return None
        from modalmoe.analysis.routing import CollapseMonitor

        return CollapseMonitor(
            max_share=collapse.max_share, min_entropy=collapse.min_entropy, patience=collapse.patience
        )

    def _backward(self, model, objectives, batch, step: int, scale: float) -> tuple[dict[str, float], list]:
        output = model(batch)
        total, terms = objectives(output, batch, model)
        weights = self.config.train.aux_weights
        for name, weight in weights.items():
            if weight and name in output.aux_losses:
                value = output.aux_losses[name]
                terms[f"aux/{name}"] = value
                total = total + weight * value
        for name, value in terms.items():
            if not torch.isfinite(value).all():
                raise TrainingError(
                    f"step {step + 1}: loss term {name!r} is {float(value.detach())} (not finite); training "
                    f"stopped and {self._kept()}. Lower train.lr, enable train.clip_norm, or check the inputs "
                    "for NaN/Inf"
                )
        (total * scale).backward()
        out = {name: float(value.detach()) for name, value in terms.items()}
        out["loss"] = float(total.detach())
        return out, [record.detach() for record in output.records]

    def _modulate(self, model, batch) -> dict[str, float]:
        ogm = self.config.train.ogm
        if not ogm.enabled:
            return {}
        from modalmoe.objectives.ogm import ogm_ge

        with torch.no_grad():
            output = model(batch)
        coefficients = ogm_ge(model, output, batch, alpha=ogm.alpha, noise=ogm.noise)
        return {f"ogm/{k}": v for k, v in coefficients.items()}

    def _metric_name(self) -> str:
        return self._metric()[0]

    def _metric(self) -> tuple[str, str]:
        """(metric, mode) of early stopping and the best checkpoint."""
        from modalmoe.evaluate.metrics import PRIMARY

        stop = self.config.train.early_stopping
        metric, mode = PRIMARY[self._head_kind()]
        if stop is not None and stop.metric is not None:
            metric = stop.metric
            mode = "min" if metric in ("ece", "nll", "mse", "mae") else "max"
        if stop is not None and stop.mode is not None:
            mode = stop.mode
        return metric, mode

    def _head_kind(self) -> str:
        kind = self.config.model.head.kind
        return kind or ("classification" if self.task.train.task_type == "classification" else "regression")

    def validate(self, model: MultimodalModel) -> dict[str, float]:
        """Metrics of ``model`` on the validation split."""
        from modalmoe.evaluate.metrics import task_metrics
        from modalmoe.evaluate.runner import predict

        pred = predict(model, self.task.valid, batch_size=256)
        return task_metrics(pred.logits, pred.target, self._head_kind())

    def _early_stopping(self, progress: dict, metrics: dict) -> bool:
        """Update the best metric; True when this evaluation is the best so far."""
        stop = self.config.train.early_stopping
        name, mode = self._metric()
        if name not in metrics:
            raise TrainingError(
                f"early-stopping metric {name!r} is not among the validation metrics {sorted(metrics)}; "
                "set train.early_stopping.metric to one of them"
            )
        value = metrics[name]
        best = progress["best"]
        if not math.isfinite(value):  # a NaN compares False both ways; it must never become "best"
            step = progress["step"]
            self.console.print(f"[yellow]warning:[/yellow] validation {name} is {value} at step {step}: never the best")
            improved = False
        else:
            improved = best is None or (value > best if mode == "max" else value < best)
        if improved:
            progress["best"], progress["bad_evals"] = value, 0
        else:
            progress["bad_evals"] += 1
            if stop is not None and stop.patience and progress["bad_evals"] >= stop.patience:
                progress["stopped_early"] = True
        return improved

    def _finish(self, progress: dict, seconds: float) -> TrainResult:
        from modalmoe.efficiency.lora import count_parameters
        from modalmoe.evaluate.metrics import task_metrics
        from modalmoe.evaluate.runner import predict

        model = load_run_model(self.out, which="best")
        trainable, total = count_parameters(model)
        if getattr(self, "growth", None) is not None:  # a grown run's fixed old parts (modalmoe.lifelong)
            trainable -= self.growth.fixed
        test_pred = predict(model, self.task.test, batch_size=256)
        test = task_metrics(test_pred.logits, test_pred.target, self._head_kind())
        # The validation metrics of the best checkpoint, kept when it was saved (runs written
        # before they were kept are validated again).
        best = progress.get("best_metrics") or self.validate(model)
        summary = {
            "name": self.config.name,
            "task": self.config.task,
            "steps": progress["step"],
            "epochs": progress["epoch"],
            "stopped_early": progress["stopped_early"],
            "train_seconds": round(seconds, 2),
            "valid": best,
            "test": test,
            "parameters": {"trainable": trainable, "total": total, "trainable_fraction": trainable / max(1, total)},
        }
        if getattr(self, "init_report", None) is not None:
            summary["init_from"] = self.init_report.to_json()
        if progress.get("history"):  # config changes of --resume (modalmoe.train.resume)
            summary["history"] = progress["history"]
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        return TrainResult(self.out, progress["step"], progress["epoch"], best, test, progress["stopped_early"])


def head_outputs(dataset) -> int | None:
    """The prediction head's outputs for a training split: its classes, or its targets."""
    if dataset.task_type == "classification":
        return dataset.num_classes
    return 1 if dataset.target.dim() == 1 else dataset.target.shape[1]


def read_run_config(run_dir: str | Path) -> ExperimentConfig:
    """The experiment config of a run directory."""
    from modalmoe.config import load_config

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{str(run_dir)!r} is not a run directory (no config.yaml); see `modalmoe train`")
    return load_config(path)


def run_files(run_dir: str | Path) -> list[str]:
    """The run artefacts present in ``run_dir`` (empty: no run there)."""
    return [name for name in RUN_FILES if (Path(run_dir) / name).exists()]


def clear_run(run_dir: str | Path) -> None:
    """Delete a run's artefacts (``RUN_FILES``) so that a fresh start leaves no old log behind."""
    for name in run_files(run_dir):
        path = Path(run_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def write_task_info(run_dir: Path, task) -> None:
    """``task.json``: what a trained model needs to be rebuilt without its training data
    (modality specs, task type, outputs, class names)."""
    train = task.train
    info = {
        "task": task.name,
        "task_type": train.task_type,
        "outputs": head_outputs(train),
        "classes": list(train.classes) if train.classes is not None else None,
        "specs": {name: dataclasses.asdict(spec) for name, spec in task.specs.items()},
    }
    atomic_write_text(run_dir / "task.json", json.dumps(info, indent=2))


def read_task_info(run_dir: str | Path) -> dict:
    """``task.json`` of a run, with ``specs`` as ``ModalitySpec`` objects."""
    path = Path(run_dir) / "task.json"
    if not path.is_file():
        raise CheckpointError(f"{str(run_dir)!r} is not a run directory (no task.json); see `modalmoe train`")
    try:
        info = json.loads(path.read_bytes())
        info["specs"] = {name: ModalitySpec(**spec) for name, spec in info["specs"].items()}
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise CheckpointError(
            f"{str(path)!r} is damaged ({type(err).__name__}: {err}); it is written by `modalmoe train`: restore it "
            "from a copy of the run, or retrain"
        ) from None
    return info


def load_run_model(run_dir: str | Path, *, which: str = "best") -> MultimodalModel:
    """The trained model of a run (``best`` or ``last`` checkpoint), in eval mode; the
    training data is not needed."""
    from modalmoe.train.checkpoint import restore_module

    config = read_run_config(run_dir)
    info = read_task_info(run_dir)
    path = Path(run_dir) / "checkpoints" / f"{which}.safetensors"
    checkpoint = load_checkpoint(path)
    check_config(checkpoint, config.model_dump(mode="json"))
    model = build_model(config.model, info["specs"], task_type=info["task_type"], outputs=info["outputs"])
    if config.train.lora.rank:  # the checkpoint holds the adapted model: rebuild its adapters first
        from modalmoe.efficiency.lora import apply_lora

        apply_lora(model, config.train.lora)
    restore_module(model, checkpoint.model_state(), f"checkpoint {str(path)!r}")
    return model.eval()


class _Log:
    """metrics.jsonl plus TensorBoard event files; on resume, drops what came after the checkpoint.

    A process killed in the middle of a write leaves a torn last line: it is dropped with a
    warning. A damaged line before the last is refused, naming the file and line
    (``modalmoe.io.read_jsonl``).
    """

    def __init__(self, out: Path, purge_after: int | None, console: Console | None = None) -> None:
        self.path = out / "metrics.jsonl"
        if purge_after is not None and self.path.exists():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                kept = [line for line, entry in read_jsonl(self.path) if entry.get("step", 0) <= purge_after]
            for warning in caught:  # a torn last line: dropped, and said so
                (console or Console(stderr=True)).print(f"[yellow]warning:[/yellow] {warning.message}")
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")  # noqa: SIM115  (closed by close())
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(out / "tb"), purge_step=purge_after + 1 if purge_after else None)

    def write(self, split: str, record: dict) -> None:
        self.file.write(json.dumps({"split": split, **record}) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)):
                self.tb.add_scalar(f"{split}/{key}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def _bar(console: Console, total: int, show: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not show,
        transient=False,
    )
