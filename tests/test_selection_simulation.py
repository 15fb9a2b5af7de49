"""Proof that the non-inferiority criterion keeps its promise where the point rule does not.

Over seeded simulated sweeps with known truth (tests/sweep_simulation.py), the rule
"among variants whose one-sided 95% lower bound of the paired accuracy difference clears
-(1 - min_retention) * acc_ft and whose repair is significant, the most repair" picks a
variant that truly keeps less than ``min_retention`` in at most 5% of the runs; the
point rule ("retention >= 0.99 on the point estimate, no significant McNemar drop, less
loss than the fine-tune, then the most repair", the rule of issue 21's audit) in far more.
"""

import numpy as np
import pytest

from fapm_merge.evaluation import noninferiority as ni
from fapm_merge.evaluation import stats
from sweep_simulation import Truth, evaluate, simulate, wrong_pick_rate

MIN_RETENTION = 0.99
RUNS = 300


def mean_losses(losses, tokens):
    return losses.sum(axis=-1) / tokens.sum()


def mcnemar_drop_pvalue(model, reference):
    """The exact one-sided McNemar test the old rule used: "the model answers worse"."""
    from scipy.stats import binomtest

    worse = int(((reference == 1) & (model == 0)).sum())
    better = int(((reference == 0) & (model == 1)).sum())
    return 1.0 if worse + better == 0 else binomtest(worse, worse + better, 0.5, alternative="greater").pvalue


def point_rule(sweep):
    acc_ft = sweep.finetuned_correct.mean()
    retention = sweep.variant_correct.mean(axis=1) / acc_ft
    loss = mean_losses(sweep.variant_losses, sweep.tokens)
    loss_ft = mean_losses(sweep.finetuned_losses, sweep.tokens)
    qualified = [k for k in range(len(retention))
                 if retention[k] >= MIN_RETENTION and loss[k] < loss_ft
                 and mcnemar_drop_pvalue(sweep.variant_correct[k], sweep.finetuned_correct)
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


# --------------------------------------------------------------------------- the product's rule
# The same question asked of the package itself: the simulated sweeps become eval records,
# `compute_tradeoff` decides with the default rule, and `confirm` reports the pick's numbers
# from an independent draw (the held-out part), as tune does.

from fapm_merge.evaluation.results import PER_ITEM  # noqa: E402
from fapm_merge.workflows.tradeoff import Rule, compute_tradeoff, confirm  # noqa: E402

PRODUCT_RUNS = 200
BASE_PATH, FT_PATH = "/sim/base", "/sim/finetuned"


def _record(model, correct, losses, tokens):
    correct = np.asarray(correct)
    return {"model": model, "name": model.rsplit("/", 1)[1],
            "recipe": None if model in (BASE_PATH, FT_PATH) else {
                "merge_method": "fapm", "base_model": BASE_PATH,
                "models": [{"model": FT_PATH, "parameters": {"sparsity": int(model[-1]) / 10 + 0.05}}]},
            "metrics": {"task": {"accuracy": float(correct.mean()), "examples": len(correct),
                                 PER_ITEM: {"correct": "".join(map(str, correct.tolist()))}},
                        "text": {"loss": float(losses.sum() / tokens.sum()), "windows": len(tokens),
                                 PER_ITEM: {"window_loss": losses.tolist(),
                                            "window_tokens": tokens.astype(int).tolist()}}}}


def _records(sweep, variants=None):
    zero = np.zeros_like(sweep.finetuned_correct)  # the base answers nothing (as in the replication)
    records = [_record(BASE_PATH, zero, sweep.base_losses, sweep.tokens),
               _record(FT_PATH, sweep.finetuned_correct, sweep.finetuned_losses, sweep.tokens)]
    for k in range(len(sweep.variant_correct)) if variants is None else variants:
        records.append(_record(f"/sim/v{k}", sweep.variant_correct[k], sweep.variant_losses[k], sweep.tokens))
    return records


def _true_cf_cut(truth, k):
    # CF% from mean token losses: the fine-tune F above the base, the variant F (1 - r_k)
    return 100 * (np.exp(truth.forgetting) - np.exp(truth.forgetting * (1 - truth.repair[k])))


def _product_runs(truth, runs, seed):
    """(pick, confirmation or None) per run: selection on one draw, confirmation on another."""
    held_out = simulate(truth, runs, seed + 1000)
    for sweep, other in zip(simulate(truth, runs, seed), held_out):
        result = compute_tradeoff(_records(sweep), base=BASE_PATH, finetuned=FT_PATH,
                                  rule=Rule(min_retention=MIN_RETENTION))
        if result.selected is None:
            yield -1, None
            continue
        k = int(result.selected.model[-1])
        yield k, confirm(result, _records(other, [k]))


@pytest.mark.slow  # 200 decisions with bootstraps: about a minute
def test_the_default_rule_keeps_its_promise_and_its_published_numbers_cover_the_truth():
    """Issue 21's proof, through the package: over 200 simulated sweeps the default rule's
    pick truly keeps less than the retention bound in at most 5% of the runs, and the
    intervals it publishes (from the held-out draw) cover the pick's true accuracy
    difference and true CF cut in at least 90% of the runs."""
    truth = Truth()
    outcomes = list(_product_runs(truth, PRODUCT_RUNS, seed=7))
    chosen = np.array([k for k, _ in outcomes])
    assert wrong_pick_rate(chosen, truth, MIN_RETENTION) <= 0.05
    assert (chosen >= 0).mean() > 0.5  # it decides, most of the time
    covered_accuracy, covered_repair = [], []
    for k, confirmation in outcomes:
        if confirmation is None:
            continue
        difference = confirmation.noninferiority.difference
        truth_difference = (truth.retention[k] - 1) * truth.accuracy_finetuned
        covered_accuracy.append(difference.low <= truth_difference <= difference.high)
        cut = confirmation.repair.cf_reduction
        covered_repair.append(cut.low <= _true_cf_cut(truth, k) <= cut.high)
    assert np.mean(covered_accuracy) >= 0.90
    assert np.mean(covered_repair) >= 0.90


def test_numbers_from_the_data_that_chose_overstate_the_pick():
    """The winner's curse the held-out part removes: among five variants that all truly
    take away 30% of the forgetting, the one that measures best reports more on the
    data that chose it (its mean loss cut lies well above the truth), while the same
    variant measured on an independent draw is centred on the truth."""
    truth = Truth(retention=(1.0,) * 5, discordance=(0.01,) * 5, repair=(0.3,) * 5,
                  noise_sd=0.05)
    true_cut = truth.forgetting * 0.3  # L_ft - L_variant, mean token loss
    selection, held_out = [], []
    for sweep, other in zip(simulate(truth, 200, seed=3), simulate(truth, 200, seed=1003)):
        k = int(np.argmin(sweep.variant_losses.sum(axis=1)))  # the most repair measured
        for data, out in ((sweep, selection), (other, held_out)):
            out.append((data.finetuned_losses.sum() - data.variant_losses[k].sum()) / data.tokens.sum())
    error = np.std(held_out) / np.sqrt(len(held_out))  # standard error of a mean over runs
    assert np.mean(selection) > true_cut + 4 * error
    assert abs(np.mean(held_out) - true_cut) < 3 * error
