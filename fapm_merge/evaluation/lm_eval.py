"""lm-evaluation-harness as a source of metrics (the optional extra ``eval``).

:func:`run_lm_eval` runs harness tasks on one local model folder through
``lm_eval.simple_evaluate`` with ``log_samples=True`` and turns the harness's
per-sample results into the record format of ``fapm-merge eval``, so that a harness
metric can be an axis of ``tradeoff`` and ``tune`` with the same paired intervals
as the built-in metrics:

* ``metrics["lm_eval"]``: the harness's aggregate results per task, as it reports
  them (``"acc,none": 0.61``, ...);
* ``metrics["lm_eval:TASK/METRIC"]`` for every metric whose per-sample values are
  0/1 (``acc``, ``acc_norm``, ``exact_match``, ...): ``accuracy``, ``examples``,
  ``correct`` and ``per_item.correct`` (a "0110..." string in ``doc_id`` order),
  the shape of the built-in ``task`` metric;
* ``metrics["lm_eval:TASK/word_perplexity"]`` (and ``byte_perplexity``) for
  perplexity tasks (``output_type: loglikelihood_rolling``): ``loss`` (negative
  log-likelihood per word or byte), ``perplexity``, ``tokens`` (words or bytes),
  ``windows`` (documents) and ``per_item.{window_loss, window_tokens}`` per
  document, the shape of the built-in ``text`` metric.

A metric filtered by anything but the harness's ``none`` filter is named
``lm_eval:TASK/METRIC,FILTER``, the harness's own spelling. Each entry carries a
``sha256`` over the documents' and prompts' hashes as the harness logged them, so
records measured on other documents or prompts are never paired.

Light on purpose: ``lm_eval`` is imported only when a task runs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from fapm_merge.evaluation.errors import EvalInputError  # torch-free: tradeoff imports this module
from fapm_merge.evaluation.results import PER_ITEM
from fapm_merge.evaluation.settings import (
    DEFAULT_BATCH_SIZE,
    EVAL_DTYPES,
    LM_EVAL_BACKENDS,
    LM_EVAL_SERVER_BACKEND,
)

PREFIX = "lm_eval:"
"""Metric names from the harness start with this: ``lm_eval:arc_easy/acc``."""

PERPLEXITY_METRICS = {"word_perplexity": "word", "byte_perplexity": "byte"}
"""Per-document ``(loglikelihood, count)`` metrics of perplexity tasks, and their unit."""

DEFAULT_PERPLEXITY_METRIC = "word_perplexity"
"""The metric of a general axis named by its task alone (``lm_eval:wikitext``)."""

INSTALL_HINT = "pip install 'fapm-merge[eval]'"


class MetricName(Tuple[str, str, str]):
    """``lm_eval:TASK/METRIC[,FILTER]`` parsed: ``(task, metric, filter)``."""

    def __new__(cls, task: str, metric: str, filter_: str = "none"):
        return super().__new__(cls, (task, metric, filter_))

    @property
    def task(self) -> str:
        return self[0]

    @property
    def metric(self) -> str:
        return self[1]

    @property
    def filter(self) -> str:
        return self[2]

    @property
    def key(self) -> str:
        """The record key: ``lm_eval:TASK/METRIC`` (``,FILTER`` unless ``none``)."""
        suffix = "" if self.filter == "none" else f",{self.filter}"
        return f"{PREFIX}{self.task}/{self.metric}{suffix}"


def is_lm_eval_metric(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def parse_metric(name: str, *, option: str, default_metric: Optional[str] = None) -> MetricName:
    """``lm_eval:TASK/METRIC[,FILTER]`` -> :class:`MetricName`, or a one-line error.

    Args:
        name (`str`): the option's value.
        option (`str`): the option's name, for the message (``--task-metric``).
        default_metric (`str`, *optional*): the metric when only ``lm_eval:TASK``
            is given (``word_perplexity`` for ``--text-metric``); without it a
            metric is required.
    """
    body = name[len(PREFIX):] if is_lm_eval_metric(name) else None
    if body is None or not body.strip():
        raise EvalInputError(f"{option} {name!r}: an lm-eval metric is written lm_eval:TASK/METRIC, "
                             "e.g. lm_eval:arc_easy/acc")
    task, _, metric = body.partition("/")
    metric = metric or (default_metric or "")
    metric, _, filter_ = metric.partition(",")
    if not task or not metric or "/" in metric:
        raise EvalInputError(f"{option} {name!r}: name the task and its metric, lm_eval:TASK/METRIC "
                             "(e.g. lm_eval:arc_easy/acc)")
    return MetricName(task.strip(), metric.strip(), filter_.strip() or "none")


@dataclass(frozen=True)
class Axes:
    """The task and general axes of ``tradeoff`` and ``tune``, as record keys.

    Attributes:
        task (`str`): the metric whose ``accuracy`` is the task axis: `TASK_METRIC`
            or ``lm_eval:TASK/METRIC``.
        text (`str`): the metric whose ``loss`` is the general axis: `TEXT_METRIC`
            or ``lm_eval:TASK/word_perplexity`` (or ``byte_perplexity``).
        harness_tasks (`Tuple[str, ...]`): the lm-eval tasks the axes name, task
            axis first (for :meth:`EvalSettings.resolved`).
    """

    task: str
    text: str
    harness_tasks: Tuple[str, ...] = ()


def resolve_axes(task_metric: str, text_metric: str) -> Axes:
    """``--task-metric`` and ``--text-metric`` as record keys: a built-in metric
    (`TASK_METRIC`, `TEXT_METRIC`) stays as it is; ``lm_eval:wikitext`` becomes
    ``lm_eval:wikitext/word_perplexity``.

    Raises:
        EvalInputError: a malformed lm-eval metric name; the message names the option.
    """
    keys, tasks = [], []
    for name, option, default_metric in ((task_metric, "--task-metric", None),
                                         (text_metric, "--text-metric", DEFAULT_PERPLEXITY_METRIC)):
        if not is_lm_eval_metric(name):
            keys.append(name)
            continue
        parsed = parse_metric(name, option=option, default_metric=default_metric)
        keys.append(parsed.key)
        if parsed.task not in tasks:
            tasks.append(parsed.task)
    return Axes(task=keys[0], text=keys[1], harness_tasks=tuple(tasks))


def model_args(backend: str, model_dir: Path, *, dtype: str, extra: Optional[str] = None) -> str:
    """The harness's ``model_args`` string for one local model folder.

    ``pretrained=FOLDER,dtype=DTYPE`` for ``hf`` and ``vllm``; ``model=FOLDER`` for
    ``local-completions`` (the server must serve that name; give ``base_url`` in
    ``extra``). ``extra`` (``--lm-eval-model-args``, e.g.
    ``tensor_parallel_size=8,gpu_memory_utilization=0.8``) is appended and wins
    over a default of the same key.
    """
    if backend not in LM_EVAL_BACKENDS:
        raise EvalInputError(f"unknown --lm-eval-backend {backend!r}; use {', '.join(LM_EVAL_BACKENDS)}")
    given: Dict[str, str] = {}
    for part in (extra or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise EvalInputError(f"--lm-eval-model-args {extra!r}: write KEY=VALUE pairs separated "
                                 "by commas, e.g. dtype=bfloat16,tensor_parallel_size=8")
        given[key.strip()] = value.strip()
    if backend == LM_EVAL_SERVER_BACKEND:
        defaults = {"model": str(model_dir)}
        if "base_url" not in given:
            raise EvalInputError(f"--lm-eval-backend {LM_EVAL_SERVER_BACKEND} needs base_url in "
                                 "--lm-eval-model-args, e.g. base_url=http://localhost:8000/v1/completions")
    else:
        defaults = {"pretrained": str(model_dir), "dtype": dtype}
    merged = {**defaults, **given}
    return ",".join(f"{key}={value}" for key, value in merged.items())


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalInputError(
            f"--lm-eval needs lm-evaluation-harness: {INSTALL_HINT} (its standard tasks "
            "download datasets: run them where the hub is reachable or with a local "
            "HF_DATASETS cache; local tasks need neither, see examples/lm_eval_task)"
        ) from None
    return lm_eval, TaskManager


def run_lm_eval(
    model_dir: Path,
    tasks: str,
    *,
    device: str = "cpu",
    dtype: str = EVAL_DTYPES[0],
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: Optional[int] = None,
    backend: str = LM_EVAL_BACKENDS[0],
    extra_model_args: Optional[str] = None,
    include_path: Optional[Path] = None,
) -> Dict[str, Any]:
    """Run harness ``tasks`` on a local model; the metrics to merge into a record.

    Args:
        model_dir (`Path`): a model folder (with its tokenizer).
        tasks (`str`): comma-separated task names (or group names).
        device (`str`, defaults to "cpu"): for ``hf``; vLLM places itself.
        dtype (`str`, defaults to "float32"): the model dtype (``model_args`` may override).
        batch_size (`int`, defaults to 8): requests per forward pass (``hf``).
        limit (`int`, *optional*): documents per task (quick runs; the intervals
            then rest on fewer items).
        backend (`str`, defaults to "hf"): one of :data:`~fapm_merge.evaluation.settings.LM_EVAL_BACKENDS`.
        extra_model_args (`str`, *optional*): ``--lm-eval-model-args``, passed through.
        include_path (`Path`, *optional*): a folder of task YAML files (your own tasks).

    Returns:
        ``{"lm_eval": aggregates, "lm_eval:TASK/METRIC": {...}, ...}`` (module docstring).

    Raises:
        EvalInputError: the harness or the backend is missing, a task is unknown.
    """
    lm_eval, TaskManager = _import_lm_eval()
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if include_path is not None and not Path(include_path).is_dir():
        raise EvalInputError(f"--lm-eval-include {include_path}: not a folder of task YAML files")
    manager = _task_manager(TaskManager, include_path, names)
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        raise EvalInputError(
            f"lm-eval knows no task {', '.join(map(repr, unknown))}"
            + (f" (also looked in --lm-eval-include {include_path})" if include_path else
               "; your own tasks: --lm-eval-include FOLDER_OF_YAML (examples/lm_eval_task)"))
    arguments = model_args(backend, Path(model_dir), dtype=dtype, extra=extra_model_args)
    try:
        results = lm_eval.simple_evaluate(
            model=backend,
            model_args=arguments,
            tasks=names,
            task_manager=manager,
            # vLLM and servers place and batch themselves
            device=device if backend == "hf" else None,
            batch_size=batch_size if backend == "hf" else None,
            limit=limit,
            log_samples=True,
        )
    except ImportError as error:  # the backend's own package (vllm, openai, ...) is absent
        raise EvalInputError(
            f"--lm-eval-backend {backend} cannot start: {error} (model_args {arguments}). "
            + ("vLLM runs on NVIDIA GPUs: pip install vllm there (see docs/scale.md)"
               if backend == "vllm" else "pip install 'lm-eval[api]'")
        ) from None
    if results is None:  # the harness returns None on ranks other than 0
        return {}
    return harness_metrics(results)


_MANAGERS: Dict[Tuple[Optional[str], bool], Any] = {}


def _task_manager(TaskManager, include_path: Optional[Path], names: List[str]):
    """The harness's task index, built once per process (indexing its thousands of
    built-in YAML files takes seconds to tens of seconds, and tune evaluates many
    models): only the ``include_path`` folder when it holds every task asked for."""
    def manager(defaults: bool):
        key = (str(include_path) if include_path else None, defaults)
        if key not in _MANAGERS:
            _MANAGERS[key] = TaskManager(include_path=key[0], include_defaults=defaults)
        return _MANAGERS[key]

    if include_path is not None:
        own = manager(False)
        if all(own.match_tasks([n]) for n in names):
            return own
    return manager(True)


def _clean(value):
    return json.loads(json.dumps(value, default=str))


def _is_binary(values) -> bool:
    return all(isinstance(v, (bool, int, float)) and float(v) in (0.0, 1.0) for v in values)


def _is_loglikelihood_count(values) -> bool:
    return all(isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[1], (int, float))
               for v in values)


def _digest(samples: List[dict]) -> str:
    text = "\n".join(f"{s.get('doc_id')}:{s.get('doc_hash')}:{s.get('prompt_hash')}" for s in samples)
    return hashlib.sha256(text.encode()).hexdigest()


def harness_metrics(results: Dict[str, Any]) -> Dict[str, Any]:
    """The record metrics of one ``simple_evaluate(..., log_samples=True)`` result
    (see the module docstring). Metrics whose per-sample values are neither 0/1 nor
    ``(loglikelihood, count)`` (corpus-level scores such as BLEU) stay in the
    aggregates only, listed under ``metrics["lm_eval"]["unpaired"]``."""
    out: Dict[str, Any] = {}
    summary = _clean(results.get("results", {}))
    unpaired: Dict[str, str] = {}
    for task, samples in (results.get("samples") or {}).items():
        by_filter: Dict[str, List[dict]] = {}
        for sample in samples:
            by_filter.setdefault(sample.get("filter", "none"), []).append(sample)
        for filter_, rows in by_filter.items():
            rows = sorted(rows, key=lambda s: s["doc_id"])
            if len({s["doc_id"] for s in rows}) != len(rows):
                unpaired[f"{task}"] = "several samples per document (repeats): not paired by document"
                continue
            metrics = rows[0].get("metrics") or []
            digest = _digest(rows)
            for metric in metrics:
                name = MetricName(task, metric, filter_)
                values = [s.get(metric) for s in rows]
                if metric in PERPLEXITY_METRICS and _is_loglikelihood_count(values):
                    losses = [-float(v[0]) for v in values]
                    counts = [int(v[1]) for v in values]
                    total = sum(counts)
                    loss = math.fsum(losses) / total if total else math.nan
                    out[name.key] = {
                        "task": task, "metric": metric, "filter": filter_,
                        "unit": PERPLEXITY_METRICS[metric],
                        "loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
                        "tokens": total, "windows": len(rows), "examples": len(rows),
                        "sha256": digest,
                        PER_ITEM: {"window_loss": losses, "window_tokens": counts},
                    }
                elif _is_binary(values):
                    correct = [int(float(v)) for v in values]
                    out[name.key] = {
                        "task": task, "metric": metric, "filter": filter_,
                        "accuracy": sum(correct) / len(correct), "examples": len(correct),
                        "correct": sum(correct), "sha256": digest,
                        PER_ITEM: {"correct": "".join(map(str, correct))},
                    }
                else:
                    unpaired[name.key] = "per-sample values are not 0/1 nor (loglikelihood, count)"
    summary_out: Dict[str, Any] = {"results": summary}
    groups = _clean(results.get("group_subtasks") or {})
    if any(groups.values()):
        summary_out["groups"] = {g: s for g, s in groups.items() if s}
    if unpaired:
        summary_out["unpaired"] = unpaired
    out["lm_eval"] = summary_out
    return out


def explain_missing(name: str, record_metrics: Dict[str, Any], *, option: str, kind: str) -> str:
    """Why a record lacks the metric ``name``, in one line naming the option and what
    the records hold instead (for tradeoff's and tune's messages).

    Args:
        kind (`str`): ``accuracy`` (a task axis) or ``loss`` (a general axis).
    """
    have = sorted(k for k, v in record_metrics.items() if isinstance(v, dict) and kind in v)
    summary = record_metrics.get("lm_eval") if isinstance(record_metrics.get("lm_eval"), dict) else {}
    reason = ""
    if is_lm_eval_metric(name):
        parsed = name[len(PREFIX):].partition("/")[0]
        groups = summary.get("groups") or {}
        unpaired = summary.get("unpaired") or {}
        if parsed in groups:
            reason = (f"{parsed} is a group of {len(groups[parsed])} tasks and the harness keeps "
                      f"per-sample results per task only: name one, e.g. "
                      f"lm_eval:{groups[parsed][0]}/METRIC")
        elif name in unpaired:
            reason = (f"the harness reports {name} as a corpus-level score ({unpaired[name]}), so "
                      "no paired interval exists for it; choose a per-sample metric such as acc, "
                      "acc_norm or exact_match")
        elif not summary:
            reason = ("these records were not evaluated with lm-eval: run fapm-merge eval "
                      f"--lm-eval {parsed} (tune runs it by itself)")
    if not reason and kind == "accuracy" and name in record_metrics and "loss" in record_metrics[name]:
        reason = f"{name} is a perplexity: use it as --text-metric"
    if not reason and kind == "loss" and name in record_metrics and "accuracy" in record_metrics[name]:
        reason = f"{name} is an accuracy: use it as --task-metric"
    return (f"{option} {name}: the results have no such {kind} metric"
            + (f" ({reason})" if reason else "")
            + f"; they hold {', '.join(have) or 'none'}")


__all__ = [
    "Axes",
    "DEFAULT_PERPLEXITY_METRIC",
    "MetricName",
    "PREFIX",
    "explain_missing",
    "harness_metrics",
    "is_lm_eval_metric",
    "model_args",
    "parse_metric",
    "resolve_axes",
    "run_lm_eval",
]
