"""The forgetting / task trade-off of a sweep, and the point a stated rule selects.

Input: the results file of ``fapm-merge eval`` (one line per model with
``metrics.text`` (loss on a general text) and ``metrics.task`` (accuracy), the
recipe of every merged model, and, in the items file beside it, each model's
per-prompt outcomes and per-window losses). For every model:

* ``cf_pct = 100 * (PPL_model - PPL_base) / PPL_base`` on the text: the paper's
  forgetting measure (0 nothing forgotten, negative better than the base);
* ``repaired = (L_ft - L_model) / (L_ft - L_base)``: the share of the fine-tune's
  forgetting undone (1 all, 0 none, < 0 worse than not repairing; undefined when
  the fine-tune did not forget);
* ``retention = accuracy / accuracy(fine-tuned)``;
* 95% intervals of its accuracy difference to the fine-tune and of its loss
  differences to the base (-> CF%) and to the fine-tune (-> repaired), all
  *paired* (:mod:`fapm_merge.evaluation.stats`): every model saw the same prompts
  and windows.

Rules (:class:`Rule`):

* ``repair`` (default): among the evaluated variants whose accuracy is not
  significantly below the fine-tune's (exact one-sided McNemar test, 5%) and whose
  retention is at least ``min_retention`` (0.99, the paper's headline operating
  point), and which forget less than the fine-tune, select the one that repairs
  the most forgetting. If none qualifies, nothing is selected and the closest
  candidates are named: never a silent fall-back.
* ``max-cf``: the highest accuracy among the points with CF% <= ``max_cf``.
* ``weighted``: maximise ``task_weight * task_norm + general_norm`` with
  ``task_norm = accuracy / accuracy(fine-tuned)`` and ``general_norm =
  exp(L_base - L_model)``, the rule of earlier releases (LiNeS, Wang et al., ICLR
  2025, https://arxiv.org/abs/2410.17146, sums normalised target and control
  accuracies). On small forgetting its general axis spans a few hundredths while
  one accuracy carries several points of noise: the task axis decides, and it can
  select a model that forgets more than the fine-tune (the replication showed it).

The axes are selectable (``task_metric``, ``text_metric``): any metric of the
records with an ``accuracy`` and per-item ``correct`` values can be the task axis,
and any with a ``loss`` and per-item window losses the general one; the harness's
per-sample metrics (:mod:`fapm_merge.evaluation.lm_eval`, e.g.
``lm_eval:arc_easy/acc`` and ``lm_eval:wikitext/word_perplexity``) have that shape.

The result also carries warnings where the intervals are wider than the
differences the rule decides between, with about how many more prompts or windows
would resolve them. The method and strength of a point come from its recipe
(:func:`fapm_merge.io.recipe.describe_recipe`). The anchors are the recipes'
``base_model`` and fine-tuned model (``--base`` / ``--finetuned`` override); for
``fapm_lora`` results the fine-tuned model is the ``fapm_lora`` point at sparsity 0.
When a model was evaluated twice, its last line counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from fapm_merge.core.errors import FapmMergeError
from fapm_merge.evaluation import stats
from fapm_merge.evaluation.lm_eval import explain_missing, is_lm_eval_metric
from fapm_merge.evaluation.results import PER_ITEM
from fapm_merge.evaluation.results import read_results as _read_records
from fapm_merge.evaluation.settings import TASK_METRIC, TEXT_METRIC
from fapm_merge.io.recipe import describe_recipe, recipe_inputs

TASK_WEIGHT = 2.0
"""Default weight of ``task_norm`` in the ``weighted`` rule."""

MIN_RETENTION = 0.99
"""Default of the ``repair`` rule: keep at least 99% of the fine-tune's accuracy."""

SIGNIFICANCE = 1 - stats.CONFIDENCE
"""One-sided significance level of the accuracy test (5%)."""

RULES = ("repair", "max-cf", "weighted")

class TradeoffError(FapmMergeError, ValueError):
    """Results that cannot be placed on the trade-off plot; the message says why."""


