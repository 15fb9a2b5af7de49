"""fapm_ties against the plain reference (tests/reference_ties.py): several models
whose task vectors disagree in sign, both election rules, int8 masks, weights,
normalize and lambda, density_rescale; then a whole model through run_merge."""

import pytest
import torch
from pydantic import ValidationError

import fapm_merge.methods  # noqa: F401  (registers fapm and fapm_ties)
from helpers import load_state, run_merge_in_process
from fapm_merge.core import FapmInputError
from mergekit.merge_methods import merge_tensors
from recipe_support import build_family
from reference_ties import reference_fapm_ties

IDS = ["base", "a", "b", "c"]


def merge(pre, finetuned, **parameters):
    ids = IDS[: len(finetuned) + 1]
    return merge_tensors([pre, *finetuned], "fapm_ties", ids=ids, base_index=0,
                         parameters=parameters, name="t")


def per_model(values):
    return dict(zip(IDS[1:], values))


@pytest.fixture(scope="module")
def conflicting():
    """Three task vectors with many sign conflicts, zeros in W_pre and dW == 0 areas."""
    generator = torch.Generator().manual_seed(5)
    pre = torch.randn(48, 40, generator=generator) * 0.02
    pre[:3] = 0.0  # W_pre == 0: FAPM scores -inf there
    finetuned = []
    for sign in (1.0, -1.0, 1.0):
        delta = torch.randn(48, 40, generator=generator) * 0.01
        delta[:, :5] = sign * delta[:, :5].abs()  # clear sign conflicts
        delta[-4:] = 0.0  # an untouched region
        finetuned.append(pre + delta)
    return pre, finetuned


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("int8_mask", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference(conflicting, consensus, int8_mask, normalize):
    pre, finetuned = conflicting
    sparsities, weights = [0.5, 0.7, 0.2], [1.0, 0.5, 2.0]
    out = merge(pre, finetuned, sparsity=per_model(sparsities), weight=per_model(weights),
                consensus=consensus, int8_mask=int8_mask, normalize=normalize, **{"lambda": 0.8})
    expected = reference_fapm_ties(pre, finetuned, sparsities, weights, lambda_=0.8,
                                   normalize=normalize, consensus=consensus)
    assert torch.equal(out, expected)


def test_sum_and_count_elect_differently_where_they_should():
    # Two small positive deltas against one large negative: "sum" elects -, "count" +.
    pre = torch.full((4,), 0.5)
    finetuned = [pre + torch.tensor([0.1, 0.1, 0.1, 0.1]),
                 pre + torch.tensor([0.1, 0.1, 0.1, 0.1]),
                 pre + torch.tensor([-0.5, -0.5, -0.5, -0.5])]
    dense = dict(sparsity=per_model([0.0, 0.0, 0.0]))
    by_sum = merge(pre, finetuned, consensus="sum", **dense)
    by_count = merge(pre, finetuned, consensus="count", **dense)
    torch.testing.assert_close(by_sum, pre - 0.5)  # only the agreeing -0.5, mean of one
    torch.testing.assert_close(by_count, pre + 0.1)  # mean of the two agreeing +0.1
    assert merge(pre, finetuned, **dense).equal(by_sum), "sum is the default"


def test_each_model_is_pruned_with_its_own_fapm_mask():
    # Model a keeps only its best-scored entry, b keeps all: a's other deltas vanish.
    pre = torch.tensor([1.0, 1.0, 1.0, 1.0])
    a = pre + torch.tensor([0.4, 0.3, 0.2, 0.1])
    b = pre + torch.tensor([0.0, 0.0, 0.0, 0.2])
    out = merge(pre, [a, b], sparsity=per_model([0.75, 0.0]))
    torch.testing.assert_close(out, torch.tensor([1.4, 1.0, 1.0, 1.2]))


def test_density_is_the_other_spelling_and_density_rescale_scales_by_its_inverse(conflicting):
    pre, finetuned = conflicting
    weights = [0.6, 0.4, 1.0]
    out = merge(pre, finetuned, density=per_model([0.3, 0.5, 0.25]), weight=per_model(weights),
                density_rescale=True, normalize=False)
    expected = reference_fapm_ties(pre, finetuned, [0.7, 0.5, 0.75], weights,
                                   normalize=False, density_rescale=True)
    # 1/density and the weight are applied in a different order here and in the
    # kernel: a few ulp apart, while a wrong mask or factor is off by ~1e-2.
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    plain = merge(pre, finetuned, density=per_model([0.3, 0.5, 0.25]), weight=per_model(weights),
                  normalize=False)
    assert not torch.equal(out, plain)


def test_rescale_and_density_rescale_together_is_a_clear_error(conflicting):
    pre, finetuned = conflicting
    with pytest.raises(FapmInputError, match="not both"):
        merge(pre, finetuned, rescale=True, density_rescale=True)


def test_bf16_inputs_keep_their_dtype(conflicting):
    pre, finetuned = conflicting
    pre16, ft16 = pre.bfloat16(), [t.bfloat16() for t in finetuned]
    out = merge(pre16, ft16, sparsity=per_model([0.9, 0.9, 0.9]))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference_fapm_ties(pre16, ft16, [0.9, 0.9, 0.9]))


