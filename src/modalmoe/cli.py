"""The ``modalmoe`` command line (click).

    modalmoe train av-digits/token-choice --set train.epochs=20 --out runs/av
    modalmoe train runs/av --resume
    modalmoe eval runs/av --subsets all --noise 1,3,5
    modalmoe predict runs/av --input path/to/manifest-dir --out predictions.csv
    modalmoe presets | data | info

Exit status: 0 on success, 2 for a usage or configuration error (an unknown preset, a bad
``--set``, a checkpoint that does not match), 1 for a failure at run time (a non-finite
loss, a download that fails). Errors are one line; ``--debug`` adds the traceback. Every
command runs with ``modalmoe.runtime.tune_allocator()`` unless ``--allocator default``.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import traceback
from pathlib import Path

import click
import torch
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import modalmoe
from modalmoe.analysis.report import write_report
from modalmoe.bench.leaderboard import compare
from modalmoe.bench.routing_index import write_bench_index
from modalmoe.bench.runner import BenchInterrupted, run_bench
from modalmoe.bench.store import ResultsStore
from modalmoe.bench.suites import load_suite
from modalmoe.checkpoint import CheckpointError
from modalmoe.commands import data as data_cli
from modalmoe.commands import presets as model_cli
from modalmoe.config import ConfigError, load_config
from modalmoe.data.folds import SMALL as SMALL_DATA
from modalmoe.data.formats import DataFormatError
from modalmoe.data.tasks import tasks
from modalmoe.efficiency.compress import compress_run, parse_keep, parse_layers
from modalmoe.efficiency.profile import profile_model
from modalmoe.encoders import encoders
from modalmoe.evaluate.intervals import summarize_reports
from modalmoe.evaluate.runner import evaluate
from modalmoe.io import DamagedFile, atomic_write_text
from modalmoe.lifelong import growth_callbacks
from modalmoe.lifelong.grow import continue_run
from modalmoe.lifelong.tasks import continue_task, task_data
from modalmoe.lock import DirectoryInUse
from modalmoe.model.fusion import fusions
from modalmoe.model.multimodal import build_model
from modalmoe.model.presets import design_names, get_preset, is_generic, task_files
from modalmoe.model.upcycle import upcycled_experiment
from modalmoe.moe import grouped_gemm, routers
from modalmoe.moe.communication import communications
from modalmoe.objectives import objectives
from modalmoe.registry import UnknownName, UnknownOption
from modalmoe.run import RunDir, experiment_task, load_run_model, read_run_config
from modalmoe.runtime import allocator_name, tune_allocator
from modalmoe.train import Trainer
from modalmoe.train.folds import is_folds_dir, read_folds, train_folds
from modalmoe.train.predict import predict_to_file

console = Console()

#: ``--data DIR`` of the commands that read a run's data again (eval, analyze, compress).
run_data_option = click.option(
    "--data",
    "data",
    default=None,
    metavar="DIR",
    help="the data to use instead of the run's recorded data (it must carry the run's modalities)",
)


class NonFiniteOutputs(RuntimeError):
    """A model gave NaN or infinite outputs (exit 1); ``--allow-nonfinite`` accepts them."""


# Errors that mean "what you asked for cannot be done as asked" (exit 2).
USAGE_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    CheckpointError,
    DataFormatError,
    DirectoryInUse,
    DamagedFile,
    UnknownName,
    UnknownOption,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(modalmoe.__version__, prog_name="modalmoe")
@click.option(
    "--allocator",
    type=click.Choice(["tuned", "default"]),
    default="tuned",
    help="'tuned' keeps large temporaries in the heap (glibc mallopt; see modalmoe.runtime)",
)
@click.option("--debug", is_flag=True, help="show tracebacks on errors")
@click.pass_context
def cli(ctx: click.Context, allocator: str, debug: bool) -> None:
    """Efficient multimodal Mixture-of-Experts learning."""
    ctx.obj = {"debug": debug}
    if allocator == "tuned":
        tune_allocator()


@cli.command(help="Versions, threads, kernels and every registered component.")
def info() -> int:
    rows = {
        "modalmoe": modalmoe.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "allocator": allocator_name(),
        "grouped GEMM": "MKL cblas_?gemm_batch"
        if grouped_gemm.available(torch.ones(1))
        else "fallback (padded bmm + per-expert tails)",
        "routers": ", ".join(routers.names()),
        "communication": ", ".join(communications.names()),
        "encoders": ", ".join(encoders.names()),
        "fusions": ", ".join(fusions.names()),
        "objectives": ", ".join(objectives.names()),
        "tasks": ", ".join(tasks.names()),
        "presets": f"<task>/<design>: tasks {', '.join(task_files())}; designs {', '.join(design_names())}",
    }
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _experiment(source: str, overrides: tuple[str, ...], data: str | None = None):
    """A preset name, a YAML file, or a run directory -> ``ExperimentConfig``; ``data``: a data
    directory to train on (a generic preset's encoders are sized for it)."""
    path = Path(source)
    if path.is_dir() and (path / "config.yaml").is_file():
        if data is not None:
            raise click.UsageError(f"{source!r} is a run directory: it trains on its own data (drop --data)")
        return load_config(path / "config.yaml", overrides=overrides)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        extra = (f"task={json.dumps(str(Path(data).expanduser().resolve()))}",) if data is not None else ()
        return load_config(path, overrides=(*extra, *overrides))
    if is_generic(source) and data is None:
        raise click.UsageError(f"{source!r} is a preset for your own data: add --data DIR (a data directory)")
    return get_preset(source, overrides=overrides, data=data)


@cli.command(
    help="Train a preset (<task>/<design>), a YAML config, or continue a run directory. With --continue-from "
    "RUN_DIR --add-modality NAME: grow a trained run by a modality of its task and new experts reserved for it; "
    "with --continue-from RUN_DIR --add-task LABEL [--task NAME] [--task-option KEY=VALUE]: learn a new task with "
    "a new head and new experts reserved for it (lifelong learning, see modalmoe.lifelong); resume a grown run "
    "later with `train OUT --resume`."
)
@click.argument("config", required=False)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config value (repeatable)")
@click.option("--data", "data", default=None, metavar="DIR",
              help="train on your own data: a data directory (manifest.yaml, or a MultiBench layout), with a "
              "generic/<design> preset (encoders sized from the data) or a YAML config")  # fmt: skip
@click.option("--out", type=click.Path(file_okay=False), default=None, help="run directory (default runs/<name>)")
@click.option("--resume", is_flag=True, help="continue the run in --out (or CONFIG's run directory) exactly; "
              "train.epochs and train.early_stopping.patience may grow (see modalmoe.train.resume)")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="start over in a directory that holds a run: its checkpoints and "
              "logs are deleted first")  # fmt: skip
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--continue-from", "continue_from", type=click.Path(file_okay=False), default=None, metavar="RUN_DIR",
              help="a trained run to grow with --add-modality or --add-task (default --out: RUN_DIR+NAME)")  # fmt: skip
