"""Table writers shared by the leaderboard and the kinds of cells: markdown and terminal
tables, ``mean ± std`` cells, points for accuracy-like metrics, and the per-method sections
("Lifelong", "Task sequences") that a kind of cell registers in ``sections``.

A kind with a leaderboard section registers a function ``(records, suite) -> section`` under
the ``SuiteConfig`` field that lists its protocols (``@sections.register("lifelong")``); a
section has ``markdown()``, ``print(console)`` and ``figures(out)`` (a ``MethodsSection``, or a
class of the kind's own, such as the generalist and capacity tables). The leaderboard writes
the sections in the order of those fields (``cells.in_suite_order``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Collection
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from modalmoe.registry import Registry

SCALED = ("accuracy", "macro_f1", "auroc")  # shown in points


def scale(metric: str | None) -> float:
    """100 for the metrics shown in points (accuracy-like), else 1."""
    return 100.0 if metric in SCALED else 1.0


def mean_std(values: list[float]) -> str:
    """``mean ± sample std`` (one value: the value)."""
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def markdown_table(header: list[str], rows: list[list[str]], *, left: Collection[int] | None = None) -> list[str]:
    """A markdown table's lines. ``left``: the columns aligned left, the others right (None:
    every column in markdown's default alignment)."""
    if left is None:
        rule = "|" + "---|" * len(header)
    else:
        rule = "|" + "".join("---|" if i in left else "---:|" for i in range(len(header)))
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(cells) + " |" for cells in rows)]


def terminal_table(title: str, header: list[str], rows: list[list[str]], *, left: Collection[int] = (0,)) -> Table:
    """A rich table titled ``title``; the columns in ``left`` aligned left, the others right."""
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i in left else "right", no_wrap=True)
    for cells in rows:
        table.add_row(*cells)
    return table


# --- per-method sections (lifelong protocols, task sequences) --------------------------------

METHOD_COLUMNS_LEFT = (0, 2)  # method and freeze: text; the other columns are numbers


def methods_markdown(heading: str, intro: str, tables: dict, header: list[str], cells, title) -> str:
    """A leaderboard section: ``## heading``, ``intro``, then per (task, protocol) of
    ``tables`` a ``###`` title and one row per method (``cells(row)``; the first and third
    columns left aligned, the others right). Empty without tables."""
    if not tables:
        return ""
    lines = ["", f"## {heading}", "", intro, ""]
    for (task, protocol), rows in tables.items():
        lines += [f"### {title(task, protocol, rows)}", ""]
        lines += markdown_table(header, [cells(row) for row in rows], left=METHOD_COLUMNS_LEFT)
        lines.append("")
    return "\n".join(lines)


def print_methods(console: Console, prefix: str, tables: dict, header: list[str], cells, title) -> None:
    """``methods_markdown``'s tables in the terminal."""
    for (task, protocol), rows in tables.items():
        title_text = f"{prefix} {title(task, protocol, rows)}"
        console.print(terminal_table(title_text, header, [cells(row) for row in rows], left=METHOD_COLUMNS_LEFT))


@dataclass(frozen=True)
class MethodsSection:
    """A leaderboard section with one table per (task, protocol) and one row per method.

    Attributes:
        heading: the markdown heading (``Lifelong``).
        prefix: the terminal tables' title prefix (``lifelong``).
        intro: the paragraph under the heading.
        tables: (task, protocol) -> rows (dicts).
        header: the column names.
        cells: row -> its cells (strings, one per column).
        title: (task, protocol, rows) -> the table's title.
    """

    heading: str
    prefix: str
    intro: str
    tables: dict[tuple[str, str], list[dict]]
    header: list[str]
    cells: Callable[[dict], list[str]]
    title: Callable[[str, str, list[dict]], str]

    def markdown(self) -> str:
        """The section in ``leaderboard.md`` (empty without tables)."""
        return methods_markdown(self.heading, self.intro, self.tables, self.header, self.cells, self.title)

    def print(self, console: Console) -> None:
        print_methods(console, self.prefix, self.tables, self.header, self.cells, self.title)

    def figures(self, out) -> list:
        """The section's plots written into the bench directory ``out`` (none for a table)."""
        return []


sections: Registry[MethodsSection] = Registry("leaderboard section")
