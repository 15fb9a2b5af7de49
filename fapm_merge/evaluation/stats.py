"""How sure is a difference between two models? Paired intervals and tests.

Every model of a sweep is evaluated on the same prompts and the same text windows,
so two models are compared item by item (*paired*): the noise that both share (an
easy prompt, a hard passage) cancels, and intervals are far narrower than the two
models' separate intervals would suggest. Everything here works on the per-item
values ``fapm-merge eval`` keeps (per prompt: correct or not; per window: summed
negative log-likelihood and token count).

* :func:`loss_difference`: ``L(model) - L(reference)`` (mean token loss) with a
  95% paired bootstrap interval over windows (or a studentized one, for few units).
* :func:`cf_reduction`, :func:`repair`, :func:`forgetting`: the repair as a finite
  paired reduction of CF in CF points, whether it is significant, and whether the
  fine-tune's forgetting is.

Items drawn from a common source (prompts from one movie, windows of one document)
are not independent: with ``groups`` the bootstrap resamples whole groups
(:func:`cluster_sums`), and :attr:`Interval.too_few_units` flags intervals resting on
fewer than :data:`MIN_UNITS` independent units. The accuracy's non-inferiority test
(a paired score interval, never of zero width) is in :mod:`.noninferiority`.

The bootstrap is ``scipy.stats.bootstrap`` with ``paired=True`` and the percentile
method, seeded, so a rerun gives the same interval. The percentile method is used
rather than BCa because two models often give identical values on many windows,
where BCa's acceleration is undefined.
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

MIN_UNITS = 30
"""Below this many independent units (windows, prompts, or the groups they were drawn
from) a bootstrap interval covers the truth less often than it claims (with few clusters
the percentile bootstrap is too narrow: A. C. Cameron, J. B. Gelbach and D. L. Miller,
"Bootstrap-based improvements for inference with clustered errors", Review of
Economics and Statistics 90:414-427, 2008): :attr:`Interval.too_few_units` flags it."""


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
    clusters: Optional[int] = None

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def units(self) -> int:
        """Independent units the interval rests on: clusters when items were grouped."""
        return self.n if self.clusters is None else self.clusters

    @property
    def too_few_units(self) -> bool:
        """Fewer than :data:`MIN_UNITS` independent units: warn that the interval may be
        too narrow."""
        return self.units < MIN_UNITS

    def excludes(self, value: float) -> bool:
        """True when ``value`` lies outside the interval (a significant difference)."""
        return value < self.low or value > self.high

    def text(self, digits: int) -> str:
        """``+0.012 [-0.004, +0.028]``: the estimate and its interval, signed, as the
        decisions' sentences write them."""
        return f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"

    def map(self, function) -> "Interval":
        """The interval of a monotonically increasing function of the statistic."""
        return Interval(function(self.estimate), function(self.low), function(self.high), self.n,
                        self.clusters)

    def to_json(self) -> dict:
        out = {"estimate": self.estimate, "low": self.low, "high": self.high, "n": self.n}
        if self.clusters is not None:
            out["clusters"] = self.clusters
        return out


def _bootstrap(data, statistic, *, seed: int, resamples: int, confidence: float = CONFIDENCE) -> tuple:
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
            confidence_level=confidence,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _as_array(values: Sequence[float]):
    import numpy as np

    return np.asarray(values, dtype=np.float64)


def _mean_loss(losses, tokens, axis=-1):
    return losses.sum(axis=axis) / tokens.sum(axis=axis)


def loss_difference(
    model_losses: Sequence[float],
    reference_losses: Sequence[float],
    tokens: Sequence[int],
    *, groups: Optional[Sequence] = None, seed: int = SEED, resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE, method: str = "bootstrap",
) -> Interval:
    """``L(model) - L(reference)``, mean token losses on the same windows, with a
    paired interval (windows resampled, the same draw for both models).

    Args:
        model_losses, reference_losses (`Sequence[float]`): summed NLL per window.
        tokens (`Sequence[int]`): predicted tokens per window (the same for both).
        groups (`Sequence`, *optional*): a document id per window; whole documents are
            resampled then (see :func:`cluster_sums`).
        confidence (`float`, defaults to 0.95): the two-sided interval's level (tune's
            screening asks for a stricter one than the decision,
            :mod:`fapm_merge.workflows.tradeoff.screen`).
        method (`str`, defaults to "bootstrap"): ``"bootstrap"`` (the paired percentile
            bootstrap, seeded) or ``"t"`` (a studentized interval over the units,
            :func:`_studentized_bounds`), for few units, where the percentile bootstrap
            is too narrow: the screening share's documents.
    """
    a, b, t = _as_array(model_losses), _as_array(reference_losses), _as_array(tokens)
    check_paired(a, b, "windows")
    check_paired(a, t, "windows")
    estimate = float(_mean_loss(a, t) - _mean_loss(b, t))
    if method == "t":
        return _unit_interval(estimate, (a, b, t), lambda units: _studentized_bounds(
            estimate, *units, confidence=confidence), same=(a == b).all(), groups=groups)
    if method != "bootstrap":
        raise ValueError(f"method must be 'bootstrap' or 't', got {method!r}")
    return _loss_bootstrap(
        estimate, (a, b, t), lambda x, y, n, axis=-1: _mean_loss(x, n, axis) - _mean_loss(y, n, axis),
        same=(a == b).all(), groups=groups, seed=seed, resamples=resamples, confidence=confidence)


