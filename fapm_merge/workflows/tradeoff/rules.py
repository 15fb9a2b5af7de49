"""The selection rules: which point of the trade-off is chosen, and why.

:class:`Rule` is what the user states (the ``--rule`` options); each rule's behaviour
is one :class:`SelectionRule` subclass, registered by name in :data:`SELECTIONS`:
its sentence, the legend of its verdict column, the :class:`Rule` fields it reads,
and ``select()``, which marks every point's verdict and sets the result's selection,
reason and warnings. A new rule is one more subclass in the registry.

The rules work on a :class:`~fapm_merge.workflows.tradeoff.points.Tradeoff`, which
imports this module (so the annotations below name it as a string).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from fapm_merge.core.errors import FapmMergeError
from fapm_merge.evaluation import stats

TASK_WEIGHT = 2.0
"""Default weight of ``task_norm`` in the ``weighted`` rule."""

MIN_RETENTION = 0.99
"""Default of the ``repair`` rule: keep at least 99% of the fine-tune's accuracy."""

SIGNIFICANCE = 1 - stats.CONFIDENCE
"""One-sided significance level of the accuracy test (5%)."""

PRACTICAL_GROWTH = 100
"""Past this many times the items evaluated, "evaluate more" is not advice anyone can
follow: the estimate sits (almost) on the value the interval must exclude."""

ANCHORS = ("base", "finetuned")
"""The methods of the two anchor points (every other point is a variant)."""


class TradeoffError(FapmMergeError, ValueError):
    """Results that cannot be placed on the trade-off plot, or rule settings that
    cannot select; the message says why. (Defined here, the package's lowest module:
    the rules and the points both raise it.)"""


@dataclass(frozen=True)
class Rule:
    """How a point is selected: the rule's name and the settings of every rule.

    Attributes:
        kind (`str`, defaults to "repair"): a name in :data:`RULES`.
        min_retention (`float`, defaults to 0.99): ``repair``: least accuracy retention.
        max_cf (`float`, *optional*): ``max-cf``: largest CF% allowed.
        task_weight (`float`, defaults to 2.0): ``weighted``: weight of ``task_norm``.
    """

    kind: str = "repair"
    min_retention: float = MIN_RETENTION
    max_cf: Optional[float] = None
    task_weight: float = TASK_WEIGHT

    def __post_init__(self):
        if self.kind not in SELECTIONS:
            raise TradeoffError(f"unknown rule {self.kind!r}; choose one of {', '.join(RULES)}")
        # the options are shared by every rule, so each is checked whichever rule reads it
        if not (math.isfinite(self.min_retention) and 0 <= self.min_retention <= 1):
            raise TradeoffError(f"--min-retention must be in [0, 1], got {self.min_retention}")
        if not (math.isfinite(self.task_weight) and self.task_weight >= 0):
            raise TradeoffError(f"--task-weight must be a finite number >= 0, got {self.task_weight}")
        self.selection.check(self)

    @property
    def selection(self) -> SelectionRule:
        """The registered behaviour of this rule."""
        return SELECTIONS[self.kind]

    @property
    def text(self) -> str:
        """The rule in one sentence, as the table, the plot and the model card state it."""
        return self.selection.text(self)


class SelectionRule:
    """One rule's behaviour (subclass it and add an instance to :data:`SELECTIONS`).

    Attributes:
        name (`str`): the ``--rule`` value.
        parameters (`Tuple[str, ...]`): the :class:`Rule` fields it reads.
        legend (`str`): what the words of the table's rule column mean.
        column (`str`, defaults to "repaired"): the table column beside CF %
            (``repaired`` or ``score``).
        needs_intervals (`bool`, defaults to True): it decides on paired intervals,
            so records without per-item values are refused.
    """

    name: str = ""
    parameters: Tuple[str, ...] = ()
    legend: str = ""
    column: str = "repaired"
    needs_intervals: bool = True

    def check(self, rule: Rule) -> None:
        """Raise :class:`TradeoffError` when ``rule`` lacks what this rule needs."""

    def text(self, rule: Rule) -> str:
        raise NotImplementedError

    def guide(self, rule: Rule, finetuned_accuracy: float) -> Optional[Tuple[str, float, str]]:
        """The bound the plot draws: (``accuracy`` or ``cf``, value, label), or None."""
        return None

    def select(self, result: "Tradeoff") -> None:
        """Set every point's verdict and ``result``'s selected, reason, closest, warnings."""
        raise NotImplementedError