@click.option("--add-modality", "add_modality", default=None, metavar="NAME", help="the run's task's modality to add")
@click.option("--add-task", "add_task", default=None, metavar="LABEL",
              help="learn a new task, labelled LABEL, with its own head (its data: --task, --task-option)")  # fmt: skip
@click.option("--task", "new_task", default=None, metavar="NAME",
              help="with --add-task: the bundled task to learn [default: the run's task]")  # fmt: skip
@click.option("--task-option", "task_options", multiple=True, metavar="KEY=VALUE",
              help="with --add-task: an option of that task, e.g. seed=2 (repeatable; over the run's options when "
              "the task is the run's)")  # fmt: skip
@click.option(
    "--previous",
    default=None,
    metavar="LABEL",
    help="with --add-task: the label of the run's own task, when it has none yet [default: its task name]",
)
@click.option("--experts", type=click.IntRange(min=0), default=None,
              help="experts added per MoE layer, reserved for the new modality or task "
              "[default: the run's k]")  # fmt: skip
@click.option("--freeze", type=click.Choice(["experts", "old", "none"]), default=None,
              help="what of the run stays fixed: its experts and router rows, everything, or nothing "
              "[default: experts]")  # fmt: skip
@click.option("--ewc", type=click.FloatRange(min=0.0), default=None,
              help="Elastic Weight Consolidation strength on the run's weights [default: 0, off]")  # fmt: skip
