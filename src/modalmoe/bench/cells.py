"""Bench cells: one protocol for every kind of work a suite plans, and the planners' registry.

A cell is one unit of work with a key ``(task, label, seed)``, the key of a cell that must
finish first (``needs``, or None), and ``run``, which trains and measures and returns the
record's own fields (``store.Record``); ``runner.run_cell`` adds the fields every record has
(key, status, timing, environment), records a failure, and never asks what kind of cell it
holds. Cells are pickled to worker processes: each kind is a frozen dataclass at module level
with plain fields.

The kinds, one file each, and the ``SuiteConfig`` field that lists their work:

- ``designs.py`` (``designs``): every (task, design, seed) of the suite, compute-matched,
  with the training-imbalance axis and efficiency variants;
- ``lifelong.py`` (``lifelong``): learn on some modalities, then grow the run by others;
- ``sequence.py`` (``sequences``): learn tasks one after another.

Add a kind: write one file with its cell class and a planner ``suite -> list[cell]``
registered under its suite field (``@planners.register("field")``), a leaderboard section if
it has a table (``tables.sections``), import it at the bottom of this file, and give
``SuiteConfig`` its field. ``plan_cells`` runs the planners in the order of their fields in
``SuiteConfig``; each returns its cells with every cell after the one it needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from modalmoe.bench.suites import SuiteConfig
from modalmoe.config import ConfigError
from modalmoe.registry import Registry

Key = tuple[str, str, int]  # (task, design label, seed), as ``store.cell_key`` of its record


class LifelongError(ConfigError):
    """A cell cannot run as planned: an unknown modality, or the run of the cell it continues
    is missing (the lifelong kinds raise it; its name is in the records of such failures)."""


@runtime_checkable
class Cell(Protocol):
    """One unit of bench work.

    Attributes:
        task: the task file (the record's ``task``; the runner passes this task's budget).
        design: the preset design (the record's ``base_design``).
        seed: the seed.
        label: the design label of the record (its ``design``).
        key: ``(task, label, seed)``.
        needs: the key of the cell that must finish first, or None.
    """

    task: str
    design: str
    seed: int

    @property
    def label(self) -> str: ...

    @property
    def key(self) -> Key: ...

    @property
    def needs(self) -> Key | None: ...

    def run(self, suite: SuiteConfig, out: Path, budget: float | None) -> dict[str, Any]:
        """Train and measure the cell into the bench directory ``out``; returns the record's
        own fields (``metrics``, ``train_seconds``, ``eval_seconds``, ...). ``budget``: the
        task's compute budget (None: not matched); a kind that does not match ignores it.
        Raises on failure (``runner.run_cell`` records it)."""
        ...


planners: Registry[list[Cell]] = Registry("cell planner")


def in_suite_order(names: Iterable[str]) -> list[str]:
    """``names`` (``SuiteConfig`` fields) in the order ``SuiteConfig`` declares them."""
    fields = list(SuiteConfig.model_fields)
    unknown = sorted(set(names) - set(fields))
    if unknown:
        raise ValueError(f"cell kinds {unknown} are not SuiteConfig fields ({', '.join(fields)})")
    return sorted(names, key=fields.index)


def plan_cells(suite: SuiteConfig) -> list[Cell]:
    """Every cell of the suite: each registered kind whose suite field is set, in the order of
    the fields (the designs' cells, then lifelong protocols, then task sequences)."""
    cells: list[Cell] = []
    for name in in_suite_order(planners.names()):
        if getattr(suite, name):
            cells += planners.get(name)(suite)
    return cells


# Registration happens on import; these imports must follow the registry's creation.
from modalmoe.bench import capacity, designs, lifelong, routing_table, sequence, specialists, upcycling  # noqa: E402, F401
