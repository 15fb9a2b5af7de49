"""Paired intervals over windows (and documents), against plain references on small cases.

The references enumerate the whole bootstrap distribution (every one of the n**n
equally likely resamples); nothing of scipy. The accuracy's interval (Tango's) is
tested in test_noninferiority.py.
"""

import itertools
import math

import numpy as np
import pytest

from fapm_merge.evaluation import noninferiority as ni
from fapm_merge.evaluation import stats


def exact_bootstrap_quantiles(statistic, columns, levels=(0.025, 0.975)):
    """Quantiles of the exact paired bootstrap distribution (all n**n resamples),
    with numpy's default (linear) interpolation between order statistics, as
    scipy's percentile method uses on its Monte Carlo sample."""
    n = len(columns[0])
    values = []
    for draw in itertools.product(range(n), repeat=n):
        values.append(statistic(*[[column[i] for i in draw] for column in columns]))
    values.sort()
    return [values[min(len(values) - 1, round(level * (len(values) - 1)))] for level in levels]


def mean(values):
    return sum(values) / len(values)


# Four windows: summed losses of the base, of the fine-tune (it forgot) and of a model
# that undoes most of that, and each window's token count.
BASE_LOSSES = [100.0, 110.0, 90.0, 105.0]
FINETUNED_LOSSES = [104.0, 113.0, 95.0, 108.0]
MODEL_LOSSES = [101.0, 111.0, 91.0, 106.0]
TOKENS = [40, 44, 36, 42]


def per_token_losses(*columns):
    """Each column's loss per token over the TOKENS windows."""
    total = sum(TOKENS)
    return [sum(column) / total for column in columns]


def reference_cf_reduction(model, finetuned, base, tokens):
    """CF % of the fine-tune minus CF % of the model, CF = exp(L - L_base) - 1."""
    return 100 * (math.exp((sum(finetuned) - sum(base)) / sum(tokens))
                  - math.exp((sum(model) - sum(base)) / sum(tokens)))


def test_loss_interval_matches_the_exact_paired_bootstrap_of_the_ratio():
    losses_model = [50.0, 61.0, 40.5, 70.0, 55.0]
    losses_reference = [48.0, 60.0, 41.0, 66.0, 54.0]
    tokens = [20, 24, 16, 28, 22]

    def difference(a, b, t):
        return sum(a) / sum(t) - sum(b) / sum(t)

    exact = exact_bootstrap_quantiles(difference, [losses_model, losses_reference, tokens],
                                      levels=(0.02, 0.025, 0.03, 0.97, 0.975, 0.98))
    got = stats.loss_difference(losses_model, losses_reference, tokens, resamples=40000)
    assert got.estimate == pytest.approx(difference(losses_model, losses_reference, tokens))
    assert exact[0] <= got.low <= exact[2]  # between the exact 2% and 3% quantiles
    assert exact[3] <= got.high <= exact[5]


def test_pairing_is_what_makes_the_interval_narrow():
    # Two models that agree on every prompt but two: unpaired, each accuracy alone
    # carries +-0.07 at n=200; paired, the difference is known to within a few prompts.
    rng = np.random.default_rng(1)
    reference = (rng.random(200) < 0.7).astype(int)
    model = reference.copy()
    model[np.flatnonzero(reference == 1)[:2]] = 0
    paired = ni.accuracy_difference_score(model, reference)  # Tango's paired score interval
    assert paired.estimate == pytest.approx(-0.01)
    assert paired.low < -0.01 < 0 < paired.high  # never of zero width, even on 2 discordant prompts
    unpaired_half_width = 1.96 * math.sqrt(0.7 * 0.3 / 200) * math.sqrt(2)
    assert paired.half_width < unpaired_half_width / 3


def test_cf_follows_its_definition():
    assert stats.cf_percent(math.log(1.05)) == pytest.approx(5.0)


def test_size_estimates_scale_as_one_over_n():
    interval = stats.Interval(-0.01, -0.03, 0.01, 100)  # half width 0.02 around -0.01
    assert stats.items_needed(interval, -0.01) == 400  # 100 * (0.02 / 0.01) ** 2
    assert stats.items_needed(interval, 0.0) is None


