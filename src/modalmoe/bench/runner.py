"""The bench runner: plan the cells of a suite, run them (in worker processes), store records.

Each cell (task, design, seed) is: resolve the preset with the suite's overrides; solve its
width so its cost matches the task's budget (``bench/compute.py``); train it
(``modalmoe.train.Trainer``, run directory kept under ``runs/``); evaluate the best
checkpoint on the test split with the suite's robustness axes; measure FLOPs, parameters,
latency at batch 1 and 64 and peak inference memory; append one record to the store.
The suite's lifelong protocols and task sequences add their cells after these
(``bench/lifelong.py``, ``bench/sequence.py``); a cell that ``needs`` another starts once
that one has finished.
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
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from modalmoe.bench.store import ResultsStore, cell_key, environment
from modalmoe.bench.suites import LOGREG, SuiteConfig
from modalmoe.config import ConfigError, read_yaml, to_yaml
from modalmoe.io import atomic_write_text
from modalmoe.lock import DirectoryLock


class BenchInterrupted(RuntimeError):
    """Ctrl-C stopped the bench; finished cells are stored, the message says how to go on."""


@dataclass(frozen=True)
class Cell:
    """One unit of work. ``imbalance``: (modality, fraction) kept for training, or None."""

    task: str
    design: str
    seed: int
    imbalance: tuple[str, float] | None = None

    @property
    def label(self) -> str:
        """The design as the leaderboard shows it (``token-choice@audio=0.2`` for imbalance)."""
        if self.imbalance is None:
            return self.design
        return f"{self.design}@{self.imbalance[0]}={self.imbalance[1]:g}"

    @property
    def key(self) -> tuple[str, str, int]:
        return self.task, self.label, self.seed


def plan_cells(suite: SuiteConfig) -> list[Cell]:
    """Every cell of the suite, tasks outermost so early results cover a whole task."""
    cells = []
    for task in suite.tasks:
        modalities = list(suite_task(suite, task).specs) if suite.robustness.imbalance else []
        for design in suite.designs:
            for seed in suite.seeds:
                if design == LOGREG and seed != suite.seeds[0]:
                    continue  # deterministic (lbfgs on fixed features): one seed says it all
                cells.append(Cell(task, design, seed))
                if design == LOGREG:
                    continue
                for m in modalities:
                    for fraction in suite.robustness.imbalance:
                        cells.append(Cell(task, design, seed, (m, fraction)))
    if suite.lifelong:
        from modalmoe.bench.lifelong import plan_lifelong

        cells += plan_lifelong(suite)
    if suite.sequences:
        from modalmoe.bench.sequence import plan_sequences

        cells += plan_sequences(suite)
    return cells


def cell_config(suite: SuiteConfig, task: str, design: str, seed: int):
    from modalmoe.model.presets import get_preset

    overrides = [*suite.overrides, *suite.task_overrides.get(task, []), f"train.seed={seed}"]
    return get_preset(f"{task}/{design}", overrides=overrides)


def suite_task(suite: SuiteConfig, task_file: str):
    """The task of a preset task file, limited to ``suite.limit[task]`` samples per split."""
    from modalmoe.data.batch import Task
    from modalmoe.train.trainer import experiment_task

    task = experiment_task(cell_config(suite, task_file, suite.reference, 0))
    limit = suite.limit.get(task_file)
    if not limit:
        return task
    splits = {}
    for name, data in task.splits.items():
        if len(data) > limit:  # seeded random subset: bundled splits may be sorted by class
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:limit]
            data = data.subset(order.sort().values)
        splits[name] = data
    return Task(name=task.name, splits=splits, description=task.description)


def _fit_sample(train, size: int = 512):
    """The training samples that fit encoders for FLOP counting (tokenizers, statistics): a
    fixed subset, the same for every design, so matching stays cheap."""
    if len(train) <= size:
        return train
    return train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:size].sort().values)


def _cost_batch(task, size: int = 64):
    return task.test.batch(torch.arange(min(size, len(task.test))))


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
    from modalmoe.bench.compute import reference_budget
    from modalmoe.train.trainer import head_outputs

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
                _cost_batch(task),
                task_type=task.train.task_type,
                outputs=head_outputs(task.train),
                mode=suite.match,
                fit_data=_fit_sample(task.train),
            )
            entry = {"budget": float(budget), "basis": basis}
        entries[task_file], out_budgets[task_file] = entry, entry["budget"]
    atomic_write_text(path, json.dumps(entries, indent=2))
    return out_budgets


def run_cell(cell: Cell, suite_json: dict, budget: float | None, out: str, threads: int) -> dict:
    """Run one cell and return its record (``status`` "ok" or "failed"); never raises."""
    global _RUNNING
    _RUNNING = True
    try:
        return _run_cell_record(cell, suite_json, budget, out, threads)
    finally:
        _RUNNING = False


def _run_cell_record(cell: Cell, suite_json: dict, budget: float | None, out: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    suite = SuiteConfig.model_validate(suite_json)
    started = time.perf_counter()
    record = {"task": cell.task, "design": cell.label, "seed": cell.seed, "base_design": cell.design}
    try:
        record.update(_run_cell(cell, suite, budget, Path(out)))
        record["status"] = "ok"
    except Exception as err:  # one failed cell must not stop the bench
        record.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    record["seconds"] = round(time.perf_counter() - started, 3)
    timed = record.get("train_seconds", 0.0) + record.get("eval_seconds", 0.0)
    record["overhead_seconds"] = round(record["seconds"] - timed, 3)
    record["environment"] = environment()
    return record


def _run_cell(cell: Cell, suite: SuiteConfig, budget: float | None, out: Path) -> dict:
    from modalmoe.bench.lifelong import LifelongCell, run_lifelong_cell
    from modalmoe.bench.sequence import SequenceCell, run_sequence_cell
    from modalmoe.data.batch import Task

    if isinstance(cell, LifelongCell):
        return run_lifelong_cell(cell, suite, out)
    if isinstance(cell, SequenceCell):
        return run_sequence_cell(cell, suite, out)
    task = suite_task(suite, cell.task)
    if cell.design == LOGREG:
        return _logistic_regression(task, cell.seed)
    from modalmoe.bench.compute import match_compute
    from modalmoe.data.corrupt import imbalance
    from modalmoe.train.trainer import head_outputs

    cfg = cell_config(suite, cell.task, cell.design, cell.seed)
    matched = None
    if budget is not None:
        matched = match_compute(
            cfg,
            task.specs,
            _cost_batch(task, 16),
            task_type=task.train.task_type,
            outputs=head_outputs(task.train),
            budget=budget,
            mode=suite.match,
            tolerance=suite.tolerance,
            fit_data=_fit_sample(task.train),
        )
        cfg = matched.config
    if cell.imbalance is not None:
        modality, fraction = cell.imbalance
        train = imbalance(task.train, modality, fraction, seed=cell.seed)
        task = Task(name=task.name, splits={**task.splits, "train": train}, description=task.description)
    run_dir = out / "runs" / cell.task / cell.label / f"s{cell.seed}"
    result, model, train_seconds = train_run(cfg, run_dir, task)

    def evaluate_model(model):
        return evaluate_with_axes(model, task, suite, cell.seed)

    report, eval_seconds = evaluate_model(model)
    variants, skipped = [], {}
    if suite.compress and cell.imbalance is None:
        from modalmoe.bench.variants import run_variants

        variants, skipped = run_variants(cell, suite, cfg, task, run_dir, out, evaluate_model)
    return {
        "variants": variants,
        "skipped_variants": skipped,
        **trained_fields(cfg, run_dir, out, result, report, model, task),
        "matched": None
        if matched is None
        else {
            "field": matched.width_field,
            "width": matched.width,
            "target": matched.target,
            "achieved": matched.achieved,
            "relative_error": matched.relative_error,
        },
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
    }


def train_run(config, run_dir: Path, task, *, console: Console | None = None):
    """Train ``config`` into ``run_dir`` (an attempt interrupted by a kill is started again)
    and reload its best checkpoint: (TrainResult, model, training seconds)."""
    import shutil

    from modalmoe.train import Trainer, load_run_model

    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    result = Trainer(config, run_dir, task=task, progress=False, console=console).fit()
    seconds = time.perf_counter() - t0
    return result, load_run_model(run_dir), seconds


def evaluate_with_axes(model, task, suite: SuiteConfig, seed: int, *, subsets: bool | None = None):
    """The model on the test split with the suite's robustness axes: (EvalReport, seconds)."""
    from modalmoe.evaluate.runner import evaluate

    t0 = time.perf_counter()
    report = evaluate(
        model,
        task.test,
        subsets=suite.robustness.subsets if subsets is None else subsets,
        noise_levels=[0, *suite.robustness.noise] if suite.robustness.noise else [],
        train_scale=task.train,
        seed=seed,
    )
    return report, time.perf_counter() - t0