@click.option("--upcycle-from", "upcycle_from", type=click.Path(file_okay=False), default=None, metavar="RUN_DIR",
              help="sparse upcycling: train an MoE model whose experts start as copies of this dense run's FFNs "
              "(the run's config with model.moe.every=1; change experts, k or router with --set model.moe.*); "
              "at step 0 it computes what the dense run computes")  # fmt: skip
@click.option("--folds", type=click.IntRange(min=3), default=None, metavar="K",
              help="K-fold: train one run per fold into OUT/fold-<i> (stratified, seeded; every sample tested "
              "once) and report the mean and 95%% interval over folds in OUT/folds.json")  # fmt: skip
@click.option("--fold-seed", "fold_seed", type=int, default=None,
              help="with --folds: the seed that deals the folds [default: train.seed]")  # fmt: skip
def train(
    config: str | None,
    overrides: tuple[str, ...],
    data: str | None,
    out: str | None,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    continue_from: str | None,
    add_modality: str | None,
    add_task: str | None,
    new_task: str | None,
    task_options: tuple[str, ...],
    previous: str | None,
    experts: int | None,
    freeze: str | None,
    ewc: float | None,
    upcycle_from: str | None,
    folds: int | None,
    fold_seed: int | None,
) -> int:

    task_flags = {"--task": new_task, "--task-option": task_options or None, "--previous": previous}
    given = [flag for flag, value in task_flags.items() if value is not None]
    if given and add_task is None:
        raise click.UsageError(
            f"{', '.join(given)} describe the task of --add-task LABEL; add it (and --continue-from)"
        )
    if continue_from is not None or add_modality is not None or add_task is not None:
        grow = {"experts": experts, "freeze": freeze, "ewc": ewc}
        task = {"task": new_task, "task_options": _task_options(task_options), "previous": previous}
        experiment, out = _grown_experiment(config, continue_from, add_modality, add_task, task, grow, overrides, out)
        if resume:
            raise click.UsageError(f"--resume continues an existing run: use `modalmoe train {out} --resume`")
    elif experts is not None or freeze is not None or ewc is not None:
        raise click.UsageError(
            "--experts, --freeze and --ewc grow a run: add --continue-from and --add-modality or --add-task"
        )
    elif upcycle_from is not None:
        if config is not None or data is not None:
            raise click.UsageError(
                "--upcycle-from RUN_DIR builds the MoE config from the dense run: drop CONFIG and --data"
            )
        experiment = upcycled_experiment(upcycle_from, overrides)
        out = out or f"{str(upcycle_from).rstrip('/')}+upcycled"
    elif config is None:
        raise click.UsageError("missing CONFIG (a preset, a YAML file or a run directory), or --continue-from RUN_DIR")
    else:
        experiment = _experiment(config, overrides, data)
    if data is not None and config is None:
        raise click.UsageError("--data trains a new run: give CONFIG (e.g. generic/token-choice), not --continue-from")
    if out is None:
        source = Path(config)
        name = (experiment.name or source.stem).replace("/", "-")
        if data is not None:
            name = f"{Path(data).expanduser().resolve().name}-{name}"
        out = str(source) if source.is_dir() else str(Path("runs") / name)
    if resume and overwrite:
        raise click.UsageError("--resume continues the run, --overwrite deletes it and starts over: pass one")
    if fold_seed is not None and folds is None:
        raise click.UsageError("--fold-seed deals the folds of --folds K: add --folds")
    if folds is not None:
        return _train_folds(experiment, out, folds, fold_seed, resume=resume, overwrite=overwrite, quiet=quiet)
    callbacks = growth_callbacks(experiment, console)  # a grown run's part (modalmoe.lifelong); else none
    trainer = Trainer(experiment, out, progress=not quiet, console=console, callbacks=callbacks)
    samples = len(trainer.task.train)
    if samples < SMALL_DATA:
        console.print(
            f"[yellow]warning:[/yellow] {samples} training samples: one test split of this size is a noisy estimate; "
            f"add --folds 5 for the mean and interval over five folds",
            highlight=False,
            soft_wrap=True,
        )
    result = trainer.fit(resume=resume, overwrite=overwrite)
    if result.test:  # under torchrun only rank 0 evaluates and reports
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.test.items())
        console.print(f"trained {result.steps} steps ({result.epochs} epochs) -> {result.run_dir}; test: {shown}")
    return 0


