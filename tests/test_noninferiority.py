"""Tango's paired score interval, the non-inferiority verdict and the prompt planning.

Checked against a published worked example, against a plain reference (the constrained
likelihood maximised by a grid search, the interval read off a grid of differences:
no closed form, no bisection of ours), and by seeded simulation.
"""

import math

import numpy as np
import pytest

from fapm_merge.evaluation import noninferiority as ni
from fapm_merge.evaluation import stats

Z975 = 1.959963984540054  # the normal distribution's 97.5% quantile
Z95 = 1.6448536269514722


def reference_score(gain, loss, n, delta):
    """Tango's statistic from its definition, for an array of differences ``delta``: the
    multinomial log-likelihood of the cells (gain, loss, concordant) maximised over
    P(loss) with P(gain) = P(loss) + delta, by a grid then a golden-section search (the
    likelihood is concave in P(loss))."""
    delta = np.atleast_1d(np.asarray(delta, dtype=np.float64))[:, None]
    same = n - gain - loss

    def loglik(q):
        total = np.zeros_like(q)
        for count, p in ((gain, q + delta), (loss, q), (same, 1 - 2 * q - delta)):
            if count:
                total += count * np.log(p)
        return total

    eps = 1e-15  # where all three cells are probabilities
    lo, hi = np.maximum(0.0, -delta) + eps, (1 - delta) / 2 - eps
    grid = lo + (hi - lo) * np.linspace(0, 1, 401)[None, :]
    best = np.argmax(loglik(grid), axis=1)[:, None]
    rows = np.arange(len(grid))[:, None]
    a = grid[rows, np.maximum(best - 1, 0)]
    b = grid[rows, np.minimum(best + 1, 400)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(120):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        left = loglik(c) < loglik(d)
        a, b = np.where(left, c, a), np.where(left, b, d)
    q = (a + b) / 2
    variance = n * (2 * q + delta * (1 - delta))
    return ((gain - loss - n * delta) / np.sqrt(variance))[:, 0]


def reference_interval(gain, loss, n, z, step=2e-4):
    """All differences on a grid of ``step`` that the score test does not reject."""
    deltas = np.arange(-1 + step, 1, step)
    kept = deltas[np.abs(reference_score(gain, loss, n, deltas)) <= z]
    return kept.min(), kept.max()


def test_tango_interval_reproduces_the_published_worked_example():
    # Cavo et al. (2012): complete response before and after consolidation therapy,
    # 161 patients, table [[59, 6], [16, 80]]; Tango's asymptotic score interval
    # -0.0621 (95% CI -0.1240 to -0.0054): M. W. Fagerland, S. Lydersen and P. Laake,
    # Statistical Analysis of Contingency Tables (CRC Press, 2017), chapter 8, as the
    # R package contingencytables reproduces it (Tango_asymptotic_score_CI_paired_2x2).
    low, high = ni.tango_interval(6, 16, 161)
    assert (6 - 16) / 161 == pytest.approx(-0.0621, abs=5e-5)
    assert low == pytest.approx(-0.1240, abs=5e-5)
    assert high == pytest.approx(-0.0054, abs=5e-5)


@pytest.mark.parametrize("gain,loss,n", [(6, 16, 161), (3, 0, 40), (0, 0, 50), (12, 5, 60), (0, 9, 9)])
def test_tango_interval_matches_the_plain_reference(gain, loss, n):
    low, high = ni.tango_interval(gain, loss, n)
    ref_low, ref_high = reference_interval(gain, loss, n, Z975)
    assert low == pytest.approx(ref_low, abs=2.5e-4)  # within the reference grid's step
    assert high == pytest.approx(ref_high, abs=2.5e-4)
    one_low, one_high = ni.tango_interval(gain, loss, n, one_sided=True)
    assert ref_low <= one_low + 2.5e-4 and one_high <= ref_high + 2.5e-4  # narrower
    assert one_low == -1 or reference_score(gain, loss, n, one_low)[0] == pytest.approx(Z95, abs=1e-6)


def test_models_that_agree_on_every_prompt_get_an_interval_of_positive_width():
    same = [1, 0, 1, 1] * 75  # 300 prompts, no discordant one
    difference = ni.accuracy_difference_score(same, same)
    # solving Tango's statistic at no discordant pair: delta / (1 - delta) = z^2 / n
    bound = Z975 ** 2 / (300 + Z975 ** 2)
    assert (difference.estimate, difference.low, difference.high) == pytest.approx((0, -bound, bound))
    verdict = ni.noninferior(same, same, margin=0.01)
    assert verdict.lower_bound == pytest.approx(-Z95 ** 2 / (300 + Z95 ** 2))
    assert verdict.lower_bound < 0 < verdict.upper_bound
    # 300 identical answers show a 1-point margin but not a 0.5-point one (bound -0.0089)
    assert verdict.verdict == ni.QUALIFIES
    assert ni.noninferior(same, same, margin=0.005).verdict == ni.UNDECIDED


def _outcomes(gain, loss, both, neither):
    model = [1] * gain + [0] * loss + [1] * both + [0] * neither
    reference = [0] * gain + [1] * loss + [1] * both + [0] * neither
    return model, reference


def test_the_verdict_separates_qualifies_undecided_and_fails():
    model, reference = _outcomes(2, 3, 700, 295)  # -0.001 on 1000 prompts, few flips
    verdict = ni.noninferior(model, reference, margin=0.01)
    assert verdict.verdict == ni.QUALIFIES and verdict.lower_bound > -0.01
    model, reference = _outcomes(20, 30, 650, 300)  # -0.01, many flips: cannot tell
    verdict = ni.noninferior(model, reference, margin=0.01)
    assert verdict.verdict == ni.UNDECIDED
    assert verdict.lower_bound < -0.01 < verdict.upper_bound
    assert verdict.prompts_needed > 1000
    model, reference = _outcomes(0, 60, 640, 300)  # -0.06: clearly worse than 1 point
    verdict = ni.noninferior(model, reference, margin=0.01)
    assert verdict.verdict == ni.FAILS and verdict.upper_bound < -0.01
    low, high = ni.tango_interval(0, 60, 1000, one_sided=True)
    assert (verdict.lower_bound, verdict.upper_bound) == (low, high)
    assert verdict.to_json()["verdict"] == "fails"
    with pytest.raises(ValueError, match="margin must be in"):
        ni.noninferior(model, reference, margin=0.0)


def test_prompts_needed_give_the_planned_power_in_simulation():
    # a variant with no true loss that flips 6% of the prompts, margin 2 points
    margin, rate = 0.02, 0.06
    n = ni.prompts_needed(margin, rate)
    assert 800 < n < 1200
    rng = np.random.default_rng(21)
    runs = 4000
    cells = rng.multinomial(n, [rate / 2, rate / 2, 1 - rate], size=runs)
    gain, loss = cells[:, 0], cells[:, 1]
    # non-inferior when the score test rejects "delta = -margin" one-sided at 5%,
    # which is the same as the one-sided lower bound clearing -margin
    shown = ni.tango_statistic(gain, loss, n, -margin) > Z95
    assert shown.mean() == pytest.approx(0.8, abs=0.03)
    low, _ = ni.tango_interval(gain[:50], loss[:50], n, one_sided=True)
    assert ((low > -margin) == shown[:50]).all()
    # half the prompts: the power the formula promises, also in simulation
    cells = rng.multinomial(n // 2, [rate / 2, rate / 2, 1 - rate], size=runs)
    simulated = (ni.tango_statistic(cells[:, 0], cells[:, 1], n // 2, -margin) > Z95).mean()
    assert simulated == pytest.approx(ni.power_at(n // 2, margin, rate), abs=0.03)


def test_the_resolvable_margin_inverts_prompts_needed_and_the_plan_says_both():
    rate = 0.05
    for margin in (0.005, 0.01, 0.03):
        n = ni.prompts_needed(margin, rate)
        assert ni.resolvable_margin(n, rate) <= margin < ni.resolvable_margin(n - 1, rate) * 1.01
        assert ni.power_at(n, margin, rate) >= ni.POWER > ni.power_at(n - 1, margin, rate)
    plan = ni.plan(300, 0.01, rate)  # the case: 300 prompts, a 1% margin
    assert not plan.enough and plan.prompts_needed > 3000 and plan.power < 0.3
    assert plan.resolvable_margin == pytest.approx(ni.resolvable_margin(300, rate))
    assert 0.03 < plan.resolvable_margin < 0.04
    assert plan.to_json()["enough"] is False
    # fewer flips, fewer prompts: the no-flip case still needs its floor
    assert ni.prompts_needed(0.01, 0.01) < ni.prompts_needed(0.01, 0.05)


def test_discordance_counts_flips_with_a_floor_of_three_in_n():
    model, reference = _outcomes(5, 7, 100, 88)
    assert ni.discordance(model, reference) == pytest.approx(12 / 200)
    same = [1, 0] * 150
    assert ni.discordance(same, same) == pytest.approx(3 / 300)


def test_grouped_prompts_widen_the_interval_by_the_design_effect():
    rng = np.random.default_rng(3)
    reference = (rng.random(200) < 0.7).astype(int)
    model = reference.copy()
    flips = rng.choice(200, 20, replace=False)
    model[flips] = 1 - model[flips]
    # each prompt its own group: nothing changes
    alone = ni.noninferior(model, reference, 0.02, groups=list(range(200)))
    plain = ni.noninferior(model, reference, 0.02)
    assert alone.design_effect == pytest.approx(1.0)
    assert (alone.lower_bound, alone.upper_bound) == pytest.approx((plain.lower_bound, plain.upper_bound))
    assert alone.difference.clusters == 200 and plain.difference.clusters is None
    # every prompt asked 4 times within its group: 4x the prompts, no more information
    model4, reference4 = np.repeat(model, 4), np.repeat(reference, 4)
    grouped = ni.noninferior(model4, reference4, 0.02, groups=np.repeat(np.arange(200), 4))
    assert grouped.design_effect == pytest.approx(4.0, rel=0.02)
    assert grouped.lower_bound == pytest.approx(plain.lower_bound, abs=2e-4)
    assert grouped.prompts_needed == pytest.approx(4 * plain.prompts_needed, rel=0.02)
    ungrouped = ni.noninferior(model4, reference4, 0.02)
    assert ungrouped.lower_bound > grouped.lower_bound + 0.01  # ignoring groups overstates
    # one group: no evidence of spread between groups, so the prompts count as one
    assert ni.design_effect(model, reference, ["a"] * 200) == 200


def test_too_few_groups_are_flagged():
    assert stats.Interval(0.0, -1.0, 1.0, 400, clusters=24).too_few_units
    assert stats.Interval(0.0, -1.0, 1.0, 24).too_few_units  # 24 windows of one text
    assert not stats.Interval(0.0, -1.0, 1.0, 400).too_few_units
    assert not stats.Interval(0.0, -1.0, 1.0, 400, clusters=30).too_few_units


def test_the_table_in_choosing_sparsity_is_what_the_planner_computes():
    # docs/choosing-sparsity.md, "How many prompts a retention margin needs"
    table = {0.02: ([5131, 1397, 425, 225], [5.2, 2.5, 1.2, 0.7]),
             0.05: ([12438, 3162, 837, 400], [6.9, 3.5, 1.8, 1.0]),
             0.10: ([24763, 6215, 1578, 717], [8.8, 4.8, 2.5, 1.4])}
    for rate, (prompts, margins) in table.items():
        assert [ni.prompts_needed(m, rate) for m in (0.005, 0.01, 0.02, 0.03)] == prompts
        assert [round(100 * ni.resolvable_margin(n, rate), 1) for n in (100, 300, 1000, 3000)] == margins
    assert [ni.prompts_needed(0.008, rate) for rate in table] == [2103, 4902, 9693]
