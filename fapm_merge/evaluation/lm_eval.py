"""lm-evaluation-harness on a local model folder (the optional extra ``eval``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from fapm_merge.evaluation.metrics import EvalInputError


def run_lm_eval(model_path: Path, tasks: str, *, device: str, dtype: str, batch_size: int, limit: Optional[int]) -> dict:
    """lm-evaluation-harness tasks on a local model (optional extra ``eval``)."""
    try:
        import lm_eval
    except ImportError:
        raise EvalInputError(
            "--lm-eval needs lm-evaluation-harness: pip install 'fapm-merge[eval]' "
            "(its tasks usually download datasets; run them where the hub is reachable "
            "or with a local HF_DATASETS cache)"
        ) from None
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_path},dtype={dtype}",
        tasks=[t.strip() for t in tasks.split(",") if t.strip()],
        device=device,
        batch_size=batch_size,
        limit=limit,
    )
    return json.loads(json.dumps(results.get("results", {}), default=str))


__all__ = ["run_lm_eval"]
