"""Benchmark suites: YAML files under ``configs/suites/`` that say which cells to run.

A cell is (task, design, seed). A suite names the tasks (task files of the presets), the
designs (preset designs, plus ``logistic-regression`` on concatenated features), the seeds,
the compute-matching rule (every design solved to the reference design's FLOPs or
parameters per sample), overrides for all cells or per task, optional per-split sample
limits (for quick suites), and the robustness axes evaluated on every cell. Its ``lifelong``
protocols (``LifelongProtocol``) add cells that train on some modalities, then grow the run
by others with each continual-learning method (``bench/lifelong.py``); its ``sequences``
(``TaskSequenceProtocol``) learn tasks one after another (``bench/sequence.py``).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from modalmoe.config import ConfigError, _Strict, apply_overrides, read_yaml, validate
from modalmoe.model.presets import config_dir, design_names, task_files

LOGREG = "logistic-regression"


class RobustnessConfig(_Strict):
    """What each trained cell is evaluated on besides the clean test split.

    Attributes:
        subsets: every non-empty subset of modalities at test time (the others missing).
        noise: noise severities (``modalmoe.data.corrupt`` levels, 1..5) per modality and all.
        imbalance: train also with one modality kept for only this fraction of the training
            samples (one extra cell per modality and fraction; design name ``<design>@<m>=<f>``).
    """

    subsets: bool = True
    noise: list[int] = Field(default_factory=list)
    imbalance: list[float] = Field(default_factory=list)


class CompressConfig(_Strict):
    """One efficiency method applied to every trained cell it fits (``modalmoe.efficiency``);
    each gives an extra leaderboard row ``<design>+<label>`` with its own accuracy, FLOPs and
    latency, so the Pareto plots show the methods beside the designs.

    Attributes:
        method: ``int8``; ``prune-experts`` / ``merge-experts`` (MoE designs whose router
            supports it); ``tokens`` (early and late fusion); ``distill`` (MoE designs: the
            trained cell is the teacher of a dense ``student`` trained with 0.5 cross-entropy
            + 0.5 KD at ``temperature``).
        experts: experts left per layer (prune, merge).
        by: merge similarity, ``weights`` or ``outputs``.
        reduction, keep, layers, placement: token reduction (``TokenReductionConfig``).
        student: the student's design (distill), built at its preset's size plus
            ``student_overrides`` (not compute-matched: it is meant to be cheaper).
    """

    method: Literal["int8", "prune-experts", "merge-experts", "tokens", "distill"]
    experts: int | None = Field(None, ge=1)
    by: Literal["weights", "outputs"] = "weights"
    reduction: Literal["merge", "attention", "router"] = "merge"
    keep: float | dict[str, float] = 0.5
    layers: list[int] = Field(default_factory=lambda: [0])
    placement: Literal["after_block", "before_ffn"] = "after_block"
    student: str = "dense-early"
    student_overrides: list[str] = Field(default_factory=list)
    temperature: float = Field(2.0, gt=0.0)

    @model_validator(mode="after")
    def _complete(self) -> CompressConfig:
        keeps = self.keep.values() if isinstance(self.keep, dict) else [self.keep]
        if not all(0.0 < k <= 1.0 for k in keeps):
            raise ValueError(f"keep fractions must be in (0, 1], got {self.keep}")
        if self.method in ("prune-experts", "merge-experts") and self.experts is None:
            raise ValueError(f"compress method {self.method!r} needs experts: N (experts left per layer)")
        return self

    @property
    def label(self) -> str:
        if self.method == "int8":
            return "int8"
        if self.method == "prune-experts":
            return f"prune{self.experts}"
        if self.method == "merge-experts":
            return f"merge{self.experts}-{self.by}"
        if self.method == "tokens":
            if isinstance(self.keep, dict):
                keep = ",".join(f"{m}={k:g}" for m, k in self.keep.items())
            else:
                keep = f"{self.keep:g}"
            where = ",".join(map(str, self.layers)) + ("<ffn" if self.placement == "before_ffn" else "")
            return f"{self.reduction}-tokens[{keep}]@{where}"
        return f"distill-{self.student}" + ("*" if self.student_overrides else "")


class LifelongMethod(_Strict):
    """How a lifelong protocol's stage 2 continues the stage-1 run (``lifelong.grow_config``).

    Attributes:
        experts: experts added per MoE layer for each added modality, reserved for it.
        freeze: what of the run stays fixed: ``experts`` (its experts, shared experts and
            router rows), ``old`` (every tensor from the run), ``none`` (naive fine-tuning).
        ewc: Elastic Weight Consolidation strength lambda (0: off).
        fisher_samples: training samples for EWC's Fisher (None: ``GrowConfig``'s default).
        overrides: ``key=value`` for this method's stage 2 only.
    """

    experts: int = Field(0, ge=0)
    freeze: Literal["experts", "old", "none"]
    ewc: float = Field(0.0, ge=0.0)
    fisher_samples: int | None = Field(None, ge=1)
    overrides: list[str] = Field(default_factory=list)


class LifelongProtocol(_Strict):
    """Learn a task on some modalities, then add others (issue 10): stage 1 trains
    ``<task>/<design>`` on ``first`` once per seed; stage 2 continues it with ``add`` by each
    method. Every (method, seed) is a cell whose record keeps the metric on the old modalities
    before and after, forgetting, and the gain with all modalities (``bench/lifelong.py``).
    The presets' sizes are used as they are (no compute matching).

    Attributes:
        task: a preset task file.
        design: a preset design (growing experts needs the ``token_choice`` router).
        first: the modalities of stage 1.
        add: the modalities stage 2 adds.
        methods: method name -> ``LifelongMethod`` (names label the cells: ``grow``, ``naive``).
        dropout: ``model.missing.dropout`` in stage 2 (modality dropout keeps inputs with only
            the old modalities in the training distribution; 0.3 is the recipe of
            ``benchmarks/lifelong.py``); None keeps stage 1's.
        overrides: ``key=value`` for both stages, after the suite's.
    """

    task: str
    design: str
    first: list[str] = Field(min_length=1)
    add: list[str] = Field(min_length=1)
    methods: dict[str, LifelongMethod] = Field(min_length=1)
    dropout: float | None = Field(0.3, ge=0.0, lt=1.0)
    overrides: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _complete(self) -> LifelongProtocol:
        both = [m for m in self.add if m in self.first]
        if both or len(set(self.first)) < len(self.first) or len(set(self.add)) < len(self.add):
            raise ValueError(f"first {self.first} and add {self.add} must name distinct modalities")
        bad = [name for name in self.methods if not name or any(c in name for c in ":>/+ ")]
        if bad:
            raise ValueError(f"method names {bad} must be non-empty and free of ':', '>', '/', '+' and spaces")
        return self

    @property
    def stage1_label(self) -> str:
        """The stage-1 cells' design label: ``token-choice:audio``."""
        return f"{self.design}:{'+'.join(self.first)}"

    @property
    def label(self) -> str:
        """The protocol: ``token-choice:audio>+image``."""
        return f"{self.stage1_label}>+{'+'.join(self.add)}"

    def method_label(self, method: str) -> str:
        """A stage-2 cell's design label: ``token-choice:audio>+image:grow``."""
        return f"{self.label}:{method}"