@dataclass(frozen=True)
class Rule:
    """How a point is selected (see the module docstring).

    Attributes:
        kind (`str`, defaults to "repair"): ``repair``, ``max-cf`` or ``weighted``.
        min_retention (`float`, defaults to 0.99): ``repair``: least accuracy retention.
        max_cf (`float`, *optional*): ``max-cf``: largest CF% allowed.
        task_weight (`float`, defaults to 2.0): ``weighted``: weight of ``task_norm``.
    """

    kind: str = "repair"
    min_retention: float = MIN_RETENTION
    max_cf: Optional[float] = None
    task_weight: float = TASK_WEIGHT

    def __post_init__(self):
        if self.kind not in RULES:
            raise TradeoffError(f"unknown rule {self.kind!r}; choose one of {', '.join(RULES)}")
        if not (math.isfinite(self.min_retention) and 0 <= self.min_retention <= 1):
            raise TradeoffError(f"--min-retention must be in [0, 1], got {self.min_retention}")
        if not (math.isfinite(self.task_weight) and self.task_weight >= 0):
            raise TradeoffError(f"--task-weight must be a finite number >= 0, got {self.task_weight}")
        if self.kind == "max-cf" and (self.max_cf is None or not math.isfinite(self.max_cf)):
            raise TradeoffError("the max-cf rule needs --max-cf X (a CF% bound, e.g. 0.5)")

    @property
    def text(self) -> str:
        """The rule in one sentence, as the table, the plot and the model card state it."""
        if self.kind == "repair":
            return (f"repair: among variants whose accuracy is not significantly below the "
                    f"fine-tune's (paired one-sided test, {SIGNIFICANCE:.0%}) with retention >= "
                    f"{self.min_retention:g} and less forgetting than the fine-tune, the one that "
                    "repairs the most forgetting")
        if self.kind == "max-cf":
            return f"max-cf: the highest accuracy among points with CF <= {self.max_cf:g}%"
        return f"weighted: maximise {self.task_weight:g} * task_norm + general_norm"


