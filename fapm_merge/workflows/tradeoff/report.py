"""Every rendering of a trade-off: the rich table of the command line, the Markdown
table of tune's model card, and the summary sentences, in one order of points."""

from __future__ import annotations

import math
from typing import List, Optional

from fapm_merge.evaluation import stats
from fapm_merge.evaluation.settings import TASK_METRIC, TEXT_METRIC
from fapm_merge.workflows.tables import WIDTH, column_widths
from fapm_merge.workflows.tradeoff.points import Point, Tradeoff


def ordered(result: Tradeoff) -> List[Point]:
    """The points as every table lists them: base, fine-tune, then by method and strength."""
    rank = {"base": 0, "finetuned": 1}
    return sorted(result.points, key=lambda p: (rank.get(p.method, 2), p.method, p.strength or 0))


def accuracy_change(result: Tradeoff, point: Point) -> float:
    """The point's accuracy minus the fine-tune's (the paired estimate where there is one)."""
    return point.accuracy_vs_ft.estimate if point.accuracy_vs_ft else point.accuracy - result.finetuned.accuracy


def _num(value: Optional[float], digits: int, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-" if value is None else ("inf" if value > 0 else "-inf")
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _with_interval(value: Optional[float], interval: Optional[stats.Interval], digits: int,
                   signed: bool = True, lines: int = 2) -> str:
    """The value on one line and its 95% interval below it: ``[low,high]`` on one line,
    or with ``lines=3`` the low and the high end on a line each (narrow terminals)."""
    text = _num(value, digits, signed)
    if interval is not None:
        low, high = _num(interval.low, digits, signed), _num(interval.high, digits, signed)
        text += f"\n[{low},{high}]" if lines == 2 else f"\n[{low},\n{high}]"
    return text


_RULE_COLUMN = {  # the column beside CF %, as the rule names it (SelectionRule.column)
    "CF cut": lambda p, lines: _with_interval(p.cf_reduction.estimate if p.cf_reduction else None,
                                              p.cf_reduction, 2, lines=lines),
    "score": lambda p, lines: _num(p.score, 3),
}

_NAME_MIN = 8
"""The fewest characters the model column gets; longer names fold onto more lines."""


def tradeoff_table(result: Tradeoff, width: int = WIDTH):
    """A rich table of every point in ``width`` columns that never cuts a number.

    Each number carries its 95% paired interval below it; every number column is
    as wide as its longest line (a DARE interval such as ``[+22550.30,+inf]``
    widens its column instead of being cut) and long model names fold. Where that
    is too wide, the interval's two ends go on two lines, and then the columns are
    shown as two or more tables, each with the model names, which the caption says.
    Sorted by method and strength; the last column is the rule's verdict.

    Args:
        result (`Tradeoff`): the points and the decision.
        width (`int`, defaults to 80): the terminal's width.

    Returns:
        a rich renderable: one table, or a group of tables.
    """
    from rich.console import Group

    column = result.rule.selection.column
    headers = ["acc", "Δacc vs FT", "CF %", column, "rule"]
    points = ordered(result)
    names = [{"base": f"{p.name} (base)", "finetuned": f"{p.name} (FT)"}.get(p.method, p.name)
             for p in points]
    bold = [p is result.selected for p in points]
    for lines in (2, 3):
        cells = [[_num(p.accuracy, 3) for p in points],
                 # 3 digits, as the accuracy column and the card: at 2 the interval of two
                 # models that agree on 1000 prompts (+-0.004) read [-0.00,+0.00]
                 [_with_interval(accuracy_change(result, p), p.accuracy_vs_ft, 3, lines=lines)
                  for p in points],
                 [_with_interval(p.cf_pct, p.cf_interval, 2, lines=lines) for p in points],
                 [_RULE_COLUMN[column](p, lines) for p in points],
                 ["◀ chosen" if p is result.selected else p.verdict for p in points]]
        widths = column_widths(list(zip(*cells)), headers)
        # SIMPLE_HEAD draws a one-space gap between columns, so no padding is added
        if _NAME_MIN + sum(widths) + len(widths) <= width:
            return _table(names, bold, headers, cells, widths, width, title=f"rule: {result.rule.kind}")
    parts: List[List[int]] = [[]]  # too narrow even so: the columns in as many tables as needed
    for index, column_width in enumerate(widths):
        used = sum(widths[i] + 1 for i in parts[-1])
        if parts[-1] and _NAME_MIN + used + column_width + 1 > width:
            parts.append([])
        parts[-1].append(index)
    tables = [_table(names, bold, [headers[i] for i in part], [cells[i] for i in part],
                     [widths[i] for i in part], width,
                     title=f"rule: {result.rule.kind} ({number} of {len(parts)})"
                     if number == 1 else f"({number} of {len(parts)})")
              for number, part in enumerate(parts, 1)]
    tables[-1].caption = f"the table is shown in {len(parts)} parts at {width} columns"
    return Group(*tables)


def _table(names: List[str], bold: List[bool], headers: List[str], cells: List[List[str]],
           widths: List[int], width: int, *, title: str):
    """One rich table: the model column and the given number columns at exact widths."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False, title=title,
                  title_justify="left", caption_justify="left")
    # exact widths: rich would otherwise widen a column to its header and crop the table
    longest = max(len(name) for name in names)
    table.add_column("model", overflow="fold", width=max(_NAME_MIN, min(longest, width - sum(widths) - len(widths))))
    for header, column_width in zip(headers, widths):
        # fold, never an ellipsis: at this width a number is whole (numbers have no
        # spaces); a header wraps between its words
        table.add_column(header, justify="left" if header == "rule" else "right",
                         width=column_width, overflow="fold")
    for index, name in enumerate(names):
        table.add_row(name, *(column_cells[index] for column_cells in cells),
                      style="bold" if bold[index] else None)
    return table


def tradeoff_markdown(result: Tradeoff) -> str:
    """The table as Markdown (the model card's): every number with its 95% interval."""
    def cell(value, interval, digits):
        if value is None or not math.isfinite(value):
            return "-"
        text = f"{value:+.{digits}f}"
        return text + (f" [{interval.low:+.{digits}f}, {interval.high:+.{digits}f}]" if interval else "")

    rows = ["| model | method | strength | accuracy | Δ accuracy vs fine-tune [95%] | CF % [95%] "
            "| CF cut, points [95%] | repaired | rule |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for p in ordered(result):
        strength = "" if p.strength is None else f"{p.strength_name} {p.strength:g}"
        name = f"**{p.name}**" if p is result.selected else p.name
        rows.append(f"| {name} | {p.method} | {strength} | {p.accuracy:.3f} | "
                    f"{cell(accuracy_change(result, p), p.accuracy_vs_ft, 3)} | "
                    f"{cell(p.cf_pct, p.cf_interval, 2)} | "
                    f"{cell(p.cf_reduction.estimate if p.cf_reduction else None, p.cf_reduction, 2)} | "
                    f"{'-' if p.repaired is None else f'{p.repaired:.0%}'} | {p.verdict} |")
    return "\n".join(rows)


def evidence(result: Tradeoff) -> str:
    """What the intervals rest on: prompts (and their groups), windows (and documents)."""
    prompts, windows = result.items.get("prompts", 0), result.items.get("windows", 0)
    text = f"{prompts} prompts"
    if result.prompt_groups:
        text += f" from {len(set(result.prompt_groups))} groups"
    text += f" and {windows} text windows"
    if result.window_groups:
        text += f" from {len(set(result.window_groups))} documents, resampled as wholes"
    return text


def summary_lines(result: Tradeoff) -> List[str]:
    """The rule, the decision and its warnings, as plain sentences."""
    lines = [f"rule: {result.rule.text}.", result.rule.selection.legend + "."]
    if (result.task_metric, result.text_metric) != (TASK_METRIC, TEXT_METRIC):
        lines.append(f"axes: task accuracy from {result.task_metric}, forgetting from "
                     f"{result.text_metric}.")
    if result.items:
        lines.append(f"intervals: 95%, paired over {evidence(result)} (every model saw the same).")
    lines.append(("selected: " if result.selected else "nothing selected: ") + result.reason + ".")
    lines += [f"warning: {w}." for w in result.warnings]
    if result.confirmation is not None:
        lines.append(f"held-out check: {result.confirmation.sentence()}.")
    lines += [f"skipped: {s}" for s in result.skipped]
    return lines


__all__ = ["accuracy_change", "evidence", "ordered", "summary_lines", "tradeoff_markdown", "tradeoff_table"]
