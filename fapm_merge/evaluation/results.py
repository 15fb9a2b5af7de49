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


__all__ = ["ResultsError", "SWEEP_MANIFEST", "append_result", "expand_models", "read_results"]