def trained_fields(config, run_dir: Path, out: Path, result, report, model, task) -> dict:
    """The record fields every trained cell has: config, run directory, test metrics and
    evaluation, the best validation metrics, epochs and steps, and the cost fields."""
    return {
        "config": config.model_dump(mode="json"),
        "run_dir": str(run_dir.relative_to(out)),
        "metrics": report.metrics,
        "valid": result.best,
        "evaluation": report.to_dict(),
        "epochs": result.epochs,
        "steps": result.steps,
        **cost_fields(model, task.test),
    }


def cost_fields(model, data) -> dict:
    """A trained model's cost fields of a bench record, measured by ``profile_model`` (the
    numbers ``modalmoe profile`` prints): FLOPs, parameters, latency, memory."""
    from modalmoe.efficiency.profile import profile_model

    numbers = profile_model(model, data, repeats=10)
    size = numbers["batch_size"]
    return {
        "flops": numbers["flops_per_sample"],
        "params": numbers["params"],
        "active_params": numbers["active_params"],
        "flops_components": numbers["flops_by_component"],
        "latency_b1_ms": numbers["latency_b1_ms"]["p50_ms"],
        "latency_b64_ms": numbers[f"latency_b{size}_ms"]["p50_ms"],
        "memory_b64_mib": numbers[f"memory_b{size}_mib"],
    }


