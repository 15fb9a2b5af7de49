"""Property/fuzz suite of the FAPM core (issue 8, item 6), driven by hypothesis.

Random shapes (zero-size included), dtypes fp32/fp16/bf16 (also mixed), sparsities
and extreme values: subnormals, very large values, all-equal tensors, an all-zero
W_pre, exact zeros in dW. Every example checks the definition, not a snapshot:

* exactly k = floor((1 - sparsity) * numel) entries are kept (mask count);
* kept entries equal W_ft and pruned entries equal W_pre bit for bit, so the
  output is finite whenever the inputs are, and has the promoted input dtype;
* the mask agrees with the plain reference (tests/reference.py);
* masks are nested: a higher sparsity keeps a subset of what a lower one keeps;
* the result does not depend on chunk_elements.
"""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from fapm_merge import core
from fapm_merge.core import selection
from helpers import bits
from reference import reference_keep_count, reference_mask, reference_scores

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# Magnitudes per dtype that keep W_ft - W_pre finite in the compute dtype (float32):
# "large" is near the top of each dtype's range, "tiny" is subnormal in each.
LARGE = {torch.float32: 1e30, torch.float16: 6e4, torch.bfloat16: 1e30, torch.float64: 1e300}
TINY = {torch.float32: 1e-42, torch.float16: 1e-7, torch.bfloat16: 1e-40, torch.float64: 1e-310}


@st.composite
def pairs(draw, dtypes=DTYPES):
    """(W_pre, W_ft) with a drawn shape, dtypes and value regime."""
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=1, max_size=3)))
    pre_dtype = draw(st.sampled_from(dtypes))
    ft_dtype = draw(st.sampled_from(dtypes + (pre_dtype,) * 3))  # mostly the same
    regime = draw(st.sampled_from(
        ["normal", "tiny", "large", "all_equal", "zero_pre", "sparse_delta", "ties"]
    ))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = {"tiny": TINY, "large": LARGE}.get(regime, {}).get(pre_dtype, 0.02)
    wide = torch.float64 if torch.float64 in (pre_dtype, ft_dtype) else torch.float32
    pre = torch.randn(shape, generator=gen, dtype=wide) * scale
    delta = torch.randn(shape, generator=gen, dtype=wide) * scale * 0.5
    if regime == "all_equal":
        pre = torch.full(shape, 0.25)
        delta = torch.full(shape, 0.01)
    elif regime == "zero_pre":
        pre = torch.zeros(shape)
    elif regime == "sparse_delta":
        delta = delta * (torch.rand(shape, generator=gen) < 0.3)
    elif regime == "ties":  # few distinct values: many equal scores at the threshold
        pre = torch.randint(-2, 3, shape, generator=gen) * 0.5
        delta = torch.randint(-1, 2, shape, generator=gen) * 0.25
    pre = pre.to(pre_dtype)
    ft = (pre.to(wide) + delta.to(wide)).to(ft_dtype)
    assume(bool(torch.isfinite(pre).all() and torch.isfinite(ft).all()))
    return pre, ft


sparsities = st.one_of(
    st.sampled_from([0.0, 0.1, 0.5, 0.9, 0.99, 1.0]),
    st.floats(0.0, 1.0, allow_nan=False),
)


def merge(pre, ft, sparsity, chunk=None):
    k = core.keep_count(pre.numel(), sparsity=sparsity)
    out = core.fapm_merge(pre, [ft], keep_counts=[k], chunk_elements=chunk, name="t")
    return out, k


def core_mask(pre, ft, sparsity, chunk=None):
    scores = core.fapm_scores(pre, ft, chunk_elements=chunk)
    k = core.keep_count(pre.numel(), sparsity=sparsity)
    threshold = core.find_threshold(scores.values, k, chunk_elements=chunk)
    return core.keep_mask(scores.values, threshold, chunk_elements=chunk), k


@SETTINGS
@given(pairs(), sparsities)
def test_exact_count_and_bitwise_selection(pair, sparsity):
    pre, ft = pair
    out, k = merge(pre, ft, sparsity)
    dtype = torch.promote_types(pre.dtype, ft.dtype)
    assert out.dtype == dtype and out.shape == pre.shape
    # Exact rational definition; reference_keep_count's Decimal (28 digits) rounds
    # 1 - 3.6e-185 up to 1 and would keep one entry too many (found by this test).
    assert k == math.floor((1 - Fraction(repr(float(sparsity)))) * pre.numel())
    if sparsity == 0 or sparsity > 1e-20:
        assert k == reference_keep_count(pre.numel(), sparsity)
    mask, _ = core_mask(pre, ft, sparsity)
    assert int(mask.sum()) == k
    flat_out = out.reshape(-1)
    assert torch.equal(bits(flat_out[mask]), bits(ft.to(dtype).reshape(-1)[mask]))
    assert torch.equal(bits(flat_out[~mask]), bits(pre.to(dtype).reshape(-1)[~mask]))
    assert bool(torch.isfinite(out).all())


