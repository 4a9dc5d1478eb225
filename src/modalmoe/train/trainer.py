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
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import rich.progress
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from modalmoe.checkpoint import (
    CheckpointError,
    check_config,
    load_checkpoint,
)
from modalmoe.config import ExperimentConfig
from modalmoe.evaluate.metrics import PRIMARY, direction, task_metrics
from modalmoe.evaluate.runner import predict
from modalmoe.io import atomic_write_text, read_jsonl
from modalmoe.model.lora import count_parameters
from modalmoe.model.multimodal import MultimodalModel, build_model
from modalmoe.model.presets import check_preset_fits
from modalmoe.objectives import build_objectives
from modalmoe.run import (  # noqa: F401  (run-directory helpers, importable from here as before)
    RunDir,
    experiment_task,
    head_outputs,
    load_run_model,
    read_run_config,
    read_task_info,
)
from modalmoe.train.callbacks import Callback, builtin_callbacks
from modalmoe.train.distributed import NullLog, Parallel, setup_parallel, torchrun_world
from modalmoe.train.init import init_from_run
from modalmoe.train.progress import Progress
from modalmoe.train.resume import extensions
from modalmoe.train.samplers import samplers


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


@dataclass
class _Loop:
    """What one ``Trainer.fit`` call trains with, built once by ``Trainer._start``."""

    model: MultimodalModel
    forward: nn.Module  # the model as the forward pass sees it (DDP-wrapped under torchrun)
    objectives: nn.Module
    module: nn.ModuleDict  # model and objectives: what the optimizer and checkpoints hold
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    parallel: Parallel
    config_json: dict
    checkpoints: Path
    batches_per_epoch: int
    total_steps: int
    params: list[Tensor]
    progress: Progress = field(default_factory=Progress)
    log: _Log | NullLog | None = None  # NullLog on ranks other than 0
    bar: rich.progress.Progress | None = None
    bar_task: rich.progress.TaskID | None = None
    terms: dict[str, float] = field(default_factory=lambda: {"loss": float("nan")})

    @property
    def last_path(self) -> Path:
        return self.checkpoints / "last.safetensors"

    @property
    def best_path(self) -> Path:
        return self.checkpoints / "best.safetensors"