class SequenceTask(_Strict):
    """One task of a task sequence: the protocol's task file with these options.

    Attributes:
        label: the task's label in the grown model (``model.tasks``).
        options: ``task_options`` over the task file's (``synthetic``: ``seed``, ``mode``,
            ``num_classes``, ...).
    """

    label: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)


class TaskSequenceProtocol(_Strict):
    """Learn tasks one after another (issue 10, ``bench/sequence.py``): the first task trains
    ``<task>/<design>`` once per seed; each later task continues the previous stage's run of
    the same method with a new head and the method's new experts (``lifelong.tasks``). Every
    stage is a cell that evaluates every task learned so far on its own test split; with
    ``scratch``, each later task is also trained alone, the reference of forward transfer.

    Attributes:
        task: a preset task file (its ``task_options`` are the base of every step's).
        design: a preset design (growing experts needs the ``token_choice`` router).
        sequence: the tasks, in order (two or more).
        methods: method name -> ``LifelongMethod``.
        scratch: train each later task alone too (forward transfer).
        overrides: ``key=value`` for every run of the protocol, after the suite's.
    """

    task: str
    design: str
    sequence: list[SequenceTask] = Field(min_length=2)
    methods: dict[str, LifelongMethod] = Field(min_length=1)
    scratch: bool = True
    overrides: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _complete(self) -> TaskSequenceProtocol:
        labels = self.labels
        bad = [x for x in [*labels, *self.methods] if any(c in x for c in ":>/+ ")]
        if bad or len(set(labels)) < len(labels):
            raise ValueError(
                f"sequence labels {labels} must be distinct, and labels and method names free of ':', '>', '/', '+' "
                f"and spaces (got {bad})"
            )
        return self

    @property
    def labels(self) -> list[str]:
        return [t.label for t in self.sequence]

    @property
    def label(self) -> str:
        """The protocol: ``token-choice:t1>t2>t3``."""
        return f"{self.design}:{'>'.join(self.labels)}"

    def alone_label(self, step: int) -> str:
        """The design label of step ``step``'s task trained alone (step 0: the first stage)."""
        return f"{self.design}:{self.labels[step]}"

    def stage_label(self, step: int, method: str) -> str:
        """The design label of the stage that learned tasks ``0..step`` by ``method``."""
        if step == 0:
            return self.alone_label(0)
        return f"{self.design}:{'>'.join(self.labels[: step + 1])}:{method}"