def cf_reduction(
    model_losses: Sequence[float],
    finetuned_losses: Sequence[float],
    base_losses: Sequence[float],
    tokens: Sequence[int],
    *, groups: Optional[Sequence] = None, seed: int = SEED, resamples: int = RESAMPLES,
) -> Interval:
    """``CF_ft - CF_model`` in CF points (CF as :func:`cf_percent`): how much of the
    fine-tune's forgetting a model takes away, with a paired interval over windows
    (whole documents with ``groups``). A difference, not a ratio: its interval is
    finite whenever there are two windows, also when the forgetting itself is in
    doubt (a ratio to the forgetting then reaches +-inf).

    Args:
        model_losses, finetuned_losses, base_losses (`Sequence[float]`): summed NLL per window.
        tokens (`Sequence[int]`): predicted tokens per window.
        groups (`Sequence`, *optional*): a document id per window.
        seed (`int`, defaults to 0), resamples (`int`, defaults to 9999): the bootstrap's.
    """
    import numpy as np

    m, f, b, t = (_as_array(v) for v in (model_losses, finetuned_losses, base_losses, tokens))
    for other in (f, b, t):
        check_paired(m, other, "windows")

    def reduction(x, y, z, n, axis=-1):
        base = _mean_loss(z, n, axis)
        return 100.0 * (np.exp(_mean_loss(y, n, axis) - base) - np.exp(_mean_loss(x, n, axis) - base))

    estimate = cf_percent(_mean_loss(f, t) - _mean_loss(b, t)) - cf_percent(_mean_loss(m, t) - _mean_loss(b, t))
    return _loss_bootstrap(float(estimate), (m, f, b, t), reduction, same=(m == f).all(),
                           groups=groups, seed=seed, resamples=resamples)


@dataclass(frozen=True)
class Forgetting:
    """The fine-tune's forgetting (see :func:`forgetting`).

    Attributes:
        cf (`Interval`): CF% of the fine-tune against the base.
    """

    cf: Interval

    @property
    def significant(self) -> bool:
        """The fine-tune forgets measurably: its CF interval lies above 0. Otherwise there
        is nothing a repair could be shown to undo on this text."""
        return self.cf.low > 0

    def to_json(self) -> dict:
        return {"cf": self.cf.to_json(), "significant": self.significant}


def forgetting(
    finetuned_losses: Sequence[float],
    base_losses: Sequence[float],
    tokens: Sequence[int],
    *, groups: Optional[Sequence] = None, seed: int = SEED, resamples: int = RESAMPLES,
) -> Forgetting:
    """Does the fine-tune forget on this text? Its CF% against the base with a paired
    interval over windows (whole documents with ``groups``)."""
    difference = loss_difference(finetuned_losses, base_losses, tokens, groups=groups,
                                 seed=seed, resamples=resamples)
    return Forgetting(difference.map(cf_percent))


@dataclass(frozen=True)
class Repair:
    """How much of the fine-tune's forgetting a model undoes (see :func:`repair`).

    Attributes:
        cf_reduction (`Interval`): ``CF_ft - CF_model`` in CF points (> 0: less forgetting).
        loss_vs_finetuned (`Interval`): ``L_model - L_ft``, the paired loss difference.
        finetuned_cf (`float`): the fine-tune's CF% (point estimate).
    """

    cf_reduction: Interval
    loss_vs_finetuned: Interval
    finetuned_cf: float

    @property
    def significant(self) -> bool:
        """The model forgets measurably less than the fine-tune: the interval of
        ``L_model - L_ft`` lies below 0."""
        return self.loss_vs_finetuned.high < 0

    @property
    def share(self) -> Optional[float]:
        """``cf_reduction / CF_ft``: the share of the forgetting undone, in CF (not loss)
        units, so that it matches the CF points reported; None without forgetting."""
        return self.cf_reduction.estimate / self.finetuned_cf if self.finetuned_cf > 0 else None

    def to_json(self) -> dict:
        return {"cf_reduction": self.cf_reduction.to_json(),
                "loss_vs_finetuned": self.loss_vs_finetuned.to_json(),
                "finetuned_cf": self.finetuned_cf, "share": self.share,
                "significant": self.significant}