def test_mismatched_items_are_refused():
    with pytest.raises(ValueError, match="same prompts for both models: 3 vs 2"):
        ni.accuracy_difference_score([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="same windows"):
        stats.loss_difference([1.0, 2.0], [1.0, 2.0], [3])


def test_grouped_items_resample_whole_groups():
    # A document whose windows are copies of one window is one window: grouped, the
    # bootstrap draws exactly what it draws for the single windows (same seed).
    rng = np.random.default_rng(5)
    model, reference = rng.normal(60, 5, 40), rng.normal(58, 5, 40)
    tokens = rng.integers(20, 30, 40).astype(float)
    single = stats.loss_difference(model, reference, tokens)
    copies = [np.repeat(v, 3) for v in (model, reference, tokens)]
    documents = np.repeat(np.arange(40), 3)
    grouped = stats.loss_difference(*copies, groups=documents)
    assert (grouped.estimate, grouped.low, grouped.high) == pytest.approx(
        (single.estimate, single.low, single.high), rel=1e-12)
    assert (grouped.n, grouped.clusters, single.clusters) == (120, 40, None)
    assert stats.loss_difference(*copies).half_width < single.half_width * 0.7  # overconfident
    with pytest.raises(ValueError, match="one group id per item"):
        stats.loss_difference(model, reference, tokens, groups=[0, 1])


def test_grouped_share_matches_the_exact_bootstrap_over_documents():
    # two windows per document: the exact bootstrap over the 4 documents' sums
    base = [100.0, 110.0, 90.0, 105.0, 98.0, 101.0, 97.0, 103.0]
    finetuned = [104.0, 113.0, 95.0, 108.0, 103.0, 104.0, 99.0, 108.0]
    model = [101.0, 111.0, 91.0, 106.0, 100.0, 102.0, 98.0, 104.0]
    tokens = [40, 44, 36, 42, 40, 41, 39, 42]
    documents = ["d1", "d1", "d2", "d2", "d3", "d3", "d4", "d4"]
    sums = [[column[i] + column[i + 1] for i in range(0, 8, 2)] for column in (model, finetuned, base, tokens)]
    exact = exact_bootstrap_quantiles(reference_cf_reduction, sums, levels=(0.02, 0.025, 0.03, 0.97, 0.975, 0.98))
    got = stats.cf_reduction(model, finetuned, base, tokens, groups=documents, resamples=40000)
    assert got.estimate == pytest.approx(reference_cf_reduction(model, finetuned, base, tokens))
    slack = 1e-9  # the exact quantiles are sums in another order
    assert exact[0] - slack <= got.low <= exact[2] + slack
    assert exact[3] - slack <= got.high <= exact[5] + slack
    assert got.clusters == 4 and got.too_few_units


def test_repair_is_a_finite_cf_reduction_with_significance_checks():
    base, finetuned, model, tokens = BASE_LOSSES, FINETUNED_LOSSES, MODEL_LOSSES, TOKENS
    l_base, l_ft, l_model = per_token_losses(base, finetuned, model)
    cf_ft, cf_model = 100 * math.expm1(l_ft - l_base), 100 * math.expm1(l_model - l_base)
    result = stats.repair(model, finetuned, base, tokens)
    assert result.cf_reduction.estimate == pytest.approx(cf_ft - cf_model)
    assert result.finetuned_cf == pytest.approx(cf_ft)
    assert result.share == pytest.approx((cf_ft - cf_model) / cf_ft)
    assert result.loss_vs_finetuned == stats.loss_difference(model, finetuned, tokens)
    assert result.significant  # the model is below the fine-tune on every window
    assert result.to_json()["significant"] is True
    exact = exact_bootstrap_quantiles(reference_cf_reduction, [model, finetuned, base, tokens],
                                      levels=(0.02, 0.025, 0.03, 0.97, 0.975, 0.98))
    slack = 1e-9  # the exact quantiles are sums in another order
    assert exact[0] - slack <= result.cf_reduction.low <= exact[2] + slack
    assert exact[3] - slack <= result.cf_reduction.high <= exact[5] + slack
    forgetting = stats.forgetting(finetuned, base, tokens)
    assert forgetting.cf.estimate == pytest.approx(cf_ft) and forgetting.significant


def test_repair_of_doubtful_forgetting_has_a_finite_interval():
    # forgetting that is not there (the fine-tune is above the base on some windows and
    # below on others): a ratio to it would run to infinity, the CF reduction does not
    rng = np.random.default_rng(11)
    base = rng.normal(100, 3, 24)
    finetuned = base + np.tile([3.0, -2.5], 12) + rng.normal(0, 0.1, 24)
    model = finetuned - 0.5 + rng.normal(0, 0.3, 24)
    tokens = np.full(24, 40.0)
    forgetting = stats.forgetting(finetuned, base, tokens)
    assert forgetting.cf.estimate > 0 and not forgetting.significant
    result = stats.repair(model, finetuned, base, tokens)
    assert math.isfinite(result.cf_reduction.low) and math.isfinite(result.cf_reduction.high)
    assert result.cf_reduction.low > 0 and result.significant  # it does lower the loss
    # a model that repairs nothing measurable is not significant
    noise = stats.repair(finetuned + rng.normal(0, 2, 24), finetuned, base, tokens)
    assert not noise.significant


def test_resampling_documents_restores_the_coverage_that_correlated_windows_break():
    # 40 documents of 5 windows; the models' difference varies mostly between documents
    # (one text is harder for the variant than another): windows of a document are not
    # independent, and the window bootstrap covers the true difference (0) far too rarely
    rng = np.random.default_rng(8)
    documents = np.repeat(np.arange(40), 5)
    tokens = np.full(200, 100.0)
    covered = {"windows": 0, "documents": 0}
    runs = 200
    for _ in range(runs):
        difference = np.repeat(rng.normal(0, 1.0, 40), 5) + rng.normal(0, 0.5, 200)
        reference = rng.normal(250, 10, 200)
        model = reference + difference
        for name, groups in (("windows", None), ("documents", documents)):
            interval = stats.loss_difference(model, reference, tokens, groups=groups, resamples=999)
            covered[name] += interval.low <= 0 <= interval.high
    assert covered["windows"] / runs < 0.8
    assert covered["documents"] / runs >= 0.9


def test_the_studentized_loss_difference_is_the_plain_ratio_interval_over_documents():
    """``method="t"`` against a plainly written reference: the ratio estimator's linearized
    standard error over documents and Student's t with n - 1 degrees of freedom."""
    from scipy import stats as scipy_stats

    documents = [0, 0, 1, 2, 2, 2, 3, 4, 4]
    tokens = [50, 70, 64, 30, 30, 40, 90, 60, 61]
    reference = [150.0, 210.5, 190.0, 91.0, 88.5, 121.0, 270.0, 181.0, 180.0]
    model = [149.0, 209.0, 191.5, 90.0, 88.0, 119.0, 268.5, 181.5, 178.0]
    interval = stats.loss_difference(model, reference, tokens, groups=documents, confidence=0.9, method="t")
    sums = {}
    for d, a, b, t in zip(documents, model, reference, tokens):
        sa, sb, st = sums.get(d, (0.0, 0.0, 0))
        sums[d] = (sa + a, sb + b, st + t)
    total_tokens = sum(st for _, _, st in sums.values())
    estimate = (sum(sa for sa, _, _ in sums.values()) - sum(sb for _, sb, _ in sums.values())) / total_tokens
    n = len(sums)
    residuals = [(sa - sb) - estimate * st for sa, sb, st in sums.values()]
    error = math.sqrt(n / (n - 1) * sum(r * r for r in residuals)) / total_tokens
    quantile = scipy_stats.t.ppf(0.95, n - 1)
    assert interval.estimate == pytest.approx(estimate, abs=1e-15)
    assert (interval.low, interval.high) == (pytest.approx(estimate - quantile * error, abs=1e-13),
                                             pytest.approx(estimate + quantile * error, abs=1e-13))
    assert (interval.n, interval.clusters) == (9, 5)
    # identical models: no spread; one document: nothing known
    same = stats.loss_difference(reference, reference, tokens, groups=documents, method="t")
    assert (same.low, same.high) == (0.0, 0.0)
    alone = stats.loss_difference(model, reference, tokens, groups=[0] * 9, method="t")
    assert (alone.low, alone.high) == (-math.inf, math.inf)
    with pytest.raises(ValueError, match="'bootstrap' or 't'"):
        stats.loss_difference(model, reference, tokens, method="bca")


def test_on_few_documents_the_studentized_bound_keeps_its_level_where_the_percentile_bootstrap_did_not():
    """Regression (issue 23): tune's screening share holds ~11 documents, and rule (b) put a
    candidate out when the one-sided 99% bound of its loss difference to the leader lay above
    0. With the percentile cluster bootstrap that bound was crossed about 3% of the time
    under no difference at all (the replication's own documents: about 2%), not 1%; the
    studentized interval stays near its level."""
    rng = np.random.default_rng(7)
    crossed = {"t": 0, "bootstrap": 0}
    trials = 2000
    for _ in range(trials):
        documents = np.repeat(np.arange(11), rng.integers(1, 5, 11))
        tokens = rng.integers(40, 120, len(documents)).astype(float)
        shift = rng.standard_t(5, 11) * 0.01  # per document, mean 0: no difference
        reference = tokens * 3.0
        model = reference + tokens * shift[documents]
        for method in crossed:
            interval = stats.loss_difference(model, reference, tokens, groups=documents.tolist(),
                                             confidence=0.98, method=method, resamples=2000)
            crossed[method] += interval.low > 0
    rates = {method: count / trials for method, count in crossed.items()}
    assert rates["bootstrap"] > 0.025
    assert rates["t"] < 0.02 and rates["t"] < rates["bootstrap"] / 2