@SETTINGS
@given(pairs(), sparsities)
# Regression (found by this test, fixed in core da6a5d5): c*|dW| underflowed to 0
# for subnormal bf16 inputs, so W_pre == 0 with dW != 0 scored 0 instead of -inf.
@example(pair=(
    torch.tensor([1.8367e-40, -0.0, -1.8367e-40, 9.1835e-41]).to(torch.bfloat16),
    torch.tensor([9.1835e-41, -9.1835e-41, -1.8367e-40, 9.1835e-41]).to(torch.bfloat16),
), sparsity=0.1)
def test_mask_matches_plain_reference(pair, sparsity):
    pre, ft = pair
    mask, k = core_mask(pre, ft, sparsity)
    expected = reference_mask(reference_scores(pre, ft), k)
    assert torch.equal(mask, expected)


@SETTINGS
@given(pairs(), st.lists(sparsities, min_size=2, max_size=4))
def test_masks_are_nested_as_sparsity_grows(pair, values):
    pre, ft = pair
    masks = [core_mask(pre, ft, s)[0] for s in sorted(values)]
    for looser, stricter in zip(masks, masks[1:]):
        assert not bool((stricter & ~looser).any())


@SETTINGS
@given(pairs(), sparsities, st.sampled_from([1, 2, 3, 7, 64]))
def test_result_independent_of_chunk_elements(pair, sparsity, chunk):
    pre, ft = pair
    reference, _ = merge(pre, ft, sparsity)
    chunked, _ = merge(pre, ft, sparsity, chunk=chunk)
    assert torch.equal(bits(reference), bits(chunked))


@SETTINGS
@given(
    pairs(dtypes=DTYPES + (torch.float64,)),
    sparsities,
    st.sampled_from([0.0, 0.5, 1.0]),
    st.sampled_from([None, 5, 64]),
)
def test_large_tensor_selection_paths_match_the_reference(pair, sparsity, beta, chunk):
    """The sampled bracket, the gathered band, the exact bisection fallback and the
    fused score+count pass start at 262,144 entries; with their thresholds shrunk,
    the drawn small inputs (ties, zeros, subnormals, float64, beta 0) go through
    them and must still give the plain reference's output bit for bit."""
    pre, ft = pair
    k = core.keep_count(pre.numel(), sparsity=sparsity)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(selection, "_DIRECT_KTHVALUE_MAX", 16)
        patch.setattr(selection, "_SAMPLE_MIN", 8)
        patch.setattr(selection, "_SAMPLE_SIZE", 32)
        patch.setattr(selection, "_BAND_MIN_LIMIT", 8)
        out = core.fapm_merge(pre, [ft], keep_counts=[k], beta=beta, chunk_elements=chunk)
    dtype = torch.promote_types(pre.dtype, ft.dtype)
    mask = reference_mask(reference_scores(pre, ft, beta), k).view(pre.shape)
    expected = torch.where(mask, ft.to(dtype), pre.to(dtype))
    assert torch.equal(bits(out), bits(expected))


@SETTINGS
@given(pairs())
def test_identical_models_give_the_base(pair):
    pre, _ = pair
    out, _ = merge(pre, pre.clone(), 0.5)
    assert torch.equal(bits(out), bits(pre))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overflowing_delta_is_refused_with_the_tensor_name(dtype):
    # W_ft - W_pre overflows float32 although both are finite: the core refuses
    # (naming the tensor) rather than ranking by an infinite score.
    pre = torch.tensor([-3e38, 1.0, 2.0]).to(dtype)
    ft = torch.tensor([3e38, 1.0, 2.5]).to(dtype)
    with pytest.raises(core.FapmInputError, match="'blk.w'.*overflows"):
        core.fapm_merge(pre, [ft], keep_counts=[1], name="blk.w")


@pytest.mark.parametrize("where", ["pre", "ft"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_is_refused_with_the_tensor_name(where, bad):
    pre, ft = torch.randn(4, 5), torch.randn(4, 5)
    (pre if where == "pre" else ft)[2, 3] = bad
    label = r"base \(pre-trained\)" if where == "pre" else "fine-tuned"
    with pytest.raises(core.FapmInputError, match=f"{label} weight holds NaN or Inf in tensor 'x.w'"):
        core.fapm_merge(pre, [ft], keep_counts=[3], name="x.w")
