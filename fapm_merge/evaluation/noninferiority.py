"""Is a variant's accuracy not worse than the fine-tune's by more than a margin?

A *non-inferiority* question (a variant need not be better, only not worse by more than
``margin`` accuracy points), answered from the per-prompt 0/1 outcomes of the two models
on the same prompts with a paired *score* interval:

* :func:`tango_interval`: Tango's score interval for the difference of two paired
  proportions (T. Tango, "Equivalence test and confidence interval for the difference
  in proportions for the paired-sample design", Statistics in Medicine 17:891-908,
  1998). Unlike the bootstrap or Wald intervals it never has zero width: two models that
  agree on every one of n prompts get about ``+-3.84 / n``.
* :func:`noninferior`: the verdict at a margin, ``qualifies`` (the one-sided 95% lower
  bound of ``acc(model) - acc(reference)`` is above ``-margin``), ``fails`` (the
  one-sided 95% upper bound is below ``-margin``: clearly worse) or ``undecided``, with
  the number of prompts that would decide it.
* :func:`prompts_needed`, :func:`resolvable_margin`, :func:`plan`: what a number of
  prompts can show *before* spending compute on it: the prompts needed for 80% power at
  a margin for a variant with no true loss, and the smallest margin the prompts at hand
  resolve (the power formula of J. Nam, "Establishing equivalence of two treatments and
  sample size requirements in matched-pairs design", Biometrics 53:1422-1430, 1997, for
  Tango's statistic).

Prompts that share a ``group`` (a source document, a movie) are not independent: with
``groups`` the counts are divided by the design effect of the per-prompt differences
(J. N. K. Rao and A. J. Scott, "A simple method for the analysis of clustered binary
data", Biometrics 48:577-585, 1992), never below 1, so clustering can only widen.

Torch-free; needs numpy and scipy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from fapm_merge.evaluation.stats import CONFIDENCE, Interval, check_paired, cluster_count

POWER = 0.8
"""Power the prompt counts are planned for: 80%, the usual design target."""

QUALIFIES, UNDECIDED, FAILS = "qualifies", "undecided", "fails"
"""The verdicts of :func:`noninferior`."""

PLANNING_DISCORDANCE = 0.02
"""Share of prompts a repaired variant is assumed to answer differently from the
fine-tune when nothing is measured yet (tune's check before the variants): the low end
of what pruned variants that keep the task show (docs/choosing-sparsity.md), so the
check only stops a tune that could not decide even then."""

RULE_OF_THREE = 3.0
"""Seeing no discordant prompt among n leaves rates up to about 3/n plausible (the
one-sided 95% bound of a rate none of n showed): the least discordance a plan assumes."""

_BISECTIONS = 100
"""Halvings of [-1, 1]: far below float resolution, so the root is exact to the last bit."""


def _z(confidence: float) -> float:
    from scipy import stats

    return float(stats.norm.ppf(confidence))


def _constrained_loss_probability(gain, loss, n, delta):
    """Maximum-likelihood ``P(model wrong, reference right)`` given that the accuracy
    difference is ``delta`` (Tango 1998, eq. 5; a root of a quadratic).

    ``gain``: prompts only the model answers right; ``loss``: only the reference."""
    import numpy as np

    w = -(gain + loss) + delta * (2 * n - gain + loss)
    discriminant = np.maximum(w * w + 8 * n * loss * delta * (1 - delta), 0.0)
    return (np.sqrt(discriminant) - w) / (4 * n)


def tango_statistic(gain, loss, n, delta):
    """Tango's score statistic for "the accuracy difference is ``delta``"; large when
    the data show a larger difference. Vectorised over numpy arrays (any broadcastable
    shapes), which is what makes simulations of many sweeps fast.

    Args:
        gain (`int` or array): prompts the model answers right and the reference wrong.
        loss (`int` or array): prompts the reference answers right and the model wrong.
        n (`int` or array): prompts in all (counts may be fractional: effective counts).
        delta (`float` or array): the hypothesised ``acc(model) - acc(reference)``.
    """
    import numpy as np

    gain, loss, n, delta = (np.asarray(v, dtype=np.float64) for v in (gain, loss, n, delta))
    q = _constrained_loss_probability(gain, loss, n, delta)
    variance = n * (2 * q + delta * (1 - delta))
    with np.errstate(divide="ignore", invalid="ignore"):
        # a vanishing variance (delta at +-1) makes any other observation infinitely unlikely
        return (gain - loss - n * delta) / np.sqrt(np.maximum(variance, 1e-300))


def tango_interval(gain, loss, n, confidence: float = CONFIDENCE, *, one_sided: bool = False):
    """Tango's score interval for ``(gain - loss) / n``: all differences ``delta`` that
    the score test at this confidence does not reject. Found by bisection (the statistic
    falls monotonically in ``delta``), vectorised like :func:`tango_statistic`.

    Args:
        gain, loss, n: as in :func:`tango_statistic`.
        confidence (`float`, defaults to 0.95): the interval's level.
        one_sided (`bool`, defaults to False): each end a one-sided bound at
            ``confidence`` (the two-sided interval at ``2 * confidence - 1``).

    Returns:
        `tuple`: ``(low, high)``, floats for scalar inputs, arrays otherwise.
    """
    import numpy as np

    z = _z(confidence if one_sided else (1 + confidence) / 2)
    gain, loss, n = (np.asarray(v, dtype=np.float64) for v in (gain, loss, n))
    estimate = (gain - loss) / n
    ends = []
    for lo, hi, target in ((np.full_like(estimate, -1.0), estimate, z),
                           (estimate, np.full_like(estimate, 1.0), -z)):
        lo, hi = lo.copy(), hi.copy()
        for _ in range(_BISECTIONS):
            middle = (lo + hi) / 2
            above = tango_statistic(gain, loss, n, middle) > target
            lo = np.where(above, middle, lo)
            hi = np.where(above, hi, middle)
        ends.append((lo + hi) / 2)
    low, high = ends
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


def design_effect(model_correct, reference_correct, groups) -> float:
    """Variance of the mean per-prompt difference when whole groups are resampled,
    over its variance when prompts are independent (Rao & Scott 1992); at least 1.

    One group carries no information about between-group variation: the effect is then
    the number of prompts (the group counts as one prompt)."""
    import numpy as np

    difference = np.asarray(model_correct, dtype=np.float64) - np.asarray(reference_correct,
                                                                          dtype=np.float64)
    n = len(difference)
    if len(groups) != n:
        raise ValueError(f"one group id per prompt is needed: {len(groups)} ids for {n} prompts")
    index, count = cluster_count(groups)
    if count < 2:
        return float(n)
    mean = difference.mean()
    within = ((difference - mean) ** 2).sum() * n / (n - 1)
    if within == 0:
        return 1.0
    totals = np.bincount(index, weights=difference, minlength=count)
    sizes = np.bincount(index, minlength=count)
    between = ((totals - sizes * mean) ** 2).sum() * count / (count - 1)
    return max(1.0, float(between / within))


def _counts(model_correct, reference_correct):
    import numpy as np

    a = np.asarray(model_correct, dtype=np.int64)
    b = np.asarray(reference_correct, dtype=np.int64)
    check_paired(a, b, "prompts")
    return int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum()), len(a)


def accuracy_difference_score(
    model_correct: Sequence[int],
    reference_correct: Sequence[int],
    *,
    groups: Optional[Sequence] = None,
    confidence: float = CONFIDENCE,
) -> Interval:
    """``acc(model) - acc(reference)`` with Tango's paired score interval (two-sided).

    Args:
        model_correct, reference_correct (`Sequence[int]`): 1/0 per prompt, same order.
        groups (`Sequence`, *optional*): a group id per prompt; the counts are divided by
            the :func:`design_effect` and the interval records the number of groups.
        confidence (`float`, defaults to 0.95): the interval's level.
    """
    gain, loss, n = _counts(model_correct, reference_correct)
    effect = _effect(model_correct, reference_correct, groups)
    return _score_interval(gain, loss, n, effect, groups, confidence)


def _effect(model_correct, reference_correct, groups) -> float:
    return 1.0 if groups is None else design_effect(model_correct, reference_correct, groups)


def _score_interval(gain: int, loss: int, n: int, effect: float, groups, confidence: float) -> Interval:
    low, high = tango_interval(gain / effect, loss / effect, n / effect, confidence)
    clusters = None if groups is None else cluster_count(groups)[1]
    return Interval((gain - loss) / n, low, high, n, clusters)


@dataclass(frozen=True)
class NonInferiority:
    """The verdict of :func:`noninferior`.

    Attributes:
        difference (`Interval`): ``acc(model) - acc(reference)``, two-sided interval.
        lower_bound, upper_bound (`float`): one-sided bounds at the confidence level.
        margin (`float`): the accuracy points the model may lose.
        discordance (`float`): share of prompts on which the two differ, at least 3/n
            (:data:`RULE_OF_THREE`), as the prompt count below assumes.
        design_effect (`float`): 1 without groups.
        prompts_needed (`int`): prompts for 80% power to show non-inferiority at this
            margin for a model with no true loss and this discordance and clustering.
    """

    difference: Interval
    lower_bound: float
    upper_bound: float
    margin: float
    discordance: float
    design_effect: float
    prompts_needed: int

    @property
    def verdict(self) -> str:
        """``qualifies``, ``fails`` (clearly worse than the margin) or ``undecided``."""
        if self.lower_bound > -self.margin:
            return QUALIFIES
        if self.upper_bound < -self.margin:
            return FAILS
        return UNDECIDED

    def to_json(self) -> dict:
        return {"difference": self.difference.to_json(), "lower_bound": self.lower_bound,
                "upper_bound": self.upper_bound, "margin": self.margin, "verdict": self.verdict,
                "discordance": self.discordance, "design_effect": self.design_effect,
                "prompts_needed": self.prompts_needed}


def discordance(model_correct: Sequence[int], reference_correct: Sequence[int]) -> float:
    """Share of prompts answered differently by the two models, at least ``3 / n``
    (:data:`RULE_OF_THREE`): no flip seen among n prompts does not make flips rarer
    than that, and a plan built on 0 would promise a margin from a handful of prompts."""
    gain, loss, n = _counts(model_correct, reference_correct)
    return max((gain + loss) / n, min(1.0, RULE_OF_THREE / n))


def noninferior(
    model_correct: Sequence[int],
    reference_correct: Sequence[int],
    margin: float,
    *,
    groups: Optional[Sequence] = None,
    confidence: float = CONFIDENCE,
    power: float = POWER,
) -> NonInferiority:
    """Is the model's accuracy at most ``margin`` below the reference's?

    Args:
        model_correct, reference_correct (`Sequence[int]`): 1/0 per prompt, same order
            (the reference is the fine-tune).
        margin (`float`): accuracy points the model may lose, > 0; for a retention of
            ``r`` of the fine-tune's accuracy ``a``: ``(1 - r) * a``.
        groups (`Sequence`, *optional*): a group id per prompt (see
            :func:`accuracy_difference_score`).
        confidence (`float`, defaults to 0.95): level of each one-sided bound.
        power (`float`, defaults to 0.8): power :attr:`NonInferiority.prompts_needed` plans for.
    """
    _check_margin(margin)
    gain, loss, n = _counts(model_correct, reference_correct)
    effect = _effect(model_correct, reference_correct, groups)
    lower, upper = tango_interval(gain / effect, loss / effect, n / effect, confidence,
                                  one_sided=True)
    rate = discordance(model_correct, reference_correct)
    needed = math.ceil(effect * prompts_needed(margin, rate, power=power, confidence=confidence))
    return NonInferiority(_score_interval(gain, loss, n, effect, groups, confidence),
                          lower, upper, margin, rate, effect, needed)


# --------------------------------------------------------------------------- planning


def _null_sd(margin: float, rate: float) -> float:
    """Per-prompt standard deviation of Tango's statistic's numerator at the margin
    (``delta = -margin``) when the truth is no difference with discordance ``rate``."""
    q = float(_constrained_loss_probability(rate / 2, rate / 2, 1.0, -margin))
    return math.sqrt(max(2 * q - margin * (1 + margin), 0.0))


def margin_for(min_retention: float, accuracy: float) -> float:
    """The accuracy points a variant may lose to keep ``min_retention`` of the
    reference's ``accuracy``: ``(1 - min_retention) * accuracy``, kept inside (0, 1) where
    the score test is defined (a retention of 1 then asks for no loss beyond 1e-9)."""
    return min(max((1 - min_retention) * accuracy, _MARGIN_LIMIT), 1 - _MARGIN_LIMIT)


_MARGIN_LIMIT = 1e-9


def _check_margin(margin: float) -> None:
    if not (math.isfinite(margin) and 0 < margin < 1):
        raise ValueError(f"a non-inferiority margin must be in (0, 1), got {margin}")


def _check_discordance(rate: float) -> None:
    if not (0 < rate <= 1):
        raise ValueError(f"a discordance rate must be in (0, 1], got {rate}")


def prompts_needed(margin: float, discordance: float, *, power: float = POWER,
                   confidence: float = CONFIDENCE) -> int:
    """Prompts for ``power`` to show non-inferiority at ``margin`` (one-sided test at
    ``confidence``) for a model with no true loss that answers a share ``discordance``
    of the prompts differently from the reference (Nam 1997):
    ``n = ((z_conf * sd_null + z_power * sqrt(discordance)) / margin) ** 2``.

    Args:
        margin (`float`): accuracy points, in (0, 1).
        discordance (`float`): share of prompts answered differently, in (0, 1].
        power (`float`, defaults to 0.8), confidence (`float`, defaults to 0.95).
    """
    _check_margin(margin)
    _check_discordance(discordance)
    spread = _z(confidence) * _null_sd(margin, discordance) + _z(power) * math.sqrt(discordance)
    return max(1, math.ceil((spread / margin) ** 2))


def power_at(prompts: int, margin: float, discordance: float, *,
             confidence: float = CONFIDENCE) -> float:
    """Probability that ``prompts`` prompts show non-inferiority at ``margin`` for a model
    with no true loss and this discordance (the inverse of :func:`prompts_needed`)."""
    from scipy import stats

    _check_margin(margin)
    _check_discordance(discordance)
    shift = math.sqrt(prompts) * margin - _z(confidence) * _null_sd(margin, discordance)
    return float(stats.norm.cdf(shift / math.sqrt(discordance)))


def resolvable_margin(prompts: int, discordance: float, *, power: float = POWER,
                      confidence: float = CONFIDENCE) -> float:
    """The smallest margin that ``prompts`` prompts show with ``power`` for a model with
    no true loss and this discordance (found by bisection; the power rises with the
    margin)."""
    _check_discordance(discordance)
    if prompts < 1:
        raise ValueError(f"need at least one prompt, got {prompts}")
    lo, hi = 0.0, 1.0
    for _ in range(_BISECTIONS):
        middle = (lo + hi) / 2
        if middle > 0 and power_at(prompts, middle, discordance, confidence=confidence) >= power:
            hi = middle
        else:
            lo = middle
    return hi


@dataclass(frozen=True)
class Plan:
    """What ``prompts`` prompts can show at ``margin`` (see :func:`plan`).

    Attributes:
        prompts (`int`), margin (`float`), discordance (`float`): the inputs.
        power (`float`): probability these prompts show non-inferiority for a model with
            no true loss.
        prompts_needed (`int`): prompts for the planned power at ``margin``.
        resolvable_margin (`float`): the smallest margin these prompts resolve.
    """

    prompts: int
    margin: float
    discordance: float
    power: float
    prompts_needed: int
    resolvable_margin: float

    @property
    def enough(self) -> bool:
        return self.prompts >= self.prompts_needed

    def to_json(self) -> dict:
        return {"prompts": self.prompts, "margin": self.margin, "discordance": self.discordance,
                "power": self.power, "prompts_needed": self.prompts_needed,
                "resolvable_margin": self.resolvable_margin, "enough": self.enough}


def plan(prompts: int, margin: float, discordance: float, *, power: float = POWER,
         confidence: float = CONFIDENCE) -> Plan:
    """Before any merge: can ``prompts`` prompts show non-inferiority at ``margin``?

    Args:
        prompts (`int`): prompts in the task file (divided by the design effect when
            they are grouped).
        margin (`float`): accuracy points a variant may lose.
        discordance (`float`): share of prompts a variant is expected to answer
            differently from the fine-tune (measured: :func:`discordance`).
        power (`float`, defaults to 0.8), confidence (`float`, defaults to 0.95).
    """
    return Plan(prompts, margin, discordance,
                power_at(prompts, margin, discordance, confidence=confidence),
                prompts_needed(margin, discordance, power=power, confidence=confidence),
                resolvable_margin(prompts, discordance, power=power, confidence=confidence))


__all__ = [
    "FAILS",
    "PLANNING_DISCORDANCE",
    "POWER",
    "QUALIFIES",
    "UNDECIDED",
    "NonInferiority",
    "Plan",
    "accuracy_difference_score",
    "design_effect",
    "discordance",
    "margin_for",
    "noninferior",
    "plan",
    "power_at",
    "prompts_needed",
    "resolvable_margin",
    "tango_interval",
    "tango_statistic",
]