def _variants(result: "Tradeoff") -> List["Point"]:
    return [p for p in result.points if p.method not in ANCHORS]


class Repair(SelectionRule):
    """Among the variants whose accuracy is not significantly below the fine-tune's
    (exact one-sided McNemar test, 5%), whose retention is at least ``min_retention``
    and which forget less than the fine-tune, the one that repairs the most forgetting.
    If none qualifies, nothing is selected and the closest candidates are named."""

    name = "repair"
    parameters = ("min_retention",)
    legend = ("rule column: ok = qualifies; drop = accuracy significantly below the fine-tune's; "
              "ret = retention below the bound; forg = forgets as much as the fine-tune or more")

    def text(self, rule: Rule) -> str:
        return (f"repair: among variants whose accuracy is not significantly below the "
                f"fine-tune's (paired one-sided test, {SIGNIFICANCE:.0%}) with retention >= "
                f"{rule.min_retention:g} and less forgetting than the fine-tune, the one that "
                "repairs the most forgetting")

    def guide(self, rule: Rule, finetuned_accuracy: float) -> Optional[Tuple[str, float, str]]:
        return ("accuracy", rule.min_retention * finetuned_accuracy,
                f"{rule.min_retention:g} x fine-tune accuracy")

    def select(self, result: "Tradeoff") -> None:
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
            if point.method in ANCHORS:
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
        self._warn(result, best, qualified)

    @staticmethod
    def _warn(result: "Tradeoff", best: "Point", qualified: List["Point"]) -> None:
        """Where the intervals are wider than the differences the selection rests on."""
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


def _paired_loss(result: "Tradeoff", a: "Point", b: "Point") -> Optional[stats.Interval]:
    """``L(a) - L(b)`` with a paired interval over windows; None without per-window values."""
    if a.window_losses is None or b.window_losses is None:
        return None
    return stats.loss_difference(a.window_losses, b.window_losses, result.window_tokens)


class MaxCf(SelectionRule):
    """The highest accuracy among the points with CF% <= ``max_cf``."""

    name = "max-cf"
    parameters = ("max_cf",)
    legend = "rule column: ok = CF within the bound; cf = above it"

    def check(self, rule: Rule) -> None:
        if rule.max_cf is None or not math.isfinite(rule.max_cf):
            raise TradeoffError("the max-cf rule needs --max-cf X (a CF% bound, e.g. 0.5)")

    def text(self, rule: Rule) -> str:
        return f"max-cf: the highest accuracy among points with CF <= {rule.max_cf:g}%"

    def guide(self, rule: Rule, finetuned_accuracy: float) -> Optional[Tuple[str, float, str]]:
        return ("cf", rule.max_cf, f"CF bound {rule.max_cf:g}%")

    def select(self, result: "Tradeoff") -> None:
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


class Weighted(SelectionRule):
    """Maximise ``task_weight * task_norm + general_norm`` (``task_norm = accuracy /
    accuracy(fine-tuned)``, ``general_norm = exp(L_base - L_model)``), as LiNeS (Wang
    et al., ICLR 2025, https://arxiv.org/abs/2410.17146) sums normalised target and
    control accuracies. On small forgetting its general axis spans a few hundredths
    while one accuracy carries several points of noise: the task axis decides, and it
    can select a model that forgets more than the fine-tune (the replication showed it)."""

    name = "weighted"
    parameters = ("task_weight",)
    legend = "rule column: the weighted score"
    column = "score"
    needs_intervals = False

    def text(self, rule: Rule) -> str:
        return f"weighted: maximise {rule.task_weight:g} * task_norm + general_norm"

    def select(self, result: "Tradeoff") -> None:
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


SELECTIONS: Dict[str, SelectionRule] = {rule.name: rule for rule in (Repair(), MaxCf(), Weighted())}
"""Every rule by its ``--rule`` name; the first is the default."""

RULES = tuple(SELECTIONS)
"""The rule names, for ``--rule``."""


__all__ = [
    "MIN_RETENTION",
    "RULES",
    "SELECTIONS",
    "TASK_WEIGHT",
    "Rule",
    "SelectionRule",
    "TradeoffError",
]
