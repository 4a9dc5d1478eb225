"""K-fold training: one run per fold of a small dataset, and the mean and interval over folds.

    from modalmoe.train.folds import train_folds
    result = train_folds(experiment, "runs/mine", folds=5)
    result.test["accuracy"].mean, result.test["accuracy"].ci_low

``OUT/fold-<i>`` is an ordinary run directory for fold ``i`` (``modalmoe.data.folds``: tested
on fold ``i``, checkpoint chosen on fold ``i + 1``), whose task options name its fold, so
``eval``, ``analyze`` and ``predict`` work on it as on any run. ``OUT/folds.json`` lists the
folds and, once every fold has trained, each test metric's mean, standard deviation and 95%
Student-t interval over the folds (``modalmoe.evaluate.intervals``). It is rewritten after
each fold, so an interrupted K-fold run resumes where it stopped (``resume=True``: finished
folds are kept, an interrupted one continues from its last checkpoint).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from modalmoe.checkpoint import CheckpointError
from modalmoe.config import ExperimentConfig
from modalmoe.data.folds import OPTIONS, check_folds
from modalmoe.evaluate.intervals import Summary, summarize_metrics, summary_dict
from modalmoe.io import atomic_write_text
from modalmoe.train.trainer import Trainer, TrainResult

FOLDS_FILE = "folds.json"


@dataclass
class FoldsResult:
    """What ``train_folds`` returns.

    Attributes:
        out: the K-fold directory.
        runs: each fold's run directory.
        results: each fold's ``TrainResult``.
        test: test metric -> its summary over the folds.
    """

    out: Path
    runs: list[Path]
    results: list[TrainResult] = field(default_factory=list)
    test: dict[str, Summary] = field(default_factory=dict)


def fold_experiment(experiment: ExperimentConfig, *, folds: int, fold: int, fold_seed: int) -> ExperimentConfig:
    """``experiment`` on fold ``fold`` of ``folds``: its task options name the fold."""
    check_folds(folds, fold)
    options = {**experiment.task_options, "folds": folds, "fold": fold, "fold_seed": fold_seed}
    return experiment.model_copy(update={"task_options": options})


def is_folds_dir(path: str | Path) -> bool:
    return (Path(path) / FOLDS_FILE).is_file()


def read_folds(path: str | Path) -> dict:
    """``folds.json`` of a K-fold directory (``CheckpointError`` when it is not one)."""
    file = Path(path) / FOLDS_FILE
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} is not a K-fold directory (no {FOLDS_FILE}); see train --folds") from None
    except ValueError as err:
        raise CheckpointError(f"{str(file)!r} is damaged ({err}); train the folds again with --overwrite") from None


def train_folds(
    experiment: ExperimentConfig,
    out: str | Path,
    *,
    folds: int,
    fold_seed: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    console: Console | None = None,
    callbacks: Callable[[ExperimentConfig], list] | None = None,
) -> FoldsResult:
    """Train ``experiment`` on each of ``folds`` folds into ``out/fold-<i>`` (module docstring).

    Args:
        fold_seed: shuffles the folds (default: ``experiment.train.seed``).
        resume: keep the finished folds, continue an interrupted one.
        overwrite: start every fold over.
        callbacks: config -> the trainer callbacks of a fold's run (e.g. a grown run's).
    """
    check_folds(folds)
    clash = sorted(set(OPTIONS) & set(experiment.task_options))
    if clash:
        raise CheckpointError(f"the config's task options already name a fold ({clash}); drop them or --folds")
    out = Path(out)
    seed = experiment.train.seed if fold_seed is None else fold_seed
    if is_folds_dir(out) and not (resume or overwrite):
        raise CheckpointError(
            f"{str(out)!r} already holds K-fold runs; pass --resume to finish them, --overwrite to start over, "
            "or choose another --out"
        )
    if resume and is_folds_dir(out):
        recorded = read_folds(out)
        if (recorded.get("folds"), recorded.get("fold_seed")) != (folds, seed):
            raise CheckpointError(
                f"{str(out)!r} holds {recorded.get('folds')} folds with fold seed {recorded.get('fold_seed')}; "
                f"resume them with the same --folds and --fold-seed, or --overwrite"
            )
    out.mkdir(parents=True, exist_ok=True)
    runs = [out / f"fold-{i}" for i in range(folds)]
    result = FoldsResult(out, runs)
    record = {"folds": folds, "fold_seed": seed, "name": experiment.name, "task": experiment.task, "runs": []}
    _write(out, record)
    for i, run in enumerate(runs):
        config = fold_experiment(experiment, folds=folds, fold=i, fold_seed=seed)
        if console is not None:
            console.print(f"fold {i + 1}/{folds} -> {run}", highlight=False)
        trainer = Trainer(config, run, progress=progress, console=console,
                          callbacks=callbacks(config) if callbacks else ())  # fmt: skip
        done = _finished(run) if resume and not overwrite else None
        if done is not None:
            fold_result = TrainResult(run, done["steps"], done["epochs"], done["valid"], done["test"])
        else:
            started = resume and not overwrite and (run / "checkpoints" / "last.safetensors").is_file()
            fold_result = trainer.fit(resume=started, overwrite=not started)
        result.results.append(fold_result)
        record["runs"].append({"fold": i, "run": run.name, "valid": fold_result.best, "test": fold_result.test})
        _write(out, record)
    tests = [r.test for r in result.results]
    result.test = summarize_metrics(tests)
    record["test"] = {k: summary_dict(s, [t[k] for t in tests]) for k, s in result.test.items()}
    _write(out, record)
    return result


def _finished(run: Path) -> dict | None:
    """A fold run's ``summary.json`` when it finished training (else None)."""
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return summary if summary.get("test") else None


def _write(out: Path, record: dict) -> None:
    atomic_write_text(out / FOLDS_FILE, json.dumps(record, indent=2))
