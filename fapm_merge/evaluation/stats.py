"""How sure is a difference between two models? Paired intervals and tests.

Every model of a sweep is evaluated on the same prompts and the same text windows,
so two models are compared item by item (*paired*): the noise that both share (an
easy prompt, a hard passage) cancels, and intervals are far narrower than the two
models' separate intervals would suggest. Everything here works on the per-item
values ``fapm-merge eval`` keeps (per prompt: correct or not; per window: summed
negative log-likelihood and token count).

* :func:`accuracy_difference`: ``acc(model) - acc(reference)`` with a 95% paired
  bootstrap interval (prompts resampled, the same draw for both models).
* :func:`accuracy_drop_pvalue`: the exact one-sided McNemar test that the model
  answers worse than the reference (binomial test on the discordant prompts).
* :func:`loss_difference`: ``L(model) - L(reference)`` (mean token loss) with a
  95% paired bootstrap interval over windows.
* :func:`repaired_share`: ``(L_ft - L_model) / (L_ft - L_base)`` with an interval.

The statistics come from ``scipy.stats`` (``bootstrap`` with ``paired=True`` and
the percentile method, seeded, so a rerun gives the same interval; ``binomtest``).
The percentile method is used rather than BCa because per-prompt outcomes are 0/1
and often identical between two models, where BCa's acceleration is undefined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

CONFIDENCE = 0.95
"""Confidence level of every interval (and 1 - the test's significance level)."""

RESAMPLES = 9999
"""Bootstrap resamples: the interval's end points move by well under 1% of its
width between seeds at this count."""

SEED = 0
"""The bootstrap's seed: same inputs, same interval."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval.

    Attributes:
        estimate (`float`): the statistic on the data as observed.
        low, high (`float`): the interval's end points.
        n (`int`): items (prompts or windows) it rests on.
    """

    estimate: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes(self, value: float) -> bool:
        """True when ``value`` lies outside the interval (a significant difference)."""
        return value < self.low or value > self.high

    def map(self, function) -> "Interval":
        """The interval of a monotonically increasing function of the statistic."""
        return Interval(function(self.estimate), function(self.low), function(self.high), self.n)

    def to_json(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "n": self.n}


def _bootstrap(data, statistic, *, seed: int, resamples: int) -> tuple:
    import warnings

    import numpy as np
    from scipy import stats

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # resamples where a ratio's denominator vanishes give inf: the percentile
        # interval then reaches inf, which is the honest answer; no warning needed
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.bootstrap(
            data,
            statistic,
            paired=True,
            vectorized=True,
            n_resamples=resamples,
            confidence_level=CONFIDENCE,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _as_array(values: Sequence[float]):
    import numpy as np

    return np.asarray(values, dtype=np.float64)


def accuracy_difference(
    model_correct: Sequence[int],
    reference_correct: Sequence[int],
    *,
    seed: int = SEED,
    resamples: int = RESAMPLES,
) -> Interval:
    """``acc(model) - acc(reference)`` on the same prompts, with a paired interval.

    Args:
        model_correct, reference_correct (`Sequence[int]`): 1/0 per prompt, same order.
        seed (`int`, defaults to 0): bootstrap seed.
        resamples (`int`, defaults to 9999): bootstrap resamples.
    """
    a, b = _as_array(model_correct), _as_array(reference_correct)
    _check_paired(a, b, "prompts")
    estimate = float(a.mean() - b.mean())
    if (a == b).all():  # no prompt differs: every resample gives 0
        return Interval(estimate, estimate, estimate, len(a))
    low, high = _bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis=axis) - y.mean(axis=axis),
                           seed=seed, resamples=resamples)
    return Interval(estimate, low, high, len(a))


def accuracy_drop_pvalue(model_correct: Sequence[int], reference_correct: Sequence[int]) -> float:
    """One-sided exact McNemar test: p-value of "the model answers worse".

    Only the discordant prompts carry information: ``worse`` (reference right, model
    wrong) and ``better``. Under "equally good" each discordant prompt is a fair
    coin, so the p-value is ``P(Binomial(worse + better, 1/2) >= worse)``.
    """
    from scipy import stats

    a, b = _as_array(model_correct), _as_array(reference_correct)
    _check_paired(a, b, "prompts")
    worse = int(((b == 1) & (a == 0)).sum())
    better = int(((b == 0) & (a == 1)).sum())
    if worse + better == 0:
        return 1.0
    return float(stats.binomtest(worse, worse + better, 0.5, alternative="greater").pvalue)