@dataclass
class Point:
    """One evaluated model on the trade-off plane.

    Intervals (``stats.Interval``) are None when the records carry no per-item
    values (an older ``fapm-merge eval``).
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
    repaired: Optional[float] = None
    accuracy_vs_ft: Optional[stats.Interval] = None
    accuracy_drop_p: Optional[float] = None
    cf_interval: Optional[stats.Interval] = None
    loss_vs_ft: Optional[stats.Interval] = None
    repaired_interval: Optional[stats.Interval] = None
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
            if key == "window_losses":
                continue  # in the items file already; thousands of numbers in a large run
            out[key] = value.to_json() if isinstance(value, stats.Interval) else value
        out["label"] = self.label
        return out


@dataclass
class Tradeoff:
    """All points, the anchors, the rule and what it selected (None: nothing qualified)."""

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

    @property
    def task_weight(self) -> float:
        return self.rule.task_weight

    def to_json(self) -> dict:
        return {
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
    if recipe.get("merge_method") != "fapm_lora":
        return False
    method, strength, _ = describe_recipe(recipe)
    return method == "fapm_lora" and strength == 0.0


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


def _add_intervals(points: List[Point], records: Dict[str, dict], base: Point, ft: Point,
                   task_metric: str = TASK_METRIC, text_metric: str = TEXT_METRIC) -> List[int]:
    """Paired intervals of every point against the anchors; returns the window token counts."""
    items = {p.model: (_per_item(records[p.model], task_metric), _per_item(records[p.model], text_metric))
             for p in points}
    ft_task, ft_text = items[ft.model]
    base_text = items[base.model][1]
    tokens = ft_text["window_tokens"]
    correct_ft = [int(c) for c in ft_task["correct"]]
    for point in points:
        task, text = items[point.model]
        correct = [int(c) for c in task["correct"]]
        if point is not ft:
            point.accuracy_vs_ft = stats.accuracy_difference(correct, correct_ft)
            point.accuracy_drop_p = stats.accuracy_drop_pvalue(correct, correct_ft)
        else:
            point.accuracy_vs_ft = stats.Interval(0.0, 0.0, 0.0, len(correct))
            point.accuracy_drop_p = 1.0
        point.cf_interval = stats.loss_difference(
            text["window_loss"], base_text["window_loss"], tokens).map(stats.cf_percent)
        point.loss_vs_ft = stats.loss_difference(text["window_loss"], ft_text["window_loss"], tokens)
        point.repaired_interval = stats.repaired_share(
            text["window_loss"], ft_text["window_loss"], base_text["window_loss"], tokens)
        point.window_losses = list(text["window_loss"])
    return list(tokens)


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
            ``Rule("weighted", task_weight=...)`` (the API of earlier releases).
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
    forgetting = ft_point.loss - base_point.loss
    for point in points:
        point.task_norm = point.retention = point.accuracy / ft_point.accuracy
        point.general_norm = math.exp(base_point.loss - point.loss)
        point.score = rule.task_weight * point.task_norm + point.general_norm
        point.cf_pct = stats.cf_percent(point.loss - base_point.loss)
        point.repaired = (ft_point.loss - point.loss) / forgetting if forgetting > 0 else None
    sizes: Dict[str, int] = {}
    with_items = all(_per_item(usable[p.model], task_metric) and _per_item(usable[p.model], text_metric)
                     for p in points)
    if rule.kind != "weighted" and not with_items:
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
        if sizes["windows"] < 2 and rule.kind != "weighted":
            raise TradeoffError(
                f"the text gave {sizes['windows']} window(s): an interval over windows needs at "
                "least 2 (and a few dozen for a useful one); evaluate a longer text or a "
                "smaller --window"
            )
        tokens = _add_intervals(points, usable, base_point, ft_point, task_metric, text_metric)
    else:
        tokens = None
    result = Tradeoff(points, base_point, ft_point, rule, None, "", skipped=skipped, items=sizes,
                      window_tokens=tokens, task_metric=task_metric, text_metric=text_metric)
    _select(result)
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
                return  # the message of earlier releases (--text/--task) says it
            raise TradeoffError(f"{path}: " + explain_missing(name, metrics, option=option, kind=kind))


# --------------------------------------------------------------------------- rules


def _variants(result: Tradeoff) -> List[Point]:
    return [p for p in result.points if p.method not in ("base", "finetuned")]


def _repair(result: Tradeoff) -> None:
    rule, ft = result.rule, result.finetuned
    if ft.loss <= result.base.loss:
        result.reason = (
            f"the fine-tune did not forget on this text (loss {ft.loss:.4f} <= base "
            f"{result.base.loss:.4f}, CF {ft.cf_pct:+.2f}%): there is nothing to repair, so no "
            "variant is selected; keep the fine-tuned model (or measure forgetting on another text)"
        )
        for point in result.points:
            point.verdict = "-"
        return
    qualified = []
    for point in result.points:
        if point.method in ("base", "finetuned"):
            point.verdict = "anchor"
            continue
        why = []
        if point.accuracy_drop_p is not None and point.accuracy_drop_p < SIGNIFICANCE:
            why.append("drop")
        if point.retention < rule.min_retention:
            why.append("ret")
        if not point.loss < ft.loss:
            why.append("forg")
        point.verdict = " ".join(why) if why else "ok"
        if not why:
            qualified.append(point)
    if not qualified:
        def distance(p):  # how far from qualifying, in retention and forgetting
            return max(0.0, rule.min_retention - p.retention) + max(0.0, -(p.repaired or 0.0))

        result.closest = sorted(_variants(result), key=distance)[:3]
        named = "; ".join(
            f"{p.name}: accuracy {p.accuracy:.3f} (retention {p.retention:.3f}"
            + (f", one-sided p {p.accuracy_drop_p:.3f}" if p.accuracy_drop_p is not None else "")
            + f"), CF {p.cf_pct:+.2f}%" for p in result.closest)
        result.reason = (
            f"no variant qualifies: none keeps {rule.min_retention:.0%} of the fine-tune's accuracy "
            f"({ft.accuracy:.3f}) without a significant drop while forgetting less than it. "
            f"Closest: {named}. Keep the fine-tuned model, lower --min-retention, or sweep "
            "other sparsities"
        )
        return
    best = max(qualified, key=lambda p: (p.repaired or 0.0))  # first of equals wins
    best.verdict = "selected"
    result.selected = best
    result.reason = (
        f"{best.name} repairs {best.repaired:.0%} of the forgetting (CF {best.cf_pct:+.2f}% vs the "
        f"fine-tune's {ft.cf_pct:+.2f}%) at accuracy {best.accuracy:.3f} (retention "
        f"{best.retention:.3f}); {len(qualified)} of {len(_variants(result))} variants qualified"
    )
    _repair_warnings(result, best, qualified)


# Past this many times the items evaluated, "evaluate more" is not advice anyone can
# follow: the estimate sits (almost) on the value the interval must exclude.
PRACTICAL_GROWTH = 100


def _more_items(interval: stats.Interval, distance: float, unit: str, outcome: str) -> str:
    """The clause of a warning that says how many more prompts or windows would shrink
    ``interval`` to ``distance`` (see :func:`stats.items_needed`), or that none would."""
    needed = stats.items_needed(interval, distance)
    if needed is None:
        return ""
    if needed > PRACTICAL_GROWTH * interval.n:
        return (f"; the estimate lies so close to the bound that more {unit} would not settle it "
                f"(about {needed}, now {interval.n}): treat the question as undecided")
    return f"; about {needed} {unit} (now {interval.n}) would {outcome}"


def _repair_warnings(result: Tradeoff, best: Point, qualified: List[Point]) -> None:
    margin = (1 - result.rule.min_retention) * result.finetuned.accuracy
    if best.loss_vs_ft is not None and not best.loss_vs_ft.excludes(0.0):
        result.warnings.append(
            f"{best.name} forgets less than the fine-tune by a loss difference of "
            f"{best.loss_vs_ft.estimate:+.4f}, but its 95% interval [{best.loss_vs_ft.low:+.4f}, "
            f"{best.loss_vs_ft.high:+.4f}] includes 0: the repair is within noise"
            + _more_items(best.loss_vs_ft, best.loss_vs_ft.estimate, "windows",
                          "resolve a difference this size"))
    acc = best.accuracy_vs_ft
    if acc is not None and acc.low < -margin:
        result.warnings.append(
            f"{best.name}'s accuracy change against the fine-tune, {acc.estimate:+.3f} [{acc.low:+.3f}, "
            f"{acc.high:+.3f}], is wider than the {result.rule.min_retention:.0%} retention margin "
            f"({margin:.3f}): the data cannot exclude a larger loss of accuracy"
            # the interval must shrink to the distance between the estimate and the bound
            + _more_items(acc, acc.estimate + margin, "prompts", "bound it"))
    runners = sorted((p for p in qualified if p is not best), key=lambda p: -(p.repaired or 0.0))
    between = _paired_loss(result, best, runners[0]) if runners else None  # one bootstrap
    if between is not None and not between.excludes(0.0):
        runner = runners[0]
        result.warnings.append(
            f"{best.name} and the runner-up {runner.name} cannot be told apart on this text: "
            f"loss difference {between.estimate:+.4f} [{between.low:+.4f}, {between.high:+.4f}]"
            + _more_items(between, between.estimate, "windows", "resolve it"))


def _paired_loss(result: Tradeoff, a: Point, b: Point) -> Optional[stats.Interval]:
    """``L(a) - L(b)`` with a paired interval over windows; None without per-window values."""
    if a.window_losses is None or b.window_losses is None:
        return None
    return stats.loss_difference(a.window_losses, b.window_losses, result.window_tokens)


def _max_cf(result: Tradeoff) -> None:
    bound = result.rule.max_cf
    allowed = [p for p in result.points if p.cf_pct <= bound]
    for point in result.points:
        point.verdict = "ok" if point in allowed else "cf"
    if not allowed:
        result.closest = sorted(result.points, key=lambda p: p.cf_pct)[:3]
        result.reason = (f"no point has CF <= {bound:g}%; the lowest: "
                         + "; ".join(f"{p.name} {p.cf_pct:+.2f}%" for p in result.closest))
        return
    best = max(allowed, key=lambda p: p.accuracy)
    best.verdict = "selected"
    result.selected = best
    result.reason = (f"{best.name} has the highest accuracy ({best.accuracy:.3f}) among the "
                     f"{len(allowed)} points with CF <= {bound:g}% (its CF {best.cf_pct:+.2f}%)")
    if best.cf_interval is not None and best.cf_interval.high > bound:
        result.warnings.append(
            f"{best.name}'s CF interval [{best.cf_interval.low:+.2f}%, {best.cf_interval.high:+.2f}%] "
            f"reaches above the bound {bound:g}%: the data cannot confirm it stays below it")


def _weighted(result: Tradeoff) -> None:
    best = max(result.points, key=lambda p: p.score)  # max keeps the first of equal scores
    for point in result.points:
        point.verdict = ""
    best.verdict = "selected"
    result.selected = best
    result.reason = f"{best.name} has the highest score {best.score:.3f} ({result.rule.text})"
    if best.loss > result.finetuned.loss and best is not result.finetuned:
        result.warnings.append(
            f"{best.name} forgets more than the fine-tune (CF {best.cf_pct:+.2f}% vs "
            f"{result.finetuned.cf_pct:+.2f}%): the weighted rule trades general ability for task "
            "accuracy; the default rule (repair) never selects such a point")


def _select(result: Tradeoff) -> None:
    {"repair": _repair, "max-cf": _max_cf, "weighted": _weighted}[result.rule.kind](result)


# --------------------------------------------------------------------------- table


def _num(value: Optional[float], digits: int, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-" if value is None else ("inf" if value > 0 else "-inf")
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _with_interval(value: Optional[float], interval: Optional[stats.Interval], digits: int,
                   signed: bool = True) -> str:
    """The value on one line and its 95% interval on the next (narrow columns)."""
    text = _num(value, digits, signed)
    if interval is not None:
        text += f"\n[{_num(interval.low, digits, signed)},{_num(interval.high, digits, signed)}]"
    return text


def _order(result: Tradeoff) -> List[Point]:
    rank = {"base": 0, "finetuned": 1}
    return sorted(result.points, key=lambda p: (rank.get(p.method, 2), p.method, p.strength or 0))


def tradeoff_table(result: Tradeoff):
    """A rich table of every point that fits 80 columns: long names wrap, each number
    carries its 95% paired interval on the line below it. Sorted by method and
    strength; the last column is the rule's verdict."""
    from rich import box
    from rich.table import Table

    # SIMPLE_HEAD draws a one-space gap between columns, so no padding is added
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False,
                  title=f"rule: {result.rule.kind}", title_justify="left")
    table.add_column("model", overflow="fold", ratio=1, min_width=14)
    table.add_column("acc", justify="right", width=5)
    table.add_column("Δacc vs FT", justify="right", width=13)
    table.add_column("CF %", justify="right", width=13)
    table.add_column("score" if result.rule.kind == "weighted" else "repaired",
                     justify="right", width=13)
    table.add_column("rule", overflow="fold", width=8)  # VERDICTS explains the words
    for p in _order(result):
        name = {"base": f"{p.name} (base)", "finetuned": f"{p.name} (FT)"}.get(p.method, p.name)
        row = [
            name,
            _num(p.accuracy, 3),
            _with_interval(p.accuracy_vs_ft.estimate if p.accuracy_vs_ft else
                           p.accuracy - result.finetuned.accuracy, p.accuracy_vs_ft, 2),
            _with_interval(p.cf_pct, p.cf_interval, 2),
        ]
        if result.rule.kind == "weighted":
            row.append(_num(p.score, 3))
        else:
            row.append(_with_interval(p.repaired, p.repaired_interval, 2))
        row.append("◀ chosen" if p is result.selected else p.verdict)
        table.add_row(*row, style="bold" if p is result.selected else None)
    return table


