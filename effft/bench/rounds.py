"""What every bench part does alike: timed rounds in alternation, and the table of figures."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from rich.table import Table

from ..console import console


def alternate(rounds: int, steps: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
    """Seconds of each step per round, the steps run in turn and their order reversed every other
    round, so that drift in the machine's speed hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return times


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """The figures as one table, every column right-aligned."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
