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

MIN_REPAIR = 0.1
"""Default of the ``repair`` rule: take away at least 10% of the fine-tune's CF (a repair
smaller than that is not worth shipping a changed model for)."""

SELECTED, UNDECIDED, NONE_QUALIFIES, NO_FORGETTING = (
    "selected", "undecided", "none qualifies", "no forgetting")
"""The outcomes of the repair rule (``Tradeoff.outcome``); the other rules select or not."""

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
        min_repair (`float`, defaults to 0.1): ``repair``: least share of the fine-tune's
            CF a variant must take away.
        max_cf (`float`, *optional*): ``max-cf``: largest CF% allowed.
        task_weight (`float`, defaults to 2.0): ``weighted``: weight of ``task_norm``.
    """

    kind: str = "repair"
    min_retention: float = MIN_RETENTION
    min_repair: float = MIN_REPAIR
    max_cf: Optional[float] = None
    task_weight: float = TASK_WEIGHT

    def __post_init__(self):
        if self.kind not in SELECTIONS:
            raise TradeoffError(f"unknown rule {self.kind!r}; choose one of {', '.join(RULES)}")
        # the options are shared by every rule, so each is checked whichever rule reads it
        if not (math.isfinite(self.min_retention) and 0 <= self.min_retention <= 1):
            raise TradeoffError(f"--min-retention must be in [0, 1], got {self.min_retention}")
        if not (math.isfinite(self.min_repair) and 0 <= self.min_repair <= 1):
            raise TradeoffError(f"--min-repair must be in [0, 1], got {self.min_repair}")
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
        column (`str`, defaults to "CF cut"): the table column beside CF %
            (``CF cut``: the CF points taken away, or ``score``).
        needs_intervals (`bool`, defaults to True): it decides on paired intervals,
            so records without per-item values are refused.
    """

    name: str = ""
    parameters: Tuple[str, ...] = ()
    legend: str = ""
    column: str = "CF cut"
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
    """The default rule: a variant qualifies when three things are *shown*, not merely
    estimated, on the evaluation's own paired data:

    1. **it keeps the task**: non-inferiority to the fine-tune at ``min_retention``: the
       one-sided 95% lower bound of its paired accuracy difference (Tango's score
       interval, :mod:`fapm_merge.evaluation.noninferiority`) lies above
       ``-(1 - min_retention) * acc_ft``;
    2. **it repairs**: its mean token loss on the text is significantly below the
       fine-tune's (the paired interval of ``L_model - L_ft`` lies below 0);
    3. **enough**: it takes away at least ``min_repair`` of the fine-tune's CF.

    Before any of that the fine-tune's forgetting itself must be significant (its CF
    interval lies above 0), else there is nothing a repair could be shown to undo.
    Among the qualified variants the one whose CF reduction is largest wins; variants
    whose repair cannot be told from the winner's (paired loss interval includes 0) are
    tied with it, and ties go to the higher accuracy, then the milder edit (lower
    sparsity, higher WiSE-FT alpha), then file order.

    When the only obstacle is that the prompts cannot show non-inferiority, the outcome
    is *undecided* (with the prompts that would decide it), distinct from *no variant
    qualifies*. The variant a point-estimate rule would pick is named beside the proven
    one, so the user sees what the margin costs."""

    name = "repair"
    parameters = ("min_retention", "min_repair")
    legend = ("rule column: ok = qualifies; acc = accuracy shown below the retention margin; "
              "acc? = accuracy not shown within the margin (too few prompts to tell); forg = forgets "
              "as much as the fine-tune or more; rep? = less forgetting, but within noise; small = "
              "repairs less than --min-repair of the forgetting")

    def check(self, rule: Rule) -> None:
        if not rule.min_retention < 1:
            raise TradeoffError(
                "--min-retention 1 asks a variant to lose no accuracy at all, which no finite "
                "evaluation can show; give the share it must keep, e.g. 0.99")

    def text(self, rule: Rule) -> str:
        return (f"repair: among variants shown to keep {rule.min_retention:g} of the fine-tune's "
                f"accuracy (one-sided {stats.CONFIDENCE:.0%} lower bound of the paired difference "
                f"above -{1 - rule.min_retention:.3g} x its accuracy) and shown to forget less than "
                f"it, by at least {rule.min_repair:.0%} of its CF, the one that repairs the most "
                "(ties: higher accuracy, then the milder edit)")

    def guide(self, rule: Rule, finetuned_accuracy: float) -> Optional[Tuple[str, float, str]]:
        return ("accuracy", rule.min_retention * finetuned_accuracy,
                f"{rule.min_retention:g} x fine-tune accuracy")

    def select(self, result: "Tradeoff") -> None:
        self._decide(result)
        # whatever the outcome: the evidence is weakest exactly when it is undecided
        result.warnings += _few_units(result)

    def _decide(self, result: "Tradeoff") -> None:
        ft, forgetting = result.finetuned, result.forgetting
        if not forgetting.significant:
            cf = forgetting.cf
            result.outcome = NO_FORGETTING
            result.reason = (
                f"no measurable forgetting on this text: the fine-tune's CF is {cf.estimate:+.2f}% "
                f"[{cf.low:+.2f}, {cf.high:+.2f}], an interval that does not lie above 0, so no repair "
                "could be shown; keep the fine-tune (or measure forgetting on a longer text, or one "
                "closer to what it lost)")
            for point in result.points:
                point.verdict = "-"
            return
        qualified = []
        for point in result.points:
            if point.method in ANCHORS:
                point.verdict = "anchor"
                continue
            point.verdict = " ".join(_obstacles(point, result)) or "ok"
            if point.verdict == "ok":
                qualified.append(point)
        result.point_pick = _point_pick(result)
        if not qualified:
            _explain_none(result)
            return
        pick = _break_ties(result, qualified)
        pick.verdict = "selected"
        result.selected = pick
        result.outcome = SELECTED
        difference = pick.accuracy_vs_ft
        result.reason = (
            f"{pick.name} repairs {pick.repaired:.0%} of the forgetting (CF {pick.cf_pct:+.2f}% vs the "
            f"fine-tune's {ft.cf_pct:+.2f}%, a cut of {_interval_text(pick.cf_reduction, 2)} CF points) "
            f"at accuracy {pick.accuracy:.3f}, {_interval_text(difference, 3)} against the fine-tune "
            f"(one-sided lower bound {pick.noninferiority.lower_bound:+.3f} > -{result.margin:.3f}); "
            f"{len(qualified)} of {len(_variants(result))} variants qualified")
        self._warn(result, pick, qualified)

    @staticmethod
    def _warn(result: "Tradeoff", pick: "Point", qualified: List["Point"]) -> None:
        """What the decision does not show: a point-estimate favourite left out, an
        indistinguishable runner-up, intervals resting on few independent units."""
        favourite = result.point_pick
        # a favourite that qualified is the leader and lost only the tie-break, which the
        # runner-up warning below reports: no evidence was missing
        if favourite is not None and favourite is not pick and favourite.verdict != "ok":
            result.warnings.append(
                f"on point estimates {favourite.name} would be chosen (repairs {favourite.repaired:.0%}, "
                f"accuracy {_interval_text(favourite.accuracy_vs_ft, 3)} against the fine-tune), but "
                f"{_why_not(favourite)}: that is what the evidence rule costs here")
        runners = [p for p in qualified if p is not pick]
        if runners:
            runner = max(runners, key=lambda p: p.cf_reduction.estimate)
            between = _paired_loss(result, pick, runner)
            if between is not None and not between.excludes(0.0):
                result.warnings.append(
                    f"{pick.name} and the runner-up {runner.name} cannot be told apart on this text: "
                    f"loss difference {_interval_text(between, 4)}"
                    + _more_items(between, between.estimate, "windows", "resolve it"))