def _train_folds(experiment, out: str, folds: int, fold_seed, *, resume: bool, overwrite: bool, quiet: bool) -> int:
    result = train_folds(
        experiment,
        out,
        folds=folds,
        fold_seed=fold_seed,
        resume=resume,
        overwrite=overwrite,
        progress=not quiet,
        console=console,
        callbacks=lambda config: growth_callbacks(config, console),
    )
    _print_folds(f"{folds}-fold test metrics -> {result.out}", result.test)
    return 0


def _print_folds(title: str, summaries: dict) -> None:
    table = Table(title=title, title_justify="left")
    for column in ("metric", "mean", "std", "95% interval", "folds"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, s in summaries.items():
        table.add_row(name, f"{s.mean:.4f}", f"{s.std:.4f}", f"{s.ci_low:.4f} .. {s.ci_high:.4f}", str(s.n))
    console.print(table)


def _task_options(pairs: tuple[str, ...]) -> dict | None:
    """``--task-option KEY=VALUE`` pairs -> options (values read as YAML: ``seed=2`` is an int)."""
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--task-option takes KEY=VALUE (e.g. seed=2), got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _grown_experiment(config, run_dir, modality, task_label, task, grow, overrides, out):
    """The experiment of ``train --continue-from RUN_DIR --add-modality NAME`` (or
    ``--add-task LABEL``) and its --out."""

    if config is not None:
        raise click.UsageError(f"give either CONFIG ({config!r}) or --continue-from RUN_DIR, not both")
    if run_dir is None:
        flag = "--add-modality" if modality is not None else "--add-task"
        raise click.UsageError(f"{flag} grows a trained run: give it with --continue-from RUN_DIR")
    if modality is not None and task_label is not None:
        raise click.UsageError("add a modality or a task, not both in one run: --add-modality or --add-task")
    if modality is None and task_label is None:
        raise click.UsageError("--continue-from needs --add-modality NAME or --add-task LABEL")
    experts = grow["experts"]
    if experts is None:
        experts = read_run_config(run_dir).model.moe.k if Path(run_dir, "config.yaml").is_file() else 0
    options = {"experts": experts, "freeze": grow["freeze"] or "experts", "ewc": grow["ewc"] or 0.0}
    if modality is not None:
        experiment = continue_run(run_dir, add_modalities=[modality], overrides=overrides, **options)
        return experiment, out or f"{str(run_dir).rstrip('/')}+{modality}"

    experiment = continue_task(run_dir, label=task_label, overrides=overrides, **options, **task)
    return experiment, out or f"{str(run_dir).rstrip('/')}+{task_label}"


@cli.command("eval", help="Evaluate a run's best checkpoint: metrics, every modality subset, noise.")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--split", type=click.Choice(["test", "valid", "train"]), default="test")
@click.option("--subsets", type=click.Choice(["all", "none"]), default="all", help="every non-empty modality subset")
@click.option("--noise", default="", help="noise severities, e.g. 1,3,5 (0 is clean)")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="also write the report here")
@click.option("--task", "task_label", default=None, metavar="LABEL",
              help="a run grown by --add-task: evaluate its earlier task LABEL on that task's data")  # fmt: skip