def _mean_loss(losses, tokens, axis=-1):
    return losses.sum(axis=axis) / tokens.sum(axis=axis)


def loss_difference(
    model_losses: Sequence[float],
    reference_losses: Sequence[float],
    tokens: Sequence[int],
    *,
    seed: int = SEED,
    resamples: int = RESAMPLES,
) -> Interval:
    """``L(model) - L(reference)``, mean token losses on the same windows, with a
    paired interval (windows resampled, the same draw for both models).

    Args:
        model_losses, reference_losses (`Sequence[float]`): summed NLL per window.
        tokens (`Sequence[int]`): predicted tokens per window (the same for both).
    """
    a, b, t = _as_array(model_losses), _as_array(reference_losses), _as_array(tokens)
    _check_paired(a, b, "windows")
    _check_paired(a, t, "windows")
    estimate = float(_mean_loss(a, t) - _mean_loss(b, t))
    if len(a) < 2 or (a == b).all():
        return Interval(estimate, estimate if len(a) >= 2 else -math.inf,
                        estimate if len(a) >= 2 else math.inf, len(a))
    low, high = _bootstrap(
        (a, b, t),
        lambda x, y, n, axis=-1: _mean_loss(x, n, axis) - _mean_loss(y, n, axis),
        seed=seed, resamples=resamples,
    )
    return Interval(estimate, low, high, len(a))


def repaired_share(
    model_losses: Sequence[float],
    finetuned_losses: Sequence[float],
    base_losses: Sequence[float],
    tokens: Sequence[int],
    *,
    seed: int = SEED,
    resamples: int = RESAMPLES,
) -> Optional[Interval]:
    """``(L_ft - L_model) / (L_ft - L_base)``: the share of the fine-tune's forgetting
    a model undoes (1 all, 0 none, < 0 worse than not repairing), with a paired
    interval over windows. None when the fine-tune did not forget (``L_ft <= L_base``):
    the share is undefined then.
    """
    m, f, b, t = (_as_array(v) for v in (model_losses, finetuned_losses, base_losses, tokens))
    for other in (f, b, t):
        _check_paired(m, other, "windows")
    forgetting = _mean_loss(f, t) - _mean_loss(b, t)
    if not forgetting > 0:
        return None
    estimate = float((_mean_loss(f, t) - _mean_loss(m, t)) / forgetting)
    if len(m) < 2:
        return Interval(estimate, -math.inf, math.inf, len(m))

    def share(x, y, z, n, axis=-1):
        undone = _mean_loss(y, n, axis) - _mean_loss(x, n, axis)
        total = _mean_loss(y, n, axis) - _mean_loss(z, n, axis)
        import numpy as np

        with np.errstate(divide="ignore", invalid="ignore"):
            # a resample in which the fine-tune did not forget says nothing: +-inf
            return np.where(total > 0, undone / np.where(total > 0, total, 1.0),
                            np.where(undone >= 0, np.inf, -np.inf))

    if (m == f).all():
        return Interval(estimate, estimate, estimate, len(m))
    low, high = _bootstrap((m, f, b, t), share, seed=seed, resamples=resamples)
    return Interval(estimate, low, high, len(m))


def cf_percent(loss_difference_to_base: float) -> float:
    """CF% = ``100 * (PPL_model - PPL_base) / PPL_base`` from ``L_model - L_base``."""
    return 100.0 * math.expm1(loss_difference_to_base)


def items_needed(interval: Interval, distance: float) -> Optional[int]:
    """About how many items (prompts, windows) would shrink an interval's half width
    to ``distance`` (the gap between its estimate and the value it must exclude):
    widths shrink as ``1/sqrt(n)``, so ``n * (half_width / distance)^2``. None when
    no number of items can (a zero distance, an unbounded interval)."""
    if distance == 0 or not math.isfinite(interval.half_width):
        return None
    return max(interval.n + 1, math.ceil(interval.n * (interval.half_width / abs(distance)) ** 2))


def _check_paired(a, b, what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same {what} for both models: "
                         f"{len(a)} vs {len(b)}")
    if len(a) == 0:
        raise ValueError(f"no {what} to compare")


__all__ = [
    "CONFIDENCE",
    "Interval",
    "accuracy_difference",
    "accuracy_drop_pvalue",
    "cf_percent",
    "items_needed",
    "loss_difference",
    "repaired_share",
]
