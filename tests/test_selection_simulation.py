"""Proof that the non-inferiority criterion keeps its promise where the point rule does not.

Over seeded simulated sweeps with known truth (tests/sweep_simulation.py), the rule
"among variants whose one-sided 95% lower bound of the paired accuracy difference clears
-(1 - min_retention) * acc_ft and whose repair is significant, the most repair" picks a
variant that truly keeps less than ``min_retention`` in at most 5% of the runs; the
point rule ("retention >= 0.99 on the point estimate, no significant McNemar drop, less
loss than the fine-tune, then the most repair", the rule of issue 21's audit) in far more.
"""

import numpy as np

from fapm_merge.evaluation import noninferiority as ni
from fapm_merge.evaluation import stats
from sweep_simulation import Truth, evaluate, simulate, wrong_pick_rate

MIN_RETENTION = 0.99
RUNS = 300


def mean_losses(losses, tokens):
    return losses.sum(axis=-1) / tokens.sum()


def point_rule(sweep):
    acc_ft = sweep.finetuned_correct.mean()
    retention = sweep.variant_correct.mean(axis=1) / acc_ft
    loss = mean_losses(sweep.variant_losses, sweep.tokens)
    loss_ft = mean_losses(sweep.finetuned_losses, sweep.tokens)
    qualified = [k for k in range(len(retention))
                 if retention[k] >= MIN_RETENTION and loss[k] < loss_ft
                 and stats.accuracy_drop_pvalue(sweep.variant_correct[k], sweep.finetuned_correct)
                 >= 1 - stats.CONFIDENCE]
    return max(qualified, key=lambda k: -loss[k]) if qualified else None


def noninferiority_rule(sweep):
    forgetting = stats.forgetting(sweep.finetuned_losses, sweep.base_losses, sweep.tokens)
    if not forgetting.significant:
        return None
    acc_ft = sweep.finetuned_correct.mean()
    margin = (1 - MIN_RETENTION) * acc_ft
    gain = ((sweep.variant_correct == 1) & (sweep.finetuned_correct == 0)).sum(axis=1)
    loss = ((sweep.variant_correct == 0) & (sweep.finetuned_correct == 1)).sum(axis=1)
    lower, _ = ni.tango_interval(gain, loss, sweep.finetuned_correct.size, one_sided=True)
    # most repair first; the first whose repair is significant wins (bootstraps only as
    # many candidates as needed)
    repaired = mean_losses(sweep.finetuned_losses, sweep.tokens) - mean_losses(sweep.variant_losses, sweep.tokens)
    for k in sorted(np.flatnonzero(lower > -margin), key=lambda k: -repaired[k]):
        result = stats.repair(sweep.variant_losses[k], sweep.finetuned_losses, sweep.base_losses,
                              sweep.tokens, resamples=999)
        if result.significant:
            return int(k)
    return None


def test_noninferiority_bounds_the_wrong_picks_where_the_point_rule_does_not():
    truth = Truth()
    chosen_ni = evaluate(noninferiority_rule, truth, runs=RUNS, seed=21)
    chosen_point = evaluate(point_rule, truth, runs=RUNS, seed=21)
    assert wrong_pick_rate(chosen_ni, truth, MIN_RETENTION) <= 0.05
    assert wrong_pick_rate(chosen_point, truth, MIN_RETENTION) > 0.05
    # not by refusing to choose: it picks a variant in most runs
    assert (chosen_ni >= 0).mean() > 0.5


def test_the_simulation_draws_the_truth_it_is_given():
    truth = Truth(prompts=4000, windows=200)
    sweeps = list(simulate(truth, runs=20, seed=1))
    acc_ft = np.mean([s.finetuned_correct.mean() for s in sweeps])
    retention = np.mean([s.variant_correct.mean(axis=1) for s in sweeps], axis=0) / acc_ft
    flips = np.mean([(s.variant_correct != s.finetuned_correct).mean(axis=1) for s in sweeps], axis=0)
    assert abs(acc_ft - truth.accuracy_finetuned) < 0.005
    assert np.allclose(retention, truth.retention, atol=0.003)
    assert np.allclose(flips, truth.discordance, atol=0.003)
    repaired = np.mean([(mean_losses(s.finetuned_losses, s.tokens) - mean_losses(s.variant_losses, s.tokens))
                        / (mean_losses(s.finetuned_losses, s.tokens) - mean_losses(s.base_losses, s.tokens))
                        for s in sweeps], axis=0)
    assert np.allclose(repaired, truth.repair, atol=0.02)
