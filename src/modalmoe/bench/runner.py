"""The bench runner: plan the cells of a suite, run them (in worker processes), store records.

The cells come from every kind's planner (``bench/cells.py``: the designs of each task, then
lifelong protocols, then task sequences). The runner measures each task's compute budget
(the reference design's cost, cached in ``budgets.json``), runs every unfinished cell
(``cell.run``, with its task's budget) in this process or in ``jobs`` workers, starting a
cell that ``needs`` another once that one has finished, appends one record per cell to the
store (``bench/store.py``) as it arrives, and writes the leaderboard. It never asks what kind
of cell it holds.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import signal
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from modalmoe.bench.cells import Cell, Key, plan_cells
from modalmoe.bench.compute import reference_budget
from modalmoe.bench.leaderboard import write_outputs
from modalmoe.bench.store import Record, ResultsStore, cell_key, environment
from modalmoe.bench.suites import SuiteConfig, task_label
from modalmoe.bench.training import cell_config, cost_batch, fit_sample, suite_task
from modalmoe.checkpoint import config_differences
from modalmoe.config import ConfigError, read_yaml, to_yaml
from modalmoe.io import atomic_write_text
from modalmoe.lock import DirectoryLock
from modalmoe.train.trainer import head_outputs


class BenchInterrupted(RuntimeError):
    """Ctrl-C stopped the bench; finished cells are stored, the message says how to go on."""


def budget_basis(suite: SuiteConfig, task_file: str) -> dict:
    """Everything a task's budget depends on: the reference design, the match kind, the
    sample limit and the reference cell's whole resolved config (suite and task overrides)."""
    config = cell_config(suite, task_file, suite.reference, 0).model_dump(mode="json")
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return {"reference": suite.reference, "match": suite.match, "limit": suite.limit.get(task_file), "config": digest}


def budgets(suite: SuiteConfig, out: Path) -> dict[str, float]:
    """Each task's budget: the reference design's FLOPs (or parameters) per sample.

    Cached in ``budgets.json``, each entry with its ``budget_basis``: an entry measured under
    another basis (another suite, ``--set``, match kind or limit) is measured again."""
    if suite.match == "none":
        return {}
    path = out / "budgets.json"
    try:
        cached = json.loads(path.read_text()) if path.exists() else {}
    except (ValueError, OSError):
        cached = {}  # a cache: measured again rather than trusted
    out_budgets, entries = {}, {}
    for task_file in suite.tasks:
        basis = budget_basis(suite, task_file)
        entry = cached.get(task_file)
        if not (isinstance(entry, dict) and entry.get("basis") == basis and isinstance(entry.get("budget"), float)):
            task = suite_task(suite, task_file)
            cfg = cell_config(suite, task_file, suite.reference, 0)
            budget = reference_budget(
                cfg,
                task.specs,
                cost_batch(task),
                task_type=task.train.task_type,
                outputs=head_outputs(task.train),
                mode=suite.match,
                fit_data=fit_sample(task.train),
            )
            entry = {"budget": float(budget), "basis": basis}
        entries[task_file], out_budgets[task_file] = entry, entry["budget"]
    atomic_write_text(path, json.dumps(entries, indent=2))
    return out_budgets


def run_cell(cell: Cell, suite_json: dict, budget: float | None, out: str, threads: int) -> Record:
    """Run one cell and return its record (``status`` "ok" or "failed"); never raises."""
    global _RUNNING
    _RUNNING = True
    try:
        return _run_cell_record(cell, suite_json, budget, out, threads)
    finally:
        _RUNNING = False


def _run_cell_record(cell: Cell, suite_json: dict, budget: float | None, out: str, threads: int) -> Record:
    torch.set_num_threads(threads)
    suite = SuiteConfig.model_validate(suite_json)
    started = time.perf_counter()
    record: Record = {
        "task": task_label(cell.task),
        "design": cell.label,
        "seed": cell.seed,
        "base_design": cell.design,
    }
    try:
        record.update(cell.run(suite, Path(out), budget))
        record["status"] = "ok"
    except Exception as err:  # one failed cell must not stop the bench
        record.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    record["seconds"] = round(time.perf_counter() - started, 3)
    timed = record.get("train_seconds", 0.0) + record.get("eval_seconds", 0.0)
    record["overhead_seconds"] = round(record["seconds"] - timed, 3)
    record["environment"] = environment()
    return record


def run_bench(
    suite: SuiteConfig,
    out: str | Path,
    *,
    resume: bool = False,
    jobs: int = 1,
    console: Console | None = None,
    progress: bool = True,
) -> list[Record]:
    """Run every unfinished cell of ``suite`` into ``out``; returns all records.

    ``out`` is locked for the whole run (a second bench into it is refused). Ctrl-C stops
    the workers and raises ``BenchInterrupted``; finished cells stay in the store."""
    console = console or Console()
    out = Path(out)
    with DirectoryLock(out, what="bench directory"):
        return _run_bench(suite, out, resume=resume, jobs=jobs, console=console, progress=progress)