@run_data_option
@click.option("--allow-nonfinite", is_flag=True, help="report metrics even when some outputs are NaN or infinite "
              "(counted in 'nonfinite'); without it such an evaluation fails and writes nothing")  # fmt: skip
def evaluate_command(
    run_dir: str,
    split: str,
    subsets: str,
    noise: str,
    checkpoint: str,
    json_path: str | None,
    task_label: str | None,
    data: str | None,
    allow_nonfinite: bool,
) -> int:

    levels = _levels(noise)
    if is_folds_dir(run_dir):
        if task_label is not None:
            raise click.UsageError("--task evaluates a grown run's earlier task; a K-fold directory has none")
        args = (split, subsets, levels, checkpoint, data, allow_nonfinite)
        reports = []
        for entry in read_folds(run_dir)["runs"]:
            fold_dir = Path(run_dir) / entry["run"]
            console.print(f"fold {entry['fold']}: {fold_dir}", highlight=False)
            reports.append(_evaluate_run(str(fold_dir), *args, quiet=True))
        folds = read_folds(run_dir)["folds"]
        if len(reports) < folds:
            raise CheckpointError(
                f"{run_dir!r} holds {len(reports)} of its {folds} fold runs; finish them with "
                f"`modalmoe train ... --folds {folds} --out {run_dir} --resume`"
            )
        summary = summarize_reports(reports)
        _print_fold_report(summary)
        payload = json.dumps({"run": str(run_dir), "split": split, "checkpoint": checkpoint, "folds": summary,
                              "runs": reports}, indent=2)  # fmt: skip
        atomic_write_text(Path(json_path) if json_path else Path(run_dir) / f"eval-{split}.json", payload)
        return 0
    report = _evaluate_run(run_dir, split, subsets, levels, checkpoint, data, allow_nonfinite, task_label=task_label)
    extra = {"task": task_label} if task_label else {}
    payload = json.dumps({"run": str(run_dir), "split": split, "checkpoint": checkpoint, **extra, **report}, indent=2)
    name = f"eval-{split}" + (f"-{task_label}" if task_label else "")
    atomic_write_text(Path(json_path) if json_path else Path(run_dir) / f"{name}.json", payload)
    return 0


def _evaluate_run(run_dir, split, subsets, levels, checkpoint, data, allow_nonfinite, *, task_label=None, quiet=False):
    """One run's evaluation report (as a dict), printed unless ``quiet``."""
    config = read_run_config(run_dir)
    task = task_data(config, task_label, run=run_dir, data=data)
    model = load_run_model(run_dir, which=checkpoint)
    report = evaluate(
        model,
        task.splits[split],
        subsets=subsets == "all",
        noise_levels=levels,
        train_scale=task.train,
        task=task_label,
    )
    if report.nonfinite and not allow_nonfinite:
        raise NonFiniteOutputs(
            f"{report.nonfinite} of {report.samples} samples of {run_dir!r} ({split}) give NaN or infinite outputs, "
            "so its metrics mean nothing and no report was written; check the run (a NaN checkpoint?) and the "
            "inputs' range, or pass --allow-nonfinite to report them anyway"
        )
    if not quiet:
        report.print(console)
    return report.to_dict()