def test_unknown_consensus_is_refused(conflicting):
    pre, finetuned = conflicting
    with pytest.raises(ValidationError, match=r"Input should be 'sum' or 'count'"):
        merge(pre, finetuned, consensus="median")


def test_whole_model_through_run_merge(tmp_path):
    """Three tiny Llama fine-tunes, per-model sparsity and weight, every tensor."""
    base, finetunes = build_family(tmp_path / "family", size=3)
    sparsities, weights = [0.9, 0.8, 0.95], [1.0, 0.5, 1.5]
    config = {
        "merge_method": "fapm_ties",
        "base_model": str(base),
        "models": [
            {"model": str(path), "parameters": {"sparsity": s, "weight": w}}
            for path, s, w in zip(finetunes, sparsities, weights)
        ],
        "parameters": {"consensus": "count", "int8_mask": True, "lambda": 1.2},
        "dtype": "float32",
    }
    run_merge_in_process(config, tmp_path / "out")
    written, pre = load_state(tmp_path / "out"), load_state(base)
    inputs = [load_state(path) for path in finetunes]
    conflicts = 0
    for name, tensor in written.items():
        deltas = [state[name] - pre[name] for state in inputs]
        conflicts += int(((deltas[0] > 0) & (deltas[1] < 0)).sum())
        expected = reference_fapm_ties(pre[name], [s[name] for s in inputs], sparsities, weights,
                                       lambda_=1.2, consensus="count")
        assert torch.equal(tensor, expected), name
    assert conflicts > 1000, "the family must disagree in sign for this test to mean much"


@pytest.mark.parametrize("normalize", [True, False])
def test_fapm_density_rescale_divides_by_density_not_the_normalisation(conflicting, normalize):
    """fapm (no election): W_pre + lambda * sum(w_i * d_i / density_i) / [sum(w_i)]."""
    from reference_ties import reference_pruned_delta

    pre, finetuned = conflicting
    densities, weights = [0.3, 0.5, 0.25], [0.6, 0.4, 1.0]
    out = merge_tensors([pre, *finetuned], "fapm", ids=IDS, base_index=0, parameters={
        "density": per_model(densities), "weight": per_model(weights), "lambda": 0.9,
        "normalize": normalize, "density_rescale": True})
    total = sum(w / d * reference_pruned_delta(pre, ft, 1.0 - d)
                for ft, d, w in zip(finetuned, densities, weights))
    expected = pre + 0.9 * total / (sum(weights) if normalize else 1.0)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-8)  # ulp of |W| ~ 0.03
    without = merge_tensors([pre, *finetuned], "fapm", ids=IDS, base_index=0, parameters={
        "density": per_model(densities), "weight": per_model(weights), "lambda": 0.9,
        "normalize": normalize})
    assert not torch.allclose(out, without)


@pytest.mark.parametrize("method", ["fapm", "fapm_ties"])
def test_density_rescale_with_a_model_at_density_zero_keeps_nothing_of_it(conflicting, method):
    # 1/density is undefined at density 0: that model keeps nothing and adds nothing,
    # without an error, and the others are rescaled as usual.
    pre, finetuned = conflicting
    ids = IDS[:3]
    merged = merge_tensors([pre, *finetuned[:2]], method, ids=ids, base_index=0, name="t",
                           parameters=dict(density=per_model([0.0, 0.5]), density_rescale=True,
                                           normalize=False))
    alone = merge_tensors([pre, finetuned[1]], method, ids=[ids[0], ids[2]], base_index=0,
                          name="t", parameters=dict(density={ids[2]: 0.5}, density_rescale=True,
                                                    normalize=False))
    assert torch.equal(merged, alone)
    assert not torch.equal(alone, pre)