class UpcycleProtocol(_Strict):
    """Sparse upcycling against continuing the dense run (issue 20, ``bench/upcycling.py``):
    per seed, ``<task>/<dense>`` trains ``epochs`` epochs (the parent); then, for the same
    ``extra_epochs`` each and seed for seed, the parent continues as it is (``continued``) and
    is upcycled into an MoE model (``upcycled``: ``modalmoe.model.upcycle``, with
    ``moe_overrides`` such as ``model.moe.num_experts=16``). The presets' sizes are used (no
    compute matching: the upcycled model's active FLOPs equal the dense model's by construction).

    Attributes:
        task: a preset task file.
        dense: the dense design of the parent.
        epochs: the parent's epochs.
        extra_epochs: the epochs of both arms after the parent.
        moe_overrides: ``key=value`` for the upcycled arm only.
        overrides: ``key=value`` for every stage, after the suite's.
    """

    task: str
    dense: str = "dense-early"
    epochs: int = Field(10, ge=1)
    extra_epochs: int = Field(10, ge=1)
    moe_overrides: list[str] = Field(default_factory=list)
    overrides: list[str] = Field(default_factory=list)

    @property
    def label(self) -> str:
        """The protocol and its parent's design label: ``dense-early:10ep``."""
        return f"{self.dense}:{self.epochs}ep"

    def arm_label(self, arm: str) -> str:
        """A cell's design label: ``dense-early:10ep`` (the parent), ``dense-early:10ep>continued+10``."""
        return self.label if arm == "parent" else f"{self.label}>{arm}+{self.extra_epochs}"


class Sweep(_Strict):
    """A capacity curve (issue 21, ``bench/capacity.py``): one design at the task's fixed
    active-FLOP budget with one key swept (Switch Transformer's experts-against-parameters
    figure), and beside each point the dense design matched to that point's total parameters
    (its FLOPs grow with them: the upper reference).

    Attributes:
        design: the swept preset design.
        key: the dotted config key swept (``model.moe.num_experts``).
        values: its values; each is one cell per seed, ``token-choice[E=8]``.
        short: the key's name in labels and tables (``E``).
        overrides: ``key=value`` for every point (``model.moe.k=1``, so E=1 is the dense model).
        dense: the dense design of the reference points (None: no reference); its cells are
            ``dense-early[params@E=8]``.
    """

    design: str = "token-choice"
    key: str = "model.moe.num_experts"
    values: list[int] = Field(min_length=1)
    short: str = "E"
    overrides: list[str] = Field(default_factory=list)
    dense: str | None = "dense-early"

    def label(self, value: int) -> str:
        return f"{self.design}[{self.short}={value}]"

    def dense_label(self, value: int) -> str:
        return f"{self.dense}[params@{self.short}={value}]"


class DesignMatch(_Strict):
    """How one design of a suite is compute-matched instead of by the suite's rule.

    Attributes:
        match: ``flops``, ``params`` or ``none`` (the preset's size).
        like: a design of the suite whose compute-matched cost, in ``match`` units, is this
            design's budget (``{match: params, like: token-choice}``: a dense model with as many
            parameters as the FLOP-matched MoE, the parameter-matched control); None: the
            task's budget in ``match`` units (the reference design's).
    """

    match: Literal["flops", "params", "none"]
    like: str | None = None


