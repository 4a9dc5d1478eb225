"""Task sequences in the bench (issue 10): learn tasks one after another, each with a new head
and the method's new experts, and measure what is forgotten and what transfers, in the same
results store and leaderboard as the other cells.

A suite's ``sequences`` protocol (``suites.TaskSequenceProtocol``, tasks ``t1 > t2 > t3``)
gives, per seed:

- the first stage, ``token-choice:t1``: ``<task>/<design>`` trained on ``t1``'s data;
- per method and later step, ``token-choice:t1>t2:grow``, ``token-choice:t1>t2>t3:grow``: the
  previous stage's run of the same method continued by the next task
  (``lifelong.tasks.continue_task``). Each stage ``needs`` the one before it, so the runner
  starts it once that one has finished;
- with ``scratch``, ``token-choice:t2`` and ``token-choice:t3``: each later task trained alone
  (the reference of forward transfer).

Every cell's ``sequence`` block keeps the primary metric on the test split of every task it
has learned (``scores``, by label; each earlier task through its own head, routing and data).
The leaderboard's table per protocol and method, from the stages of each seed:

- ``final``: the mean over all tasks after the last one is learned;
- ``forgetting``: the mean over the earlier tasks of (score right after learning it) minus
  (score after the last task), in the metric's better direction;
- ``transfer``: the mean over the later tasks of (score right after learning it in the
  sequence) minus (score of that task trained alone), forward transfer.

The planner and the leaderboard section are registered under the suite field ``sequences``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from modalmoe.bench.cells import LifelongError, planners
from modalmoe.bench.suites import SuiteConfig, TaskSequenceProtocol
from modalmoe.bench.tables import MethodsSection, mean_std, scale, sections
from modalmoe.bench.training import evaluate_with_axes, train_run, trained_fields
from modalmoe.evaluate.runner import evaluate
from modalmoe.lifelong.tasks import continue_task, task_data
from modalmoe.model.presets import get_preset
from modalmoe.train.trainer import experiment_task


@dataclass(frozen=True)
class SequenceCell:
    """One cell of a task sequence.

    Attributes:
        task: the task file.
        design: the protocol's design (the record's ``base_design``).
        seed: the seed of every stage.
        protocol: index into ``suite.sequences``.
        step: the sequence step whose task this cell trains (0: the first).
        method: the method of a later stage; None for a task trained alone (step 0 or scratch).
        label: the record's design label.
        previous: the design label of the stage this one continues ("" when it continues none).
    """

    task: str
    design: str
    seed: int
    protocol: int
    step: int
    method: str | None
    label: str
    previous: str

    @property
    def key(self) -> tuple[str, str, int]:
        return self.task, self.label, self.seed

    @property
    def needs(self) -> tuple[str, str, int] | None:
        """The key of the cell that must finish first (the previous stage, same seed)."""
        return (self.task, self.previous, self.seed) if self.previous else None

    def run(self, suite: SuiteConfig, out: Path, budget: float | None) -> dict:
        """Train and measure the cell (sequences use the presets' sizes: no budget)."""
        return run_sequence_cell(self, suite, out)


@planners.register("sequences")
def plan_sequences(suite: SuiteConfig) -> list[SequenceCell]:
    """The cells of ``suite.sequences``, each after the one it needs: the first stage of
    every seed, the scratch runs, then step by step every (method, seed)."""
    cells, planned = [], set()

    def add(cell: SequenceCell) -> None:
        if cell.key not in planned:
            planned.add(cell.key)
            cells.append(cell)

    for index, p in enumerate(suite.sequences):
        alone = [0, *(range(1, len(p.sequence)) if p.scratch else [])]
        for step in alone:
            for seed in suite.seeds:
                add(SequenceCell(p.task, p.design, seed, index, step, None, p.alone_label(step), ""))
        for step in range(1, len(p.sequence)):
            for method in p.methods:
                for seed in suite.seeds:
                    label, previous = p.stage_label(step, method), p.stage_label(step - 1, method)
                    add(SequenceCell(p.task, p.design, seed, index, step, method, label, previous))
    return cells


def run_directory(out: Path, p: TaskSequenceProtocol, seed: int, step: int, method: str | None) -> Path:
    """``runs/<task>/sequence/<design>/<label>/s<seed>`` for a task alone,
    ``runs/<task>/sequence/<design>/<t1+t2+..>/<method>/s<seed>`` for a later stage."""
    base = out / "runs" / p.task / "sequence" / p.design
    if method is None:
        return base / p.labels[step] / f"s{seed}"
    return base / "+".join(p.labels[: step + 1]) / method / f"s{seed}"


def _alone_config(suite: SuiteConfig, p: TaskSequenceProtocol, step: int, seed: int):
    """``<task>/<design>`` on step ``step``'s data, with the suite's and protocol's overrides."""
    overrides = [*suite.overrides, *suite.task_overrides.get(p.task, []), *p.overrides]
    overrides += [f"task_options.{k}={json.dumps(v)}" for k, v in p.sequence[step].options.items()]
    return get_preset(f"{p.task}/{p.design}", overrides=[*overrides, f"train.seed={seed}"])


def _stage_config(suite: SuiteConfig, p: TaskSequenceProtocol, cell: SequenceCell, out: Path):
    """A later stage: the previous stage's run continued by this step's task."""
    source = run_directory(out, p, cell.seed, cell.step - 1, None if cell.step == 1 else cell.method)
    if not (source / "summary.json").exists():
        raise LifelongError(
            f"the stage this cell continues ({cell.task} {cell.previous}, seed {cell.seed}) has no finished run at "
            f"{str(source)!r}: its cell failed or was interrupted; see its record, then run the bench again with "
            "--resume"
        )
    method = p.methods[cell.method]
    return continue_task(
        source.resolve(),  # the run's train.init_from: absolute, so it does not depend on the cwd
        label=p.labels[cell.step],
        task_options=_alone_config(suite, p, cell.step, cell.seed).task_options,
        inherit_options=False,  # this step's options only: none of the previous task's leak in
        previous=p.labels[0],
        overrides=method.overrides,
        experts=method.experts,
        freeze=method.freeze,
        ewc=method.ewc,
        fisher_samples=method.fisher_samples,
    )


def run_sequence_cell(cell: SequenceCell, suite: SuiteConfig, out: Path) -> dict:
    """Train and measure one cell; returns the record's fields (raises on failure, which
    ``runner.run_cell`` records)."""
    p = suite.sequences[cell.protocol]
    run_dir = run_directory(out, p, cell.seed, cell.step, cell.method)
    if cell.method is None:
        config = _alone_config(suite, p, cell.step, cell.seed)
    else:
        config = _stage_config(suite, p, cell, out)
    task = experiment_task(config)
    quiet = Console(quiet=True)  # the grown runs' init and freeze notes would flood the progress bar
    result, model, train_seconds = train_run(config, run_dir, task, console=quiet)
    report, eval_seconds = evaluate_with_axes(model, task, suite, cell.seed)
    if report.metric is None:
        raise LifelongError("task sequences need a prediction head with a primary metric")
    scores = {p.labels[cell.step]: report.metrics[report.metric]}
    if cell.method is not None:
        t0 = time.perf_counter()
        for label in p.labels[: cell.step]:  # every earlier task through its own head, routing and data
            earlier = evaluate(model, task_data(config, label).test, subsets=False, task=label)
            scores[label] = earlier.metrics[report.metric]
        eval_seconds += time.perf_counter() - t0
    method = p.methods[cell.method] if cell.method is not None else None
    block = {
        "protocol": p.label,
        "step": cell.step,
        "method": cell.method,
        "alone": cell.method is None,
        "task": p.labels[cell.step],
        "metric": report.metric,
        "mode": report.mode,
        "scores": {label: scores[label] for label in p.labels if label in scores},
        "options": None if method is None else {"experts": method.experts, "freeze": method.freeze, "ewc": method.ewc},
    }
    return {
        **trained_fields(config, run_dir, out, result, report, model, task),
        "matched": None,  # sequences use the presets' sizes
        "sequence": block,
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
    }


# --- the leaderboard's task-sequence tables -------------------------------------------------

COLUMNS = ("final", "forgetting", "transfer", "first_learned", "first_final")


def sequence_tables(records: list[dict], suite: SuiteConfig | None = None) -> dict[tuple[str, str], list[dict]]:
    """(task, protocol) -> one row per method (and a first row ``alone``: every task trained
    alone), with per column of ``COLUMNS`` the values over the seeds whose stages all finished
    (in points for accuracy-like metrics)."""
    alone: dict[tuple[str, str], dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    stages: dict[tuple[str, str], dict[str, dict[int, dict[int, dict]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict))
    )
    info: dict[tuple[str, str], dict] = {}
    for r in records:
        block = r.get("sequence")
        if r.get("status") != "ok" or not block:
            continue
        protocols = [block["protocol"]] if not block["alone"] else _protocols_of(records, r, suite)
        for protocol in protocols:
            key = (r["task"], protocol)
            info.setdefault(key, {"metric": block["metric"], "mode": block["mode"], "methods": {}})
            if block["alone"]:
                alone[key][r["seed"]][block["task"]] = block["scores"][block["task"]]
            else:
                stages[key][block["method"]][r["seed"]][block["step"]] = block
                info[key]["methods"].setdefault(block["method"], block["options"])
    order = {(p.task, p.label): (list(p.methods), p.labels) for p in (suite.sequences if suite else [])}
    tables = {}
    for key, methods in stages.items():
        metric, mode = info[key]["metric"], info[key]["mode"]
        points, sign = scale(metric), (-1.0 if mode == "min" else 1.0)
        names, labels = order.get(key, (sorted(methods), None))
        names = [m for m in names if m in methods] + sorted(set(methods) - set(names))
        rows = []
        seeds_alone = alone.get(key, {})
        if labels is not None and seeds_alone:
            finals = [statistics.mean(s.values()) for s in seeds_alone.values() if set(s) == set(labels)]
            if finals:
                row = {"method": "alone", "options": None, "seeds": len(finals)}
                row |= {c: [] for c in COLUMNS} | {"final": [points * v for v in finals]}
                rows.append(row)
        for method in names:
            row = {"method": method, "options": info[key]["methods"][method], "seeds": 0}
            row |= {c: [] for c in COLUMNS}
            for seed, by_step in sorted(methods[method].items()):
                first = seeds_alone.get(seed, {})
                last = max(by_step)
                task_labels = labels or list(by_step[last]["scores"])
                if labels is not None and (last != len(labels) - 1 or set(by_step) != set(range(1, last + 1))):
                    continue  # a seed whose sequence did not finish
                if task_labels[0] not in first:
                    continue
                learned = {task_labels[0]: first[task_labels[0]]}
                learned |= {by_step[k]["task"]: by_step[k]["scores"][by_step[k]["task"]] for k in by_step}
                final = by_step[last]["scores"]
                row["seeds"] += 1
                row["final"].append(points * statistics.mean(final.values()))
                earlier = task_labels[:-1]
                row["forgetting"].append(points * statistics.mean(sign * (learned[t] - final[t]) for t in earlier))
                transfer = [sign * (learned[t] - first[t]) for t in task_labels[1:] if t in first]
                if len(transfer) == len(task_labels) - 1:
                    row["transfer"].append(points * statistics.mean(transfer))
                row["first_learned"].append(points * learned[task_labels[0]])
                row["first_final"].append(points * final[task_labels[0]])
            rows.append(row)
        tables[key] = [{"metric": metric, "scale": points, **row} for row in rows]
    return tables


def _protocols_of(records: list[dict], record: dict, suite: SuiteConfig | None) -> list[str]:
    """The protocols a task-alone record belongs to: those of the suite with its label, else
    those of the stage records that name its task."""
    if suite is not None:
        return [p.label for p in suite.sequences if p.task == record["task"] and record["design"] in
                {p.alone_label(k) for k in range(len(p.sequence))}]  # fmt: skip
    label = record["sequence"]["task"]
    return sorted(
        {
            r["sequence"]["protocol"]
            for r in records
            if r.get("sequence") and not r["sequence"]["alone"] and r["task"] == record["task"]
            and label in r["sequence"]["protocol"].split(":", 1)[1].split(">")
        }
    )  # fmt: skip


HEADER = ["method", "new experts", "freeze", "EWC λ", "seeds", "final (all tasks)", "forgetting", "forward transfer",
          "first task: learned", "first task: final"]  # fmt: skip


def _cells(row: dict) -> list[str]:
    o = row["options"]
    options = ["", "", ""] if o is None else [str(o["experts"]), o["freeze"], f"{o['ewc']:g}"]
    return [row["method"], *options, str(row["seeds"]), *(mean_std(row[c]) for c in COLUMNS)]


def _title(task: str, protocol: str, rows: list[dict]) -> str:
    design, _, labels = protocol.partition(":")
    metric = rows[0]["metric"] + (" %" if rows[0]["scale"] == 100.0 else "")
    return f"{task}: {design}, tasks {' → '.join(labels.split('>'))} ({metric})"


@sections.register("sequences")
def sequence_section(records: list[dict], suite: SuiteConfig | None = None) -> MethodsSection:
    """The leaderboard's "Task sequences" section (empty without such records)."""
    intro = (
        "Tasks learned one after another, each with its own head (and the method's new experts, reserved for it); "
        "the first stage is shared by the methods of a seed. Test split of each task, mean ± std over seeds. "
        "final: the mean over all tasks after the last; forgetting: the mean over earlier tasks of (right after "
        "learning it − after the last task); forward transfer: the mean over later tasks of (right after learning "
        "it in the sequence − trained alone); alone: every task trained alone."
    )
    tables = sequence_tables(records, suite)
    return MethodsSection("Task sequences", "task sequence", intro, tables, HEADER, _cells, _title)
