"""The trade-off's data: every evaluated model as a :class:`Point`, with its paired
intervals against the two anchors, and :func:`compute_tradeoff`, which places the
records on the plane and applies the rule (:mod:`.rules`).

Per point: ``cf_pct`` (the paper's forgetting measure), ``repaired`` (the share of the
fine-tune's forgetting undone), ``retention`` (accuracy over the fine-tune's), and the
95% *paired* intervals of its accuracy difference to the fine-tune and of its loss
differences to the base and the fine-tune (:mod:`fapm_merge.evaluation.stats`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fapm_merge.core.rules import FAPM_LORA
from fapm_merge.evaluation import noninferiority as ni
from fapm_merge.evaluation import stats
from fapm_merge.evaluation.lm_eval import explain_missing, is_lm_eval_metric
from fapm_merge.evaluation.results import PER_ITEM
from fapm_merge.evaluation.results import read_results as _read_records
from fapm_merge.evaluation.settings import TASK_METRIC, TEXT_METRIC
from fapm_merge.io.recipe import describe_recipe, recipe_inputs
from fapm_merge.workflows.tradeoff.rules import Rule, TradeoffError


@dataclass
class Point:
    """One evaluated model on the trade-off plane.

    Intervals (``stats.Interval``) are None when the records carry no per-item
    values (an older ``fapm-merge eval``), and where a comparison is with the point
    itself (the fine-tune against the fine-tune): no interval is of zero width.
    """

    name: str
    model: str
    method: str  # base, finetuned, fapm, magnitude, dare, wiseft, fapm_lora, ... or a mergekit method
    strength: Optional[float]  # sparsity (fapm, magnitude, dare) or alpha (wiseft)
    strength_name: Optional[str]
    accuracy: float
    loss: float
    task_norm: float = math.nan
    general_norm: float = math.nan
    score: float = math.nan
    retention: float = math.nan
    cf_pct: float = math.nan
    repaired: Optional[float] = None  # share of the fine-tune's CF taken away (CF units)
    accuracy_vs_ft: Optional[stats.Interval] = None  # Tango's paired score interval
    noninferiority: Optional[ni.NonInferiority] = None
    cf_interval: Optional[stats.Interval] = None
    loss_vs_ft: Optional[stats.Interval] = None
    cf_reduction: Optional[stats.Interval] = None  # CF_ft - CF_model, CF points
    repair: Optional[stats.Repair] = field(default=None, repr=False)
    verdict: str = ""  # the rule's word on this point: selected, ok, or why not
    window_losses: Optional[List[float]] = field(default=None, repr=False)  # summed NLL per window

    @property
    def label(self) -> str:
        if self.strength is None:
            return self.method
        return f"{self.method} {self.strength_name}={self.strength:g}"

    def to_json(self) -> dict:
        out = {}
        for key, value in self.__dict__.items():
            if key in ("window_losses", "repair"):
                continue  # window losses: in the items file already; repair: its parts are here
            out[key] = value.to_json() if hasattr(value, "to_json") else value
        out["repair_significant"] = self.repair.significant if self.repair is not None else None
        out["label"] = self.label
        return out


@dataclass
class Tradeoff:
    """All points, the anchors, the rule and what it selected (None: nothing qualified).

    ``outcome`` is the repair rule's word (``selected``, ``undecided``, ``none qualifies``,
    ``no forgetting``; the other rules: selected or none qualifies); ``point_pick`` what a
    rule on point estimates alone would have chosen; ``margin`` the accuracy points a
    variant may lose and ``resolvable_margin`` the smallest margin these prompts show
    (80% power, a variant with no true loss, the sweep's median discordance);
    ``confirmation`` the held-out check of the selection (:mod:`.confirm`).
    """

    points: List[Point]
    base: Point
    finetuned: Point
    rule: Rule
    selected: Optional[Point]
    reason: str
    closest: List[Point] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    items: Dict[str, int] = field(default_factory=dict)  # prompts, windows
    window_tokens: Optional[List[int]] = field(default=None, repr=False)
    task_metric: str = TASK_METRIC
    text_metric: str = TEXT_METRIC
    outcome: str = ""
    forgetting: Optional[stats.Forgetting] = None
    margin: float = math.nan
    resolvable_margin: float = math.nan
    point_pick: Optional[Point] = None
    window_groups: Optional[List[int]] = field(default=None, repr=False)
    prompt_groups: Optional[List[str]] = field(default=None, repr=False)
    confirmation: Optional[Any] = None  # a confirm.Confirmation (that module imports this one)
    files: Dict[str, dict] = field(default_factory=dict)  # task, text: data_files of the fine-tune's record

    def to_json(self) -> dict:
        return {
            "outcome": self.outcome,
            "margin": self.margin,
            "resolvable_margin": self.resolvable_margin,
            "forgetting": self.forgetting.to_json() if self.forgetting else None,
            "point_pick": self.point_pick.name if self.point_pick else None,
            "confirmation": self.confirmation.to_json() if self.confirmation else None,
            "files": self.files,
            "rule": self.rule.text,
            "rule_settings": self.rule.__dict__,
            "selected": self.selected.to_json() if self.selected else None,
            "reason": self.reason,
            "closest": [p.name for p in self.closest],
            "warnings": self.warnings,
            "base": self.base.to_json(),
            "finetuned": self.finetuned.to_json(),
            "points": [p.to_json() for p in self.points],
            "items": self.items,
            "skipped": self.skipped,
            "task_metric": self.task_metric,
            "text_metric": self.text_metric,
        }


def read_results(path: Path) -> List[dict]:
    """The records of a results file (last line per model), with per-item values."""
    return _read_records(path, TradeoffError, with_items=True)


# --------------------------------------------------------------------------- anchors


def _is_lora_finetune(record: dict) -> bool:
    recipe = record.get("recipe") or {}
    if recipe.get("merge_method") != FAPM_LORA:
        return False
    method, strength, _ = describe_recipe(recipe)
    return method == FAPM_LORA and strength == 0.0


def _anchor_paths(records: List[dict]) -> Tuple[Optional[str], Optional[str]]:
    bases, finetuned = set(), set()
    for record in records:
        base, models = recipe_inputs(record.get("recipe") or {})
        if base:
            bases.add(str(base))
            finetuned.update(models)
    if len(bases) > 1 or len(finetuned) > 1:
        raise TradeoffError(
            f"the results mix merges of different models (bases {sorted(bases)}, fine-tuned "
            f"{sorted(finetuned)}); pass --base and --finetuned or split the file"
        )
    ft = next(iter(finetuned), None)
    present = {record["model"] for record in records}
    if ft is not None and ft not in present:
        # fapm_lora: the fine-tune is BASE+ADAPTER; its evaluated stand-in is the
        # fapm_lora merge at sparsity 0 (exactly W_pre + scale * B @ A)
        stand_ins = [r["model"] for r in records if _is_lora_finetune(r)]
        if len(stand_ins) == 1:
            ft = stand_ins[0]
    return next(iter(bases), None), ft


# --------------------------------------------------------------------------- points


def _per_item(record: dict, metric: str) -> Optional[dict]:
    values = (record.get("metrics") or {}).get(metric) or {}
    items = values.get(PER_ITEM) if isinstance(values, dict) else None
    return items if isinstance(items, dict) else None


def _point(record: dict, base_path: str, ft_path: str, task_metric: str = TASK_METRIC,
           text_metric: str = TEXT_METRIC) -> Point:
    metrics = record["metrics"]
    accuracy = float(metrics[task_metric]["accuracy"])
    loss = float(metrics[text_metric]["loss"])
    if record["model"] == base_path:
        method, strength, strength_name = "base", None, None
    elif record["model"] == ft_path:
        method, strength, strength_name = "finetuned", None, None
    else:
        method, strength, strength_name = describe_recipe(record.get("recipe"))
    return Point(
        name=record.get("name", Path(record["model"]).name),
        model=record["model"],
        method=method,
        strength=strength,
        strength_name=strength_name,
        accuracy=accuracy,
        loss=loss,
    )


def data_files(task: dict, text: dict) -> Dict[str, dict]:
    """What a record's two axes were measured on: ``{"task": {...}, "text": {...}}``, each
    with the ``file`` (None for an lm-eval task, named by its ``task``) and its ``sha256``
    (for lm-eval, over the harness's document hashes).

    Args:
        task, text (`dict`): a record's metrics of the task and of the general axis.
    """
    return {role: {"file": values.get("file"), "task": values.get("task"),
                   "sha256": values.get("sha256")}
            for role, values in (("task", task), ("text", text))}


def _check_same_data(records: Dict[str, dict], task_metric: str = TASK_METRIC,
                     text_metric: str = TEXT_METRIC) -> Dict[str, int]:
    """Every record must come from the same task and text, else pairing is meaningless."""
    sizes: Dict[str, int] = {}
    for metric, what in ((task_metric, "task file" if task_metric == TASK_METRIC else f"{task_metric} document"),
                         (text_metric, "text" if text_metric == TEXT_METRIC else f"{text_metric} document")):
        seen = {}
        for model, record in records.items():
            values = record["metrics"][metric]
            key = (values.get("sha256"), values.get("window"), values.get("tokens"),
                   values.get("examples"), values.get("bos"))
            seen.setdefault(key, []).append(model)
        if len(seen) > 1:
            groups = "; ".join(f"{len(models)} model(s) such as {models[0]}" for models in seen.values())
            raise TradeoffError(
                f"the results were measured on different {what}s or settings ({groups}); "
                "paired comparisons need every model evaluated on the same data with the "
                "same settings: re-run fapm-merge eval on all of them into one results file"
            )
    first = next(iter(records.values()))
    sizes["prompts"] = int(first["metrics"][task_metric].get("examples") or 0)
    sizes["windows"] = int(first["metrics"][text_metric].get("windows") or 0)
    return sizes


def _add_intervals(result: Tradeoff, records: Dict[str, dict]) -> None:
    """Paired intervals of every point against the anchors: accuracy by Tango's score
    interval (resampling nothing: never of zero width), losses by the bootstrap over
    windows, or over whole documents when the text had several; prompts that share a
    ``group`` count through their design effect."""
    base, ft = result.base, result.finetuned
    items = {p.model: (_per_item(records[p.model], result.task_metric),
                       _per_item(records[p.model], result.text_metric)) for p in result.points}
    ft_task, ft_text = items[ft.model]
    base_text = items[base.model][1]
    tokens = ft_text["window_tokens"]
    documents = ft_text.get("window_document")
    result.window_tokens = list(tokens)
    result.window_groups = list(documents) if documents and len(set(documents)) > 1 else None
    result.prompt_groups = list(ft_task["group"]) if ft_task.get("group") else None
    groups = result.window_groups
    result.forgetting = stats.forgetting(ft_text["window_loss"], base_text["window_loss"], tokens,
                                         groups=groups)
    discordances, effects = [], []
    for point in result.points:
        task, text = items[point.model]
        point.window_losses = list(text["window_loss"])
        if point is not base:
            point.cf_interval = (result.forgetting.cf if point is ft else stats.loss_difference(
                text["window_loss"], base_text["window_loss"], tokens, groups=groups).map(stats.cf_percent))
        if point is ft:
            continue
        point.noninferiority = accuracy_test(task["correct"], ft_task, result.margin)
        point.accuracy_vs_ft = point.noninferiority.difference
        if point is not base:
            discordances.append(point.noninferiority.discordance)
            effects.append(point.noninferiority.design_effect)
            point.repair = stats.repair(text["window_loss"], ft_text["window_loss"],
                                        base_text["window_loss"], tokens, groups=groups)
            point.loss_vs_ft = point.repair.loss_vs_finetuned
            point.cf_reduction = point.repair.cf_reduction
    if discordances:  # what these prompts can show for a variant like the sweep's typical one
        import numpy as np

        # the fine-tune against itself has no spread, so its design effect would be 1:
        # the variants' own (1 without groups) say how much the groups cost
        result.resolvable_margin = ni.resolvable_margin(
            max(1, int(len(ft_task["correct"]) / float(np.median(effects)))), float(np.median(discordances)))


def accuracy_test(correct: Sequence, finetuned_items: dict, margin: float) -> ni.NonInferiority:
    """The decision's accuracy test: a variant's per-prompt outcomes (``"1"``/``"0"`` or
    1/0) non-inferior to the fine-tune's at ``margin`` (its task metric's per-item values,
    resampled by their ``group`` when there are groups), one-sided 95%."""
    return ni.noninferior([int(c) for c in correct], [int(c) for c in finetuned_items["correct"]], margin,
                          groups=list(finetuned_items["group"]) if finetuned_items.get("group") else None)


def compute_tradeoff(
    records: List[dict],
    *,
    base: Optional[str] = None,
    finetuned: Optional[str] = None,
    rule: Optional[Rule] = None,
    task_weight: Optional[float] = None,
    task_metric: str = TASK_METRIC,
    text_metric: str = TEXT_METRIC,
) -> Tradeoff:
    """Place every record on the plane, add paired intervals, apply the rule.

    Args:
        records (`List[dict]`): from :func:`read_results` (with per-item values).
        base (`str`, *optional*): path of the base model's record (default: the
            recipes' ``base_model``).
        finetuned (`str`, *optional*): path of the fine-tuned model's record
            (default: the recipes' fine-tuned model).
        rule (`Rule`, *optional*): the selection rule; default ``Rule()`` (repair).
        task_weight (`float`, *optional*): shorthand for
            ``Rule("weighted", task_weight=...)``.
        task_metric (`str`, defaults to "task"): the record metric whose ``accuracy``
            is the task axis, e.g. ``lm_eval:arc_easy/acc``.
        text_metric (`str`, defaults to "text"): the record metric whose ``loss`` is
            the general axis, e.g. ``lm_eval:wikitext/word_perplexity``.
    """
    if rule is None:
        rule = Rule("weighted", task_weight=task_weight) if task_weight is not None else Rule()
    auto_base, auto_ft = _anchor_paths(records)
    base_path = str(Path(base).absolute()) if base else auto_base
    ft_path = str(Path(finetuned).absolute()) if finetuned else auto_ft
    if base_path is None or ft_path is None:
        raise TradeoffError(
            "no merged model's recipe names the base and fine-tuned models; pass --base and --finetuned"
        )
    points: List[Point] = []
    skipped: List[str] = []
    usable: Dict[str, dict] = {}
    for record in records:
        metrics = record["metrics"] if isinstance(record["metrics"], dict) else {}
        if text_metric not in metrics or task_metric not in metrics:
            skipped.append(f"{record['model']}: needs both --text and --task metrics"
                           if (task_metric, text_metric) == (TASK_METRIC, TEXT_METRIC) else
                           f"{record['model']}: needs both the {text_metric} and the {task_metric} "
                           "metric")
            continue
        try:  # hand-edited or foreign lines: skip them with the reason, never crash
            point = _point(record, base_path, ft_path, task_metric, text_metric)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            skipped.append(f"{record['model']}: malformed record ({type(error).__name__}: {error})")
            continue
        if not (math.isfinite(point.accuracy) and math.isfinite(point.loss)):
            skipped.append(
                f"{record['model']}: accuracy {point.accuracy} / loss {point.loss} is not finite "
                "(the model gives NaN or Inf): check it with fapm-merge verify"
            )
            continue
        points.append(point)
        usable[point.model] = record
    anchors = {}
    for role, path in (("base", base_path), ("finetuned", ft_path)):
        found = [p for p in points if p.model == path]
        if not found:
            _explain_missing_metric(records, path, task_metric, text_metric)
            why = [reason for reason in skipped if reason.startswith(f"{path}: ")]
            raise TradeoffError(
                f"the results have no usable line for the {role} model {path}"
                + (f" ({why[-1][len(path) + 2:]})" if why else "")
                + f"; run fapm-merge eval {path} --text ... --task ... --out RESULTS"
            )
        anchors[role] = found[0]
    base_point, ft_point = anchors["base"], anchors["finetuned"]
    if ft_point.accuracy <= 0:
        raise TradeoffError(
            "the fine-tuned model scores 0 on the task: accuracy retention = accuracy / "
            "accuracy(fine-tuned) is undefined; check the task file (its answers, the prompt "
            "format) and the fine-tune"
        )
    ft_cf = stats.cf_percent(ft_point.loss - base_point.loss)
    for point in points:
        point.task_norm = point.retention = point.accuracy / ft_point.accuracy
        point.general_norm = math.exp(base_point.loss - point.loss)
        point.score = rule.task_weight * point.task_norm + point.general_norm
        point.cf_pct = stats.cf_percent(point.loss - base_point.loss)
        # in CF units, as the CF points reported beside it (stats.Repair.share)
        point.repaired = (ft_cf - point.cf_pct) / ft_cf if ft_cf > 0 else None
    sizes: Dict[str, int] = {}
    with_items = all(_per_item(usable[p.model], task_metric) and _per_item(usable[p.model], text_metric)
                     for p in points)
    if rule.selection.needs_intervals and not with_items:
        missing = [p.model for p in points
                   if not (_per_item(usable[p.model], task_metric)
                           and _per_item(usable[p.model], text_metric))]
        raise TradeoffError(
            f"{len(missing)} record(s), e.g. {missing[0]}, carry no per-item values (an older "
            "fapm-merge eval, or an items file that was not copied with the results): the "
            f"{rule.kind} rule needs paired intervals. Re-run fapm-merge eval on those models, or "
            "choose --rule weighted")
    if with_items:
        sizes = _check_same_data(usable, task_metric, text_metric)
        if sizes["windows"] < 2 and rule.selection.needs_intervals:
            raise TradeoffError(
                f"the text gave {sizes['windows']} window(s): an interval over windows needs at "
                "least 2 (and a few dozen for a useful one); evaluate a longer text or a "
                "smaller --window"
            )
    result = Tradeoff(points, base_point, ft_point, rule, None, "", skipped=skipped, items=sizes,
                      task_metric=task_metric, text_metric=text_metric,
                      margin=ni.margin_for(rule.min_retention, ft_point.accuracy),
                      files=data_files(*(usable[ft_point.model]["metrics"][metric]
                                         for metric in (task_metric, text_metric))))
    if with_items:
        _add_intervals(result, usable)
    rule.selection.select(result)
    return result


def _explain_missing_metric(records: List[dict], path: str, task_metric: str, text_metric: str) -> None:
    """An anchor lacks a chosen metric: say which, why, and what the records hold."""
    record = next((r for r in reversed(records) if r.get("model") == path), None)
    metrics = record.get("metrics") if record and isinstance(record.get("metrics"), dict) else None
    if metrics is None:
        return
    for name, kind, option in ((task_metric, "accuracy", "--task-metric"),
                               (text_metric, "loss", "--text-metric")):
        if not isinstance(metrics.get(name), dict) or kind not in metrics[name]:
            if name in (TASK_METRIC, TEXT_METRIC) and not any(is_lm_eval_metric(k) for k in metrics):
                return  # the caller's message for the built-in axes (--text/--task) says it
            raise TradeoffError(f"{path}: " + explain_missing(name, metrics, option=option, kind=kind))
