"""One model in, one record out: what ``fapm-merge eval`` measures and writes.

:func:`evaluate_model` loads a model folder once and runs every metric asked for
(:mod:`fapm_merge.evaluation.metrics`); the record is one JSON line of a results
file (:mod:`fapm_merge.evaluation.results`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional

from fapm_merge.evaluation.inputs import load_documents, load_task
from fapm_merge.evaluation.metrics import (
    ByteTokenizer,
    EvalInputError,
    load_model,
    load_tokenizer,
    mean_token_loss,
    task_accuracy,
)
from fapm_merge.evaluation.results import data_digest, file_digest
from fapm_merge.evaluation.settings import TASK_METRIC, TEXT_METRIC, EvalSettings
from fapm_merge.io.recipe import RecipeError, read_model_recipe


def _model_recipe(model_dir: Path) -> Optional[dict]:
    try:
        return read_model_recipe(model_dir)
    except RecipeError as error:
        raise EvalInputError(str(error)) from None


# ---------------------------------------------------------------------------
# one model, one JSON line
# ---------------------------------------------------------------------------


def evaluate_model(model_dir: Path, settings: EvalSettings) -> Dict[str, Any]:
    """Evaluate one model folder; the result is one JSON-serialisable record.

    Per-prompt and per-window values sit under ``metrics.<metric>.per_item``;
    :func:`fapm_merge.evaluation.results.append_result` stores them in the items
    file beside the results file, so results lines stay short.

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
        # the data first: a bad line is found before a model is loaded
        documents = load_documents(settings.text) if settings.text is not None else None
        items = load_task(settings.task) if settings.task is not None else None
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
            record["metrics"][TEXT_METRIC] = {
                "file": str(Path(settings.text).absolute()),
                "sha256": data_digest(settings.text),
                **mean_token_loss(
                    model,
                    tokenizer,
                    documents,
                    window=settings.window,
                    batch_size=settings.batch_size,
                    max_tokens=settings.max_tokens,
                    use_bos=settings.use_bos,
                ),
            }
        if settings.task is not None:
            record["metrics"][TASK_METRIC] = {
                "file": str(Path(settings.task).absolute()),
                "sha256": file_digest(settings.task),
                **task_accuracy(model, tokenizer, items, use_bos=settings.use_bos),
            }
        del model
    if settings.lm_eval_tasks:
        from fapm_merge.evaluation.lm_eval import run_lm_eval

        # the aggregates under "lm_eval", each per-sample metric as "lm_eval:TASK/METRIC"
        record["metrics"].update(run_lm_eval(
            model_dir,
            settings.lm_eval_tasks,
            device=settings.device,
            dtype=settings.dtype,
            batch_size=settings.batch_size,
            limit=settings.lm_eval_limit,
            backend=settings.lm_eval_backend,
            extra_model_args=settings.lm_eval_model_args,
            include_path=settings.lm_eval_include,
        ))
    record["settings"] = {
        "tokenizer": settings.tokenizer or "model",
        "window": settings.window,
        "max_tokens": settings.max_tokens,
        "bos": bos_applied,
        "device": settings.device,
        "dtype": settings.dtype,
    }
    if settings.lm_eval_tasks:
        record["settings"]["lm_eval"] = {
            "backend": settings.lm_eval_backend, "model_args": settings.lm_eval_model_args,
            "limit": settings.lm_eval_limit,
            "include": str(settings.lm_eval_include) if settings.lm_eval_include else None,
        }
    record["seconds"] = round(time.perf_counter() - started, 3)
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return record


__all__ = ["EvalSettings", "evaluate_model"]