def _run_bench(suite: SuiteConfig, out: Path, *, resume: bool, jobs: int, console: Console, progress: bool):
    store = ResultsStore(out)
    suite_path = out / "suite.yaml"
    if store.path.exists() and not resume:
        raise ConfigError(f"{str(out)!r} already holds bench results; pass --resume to continue, or another --out")
    if resume and suite_path.exists():
        saved = SuiteConfig.model_validate(read_yaml(suite_path)).model_dump(mode="json")
        diffs = config_differences(saved, suite.model_dump(mode="json"))
        if diffs:
            raise ConfigError(f"{str(out)!r} was run with another suite ({'; '.join(diffs[:5])}); use another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(suite_path, to_yaml(suite))
    with console.status("measuring each task's compute budget"):
        task_budgets = budgets(suite, out)
    done = store.finished()
    cells = [c for c in plan_cells(suite) if c.key not in done]
    if done:
        console.print(f"resuming: {len(done)} cells done, {len(cells)} to run")
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    try:
        bar = Progress(*columns, console=console, disable=not progress)
        _run_cells(suite, out, cells, task_budgets, jobs=jobs, threads=threads, store=store, console=console, bar=bar)
    except KeyboardInterrupt:
        finished = len(store.finished())
        raise BenchInterrupted(
            f"interrupted: {finished} cells finished and stored in {str(out)!r}, the cells in flight are dropped"
        ) from None
    records = store.records()
    write_outputs(out, records, suite, console=console)
    return records


class CellStopped(BaseException):
    """Raised in a worker when the parent stops the bench: the cell unwinds (its run's logs
    are closed, its lock released) and the worker exits cleanly. A BaseException, so that
    ``run_cell`` does not record it as a failed cell."""


_RUNNING = False  # a worker is inside run_cell


def _stop_worker(signum, frame) -> None:
    if _RUNNING:
        raise CellStopped
    raise SystemExit(0)


def _init_worker() -> None:
    """Worker initializer: Ctrl-C reaches the whole process group, but only the parent
    handles it; the parent stops the workers with SIGTERM, which unwinds the running cell
    (a killed worker would leave TensorBoard's queue semaphores behind, and tracebacks)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_worker)


def _run_cells(suite, out, cells, task_budgets, *, jobs, threads, store, console, bar) -> None:
    """Run ``cells`` in this process or ``jobs`` workers, each record stored as it arrives."""
    suite_json = suite.model_dump(mode="json")
    with bar:
        task_id = bar.add_task(f"bench {suite.name}", total=len(cells), info="")

        def finish(record: Record) -> None:
            for variant in record.pop("variants", []):  # first: the base record marks the cell done
                variant["environment"] = record.get("environment")
                store.append(variant)
            store.append(record)
            status = "ok" if record["status"] == "ok" else "[red]failed[/red]"
            bar.update(task_id, advance=1, info=f"{record['task']} {record['design']} s{record['seed']}: {status}")
            if record["status"] != "ok":
                console.print(f"[red]cell failed[/red] {cell_key(record)}: {record['error']}")

        if jobs <= 1:
            for cell in cells:  # planned in order: a cell comes after the one it needs
                finish(run_cell(cell, suite_json, task_budgets.get(cell.task), str(out), threads))
        else:
            import multiprocessing

            # A cell that needs an unfinished one (a lifelong stage 2 its stage 1) waits for it.
            todo = {cell.key for cell in cells}
            waiting: dict[Key, list[Cell]] = {}
            for cell in cells:
                if cell.needs in todo:
                    waiting.setdefault(cell.needs, []).append(cell)
            # spawn, not fork: forking a process whose OpenMP pool is running can deadlock.
            context = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker)
            try:

                def submit(cell):
                    return pool.submit(run_cell, cell, suite_json, task_budgets.get(cell.task), str(out), threads)

                futures = {submit(c): c for c in cells if c.needs not in todo}
                while futures:
                    done_now, _ = wait(futures, return_when=FIRST_COMPLETED)
                    for future in done_now:
                        cell = futures.pop(future)
                        finish(future.result())
                        for later in waiting.pop(cell.key, []):  # run even if it failed: they record why
                            futures[submit(later)] = later
            except BaseException:
                _stop_workers(pool)
                # Free the pool's queues now: the traceback keeps this frame alive, and their
                # semaphores would outlive the process as "leaked" (resource_tracker warns).
                del pool, submit
                gc.collect()
                raise
            pool.shutdown(wait=True)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Stop a pool's workers now (their cells are dropped) and wait until they are gone."""
    workers = list((getattr(pool, "_processes", None) or {}).values())  # the executor offers no public stop
    for process in workers:
        process.terminate()  # SIGTERM: the cell unwinds (_init_worker), then the worker takes the exit sentinel
    pool.shutdown(wait=False, cancel_futures=True)
    for process in workers:
        process.join(timeout=20)
        if process.is_alive():
            process.kill()
            process.join()