def _print_fold_report(summary: dict) -> None:
    """Modality subsets and noise rows: each metric's mean +- the half-width of its 95% interval over folds."""
    names = list(summary["metrics"])

    def cell(m):
        return "" if m is None else f"{m['mean']:.4f} ± {(m['ci_high'] - m['ci_low']) / 2:.4f}"

    title = f"Mean over {summary['runs']} folds ± half the 95% interval"
    table = Table(title=title, title_justify="left")
    for column in ("modalities", "samples", *names):
        table.add_column(column, justify="left" if column == "modalities" else "right")
    rows = summary["subsets"] or [{"modalities": ["all"], "samples": summary["samples"], "metrics": summary["metrics"]}]
    for row in rows:
        table.add_row(" + ".join(row["modalities"]), str(row["samples"]), *[cell(row["metrics"].get(n)) for n in names])
    for row in summary["noise"]:
        label = f"noise {row['level']} on {row['noisy']}"
        table.add_row(label, str(row["samples"]), *[cell(row["metrics"].get(n)) for n in names])
    console.print(table)


def _levels(text: str) -> list[int]:
    try:
        levels = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: give severities as integers, e.g. 1,3,5", param_hint="--noise") from None
    return sorted({0, *levels}) if levels else []


@cli.command(
    help="Write a run's routing report: one self-contained HTML page (per-layer statistics and plots). "
    "Given a bench directory, write routing/index.html: routing consistency across seeds and designs, "
    "with a report per task."
)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--split", type=click.Choice(["test", "valid", "train"]), default="test")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None, help="default RUN_DIR/report.html")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best")
@run_data_option
def analyze(run_dir: str, split: str, out_path: str | None, checkpoint: str, data: str | None) -> int:

    if (Path(run_dir) / "results.jsonl").exists():  # a bench directory
        path = write_bench_index(run_dir, console=console)
        console.print(f"index -> {path}")
        return 0
    with console.status("routing the split and drawing the report"):
        path = write_report(run_dir, out_path, split=split, which=checkpoint, data=data)
    console.print(f"report -> {path} ({path.stat().st_size / 2**20:.2f} MiB)")
    return 0


@cli.command(help="Cost of a trained run or a preset: parameters, active parameters, FLOPs per sample by "
             "component, latency p50/p95 at batch 1 and 64, throughput, peak memory.")  # fmt: skip
@click.argument("source")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a preset's config value")
@click.option("--repeats", type=int, default=20, show_default=True, help="timed passes for latency")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="also write the numbers here")
@click.option("--data", "data", default=None, metavar="DIR",
              help="a run: the data to use instead of its recorded data; a generic preset: the data it is sized "
              "for")  # fmt: skip
def profile(source: str, overrides: tuple[str, ...], repeats: int, json_path: str | None, data: str | None) -> int:
    path = Path(source)
    if path.is_dir() and (path / "config.yaml").is_file():
        model = load_run_model(path)
        task = RunDir(path).task(data)
    else:  # a preset or YAML file: built and fitted, untrained (costs do not depend on training)
        experiment = _experiment(source, overrides, data)
        task = experiment_task(experiment)
        train = task.train
        torch.manual_seed(0)
        outputs = train.num_classes if train.task_type == "classification" else 1
        model = build_model(experiment.model, task.specs, task_type=train.task_type, outputs=outputs).fit(train)
    numbers = profile_model(model.eval(), task.test, repeats=repeats)
    table = Table(title=f"profile: {source}", title_justify="left")
    table.add_column("quantity", no_wrap=True)
    table.add_column("value", justify="right")
    for key, value in numbers.items():
        if key == "flops_by_component":
            for name, flops in value.items():
                table.add_row(f"  MFLOPs/sample: {name}", f"{flops / 1e6:.3f}")
        elif isinstance(value, dict):
            table.add_row(key.replace("_ms", " (ms)"), f"p50 {value['p50_ms']:.2f}, p95 {value['p95_ms']:.2f}")
        elif key == "flops_per_sample":
            table.add_row("MFLOPs/sample", f"{value / 1e6:.3f}")
        else:
            table.add_row(key, f"{value:,.1f}" if isinstance(value, float) else f"{value:,}")
    console.print(table)
    if json_path:
        atomic_write_text(json_path, json.dumps(numbers, indent=2))
    return 0