class Trainer:
    """Train one experiment into a run directory.

    Args:
        config: the experiment (task, model, training recipe).
        out: the run directory (created; an existing run is resumed only with ``fit(resume=True)``).
        task: an already loaded task (default: ``load_task(config.task, **config.task_options)``,
            a bundled task or a data directory).
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
        callbacks: Sequence[Callback] = (),
    ) -> None:
        check_preset_fits(config, task)  # a bundled task's preset is not for other data
        self.config, self.out = config, Path(out)
        self.console = console or Console()
        self.show_progress = progress
        self.task = task if task is not None else experiment_task(config)
        self.run = RunDir(self.out)
        self.checkpoints = self.run.checkpoints
        self.callbacks: list[Callback] = [*builtin_callbacks(config, self.console), *callbacks]
        self.init_report = None  # train.init_from's InitReport, once built
        self.saved: dict[str, int | None] = {}  # checkpoint -> the step it holds, for messages
        handled = {key for cb in self.callbacks for key in cb.handles}
        if config.train.grow is not None and "train.grow" not in handled:
            raise TrainingError(
                "this experiment grows a trained run (train.grow), which modalmoe.lifelong implements: train it "
                "with `modalmoe train`, or Trainer(..., callbacks=modalmoe.lifelong.growth_callbacks(config))"
            )

    # --- building -------------------------------------------------------------------------

    def build(self) -> tuple[MultimodalModel, nn.Module]:
        """The model (fitted on the training split) and the objectives, seeded; each callback
        sees the model, then both (``on_model``, ``on_objectives``)."""
        seed_everything(self.config.train.seed)
        train = self.task.train
        model = build_model(
            self.config.model, self.task.specs, task_type=train.task_type, outputs=head_outputs(train)
        ).fit(train)
        cfg = self.config.train
        if cfg.init_from is not None:  # after fit: the run's encoder statistics and tokenizers win
            transforms = [t for t in (cb.init_transform() for cb in self.callbacks) if t is not None]
            if len(transforms) > 1:
                raise TrainingError("two callbacks transform train.init_from's checkpoint; pass one of them")
            self.init_report = init_from_run(model, cfg.init_from, transform=transforms[0] if transforms else None)
            self.console.print(self.init_report.summary())
        for callback in self.callbacks:
            callback.on_model(model, self.init_report)
        objectives = build_objectives(cfg.objectives, head_kind=model.head.kind, dim=model.fusion.dim)
        for callback in self.callbacks:
            callback.on_objectives(model, objectives, self.init_report)
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
        for callback in self.callbacks:
            callback.on_optimizer(optimizer)
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
        with self.run.lock() if main else contextlib.nullcontext():
            return self._fit(resume=resume, overwrite=overwrite, main=main)

    def _fit(self, *, resume: bool, overwrite: bool, main: bool) -> TrainResult:
        self._check_directory(resume=resume, overwrite=overwrite, main=main)
        loop = self._start(resume=resume, main=main)
        started = time.perf_counter()
        bar = _bar(self.console, loop.total_steps, self.show_progress and loop.parallel.is_main)
        try:
            with bar:
                loop.bar = bar
                loop.bar_task = bar.add_task("train", total=loop.total_steps, completed=loop.progress.step, info="")
                while loop.progress.epoch < self.config.train.epochs and not loop.progress.stopped_early:
                    self._epoch(loop)
        finally:
            loop.log.close()
        loop.parallel.close()
        progress = loop.progress
        if not loop.parallel.is_main:  # rank 0 evaluates the best checkpoint and writes the summary
            best = progress.best_metrics or {}
            return TrainResult(self.out, progress.step, progress.epoch, best, {}, progress.stopped_early)
        if not loop.best_path.is_file():
            name = self._metric_name()
            raise TrainingError(
                f"no validation of this run gave a finite {name}, so there is no best checkpoint; "
                f"{self._kept()}. Lower train.lr, enable train.clip_norm, or check the inputs for NaN/Inf"
            )
        return self._finish(progress, time.perf_counter() - started)

    def _check_directory(self, *, resume: bool, overwrite: bool, main: bool) -> None:
        """Refuse a fresh start into an existing run (unless ``overwrite``: then clear it) and
        a resume without a checkpoint. Rank 0 decides; torchrun stops the others if it fails."""
        if main and not resume:
            existing = self.run.files()
            if existing and not overwrite:
                raise CheckpointError(
                    f"{str(self.out)!r} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                    "--overwrite to start it over (its checkpoints and logs are deleted), or choose another --out"
                )
            self.run.clear()
        if main and resume and not (self.checkpoints / "last.safetensors").is_file():
            raise CheckpointError(
                f"{str(self.out)!r} has no checkpoint to resume (checkpoints/last.safetensors: the run stopped "
                "before its first one); start it over with --overwrite"
            )

    def _start(self, *, resume: bool, main: bool) -> _Loop:
        """Everything one ``fit`` trains with: the model, the optimizer and the schedule built,
        the checkpoint restored on ``resume`` (or the run directory written), the log opened."""
        cfg = self.config.train
        model, objectives = self.build()
        train = self.task.train
        # Under torchrun: shard experts, wrap in DDP (modalmoe.train.distributed); else a no-op.
        parallel = setup_parallel(self.config, len(train))
        forward_model = parallel.prepare(model)
        module = nn.ModuleDict({"model": model, "objectives": objectives})
        optimizer = self._optimizer(module)
        # An unknown sampler or option fails here, before any training (the registry names them).
        samplers.create(cfg.sampler.name, dataset=train, seed=cfg.seed, epoch=0, **cfg.sampler.options)
        batches_per_epoch = math.ceil(len(train) / cfg.batch_size)
        total_steps = cfg.epochs * math.ceil(batches_per_epoch / cfg.accumulate)
        # Resuming with more epochs stretches the schedule from here on: the lambda is not saved.
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(total_steps, cfg.warmup, cfg.min_lr_ratio)
        )
        loop = _Loop(
            model=model,
            forward=forward_model,
            objectives=objectives,
            module=module,
            optimizer=optimizer,
            scheduler=scheduler,
            parallel=parallel,
            config_json=self.config.model_dump(mode="json"),
            checkpoints=self.checkpoints,
            batches_per_epoch=batches_per_epoch,
            total_steps=total_steps,
            params=list(module.parameters()),
        )
        self.saved = {}
        if resume:
            self._restore(loop, main=main)
        elif main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.run.write_config(self.config)
            self.run.write_task_info(self.task)
        loop.log = (
            _Log(self.out, purge_after=loop.progress.step if resume else None, console=self.console)
            if main
            else NullLog()
        )
        for callback in self.callbacks:
            if loop.progress.callbacks.get(callback.name):
                callback.load_state_dict(loop.progress.callbacks[callback.name])
        return loop

    def _restore(self, loop: _Loop, *, main: bool) -> None:
        """Resume from ``checkpoints/last.safetensors``: the training state and progress, and
        the config changes it allows (``train.resume.extensions``) recorded in the history."""
        last_path = loop.last_path
        checkpoint = load_checkpoint(last_path)
        compared, changes = extensions(checkpoint.config, loop.config_json, source=str(last_path))
        check_config(checkpoint, compared, sections=("task", "task_options", "model", "train"))
        loop.parallel.restore_training(
            checkpoint, module=loop.module, optimizer=loop.optimizer, scheduler=loop.scheduler
        )
        progress = loop.progress = Progress.from_dict(checkpoint.progress)
        self.saved = {"last": progress.step}
        if loop.best_path.is_file():
            self.saved["best"] = None
        if changes:
            progress.history.append({"step": progress.step, "changes": changes})
            patience = self.config.train.early_stopping
            if progress.stopped_early and patience is not None:
                progress.stopped_early = bool(patience.patience) and progress.bad_evals >= patience.patience
            if main:
                self.run.write_config(self.config)
            shown = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())
            self.console.print(f"extending the run: {shown}")
        self.console.print(f"resuming {self.out} at step {progress.step} (epoch {progress.epoch})")

    def _checkpoint(self, loop: _Loop, path: Path) -> None:
        """Save the training state (and each callback's) to ``path``."""
        progress = loop.progress
        for callback in self.callbacks:
            state = callback.state_dict()
            if state is not None:
                progress.callbacks[callback.name] = state
        loop.parallel.save_checkpoint(
            path,
            module=loop.module,
            config=loop.config_json,
            progress=progress.to_dict(),
            optimizer=loop.optimizer,
            scheduler=loop.scheduler,
        )
        self.saved[path.stem] = progress.step

    def _epoch(self, loop: _Loop) -> None:
        """The rest of the current epoch (all of it unless resumed mid-epoch), then its
        evaluation when due, then the last checkpoint."""
        cfg, progress, train = self.config.train, loop.progress, self.task.train
        epoch = progress.epoch
        order = samplers.create(cfg.sampler.name, dataset=train, seed=cfg.seed, epoch=epoch, **cfg.sampler.options)
        loop.module.train()
        micro = 0
        for index in range(progress.batch, loop.batches_per_epoch):
            rows = order[index * cfg.batch_size : (index + 1) * cfg.batch_size]
            batch = train.batch(loop.parallel.shard(rows))  # this rank's slice of the global batch
            # Each micro-batch's mean loss weighs by its share of its accumulation
            # group's samples, so a short last group is a mean over its own samples.
            start = index - index % cfg.accumulate
            group_samples = len(order[start * cfg.batch_size : (start + cfg.accumulate) * cfg.batch_size])
            scale = loop.parallel.loss_scale(rows) * len(rows) / group_samples
            terms, records = self._backward(loop.forward, loop.objectives, batch, progress.step, scale=scale)
            loop.terms = loop.parallel.reduce_terms(terms, rows)
            micro += 1
            if micro % cfg.accumulate and index + 1 < loop.batches_per_epoch:
                continue
            self._update(loop, batch, records, epoch=epoch, index=index)
        progress.epoch, progress.batch = epoch + 1, 0
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            self._evaluate(loop, epoch + 1)
        self._checkpoint(loop, loop.last_path)

    def _update(self, loop: _Loop, batch, records: list, *, epoch: int, index: int) -> None:
        """One optimizer step on the accumulated gradients, its log line and the callbacks."""
        cfg, progress = self.config.train, loop.progress
        extra: dict[str, float] = {}
        for callback in self.callbacks:
            extra |= callback.before_update(loop.model, batch)
        loop.parallel.sync_gradients(loop.module, loop.forward)
        if cfg.clip_norm is not None:
            loop.parallel.clip_grad_norm_(loop.module, cfg.clip_norm)
        loop.optimizer.step()
        self._check_weights(loop.module, loop.params, progress.step + 1)
        loop.scheduler.step()
        loop.optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        progress.batch = index + 1
        record = {"step": progress.step, "epoch": epoch, "lr": loop.scheduler.get_last_lr()[0], **loop.terms}
        loop.log.write("train", record | extra)
        notes = "".join(cb.after_update(progress.step, epoch, records, loop.log) for cb in self.callbacks)
        loop.bar.update(loop.bar_task, advance=1, info=f"loss {loop.terms['loss']:.4f}{notes}")
        if cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0:
            self._checkpoint(loop, loop.last_path)

    def _evaluate(self, loop: _Loop, epochs: int) -> None:
        """Validate, log it, and keep the best checkpoint when this is the best so far."""
        progress = loop.progress
        metrics = loop.parallel.broadcast(self.validate(loop.model))  # rank 0's, so all stop alike
        loop.log.write("valid", {"step": progress.step, "epoch": epochs, **metrics})
        if self._early_stopping(progress, metrics):
            progress.best_metrics = metrics
            self._checkpoint(loop, loop.best_path)
        shown = f"{self._metric_name()} {metrics[self._metric_name()]:.4f}"
        loop.bar.update(loop.bar_task, info=f"loss {loop.terms['loss']:.4f} | valid {shown}")

    def _kept(self) -> str:
        """What this run has on disk, for messages when training stops."""
        shown = []
        for name in ("last", "best"):
            path = self.checkpoints / f"{name}.safetensors"
            if path.is_file():
                step = self.saved.get(name)
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

    def _metric_name(self) -> str:
        return self._metric()[0]

    def _metric(self) -> tuple[str, str]:
        """(metric, mode) of early stopping and the best checkpoint."""

        stop = self.config.train.early_stopping
        metric, mode = PRIMARY[self._head_kind()]
        if stop is not None and stop.metric is not None:
            metric = stop.metric
            mode = direction(metric)
        if stop is not None and stop.mode is not None:
            mode = stop.mode
        return metric, mode

    def _head_kind(self) -> str:
        kind = self.config.model.head.kind
        return kind or ("classification" if self.task.train.task_type == "classification" else "regression")

    def validate(self, model: MultimodalModel) -> dict[str, float]:
        """Metrics of ``model`` on the validation split."""

        pred = predict(model, self.task.valid, batch_size=256)
        return task_metrics(pred.logits, pred.target, self._head_kind())

    def _early_stopping(self, progress: Progress, metrics: dict) -> bool:
        """Update the best metric; True when this evaluation is the best so far."""
        stop = self.config.train.early_stopping
        name, mode = self._metric()
        if name not in metrics:
            raise TrainingError(
                f"early-stopping metric {name!r} is not among the validation metrics {sorted(metrics)}; "
                "set train.early_stopping.metric to one of them"
            )
        value = metrics[name]
        best = progress.best
        if not math.isfinite(value):  # a NaN compares False both ways; it must never become "best"
            step = progress.step
            self.console.print(f"[yellow]warning:[/yellow] validation {name} is {value} at step {step}: never the best")
            improved = False
        else:
            improved = best is None or (value > best if mode == "max" else value < best)
        if improved:
            progress.best, progress.bad_evals = value, 0
        else:
            progress.bad_evals += 1
            if stop is not None and stop.patience and progress.bad_evals >= stop.patience:
                progress.stopped_early = True
        return improved

    def _finish(self, progress: Progress, seconds: float) -> TrainResult:
        model = self.run.load_model("best")
        trainable, total = count_parameters(model)
        trainable -= sum(cb.fixed_parameters for cb in self.callbacks)  # e.g. a grown run's fixed old parts
        test_pred = predict(model, self.task.test, batch_size=256)
        test = task_metrics(test_pred.logits, test_pred.target, self._head_kind())
        # The validation metrics of the best checkpoint, kept when it was saved (runs written
        # before they were kept are validated again).
        best = progress.best_metrics or self.validate(model)
        summary = {
            "name": self.config.name,
            "task": self.config.task,
            "steps": progress.step,
            "epochs": progress.epoch,
            "stopped_early": progress.stopped_early,
            "train_seconds": round(seconds, 2),
            "valid": best,
            "test": test,
            "parameters": {"trainable": trainable, "total": total, "trainable_fraction": trainable / max(1, total)},
        }
        if self.init_report is not None:
            summary["init_from"] = self.init_report.to_json()
        if progress.history:  # config changes of --resume (modalmoe.train.resume)
            summary["history"] = progress.history
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        return TrainResult(self.out, progress.step, progress.epoch, best, test, progress.stopped_early)


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


def _bar(console: Console, total: int, show: bool) -> rich.progress.Progress:
    return rich.progress.Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not show,
        transient=False,
    )