def _logistic_regression(task, seed: int) -> dict:
    """scikit-learn's logistic regression on concatenated per-modality features."""
    from modalmoe.data.describe import linear_baselines

    t0 = time.perf_counter()
    scores = linear_baselines(task, seed=seed)
    seconds = time.perf_counter() - t0
    metric = "accuracy" if task.train.task_type == "classification" else "r2"
    return {
        "metrics": {metric: scores["all"]["test"]},
        "valid": {metric: scores["all"]["valid"]},
        "unimodal": {m: s["test"] for m, s in scores.items() if m != "all"},
        "train_seconds": round(seconds, 3),
        "eval_seconds": 0.0,
    }


def run_bench(
    suite: SuiteConfig,
    out: str | Path,
    *,
    resume: bool = False,
    jobs: int = 1,
    console: Console | None = None,
    progress: bool = True,
) -> list[dict]:
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
        from modalmoe.train.checkpoint import config_differences

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
    from modalmoe.bench.leaderboard import write_outputs

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

        def finish(record: dict) -> None:
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
            waiting: dict[tuple, list[Cell]] = {}
            for cell in cells:
                if getattr(cell, "needs", None) in todo:
                    waiting.setdefault(cell.needs, []).append(cell)
            # spawn, not fork: forking a process whose OpenMP pool is running can deadlock.
            context = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker)
            try:

                def submit(cell):
                    return pool.submit(run_cell, cell, suite_json, task_budgets.get(cell.task), str(out), threads)

                futures = {submit(c): c for c in cells if getattr(c, "needs", None) not in todo}
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