def repair(
    model_losses: Sequence[float],
    finetuned_losses: Sequence[float],
    base_losses: Sequence[float],
    tokens: Sequence[int],
    *, groups: Optional[Sequence] = None, seed: int = SEED, resamples: int = RESAMPLES,
) -> Repair:
    """A model's repair of the fine-tune's forgetting: the reduction of CF in CF points
    (:func:`cf_reduction`) and whether it is significant (the paired loss difference to
    the fine-tune excludes 0), both with paired intervals over windows (whole documents
    with ``groups``). Arguments as :func:`cf_reduction`."""
    m, f, b, t = (_as_array(v) for v in (model_losses, finetuned_losses, base_losses, tokens))
    return Repair(
        cf_reduction(m, f, b, t, groups=groups, seed=seed, resamples=resamples),
        loss_difference(m, f, t, groups=groups, seed=seed, resamples=resamples),
        cf_percent(_mean_loss(f, t) - _mean_loss(b, t)))


def _degenerate(estimate: float, n: int, clusters: Optional[int]) -> Interval:
    """No resampling possible or needed: one unit says nothing about the spread (an
    unbounded interval); identical values give the same difference in every resample."""
    units = n if clusters is None else clusters
    if units < 2:
        return Interval(estimate, -math.inf, math.inf, n, clusters)
    return Interval(estimate, estimate, estimate, n, clusters)


def _studentized_bounds(estimate: float, a, b, t, *, confidence: float) -> tuple:
    """``loss_difference``'s ``method="t"`` on per-unit sums (documents with ``groups``,
    else windows): the studentized interval of the ratio ``sum(a - b) / sum(t)`` from
    its linearization: per unit ``r_i = (a_i - b_i) - estimate * t_i``, standard error
    ``sqrt(n / (n - 1) * sum(r_i^2)) / sum(t)``, Student's t with ``n - 1`` degrees of
    freedom (W. G. Cochran, *Sampling Techniques*, 3rd ed., 1977, sec. 6.4). Unlike the
    percentile bootstrap it widens as the units get few: with the screening share's
    ~11 documents the percentile cluster bootstrap's 99% one-sided bound was crossed
    about 2% of the time under no difference (tests/test_stats.py)."""
    import numpy as np
    from scipy import stats as scipy_stats

    units = len(a)
    residuals = (a - b) - estimate * t
    error = math.sqrt(units / (units - 1) * float(np.sum(residuals ** 2))) / float(np.sum(t))
    quantile = float(scipy_stats.t.ppf(0.5 + confidence / 2, units - 1))
    return estimate - quantile * error, estimate + quantile * error


def _unit_interval(estimate: float, columns: tuple, bounds, *, same: bool,
                   groups: Optional[Sequence]) -> Interval:
    """An interval of a statistic of summed window losses and tokens from ``bounds`` of
    the per-unit columns: windows, or whole documents (the columns summed per document
    first: a sum of sums over documents is the sum over their windows)."""
    n, clusters = len(columns[0]), None
    if groups is not None:
        columns, clusters = cluster_sums(groups, *columns)
    if len(columns[0]) < 2 or same:
        return _degenerate(estimate, n, clusters)
    low, high = bounds(tuple(columns))
    return Interval(estimate, low, high, n, clusters)


def _loss_bootstrap(estimate: float, columns: tuple, statistic, *, same: bool,
                    groups: Optional[Sequence], seed: int, resamples: int,
                    confidence: float = CONFIDENCE) -> Interval:
    """The paired bootstrap of a statistic of summed window losses and tokens, windows
    or whole documents resampled (:func:`_unit_interval`)."""
    return _unit_interval(estimate, columns, lambda units: _bootstrap(
        units, statistic, seed=seed, resamples=resamples, confidence=confidence),
        same=same, groups=groups)


def cluster_count(groups: Sequence) -> tuple:
    """``(index, count)``: each item's cluster number (0 to count - 1, numbered in the
    order the clusters first appear, so the bootstrap's draws do not depend on how the
    ids sort) and the number of clusters."""
    import numpy as np

    labels, first, index = np.unique(np.asarray([str(g) for g in groups]), return_index=True,
                                     return_inverse=True)
    rank = np.empty(len(labels), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(labels))
    return rank[index.reshape(-1)], len(labels)


def cluster_sums(groups: Sequence, *columns) -> tuple:
    """Per-item columns summed per cluster, and the number of clusters.

    Resampling clusters instead of items (the cluster bootstrap: A. C. Davison and D. V.
    Hinkley, *Bootstrap Methods and their Application*, 1997, sec. 3.8) keeps items that
    share a source together, so their correlation widens the interval as it should.
    Ids are compared as strings (1 and "1" are the same group)."""
    import numpy as np

    if len(groups) != len(columns[0]):
        raise ValueError(f"one group id per item is needed: {len(groups)} ids for "
                         f"{len(columns[0])} items")
    index, count = cluster_count(groups)
    return [np.bincount(index, weights=c, minlength=count) for c in columns], count


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


def check_paired(a, b, what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same {what} for both models: "
                         f"{len(a)} vs {len(b)}")
    if len(a) == 0:
        raise ValueError(f"no {what} to compare")


__all__ = [
    "CONFIDENCE",
    "MIN_UNITS",
    "Forgetting",
    "Interval",
    "Repair",
    "cf_percent",
    "cf_reduction",
    "check_paired",
    "cluster_count",
    "cluster_sums",
    "forgetting",
    "items_needed",
    "loss_difference",
    "repair",
]
