"""Terminal tables that fit 80 columns and still show whole tensor names.

rich shrinks a too-wide table by cutting every column's text (``model.layers.0.mlp.d…``),
which loses the one thing a reader needs, the tensor's name, while number columns
keep spare room. Here every number column gets exactly the width its values and
header words need, the name column gets the rest, and a name longer than that is
wrapped after a dot (:func:`wrap_name`), never cut.
"""

from __future__ import annotations

from typing import Iterable, List, Sequence

WIDTH = 80
"""The terminal width the tables are designed for (and tested at)."""


def wrap_name(name: str, width: int) -> str:
    """``name`` on as many lines of at most ``width`` characters as it needs,
    broken after a dot (``model.layers.10.self_attn.`` / ``q_proj.weight``); a
    single part longer than ``width`` is split inside. Joining the lines gives
    the name back.

    Args:
        name (`str`): a tensor (or layer) name.
        width (`int`): the most characters per line (>= 1).
    """
    lines: List[str] = []
    line = ""
    for index, part in enumerate(name.split(".")):
        piece = part + ("." if index < name.count(".") else "")
        if line and len(line) + len(piece) > width:
            lines.append(line)
            line = ""
        while len(piece) > width:
            lines.append(piece[:width])
            piece = piece[width:]
        line += piece
    lines.append(line)
    return "\n".join(lines)


def column_widths(cells: Sequence[Sequence[str]], headers: Sequence[str]) -> List[int]:
    """Per number column: its longest line of a value (a cell may hold several lines)
    or the longest word of its header (headers wrap between words)."""
    return [max([len(line) for row in cells for line in row[i].splitlines() or [""]]
                + [max(len(w) for w in header.split())])
            for i, header in enumerate(headers)]


def name_column_width(names: Iterable[str], other_widths: Sequence[int], width: int = WIDTH) -> int:
    """Characters the name column gets in a table of ``len(other_widths) + 1`` columns,
    so that the whole table is at most ``width`` wide.

    The table is made with :func:`table`: one bar per column edge and one space
    of padding on each side of every cell.
    """
    columns = len(other_widths) + 1
    frame = (columns + 1) + 2 * columns
    budget = width - frame - sum(other_widths)
    longest = max((len(n) for n in names), default=1)
    return max(8, min(longest, budget))


def table(title: str = ""):
    """A rich table with the layout :func:`name_column_width` assumes."""
    from rich.table import Table

    return Table(title=title)


def short_count(number: int) -> str:
    """A count in at most 6 characters, as a person would round it: ``725,504`` ->
    ``725.5K``, ``3,950,848`` -> ``3.95M``, ``8,030,261,248`` -> ``8.03B``."""
    for size, unit in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if number >= size:
            value = number / size
            return f"{value:.3g}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return str(number)


def wrapped(names: Sequence[str], column_width: int) -> List[str]:
    """Every name wrapped to ``column_width`` (see :func:`wrap_name`)."""
    return [wrap_name(name, column_width) for name in names]


__all__ = ["WIDTH", "column_widths", "name_column_width", "short_count", "table", "wrap_name", "wrapped"]
