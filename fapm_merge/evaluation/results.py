"""Results files: one JSON line per evaluated model, appended over time, read back.

``fapm-merge eval`` appends records (:func:`append_result`); ``tradeoff`` and
``tune`` read them (:func:`read_results`, the last line per model wins). A sweep
folder stands for its outputs (:func:`expand_models`). Light on purpose: reading
results needs neither torch nor mergekit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

from fapm_merge.io.jsonl import iter_jsonl

SWEEP_MANIFEST = "sweep.json"
"""The file ``fapm-merge sweep`` writes into its output folder, listing the variants."""


class ResultsError(ValueError):
    """A results file or model list that cannot be read; the message says why."""


def expand_models(paths: Sequence[Path]) -> List[Path]:
    """Model folders; a sweep folder (with sweep.json) stands for its outputs."""
    folders: List[Path] = []
    for path in paths:
        path = Path(path).absolute()
        manifest = path / SWEEP_MANIFEST
        if manifest.exists():
            try:
                names = [v["name"] for v in json.loads(manifest.read_text())["variants"]]
            except (ValueError, KeyError, TypeError) as error:
                raise ResultsError(
                    f"{manifest} is not a sweep manifest ({type(error).__name__}: {error}); "
                    "re-run the sweep, or pass the model folders themselves"
                ) from None
            folders.extend(path / name for name in names)
        else:
            folders.append(path)
    return folders


def append_result(path: Path, record: Dict[str, Any]) -> None:
    """Append one JSON line (results files collect runs over time)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=False) + "\n")


def read_results(path: Path, error: type = ResultsError) -> List[dict]:
    """The records of a results file, the last line per model winning (in the
    file order of those last lines).

    Args:
        path (`Path`): a JSON-lines file written by ``fapm-merge eval``.
        error (`type`, defaults to `ResultsError`): the exception raised for a
            missing, unreadable or empty file (the caller's own input-error type).
    """
    path = Path(path)
    if not path.exists():
        raise error(f"results file {path} not found; write it with fapm-merge eval --out {path}")
    latest: Dict[str, dict] = {}
    for _, record in iter_jsonl(path, error):
        if isinstance(record, dict) and "model" in record and "metrics" in record:
            latest.pop(record["model"], None)  # re-insert: keeps file order of the last run
            latest[record["model"]] = record
    if not latest:
        raise error(f"{path} holds no fapm-merge eval records")
    return list(latest.values())


def progress_line(number: int, total: int, record: Dict[str, Any], width: int = 80) -> str:
    """What ``fapm-merge eval`` prints after one model: at most ``width`` columns a
    line (one line when it fits, else the model's name on its own line and the
    numbers indented below it, so a terminal never wraps them mid-number).

    Args:
        number (`int`): this model's position, from 1.
        total (`int`): models in this run.
        record (`Dict[str, Any]`): the model's record (:func:`append_result`).
        width (`int`, defaults to 80): the terminal width.
    """
    metrics = record.get("metrics", {})
    parts = []
    if "text" in metrics:
        parts.append(f"loss {metrics['text']['loss']:.4f}, ppl {metrics['text']['perplexity']:.2f}")
    if "task" in metrics:
        parts.append(f"task {metrics['task']['accuracy']:.1%} of {metrics['task']['examples']}")
    if "lm_eval" in metrics:
        parts.append(f"lm-eval: {', '.join(metrics['lm_eval'])}")
    parts.append(f"{record.get('seconds', 0.0):.1f} s")
    head = f"[{number}/{total}] {record.get('name', record.get('model', '?'))}"
    numbers = "; ".join(parts)
    if len(head) + 2 + len(numbers) <= width:
        return f"{head}: {numbers}"
    indent = " " * (len(f"[{number}/{total}]") + 1)
    lines = [head]
    line = indent
    for index, part in enumerate(parts):  # wrap between parts, never inside one
        piece = part + (";" if index < len(parts) - 1 else "")
        if line.strip() and len(line) + 1 + len(piece) > width:
            lines.append(line)
            line = indent
        line += ("" if not line.strip() else " ") + piece
    lines.append(line)
    return "\n".join(lines)


__all__ = ["ResultsError", "SWEEP_MANIFEST", "append_result", "expand_models", "progress_line",
           "read_results"]