class SuiteConfig(_Strict):
    """A benchmark suite.

    Attributes:
        name: the suite's name.
        description: one line.
        tasks: preset task files (``configs/tasks/<task>.yaml``); may be empty in a suite of
            only ``lifelong`` protocols.
        designs: preset designs, and ``logistic-regression``.
        seeds: seeds of every cell.
        folds: K-fold protocol for the design cells (``modalmoe.data.folds``, K >= 3): each
            seed ``s`` deals the pooled samples of a task into K folds and trains fold ``f``
            with seed ``s * K + f`` (so designs are paired on the same fold and seed), and
            the leaderboard's mean and interval run over seeds x folds. None: the task's splits.
        reference: the design whose cost sets each task's budget.
        match: ``flops`` (forward FLOPs per sample), ``params`` (total parameters) or ``none``.
        tolerance: allowed relative deviation from the budget.
        overrides: ``key=value`` for every cell (``train.epochs=8``).
        task_overrides: task -> more overrides.
        limit: task -> maximum samples per split (a seeded random subset; for quick suites), for the
            design cells and the upcycle protocols of that task.
        robustness: the robustness axes.
        compress: efficiency methods applied to each trained cell (``CompressConfig``).
        lifelong: lifelong protocols (``LifelongProtocol``), run over ``seeds`` with
            ``overrides`` and ``task_overrides``, not ``limit`` or ``match``.
        sequences: task sequences (``TaskSequenceProtocol``).
        upcycle: upcycling protocols (``UpcycleProtocol``), run over ``seeds`` like ``lifelong``, with
            ``limit``.
        match_designs: design -> its own compute-matching rule (``DesignMatch``).
        specialists: designs trained as specialists on every task mixture of ``tasks`` (one
            model per member task, each with the width the design is matched to on the
            mixture; ``bench/specialists.py``), the top of each member's normalised scale.
        specialist_budgets: how long each specialist trains: ``epochs`` (the suite's epochs over
            its member's samples: each sample seen as often as the generalist sees it) and/or
            ``steps`` (as many optimisation steps as the generalist: its epochs scaled by the
            mixture's training batches over the member's; label ``specialists/<design>@steps``).
        sweeps: capacity curves over ``tasks`` (``Sweep``), run over ``seeds`` at the task's
            budget.
        routing_table: add the "Routing" section (``bench/routing_table.py``): each MoE design's
            expert load, dropped share, experts per token (by modality) and FLOPs spent.
    """

    name: str
    description: str = ""
    tasks: list[str] = Field(default_factory=list)
    designs: list[str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    folds: int | None = Field(None, ge=3)
    reference: str = "dense-early"
    match: Literal["flops", "params", "none"] = "flops"
    tolerance: float = Field(0.05, gt=0.0, lt=1.0)
    overrides: list[str] = Field(default_factory=list)
    task_overrides: dict[str, list[str]] = Field(default_factory=dict)
    limit: dict[str, int] = Field(default_factory=dict)
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)
    compress: list[CompressConfig] = Field(default_factory=list)
    lifelong: list[LifelongProtocol] = Field(default_factory=list)
    sequences: list[TaskSequenceProtocol] = Field(default_factory=list)
    upcycle: list[UpcycleProtocol] = Field(default_factory=list)
    match_designs: dict[str, DesignMatch] = Field(default_factory=dict)
    specialists: list[str] = Field(default_factory=list)
    specialist_budgets: list[Literal["epochs", "steps"]] = Field(default_factory=lambda: ["epochs"], min_length=1)
    sweeps: list[Sweep] = Field(default_factory=list)
    routing_table: bool = False

    @model_validator(mode="after")
    def _known_parts(self) -> SuiteConfig:
        protocols = self.lifelong or self.sequences or self.upcycle
        if bool(self.tasks) != bool(self.designs or self.sweeps) or not (self.tasks or protocols):
            raise ValueError(
                "a suite needs both tasks and designs (cells task x design x seed) or sweeps, or lifelong protocols "
                f"or task sequences, or several of these; got tasks {self.tasks}, designs {self.designs}, "
                f"{len(self.lifelong)} lifelong protocols, {len(self.sequences)} task sequences"
            )
        known_tasks, known_designs = task_files(), [*design_names(), LOGREG]
        lifelong_tasks = [p.task for p in [*self.lifelong, *self.sequences, *self.upcycle]]
        data_dirs = [t for t in self.tasks if t not in known_tasks and Path(t).expanduser().is_dir()]
        labels = [task_label(t) for t in self.tasks]
        if len(set(labels)) < len(labels):
            raise ValueError(f"tasks {self.tasks} share a name ({labels}); rename a data directory")
        for what, names, known in (
            ("task", [*[t for t in self.tasks if t not in data_dirs], *lifelong_tasks], known_tasks),
            ("design", [*self.designs, *(p.design for p in [*self.lifelong, *self.sequences])], known_designs),
            ("dense design", [p.dense for p in self.upcycle], known_designs),
            ("specialist design", self.specialists, design_names()),
            ("swept design", [d for w in self.sweeps for d in (w.design, w.dense) if d is not None], design_names()),
        ):
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(f"unknown {what}s {unknown}; known: {', '.join(known)}")
        for design, rule in self.match_designs.items():
            if design not in self.designs:
                raise ValueError(
                    f"match_designs names {design!r}, which is not one of the suite's designs {self.designs}"
                )
            if rule.like is not None and (rule.like not in self.designs or rule.like in (design, LOGREG)):
                raise ValueError(
                    f"match_designs.{design}.like must name another trained design of the suite, got {rule.like!r}"
                )
            if rule.like is not None and rule.like in self.match_designs:
                raise ValueError(f"match_designs.{design}.like names {rule.like!r}, which has a rule of its own")
        if LOGREG in [p.design for p in [*self.lifelong, *self.sequences]]:
            raise ValueError(f"a lifelong protocol needs a trained design, not {LOGREG!r}")
        upcycle_labels = [(p.task, p.label) for p in self.upcycle]
        if len(set(upcycle_labels)) < len(upcycle_labels):
            raise ValueError(f"upcycle protocols {upcycle_labels} are listed twice (vary dense or epochs)")
        sequence_labels = [(p.task, p.label) for p in self.sequences]
        if len(set(sequence_labels)) < len(sequence_labels):
            raise ValueError(f"task sequences {sequence_labels} are listed twice")
        stage1, labels = {}, set()
        for p in self.lifelong:
            key = (p.task, p.stage1_label)
            if stage1.setdefault(key, p.overrides) != p.overrides:
                raise ValueError(
                    f"lifelong protocols share stage 1 {key} with different overrides; split their designs"
                )
            for method in p.methods:
                if (p.task, p.method_label(method)) in labels:
                    raise ValueError(f"lifelong cell {p.task} {p.method_label(method)} is listed twice")
                labels.add((p.task, p.method_label(method)))
        if self.match != "none" and self.reference not in design_names():
            raise ValueError(f"reference design {self.reference!r} is not a design ({', '.join(design_names())})")
        stray = sorted(
            (set(self.task_overrides) - set(self.tasks) - set(lifelong_tasks))
            | (set(self.limit) - set(self.tasks) - {p.task for p in self.upcycle})
        )
        if stray:
            raise ValueError(
                f"task_overrides/limit name tasks {stray} that the suite does not run (limit applies to `tasks` "
                "and upcycle protocols, not to lifelong protocols or task sequences)"
            )
        return self


def task_label(task: str) -> str:
    """A suite task's name in run directories and tables: a preset task file's name, or a data
    directory's own name (its last path component)."""
    return task if task in task_files() else Path(task).expanduser().resolve().name


def suite_names() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "suites").glob("*.yaml"))


def load_suite(name_or_path: str, overrides=()) -> SuiteConfig:
    """A suite by name (``configs/suites/<name>.yaml``) or path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = config_dir() / "suites" / f"{name_or_path}.yaml"
        if not path.is_file():
            close = difflib.get_close_matches(name_or_path, suite_names(), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"unknown suite {name_or_path!r}.{hint} Known suites: {', '.join(suite_names())}")
    return validate(apply_overrides(read_yaml(path), overrides), SuiteConfig, source=f"in {str(path)!r}")