@cli.command(help="Compress a trained run into a new run directory: int8 weights, fewer experts (pruned or "
             "merged), or token reduction. Prints test metrics before and after.")  # fmt: skip
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--method", required=True, type=click.Choice(["int8", "prune-experts", "merge-experts", "tokens"]))
@click.option(
    "--out", type=click.Path(file_okay=False), default=None, help="new run directory (default RUN_DIR-METHOD)"
)
@click.option("--experts", type=click.IntRange(min=1), default=None, help="prune/merge: experts left per MoE layer")
@click.option("--by", type=click.Choice(["weights", "outputs"]), default="weights", show_default=True,
              help="merge: expert similarity")  # fmt: skip
@click.option("--reduction", type=click.Choice(["merge", "attention", "router"]), default="merge", show_default=True,
              help="tokens: ToMe merging, or pruning by attention or router score")  # fmt: skip
@click.option(
    "--keep",
    default="0.5",
    show_default=True,
    help="tokens: fraction of each modality's tokens kept, or per modality (image=0.75,audio=0.5)",
)
@click.option(
    "--layers", default="0", show_default=True, help="tokens: blocks after which to reduce (-1: before the first)"
)
@click.option(
    "--placement",
    type=click.Choice(["after_block", "before_ffn"]),
    default="after_block",
    show_default=True,
    help="tokens: between blocks, or inside a block before its FFN (ToMe)",
)
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best")
@run_data_option
def compress(
    run_dir: str,
    method: str,
    out: str | None,
    experts: int | None,
    by: str,
    reduction: str,
    keep: str,
    layers: str,
    placement: str,
    checkpoint: str,
    data: str | None,
) -> int:

    if method in ("prune-experts", "merge-experts") and experts is None:
        raise click.UsageError(f"--method {method} needs --experts N (experts left per MoE layer)")
    out = out or f"{run_dir.rstrip('/')}-{method}"
    options: dict = {}
    if method in ("prune-experts", "merge-experts"):
        options = {"experts": experts, **({"by": by} if method == "merge-experts" else {})}
    elif method == "tokens":
        options = {
            "reduction": reduction,
            "keep": parse_keep(keep),
            "layers": parse_layers(layers),
            "placement": placement,
        }
    with console.status(f"compressing {run_dir} ({method})"):
        summary = compress_run(run_dir, out, method, which=checkpoint, data_dir=data, **options)
    before, after = summary["test_before"], summary["test"]
    shown = [k for k in ("accuracy", "macro_f1", "mse") if k in after]
    for key in shown:
        console.print(f"test {key}: {before[key]:.4f} -> {after[key]:.4f}")
    console.print(f"compressed run -> {out}")
    return 0


@cli.command(help="Predict with a trained run on a data directory (manifest format) or a bundled task.")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--input", "source", required=True, help="a manifest directory or a bundled task name")
@click.option("--split", default="all", help="train, valid, test, or all")
@click.option("--modalities", default=None, help="comma-separated subset of the model's modalities to use")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None, help="file.csv or file.json")
@click.option("--allow-nonfinite", is_flag=True, help="exit 0 even when some outputs are NaN or infinite (those "
              "rows are marked finite=false either way)")  # fmt: skip
def predict(
    run_dir: str, source: str, split: str, modalities: str | None, out_path: str | None, allow_nonfinite: bool
) -> int:

    rows, bad = predict_to_file(
        run_dir,
        source,
        split=split,
        modalities=None if modalities is None else [m.strip() for m in modalities.split(",") if m.strip()],
        out=out_path,
    )
    console.print(f"{rows} predictions" + (f" -> {out_path}" if out_path else ""))
    if bad and not allow_nonfinite:
        raise NonFiniteOutputs(
            f"{bad} of {rows} predictions are NaN or infinite (marked finite=false"
            + (f" in {out_path!r}" if out_path else "")
            + "); check the inputs' range and the run, or pass --allow-nonfinite"
        )
    return 0


