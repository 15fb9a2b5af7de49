"""Evaluation records: one model in, one JSON line out; results files read back.

``fapm-merge eval`` appends one record per model to a JSON-lines results file
(:func:`evaluate_model`, :func:`append_result`); ``tradeoff`` and ``tune`` read
them back with :func:`read_results` (the last line per model wins).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from fapm_merge.evaluation.metrics import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_WINDOW,
    ByteTokenizer,
    EvalInputError,
    load_model,
    load_task,
    load_tokenizer,
    mean_token_loss,
    task_accuracy,
)
from fapm_merge.io.jsonl import iter_jsonl
from fapm_merge.io.recipe import RecipeError, read_model_recipe

SWEEP_MANIFEST = "sweep.json"
"""The file ``fapm-merge sweep`` writes into its output folder, listing the variants."""


class ResultsError(ValueError):
    """A results file that cannot be read; the message says why."""


def _model_recipe(model_dir: Path) -> Optional[dict]:
    try:
        return read_model_recipe(model_dir)
    except RecipeError as error:
        raise EvalInputError(str(error)) from None


# ---------------------------------------------------------------------------
# one model, one JSON line
# ---------------------------------------------------------------------------


@dataclass
class EvalSettings:
    """What to measure. Attributes mirror the ``fapm-merge eval`` options."""

    text: Optional[Path] = None
    task: Optional[Path] = None
    tokenizer: Optional[str] = None
    window: int = DEFAULT_WINDOW
    batch_size: int = DEFAULT_BATCH_SIZE
    max_tokens: Optional[int] = None
    use_bos: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    lm_eval_tasks: Optional[str] = None
    lm_eval_limit: Optional[int] = None


def evaluate_model(model_dir: Path, settings: EvalSettings) -> Dict[str, Any]:
    """Evaluate one model folder; the result is one JSON-serialisable record."""
    model_dir = Path(model_dir).absolute()
    if settings.text is None and settings.task is None and not settings.lm_eval_tasks:
        raise EvalInputError("nothing to measure: give --text, --task and/or --lm-eval")
    started = time.perf_counter()
    record: Dict[str, Any] = {
        "model": str(model_dir),
        "name": model_dir.name,
        "recipe": _model_recipe(model_dir),
        "metrics": {},
    }
    if settings.text is not None or settings.task is not None:
        model = load_model(model_dir, device=settings.device, dtype=settings.dtype)
        tokenizer = load_tokenizer(settings.tokenizer, model_dir)
        vocab = model.get_input_embeddings().num_embeddings
        if isinstance(tokenizer, ByteTokenizer) and vocab < 256:
            raise EvalInputError(
                f"--tokenizer bytes needs a vocabulary of at least 256 tokens; this model has {vocab}"
            )
        if settings.text is not None:
            try:
                text = Path(settings.text).read_text(encoding="utf-8")
            except UnicodeDecodeError as error:
                raise EvalInputError(
                    f"--text {settings.text} is not UTF-8 text ({error.reason} at byte "
                    f"{error.start}); convert it to UTF-8"
                ) from None
            record["metrics"]["text"] = {
                "file": str(Path(settings.text).absolute()),
                **mean_token_loss(
                    model,
                    tokenizer,
                    text,
                    window=settings.window,
                    batch_size=settings.batch_size,
                    max_tokens=settings.max_tokens,
                    use_bos=settings.use_bos,
                ),
            }
        if settings.task is not None:
            record["metrics"]["task"] = {
                "file": str(Path(settings.task).absolute()),
                **task_accuracy(model, tokenizer, load_task(settings.task), use_bos=settings.use_bos),
            }
        del model
    if settings.lm_eval_tasks:
        from fapm_merge.evaluation.lm_eval import run_lm_eval

        record["metrics"]["lm_eval"] = run_lm_eval(
            model_dir,
            settings.lm_eval_tasks,
            device=settings.device,
            dtype=settings.dtype,
            batch_size=settings.batch_size,
            limit=settings.lm_eval_limit,
        )
    record["settings"] = {
        "tokenizer": settings.tokenizer or "model",
        "window": settings.window,
        "max_tokens": settings.max_tokens,
        "bos": settings.use_bos,
        "device": settings.device,
        "dtype": settings.dtype,
    }
    record["seconds"] = round(time.perf_counter() - started, 3)
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return record


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
                raise EvalInputError(
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


__all__ = [
    "EvalSettings",
    "ResultsError",
    "SWEEP_MANIFEST",
    "append_result",
    "evaluate_model",
    "expand_models",
    "read_results",
]