def _interval_text(interval: Optional[stats.Interval], digits: int) -> str:
    return "-" if interval is None else interval.text(digits)


def _obstacles(point: "Point", result: "Tradeoff") -> List[str]:
    """Why ``point`` does not qualify under the repair rule (empty: it does)."""
    from fapm_merge.evaluation.noninferiority import FAILS, UNDECIDED

    why = []
    verdict = point.noninferiority.verdict
    if verdict == FAILS:
        why.append("acc")
    elif verdict == UNDECIDED:
        why.append("acc?")
    if not point.loss < result.finetuned.loss:
        why.append("forg")
    elif not point.repair.significant:
        why.append("rep?")
    elif point.repaired < result.rule.min_repair:
        why.append("small")
    return why


def _why_not(point: "Point") -> str:
    words = {"acc": "its accuracy is shown below the margin",
             "acc?": "the prompts cannot show it keeps the task within the margin",
             "rep?": "its repair is within noise", "small": "it repairs less than --min-repair",
             "forg": "it forgets as much as the fine-tune"}
    return " and ".join(words[w] for w in point.verdict.split() if w in words) or point.verdict


def _point_pick(result: "Tradeoff") -> Optional["Point"]:
    """What a rule on point estimates alone would pick: retention at least the bound,
    less loss than the fine-tune by at least ``min_repair``, then the most repair."""
    rule, ft = result.rule, result.finetuned
    candidates = [p for p in _variants(result) if p.retention >= rule.min_retention
                  and p.loss < ft.loss and p.repaired is not None and p.repaired >= rule.min_repair]
    return max(candidates, key=lambda p: p.cf_reduction.estimate) if candidates else None


def edit_size(point: "Point") -> float:
    """How far a variant moves from the fine-tune, for breaking ties towards the milder
    edit: its sparsity (pruning, DARE), or ``1 - alpha`` (WiSE-FT: alpha 1 is the
    fine-tune); unknown methods last."""
    if point.strength is None:
        return math.inf
    return 1 - point.strength if point.strength_name == "alpha" else point.strength


def _break_ties(result: "Tradeoff", qualified: List["Point"]) -> "Point":
    """The most repair; those not distinguishable from it are tied, and the tie goes to
    the higher accuracy, then the milder edit, then file order."""
    leader = max(qualified, key=lambda p: p.cf_reduction.estimate)
    tied = [p for p in qualified
            if p is leader or not _paired_loss(result, p, leader).excludes(0.0)]
    order = {id(p): i for i, p in enumerate(result.points)}
    return min(tied, key=lambda p: (-p.accuracy, edit_size(p), order[id(p)]))


