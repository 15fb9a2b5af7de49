"""What tune checks before it merges anything: the evaluation inputs and the disk (the
axes: :meth:`TuneSettings.resolved`), and, after the anchors, that a decision can be
made at all (each raises TuneError)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from fapm_merge.evaluation.lm_eval import explain_missing
from fapm_merge.evaluation.results import read_results
from fapm_merge.evaluation.settings import TASK_METRIC
from fapm_merge.workflows.tune.plan import TuneError, TunePlan, TuneSettings


def check_eval_inputs(plan: TunePlan, settings: TuneSettings) -> None:
    """The task has items and the text gives at least two windows (intervals are
    over windows), before any merge: for the built-in axes (the harness checks its own)."""
    from fapm_merge.evaluation.metrics import EvalInputError, load_task, load_tokenizer, text_windows

    try:
        items = load_task(settings.task) if settings.task is not None else None
        text = Path(settings.text).read_text(encoding="utf-8") if settings.text is not None else None
        tokenizer = load_tokenizer(settings.eval.tokenizer, plan.base) if text is not None else None
    except UnicodeDecodeError as error:
        raise TuneError(f"--text {settings.text} is not UTF-8 text ({error.reason}); "
                        "convert it to UTF-8") from None
    except EvalInputError as error:
        raise TuneError(str(error)) from None
    if items is not None and len(items) < 2:
        raise TuneError(f"--task {settings.task} has {len(items)} item: a paired accuracy "
                        "comparison needs many (a few hundred resolve a few points of accuracy)")
    if text is None:
        return
    ids = tokenizer.encode(text)
    if settings.eval.max_tokens is not None:
        ids = ids[: settings.eval.max_tokens]
    windows = text_windows(ids, settings.eval.window, [])
    full = sum(1 for w in windows if len(w) == settings.eval.window)
    if full < 2:
        raise TuneError(
            f"--text {settings.text} gives {len(ids)} tokens, {full} full window(s) of "
            f"{settings.eval.window}: the forgetting intervals are computed over windows and "
            "need at least 2 (a few dozen for useful ones); give a longer text or a smaller --window")


def _variant_bytes(plan: TunePlan, recipe: dict) -> int:
    """About one variant's size on disk: the base's tensors in the recipe's dtype."""
    from fapm_merge.io.checkpoint import tensor_shapes

    dtype = recipe.get("out_dtype") or recipe.get("dtype")
    itemsize = {"float32": 4, "fp32": 4, "float64": 8, "bfloat16": 2, "bf16": 2,
                "float16": 2, "fp16": 2}.get(str(dtype))
    if itemsize is None:
        return sum(p.stat().st_size for p in plan.base.glob("*.safetensors"))
    return sum(math.prod(shape) for shape in tensor_shapes(plan.base).values()) * itemsize


def check_disk(work: Path, plan: TunePlan, count: int, recipe: dict) -> None:
    """Enough free space in the work folder for ``count`` variants, or a clear error."""
    needed = count * _variant_bytes(plan, recipe)
    free = shutil.disk_usage(work).free
    if needed > free:
        raise TuneError(
            f"the next {count} variant(s) need about {needed / 1e9:.1f} GB in {work}, but only "
            f"{free / 1e9:.1f} GB are free: lower --max-on-disk, free space, or give --work on a "
            "bigger disk")


def check_anchors(results: Path, plan: TunePlan, settings: TuneSettings) -> dict:
    """Stop before the variants when the decision could never be made; the fine-tune's
    task metric (``accuracy``, ``examples``) for the checks that follow."""
    records = {r["model"]: r for r in read_results(results, TuneError)}
    ft = records[str(plan.finetuned)]["metrics"]
    for name, kind, option in ((settings.task_metric, "accuracy", "--task-metric"),
                               (settings.text_metric, "loss", "--text-metric")):
        if not isinstance(ft.get(name), dict) or kind not in ft[name]:
            raise TuneError(f"{plan.finetuned}: " + explain_missing(name, ft, option=option, kind=kind))
    task = ft[settings.task_metric]
    what = "--task" if settings.task_metric == TASK_METRIC else settings.task_metric
    if task["accuracy"] <= 0:
        raise TuneError(
            f"the fine-tuned model scores 0 on {what} ({task['examples']} items): there is "
            "no task accuracy to keep, so no variant can be chosen. Check the task file (answers, "
            "prompt format, --bos/--no-bos as in training) before sweeping")
    return task


__all__ = ["check_anchors", "check_disk", "check_eval_inputs"]
