"""The numerical core against the plain reference (tests/reference.py), element for element."""

import math

import pytest
import torch

from fapm_merge import core
from fapm_merge.core import selection
from fapm_merge.core import (
    FapmInputError,
    fapm_merge,
    fapm_scores,
    find_threshold,
    keep_count,
    keep_mask,
)

from reference import reference_fapm, reference_keep_count, reference_mask, reference_scores


def _pair(shape, seed=0, dtype=torch.float32, scale=0.02):
    generator = torch.Generator().manual_seed(seed)
    pre = torch.randn(shape, generator=generator) * scale
    ft = pre + torch.randn(shape, generator=generator) * scale * 0.1
    return pre.to(dtype), ft.to(dtype)


def _adversarial_pair(n=4096, dtype=torch.float32):
    """Zeros in W_pre, dW == 0 regions, both zero, repeated values (ties)."""
    pre, ft = _pair((n,), seed=3)
    pre[:300] = 0.0  # W_pre == 0 ...
    ft[:150] = 0.0  # ... with dW == 0 (0/0 in the reference script: NaN)
    ft[1000:1800] = pre[1000:1800]  # an untouched region
    pre[2000:2600] = 0.01  # equal |W_pre| and equal dW: many equal scores
    ft[2000:2600] = 0.012
    return pre.to(dtype), ft.to(dtype)


@pytest.mark.parametrize(
    "numel, sparsity, expected",
    [(1000, 0.9, 100), (1000, 0.7, 300), (10, 0.3, 7), (3, 0.5, 1), (7, 0.0, 7), (7, 1.0, 0)],
)
def test_keep_count_is_exact_without_float_drift(numel, sparsity, expected):
    # Regression: int(1000 * (1 - 0.9)) == 99 in the authors' script.
    assert keep_count(numel, sparsity=sparsity) == expected
    assert keep_count(numel, sparsity=sparsity) == reference_keep_count(numel, sparsity)


def test_density_is_the_complement_of_sparsity():
    for value in (0.1, 0.25, 0.33, 0.5, 0.9, 0.99):
        assert keep_count(12345, density=value) == keep_count(
            12345, sparsity=float(f"{1 - value:.10g}")
        )


