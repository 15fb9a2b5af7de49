"""Results files: one JSON line per evaluated model, appended over time, read back.

``fapm-merge eval`` appends records (:func:`append_result`); ``tradeoff`` and
``tune`` read them (:func:`read_results`, the last line per model wins). A sweep
folder stands for its outputs (:func:`expand_models`). Light on purpose: reading
results needs neither torch nor mergekit.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

from fapm_merge.core.errors import FapmMergeError
from fapm_merge.evaluation.inputs import document_files
from fapm_merge.evaluation.settings import TASK_METRIC, TEXT_METRIC
from fapm_merge.io.jsonl import iter_jsonl

PER_ITEM = "per_item"
"""Key of the per-prompt / per-window values inside a metric of a record."""

ITEMS_SUFFIX = ".items.jsonl"
"""``results.jsonl`` keeps its per-item values in ``results.items.jsonl``."""

SWEEP_MANIFEST = "sweep.json"
"""The file ``fapm-merge sweep`` writes into its output folder, listing the variants."""


class ResultsError(FapmMergeError, ValueError):
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


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes: two records were measured on the same data only
    when their digests agree (paired comparisons check it)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def data_digest(path: Path) -> str:
    """SHA-256 of an evaluation input: a file's bytes (:func:`file_digest`), or for a
    text folder its documents' sorted file names and bytes (any change to the set of
    ``.txt`` files, a name or a byte changes it)."""
    path = Path(path)
    if not path.is_dir():
        return file_digest(path)
    digest = hashlib.sha256()
    for file in document_files(path):
        # a name (no NUL in file names) then the fixed-length digest of its bytes: unambiguous
        digest.update(file.name.encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def items_path(results: Path) -> Path:
    """The items file beside a results file: ``results.jsonl`` -> ``results.items.jsonl``."""
    results = Path(results)
    return results.with_name(results.stem + ITEMS_SUFFIX)


def _record_key(record: Dict[str, Any]) -> str:
    text = json.dumps(record, sort_keys=True, default=str)
    return f"{record.get('name', 'model')}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def append_result(path: Path, record: Dict[str, Any]) -> None:
    """Append one record as a JSON line; its per-item values go to the items file.

    Results files collect runs over time. The per-prompt outcomes and per-window
    losses (``metrics.<metric>.per_item``) are what paired intervals need but would
    make every results line thousands of characters long, so they are written as
    one line of :func:`items_path` under a key the results line names
    (``"items": {"file": ..., "key": ...}``). The items line is written first: a
    results line never points at items that are not there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = copy.deepcopy(record)
    per_item = {}
    for metric, values in (record.get("metrics") or {}).items():
        if isinstance(values, dict) and PER_ITEM in values:
            per_item[metric] = values.pop(PER_ITEM)
    if per_item:
        key = _record_key(record)
        side = items_path(path)
        with side.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"key": key, "model": record.get("model"), **per_item}) + "\n")
        record["items"] = {"file": side.name, "key": key}
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=False) + "\n")


def read_results(path: Path, error: type = ResultsError, *, with_items: bool = False) -> List[dict]:
    """The records of a results file, the last line per model winning (in the
    file order of those last lines).

    Args:
        path (`Path`): a JSON-lines file written by ``fapm-merge eval``.
        error (`type`, defaults to `ResultsError`): the exception raised for a
            missing, unreadable or empty file (the caller's own input-error type).
        with_items (`bool`, defaults to False): put each record's per-item values
            back under ``metrics.<metric>.per_item`` from the items file (records
            without them are left as they are).
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
    records = list(latest.values())
    if with_items:
        _attach_items(path, records, error)
    return records


def _attach_items(path: Path, records: List[dict], error: type) -> None:
    wanted = {}
    for record in records:
        items = record.get("items")
        if isinstance(items, dict) and isinstance(items.get("key"), str):
            wanted.setdefault(path.parent / str(items.get("file")), set()).add(items["key"])
    found: Dict[str, dict] = {}
    for side, keys in wanted.items():
        if not side.exists():
            raise error(f"{side} (the per-item values of {path}) is missing; it is written "
                        f"beside the results file by fapm-merge eval: rerun the evaluation")
        for _, line in iter_jsonl(side, error):
            if isinstance(line, dict) and line.get("key") in keys:
                found[line["key"]] = line
    for record in records:
        items = record.get("items")
        if not isinstance(items, dict):
            continue
        line = found.get(items.get("key"))
        if line is None:
            raise error(f"{path}: the per-item values of {record['model']} (key "
                        f"{items.get('key')}) are not in {items.get('file')}; rerun its evaluation")
        for metric, values in record["metrics"].items():
            if isinstance(values, dict) and metric in line:
                values[PER_ITEM] = line[metric]



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
    if TEXT_METRIC in metrics:
        text = metrics[TEXT_METRIC]
        parts.append(f"loss {text['loss']:.4f}, ppl {text['perplexity']:.2f}")
    if TASK_METRIC in metrics:
        task = metrics[TASK_METRIC]
        parts.append(f"task {task['accuracy']:.1%} of {task['examples']}")
    harness = [f"{k} {v['accuracy']:.1%}" if "accuracy" in v else f"{k} ppl {v['perplexity']:.4g}"
               for k, v in metrics.items() if k.startswith("lm_eval:") and isinstance(v, dict)]
    if harness:
        parts.extend(harness)
    elif "lm_eval" in metrics:  # harness results without per-sample values
        parts.append(f"lm-eval: {', '.join(metrics['lm_eval'].get('results', metrics['lm_eval']))}")
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


__all__ = ["ITEMS_SUFFIX", "PER_ITEM", "ResultsError", "SWEEP_MANIFEST", "append_result",
           "data_digest", "expand_models", "file_digest", "items_path", "progress_line", "read_results"]
