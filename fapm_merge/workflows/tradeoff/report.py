"""Every rendering of a trade-off: the rich table of the command line, the Markdown
table of tune's model card, and the summary sentences, in one order of points."""

from __future__ import annotations

import math
from typing import List, Optional

from fapm_merge.evaluation import stats
from fapm_merge.evaluation.settings import TASK_METRIC, TEXT_METRIC
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
                   signed: bool = True) -> str:
    """The value on one line and its 95% interval on the next (narrow columns)."""
    text = _num(value, digits, signed)
    if interval is not None:
        text += f"\n[{_num(interval.low, digits, signed)},{_num(interval.high, digits, signed)}]"
    return text


_RULE_COLUMN = {  # the column beside CF %, as the rule names it (SelectionRule.column)
    "repaired": lambda p: _with_interval(p.repaired, p.repaired_interval, 2),
    "score": lambda p: _num(p.score, 3),
}


def tradeoff_table(result: Tradeoff):
    """A rich table of every point that fits 80 columns: long names wrap, each number
    carries its 95% paired interval on the line below it. Sorted by method and
    strength; the last column is the rule's verdict."""
    from rich import box
    from rich.table import Table

    column = result.rule.selection.column
    # SIMPLE_HEAD draws a one-space gap between columns, so no padding is added
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False,
                  title=f"rule: {result.rule.kind}", title_justify="left")
    table.add_column("model", overflow="fold", ratio=1, min_width=14)
    table.add_column("acc", justify="right", width=5)
    table.add_column("Δacc vs FT", justify="right", width=13)
    table.add_column("CF %", justify="right", width=13)
    table.add_column(column, justify="right", width=13)
    table.add_column("rule", overflow="fold", width=8)  # the rule's legend explains the words
    for p in ordered(result):
        name = {"base": f"{p.name} (base)", "finetuned": f"{p.name} (FT)"}.get(p.method, p.name)
        table.add_row(
            name,
            _num(p.accuracy, 3),
            _with_interval(accuracy_change(result, p), p.accuracy_vs_ft, 2),
            _with_interval(p.cf_pct, p.cf_interval, 2),
            _RULE_COLUMN[column](p),
            "◀ chosen" if p is result.selected else p.verdict,
            style="bold" if p is result.selected else None,
        )
    return table


def tradeoff_markdown(result: Tradeoff) -> str:
    """The table as Markdown (the model card's): every number with its 95% interval."""
    def cell(value, interval, digits):
        if value is None or not math.isfinite(value):
            return "-"
        text = f"{value:+.{digits}f}"
        return text + (f" [{interval.low:+.{digits}f}, {interval.high:+.{digits}f}]" if interval else "")

    rows = ["| model | method | strength | accuracy | Δ accuracy vs fine-tune [95%] | CF % [95%] "
            "| repaired [95%] | rule |", "|---|---|---|---:|---:|---:|---:|---|"]
    for p in ordered(result):
        strength = "" if p.strength is None else f"{p.strength_name} {p.strength:g}"
        name = f"**{p.name}**" if p is result.selected else p.name
        rows.append(f"| {name} | {p.method} | {strength} | {p.accuracy:.3f} | "
                    f"{cell(accuracy_change(result, p), p.accuracy_vs_ft, 3)} | "
                    f"{cell(p.cf_pct, p.cf_interval, 2)} | "
                    f"{cell(p.repaired, p.repaired_interval, 2)} | {p.verdict} |")
    return "\n".join(rows)


def summary_lines(result: Tradeoff) -> List[str]:
    """The rule, the decision and its warnings, as plain sentences."""
    lines = [f"rule: {result.rule.text}.", result.rule.selection.legend + "."]
    if (result.task_metric, result.text_metric) != (TASK_METRIC, TEXT_METRIC):
        lines.append(f"axes: task accuracy from {result.task_metric}, forgetting from "
                     f"{result.text_metric}.")
    if result.items:
        lines.append(f"intervals: 95%, paired over {result.items.get('prompts', 0)} prompts and "
                     f"{result.items.get('windows', 0)} text windows (every model saw the same).")
    lines.append(("selected: " if result.selected else "nothing selected: ") + result.reason + ".")
    lines += [f"warning: {w}." for w in result.warnings]
    lines += [f"skipped: {s}" for s in result.skipped]
    return lines


__all__ = ["accuracy_change", "ordered", "summary_lines", "tradeoff_markdown", "tradeoff_table"]