VERDICTS = {
    "repair": "rule column: ok = qualifies; drop = accuracy significantly below the fine-tune's; "
              "ret = retention below the bound; forg = forgets as much as the fine-tune or more",
    "max-cf": "rule column: ok = CF within the bound; cf = above it",
    "weighted": "rule column: the weighted score",
}


def summary_lines(result: Tradeoff) -> List[str]:
    """The rule, the decision and its warnings, as plain sentences."""
    lines = [f"rule: {result.rule.text}.", VERDICTS[result.rule.kind] + "."]
    if (result.task_metric, result.text_metric) != (TASK_METRIC, TEXT_METRIC):
        lines.append(f"axes: task accuracy from {result.task_metric}, forgetting from "
                     f"{result.text_metric}.")
    if result.items:
        lines.append(f"intervals: 95%, paired over {result.items.get('prompts', 0)} prompts and "
                     f"{result.items.get('windows', 0)} text windows (every model saw the same).")
    lines.append(("selected: " if result.selected else "nothing selected: ") + result.reason + ".")
    lines += [f"warning: {w}." for w in result.warnings]
    lines += [f"skipped: {s}" for s in result.skipped]
    return lines


__all__ = [
    "MIN_RETENTION",
    "RULES",
    "TASK_METRIC",
    "TEXT_METRIC",
    "Point",
    "Rule",
    "TASK_WEIGHT",
    "Tradeoff",
    "TradeoffError",
    "compute_tradeoff",
    "read_results",
    "summary_lines",
    "tradeoff_table",
]
