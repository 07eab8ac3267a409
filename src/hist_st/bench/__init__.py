"""Benchmarks: one harness (`harness`) behind ``bench speed`` (`speed`), Table 1 (`efficiency`) and Figure 3
(`scaling`); their figures (`plots`); the host cost of a small step (`host`), encoder throughput (`encoder`)
and tissue detection (`tissue`)."""

from collections.abc import Iterable, Sequence
from typing import Any


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a Markdown table: ``head``, its rule and one line per row of cells (empty: ``| |``)."""
    lines = ["|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|" for cells in [head, *rows]]
    return [lines[0], "|" + "---|" * len(head), *lines[1:]]