def test_both_sparsity_and_density_is_an_error():
    with pytest.raises(FapmInputError, match="not both"):
        keep_count(10, sparsity=0.9, density=0.1)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_sparsity_outside_unit_interval_is_an_error(bad):
    with pytest.raises(FapmInputError, match="sparsity"):
        keep_count(10, sparsity=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("beta", [1.0, 0.5, 0.0])
def test_scores_equal_reference_bit_for_bit(dtype, beta):
    pre, ft = _adversarial_pair(dtype=dtype)
    scores = fapm_scores(pre, ft, beta=beta, chunk_elements=777).values
    expected = reference_scores(pre, ft, beta)
    assert scores.dtype == expected.dtype
    assert torch.equal(scores, expected)
    assert not scores.isnan().any()


def test_zero_delta_scores_zero_and_zero_base_scores_minus_inf():
    pre = torch.tensor([0.0, 0.0, 0.5, -0.5])
    ft = torch.tensor([0.0, 0.3, 0.5, -0.1])
    scores = fapm_scores(pre, ft).values
    assert scores[0] == 0.0 and scores[2] == 0.0  # dW == 0, with and without W_pre == 0
    assert scores[1] == -math.inf  # W_pre == 0, dW != 0
    assert torch.isfinite(scores[3])


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prune_matches_reference_on_adversarial_tensors(sparsity, dtype):
    pre, ft = _adversarial_pair(dtype=dtype)
    k = keep_count(pre.numel(), sparsity=sparsity)
    out = fapm_merge(pre, [ft], keep_counts=[k], chunk_elements=500)
    expected, mask = reference_fapm(pre, ft, sparsity)
    assert out.dtype == dtype
    assert torch.equal(out, expected)
    assert torch.equal(out[mask], ft[mask]) and torch.equal(out[~mask], pre[~mask])


def test_sampled_selection_path_matches_reference_with_heavy_ties():
    """Tensors above the direct-kthvalue size go through the sampled bracket."""
    n = selection._DIRECT_KTHVALUE_MAX * 3 + 17
    pre, ft = _pair((n,), seed=5)
    # quantised values: thousands of exactly equal scores around any threshold
    pre = (pre * 64).round() / 64
    ft = (ft * 64).round() / 64
    scores = fapm_scores(pre, ft).values
    assert torch.equal(scores, reference_scores(pre, ft))
    for sparsity in (0.5, 0.9, 0.999):
        k = keep_count(n, sparsity=sparsity)
        threshold = find_threshold(scores, k)
        mask = keep_mask(scores, threshold)
        assert int(mask.sum()) == k
        assert torch.equal(mask, reference_mask(scores, k))


def test_sampled_selection_with_periodic_layout():
    """Rows whose structure repeats with the sample stride must not fool the bracket."""
    rows, cols = 1024, 1024
    base_row = torch.linspace(-1, 1, cols)
    scores = base_row.repeat(rows) + torch.arange(rows).repeat_interleave(cols) * 1e-3
    for k in (1, 1000, scores.numel() // 2, scores.numel() - 1):
        mask = keep_mask(scores, find_threshold(scores, k))
        assert torch.equal(mask, reference_mask(scores, k))


def test_all_equal_scores_keep_the_lowest_flat_indices():
    scores = torch.zeros(1000)
    threshold = find_threshold(scores, 100)
    mask = keep_mask(scores, threshold, chunk_elements=64)
    assert threshold.above == 0 and threshold.ties_kept == 100
    assert mask[:100].all() and not mask[100:].any()


@pytest.mark.parametrize("chunk", [1, 63, 4096, None])
def test_result_does_not_depend_on_chunk_size(chunk):
    pre, ft = _adversarial_pair()
    expected, _ = reference_fapm(pre, ft, 0.9)
    k = keep_count(pre.numel(), sparsity=0.9)
    assert torch.equal(fapm_merge(pre, [ft], keep_counts=[k], chunk_elements=chunk), expected)


def test_sparsity_zero_returns_finetuned_and_one_returns_base():
    pre, ft = _pair((64, 48), dtype=torch.bfloat16)
    assert torch.equal(fapm_merge(pre, [ft], keep_counts=[pre.numel()]), ft)
    assert torch.equal(fapm_merge(pre, [ft], keep_counts=[0]), pre)


def test_inputs_are_never_modified():
    # Regression: `.to(float32)` on float32 inputs returned the input itself, and
    # in-place abs_/sub_ on it silently rewrote the caller's base and fine-tune.
    pre, ft = _adversarial_pair()
    pre_copy, ft_copy = pre.clone(), ft.clone()
    k = keep_count(pre.numel(), sparsity=0.9)
    fapm_merge(pre, [ft], keep_counts=[k])
    fapm_merge(pre, [ft, ft * 1.5], keep_counts=[k, k], weights=[0.3, 0.7], rescale=True)
    assert torch.equal(pre, pre_copy) and torch.equal(ft, ft_copy)


def test_several_models_weights_lambda_normalize_rescale_match_plain_formula():
    pre, ft_a = _pair((96, 64), seed=1)
    _, ft_b = _pair((96, 64), seed=2)
    ft_b = pre + (ft_b - pre) * -2.0
    sparsities, weights, lam = (0.9, 0.7), (0.6, 1.4), 0.8
    for normalize in (False, True):
        for rescale in (False, True):
            total = torch.zeros_like(pre)
            for ft, s, w in zip((ft_a, ft_b), sparsities, weights):
                delta = ft - pre
                _, mask = reference_fapm(pre, ft, s)
                kept = delta * mask
                if rescale:
                    kept = kept * (delta.abs().sum(dtype=torch.float64) / kept.abs().sum(dtype=torch.float64)).float()
                total += w * kept
            if normalize:
                total /= sum(weights)
            expected = pre + lam * total
            out = fapm_merge(
                pre,
                [ft_a, ft_b],
                keep_counts=[keep_count(pre.numel(), sparsity=s) for s in sparsities],
                weights=weights,
                lambda_=lam,
                normalize=normalize,
                rescale=rescale,
            )
            # float32 sums in another order: a few ulps apart, never more
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-8)


def test_nan_in_finetuned_is_refused_with_the_tensor_name():
    pre, ft = _pair((8, 8))
    ft[3, 3] = float("nan")
    with pytest.raises(FapmInputError, match="model.layers.0.mlp.up_proj.weight"):
        fapm_scores(pre, ft, name="model.layers.0.mlp.up_proj.weight")


def test_inf_in_base_is_refused():
    pre, ft = _pair((8, 8))
    pre[0, 0] = float("inf")
    with pytest.raises(FapmInputError, match="base"):
        fapm_scores(pre, ft, name="w")


def test_subnormal_delta_on_zero_base_scores_minus_inf_not_zero():
    # Regression (found by the property suite): with subnormal weights c*|dW|
    # underflows to 0, so 0/|W_pre| = 0/0 = NaN at W_pre == 0; the NaN was mapped
    # to 0 as if dW were 0, and the entry could be kept ahead of untouched ones.
    pre = torch.tensor([1.8367e-40, -0.0, -1.8367e-40, 9.1835e-41], dtype=torch.bfloat16)
    ft = torch.tensor([9.1835e-41, -9.1835e-41, -1.8367e-40, 9.1835e-41], dtype=torch.bfloat16)
    scores = fapm_scores(pre, ft).values
    assert scores[1] == -math.inf
    assert torch.equal(scores, reference_scores(pre, ft))
    expected, _ = reference_fapm(pre, ft, 0.1)
    assert torch.equal(fapm_merge(pre, [ft], keep_counts=[3]), expected)


def test_mean_abs_counts_every_block_of_a_tensor_past_one_row_reduction():
    # mean_abs reduces 4 blocks of MEAN_BLOCK_ELEMENTS per step; every real LLM
    # weight has more than 16, and the tests' other tensors fewer (a loop that
    # stopped after the first step went unnoticed by them).
    x = torch.randn(core.MEAN_BLOCK_ELEMENTS * 33 + 5, generator=torch.Generator().manual_seed(0))
    assert core.mean_abs(x) == pytest.approx(x.double().abs().mean().item(), rel=1e-12)


@pytest.mark.parametrize("models", [1, 2])
def test_keeping_nothing_with_rescale_returns_the_base(models):
    # k = 0 (sparsity 1.0): the L1 rescale factor must not divide by the kept
    # delta's zero norm; the output is the base, bit for bit.
    pre, ft = _pair((64, 48), seed=4)
    out = fapm_merge(pre, [ft] * models, keep_counts=[0] * models, rescale=True)
    assert torch.equal(out, pre)