def _explain_none(result: "Tradeoff") -> None:
    """Nothing qualifies: undecided (only the prompts are too few to show the accuracy
    is kept) or no variant qualifies; the closest candidates are named either way."""
    rule, ft = result.rule, result.finetuned
    variants = _variants(result)
    undecided = [p for p in variants if p.verdict == "acc?"]
    if undecided:
        best = max(undecided, key=lambda p: p.noninferiority.lower_bound)
        result.closest = [best]
        result.outcome = UNDECIDED
        check = best.noninferiority
        result.reason = (
            f"undecided: {len(undecided)} variant(s) repair the forgetting significantly, but the "
            f"{check.difference.n} prompts cannot show that they keep {rule.min_retention:g} of the "
            f"fine-tune's accuracy {ft.accuracy:.3f} (margin {result.margin:.3f}). The closest, "
            f"{best.name}: accuracy {_interval_text(check.difference, 3)} against the fine-tune, "
            f"one-sided lower bound {check.lower_bound:+.3f}, repairs {best.repaired:.0%}. "
            + _prompts_clause(check) +
            f"; with these prompts a margin of about {result.resolvable_margin:.3f} "
            f"(--min-retention {1 - result.resolvable_margin / ft.accuracy:.3f}) is resolvable. "
            "Keep the fine-tune until then")
        return

    def distance(p):  # how far from qualifying: accuracy short of the margin, repair missing
        return (max(0.0, -result.margin - p.noninferiority.lower_bound)
                + max(0.0, -(p.repaired or 0.0)))

    result.closest = sorted(variants, key=distance)[:3]
    result.outcome = NONE_QUALIFIES
    named = "; ".join(f"{p.name}: accuracy {_interval_text(p.accuracy_vs_ft, 3)}, CF {p.cf_pct:+.2f}% "
                      f"({p.verdict})" for p in result.closest)
    result.reason = (
        f"no variant qualifies: none is shown to keep {rule.min_retention:g} of the fine-tune's "
        f"accuracy ({ft.accuracy:.3f}) while repairing at least {rule.min_repair:.0%} of its "
        f"forgetting significantly. Closest: {named}. Keep the fine-tuned model, or sweep other "
        "strengths")


def _prompts_clause(check) -> str:
    """How many prompts would decide: planned for a variant with no true loss that differs
    from the fine-tune on as many prompts as this one (Nam's sample size)."""
    n = check.difference.n
    if check.prompts_needed <= n:
        return (f"These {n} prompts would show a variant with no true loss that differs from the "
                f"fine-tune as often ({check.discordance:.1%} of the prompts) within the margin; "
                f"what keeps this one undecided is its own estimated loss {check.difference.estimate:+.3f}")
    return (f"About {check.prompts_needed} prompts would show a variant with no true loss that "
            f"differs from the fine-tune as often ({check.discordance:.1%} of the prompts) within "
            "the margin (80% power)")


def _few_units(result: "Tradeoff") -> List[str]:
    """Warnings for intervals that rest on fewer than ``stats.MIN_UNITS`` independent
    units (windows or documents; prompts or their groups)."""
    warnings = []
    for what, interval, unit in (("forgetting", result.forgetting.cf, "documents or windows"),
                                 ("accuracy", _first_difference(result), "prompts or prompt groups")):
        if interval is not None and interval.too_few_units:
            warnings.append(
                f"the {what} intervals rest on {interval.units} independent {unit} (fewer than "
                f"{stats.MIN_UNITS}): they may be narrower than the truth; evaluate more")
    return warnings


def _first_difference(result: "Tradeoff") -> Optional[stats.Interval]:
    return next((p.accuracy_vs_ft for p in _variants(result) if p.accuracy_vs_ft is not None), None)


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
    """``L(a) - L(b)`` with a paired interval over windows (whole documents when the text
    has several); None without per-window values."""
    if a.window_losses is None or b.window_losses is None:
        return None
    return stats.loss_difference(a.window_losses, b.window_losses, result.window_tokens,
                                 groups=result.window_groups)


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
            result.outcome = NONE_QUALIFIES
            result.closest = sorted(result.points, key=lambda p: p.cf_pct)[:3]
            result.reason = (f"no point has CF <= {bound:g}%; the lowest: "
                             + "; ".join(f"{p.name} {p.cf_pct:+.2f}%" for p in result.closest))
            return
        best = max(allowed, key=lambda p: p.accuracy)
        best.verdict = "selected"
        result.selected, result.outcome = best, SELECTED
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
        result.selected, result.outcome = best, SELECTED
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
    "MIN_REPAIR",
    "MIN_RETENTION",
    "NONE_QUALIFIES",
    "NO_FORGETTING",
    "SELECTED",
    "UNDECIDED",
    "edit_size",
    "RULES",
    "SELECTIONS",
    "TASK_WEIGHT",
    "Rule",
    "SelectionRule",
    "TradeoffError",
]
