"""One model in, one record out: what ``fapm-merge eval`` measures and writes.

:func:`evaluate_model` loads a model folder once and runs every metric asked for
(:mod:`fapm_merge.evaluation.metrics`); the record is one JSON line of a results
file (:mod:`fapm_merge.evaluation.results`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

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
from fapm_merge.io.recipe import RecipeError, read_model_recipe


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
    """Evaluate one model folder; the result is one JSON-serialisable record.

    ``record["settings"]`` holds the settings as applied: ``bos`` is whether a BOS
    token was prepended (``--bos`` and the tokenizer has one), None when neither
    text nor task was scored.

    Args:
        model_dir (`Path`): the model folder.
        settings (`EvalSettings`): what to measure.
    """
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
    bos_applied = None  # not applicable: no text or task was scored
    if settings.text is not None or settings.task is not None:
        model = load_model(model_dir, device=settings.device, dtype=settings.dtype)
        tokenizer = load_tokenizer(settings.tokenizer, model_dir)
        # --bos asks for BOS "when the tokenizer has one": record what happened,
        # so settings.bos and metrics.text.bos can never disagree.
        bos_applied = bool(settings.use_bos and tokenizer.bos_token_id is not None)
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
        "bos": bos_applied,
        "device": settings.device,
        "dtype": settings.dtype,
    }
    record["seconds"] = round(time.perf_counter() - started, 3)
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return record


__all__ = ["EvalSettings", "evaluate_model"]