@cli.group(
    invoke_without_command=True,
    help="The benchmark: every design of a suite at equal compute, over seeds, with statistics "
    "and robustness. `modalmoe bench compare A B` shows what changed between two bench directories.",
)
@click.option("--suite", default="standard", show_default=True, help="a suite name (configs/suites) or a YAML file")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="bench directory (default bench/<suite>)")
@click.option("--resume", is_flag=True, help="skip the cells already finished in --out")
@click.option("--jobs", type=int, default=2, show_default=True, help="cells run in parallel (worker processes)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a suite value")
@click.pass_context
def bench(ctx: click.Context, suite: str, out: str | None, resume: bool, jobs: int, overrides: tuple[str, ...]) -> int:
    if ctx.invoked_subcommand is not None:
        return 0

    if jobs < 1:
        raise click.BadParameter("--jobs must be >= 1", param_hint="--jobs")
    config = load_suite(suite, overrides)
    target = Path(out) if out else Path("bench") / config.name
    try:
        records = run_bench(config, target, resume=resume, jobs=jobs, console=console)
    except BenchInterrupted as stop:
        again = ["modalmoe", "bench", "--suite", suite, "--out", str(target), "--jobs", str(jobs), "--resume"]
        again += [arg for pair in overrides for arg in ("--set", pair)]
        console.print(escape(f"{stop}; continue with: {shlex.join(again)}"), highlight=False, soft_wrap=True)
        return 130  # the shell's status for a command stopped by SIGINT
    failed = [r for r in records if r.get("status") != "ok"]
    console.print(f"{len(records) - len(failed)} cells ok, {len(failed)} failed -> {target}/leaderboard.md")
    return 1 if failed else 0


@bench.command("compare", help="What changed between two bench directories (metric and FLOPs per design).")
@click.argument("dir_a", type=click.Path(exists=True, file_okay=False))
@click.argument("dir_b", type=click.Path(exists=True, file_okay=False))
def bench_compare(dir_a: str, dir_b: str) -> int:

    rows = compare(ResultsStore(dir_a).records(), ResultsStore(dir_b).records())
    table = Table(title=f"{dir_a} -> {dir_b}", title_justify="left")
    for column in ("task", "design", "metric", "A", "B", "B - A", "MFLOPs A", "MFLOPs B"):
        table.add_column(column, justify="left" if column in ("task", "design", "metric") else "right", no_wrap=True)

    def num(v, scale=1.0, digits=4):
        return "" if v is None else f"{v * scale:.{digits}f}"

    for r in rows:
        table.add_row(
            r["task"], r["design"], r["metric"], num(r["a"]), num(r["b"]), num(r["delta"]),
            num(r["flops_a"], 1e-6, 3), num(r["flops_b"], 1e-6, 3),
        )  # fmt: skip
    console.print(table)
    return 0


data_cli.register(cli)
model_cli.register(cli)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failure, 2 usage/config error)."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        result = cli.main(args=argv, prog_name="modalmoe", standalone_mode=False)
    except click.exceptions.Exit as stop:
        return stop.exit_code
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except click.Abort:
        console.print("aborted")
        return 1
    except Exception as err:  # one clear line; the traceback only on request
        usage = isinstance(err, USAGE_ERRORS)
        if debug:
            traceback.print_exc()
        message = str(err).strip() or type(err).__name__
        # soft_wrap: one line however narrow the terminal (rich would break it at its width)
        console.print("[red]error:[/red]", escape(message), highlight=False, soft_wrap=True)
        if not debug:
            console.print("(run with --debug for the traceback)", style="dim")
        return 2 if usage else 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
