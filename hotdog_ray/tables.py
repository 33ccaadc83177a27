"""Every table the command line prints, drawn by rich: columns as wide as their longest cell (a
name is never cut), numbers right-aligned, plain text (no colour codes in logs or pipes)."""

from __future__ import annotations

import io
import re
from typing import Iterable, Sequence

from rich import box
from rich.console import Console
from rich.table import Table

_NUMBER = re.compile(r"^[-+]?[\d,]*\.?\d+(e[-+]?\d+)?%?$|^-$")


def render(columns: Sequence[str], rows: Iterable[Sequence[object]], *, title: str | None = None) -> str:
    """``rows`` under ``columns`` as text; None shows as ``-``. A column whose every cell reads as a
    number (``1,234``, ``0.25``, ``12.5%``) is right-aligned; columns all named ``""``: no header."""
    cells = [["-" if v is None else str(v) for v in row] for row in rows]
    table = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        show_header=any(columns),  # all names empty: a list of figures, no header rule
        title=title,
        title_justify="left",
    )
    for i, name in enumerate(columns):
        numeric = bool(cells) and all(_NUMBER.match(row[i]) for row in cells)
        table.add_column(name, justify="right" if numeric else "left", no_wrap=True)
    for row in cells:
        table.add_row(*row)
    out = io.StringIO()
    # As wide as the table needs: a terminal's width would fold long names.
    Console(file=out, width=100_000, color_system=None, force_terminal=False, emoji=False).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines()).strip("\n")
