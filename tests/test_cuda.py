"""CUDA (issue 3): the kernel and `mergekit-yaml --cuda` give the CPU's bits exactly.

Skipped where torch sees no CUDA device (CI has none); `make bench-gpu` runs this
file first on a GPU machine, before timing anything. The checks compare against the
plain reference of tests/reference.py computed on the CPU, so a CUDA-only rounding
difference (a division, the float64 mean, the tie rule) fails here, not in a benchmark.
"""

import pytest
import torch

from helpers import fapm_recipe, load_state, run_merge_in_process
from reference import reference_fapm

from fapm_merge.core import fapm_merge, keep_count

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _pair(numel: int, dtype: torch.dtype, seed: int, quantised: bool):
    gen = torch.Generator().manual_seed(seed)
    pre = torch.randn(numel, generator=gen) * 0.02
    delta = torch.randn(numel, generator=gen) * 1e-3
    if quantised:  # few distinct values: heavy ties at the threshold, exact zeros in W_pre
        pre, delta = (pre * 200).round() / 200, (delta * 4000).round() / 4000
    return pre.to(dtype), (pre + delta).to(dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("numel", [1_000, 300_000, 5_000_000])  # above 2**18: sampled path
@pytest.mark.parametrize("quantised", [False, True])
def test_kernel_on_cuda_equals_reference_bit_for_bit(dtype, numel, quantised):
    pre, ft = _pair(numel, dtype, seed=numel, quantised=quantised)
    for sparsity in (0.1, 0.9, 0.99):
        k = keep_count(numel, sparsity=sparsity)
        expected, _ = reference_fapm(pre, ft, sparsity=sparsity)
        got = fapm_merge(pre.cuda(), [ft.cuda()], keep_counts=[k], name="w")
        assert got.device.type == "cuda" and got.dtype == dtype
        assert torch.equal(got.cpu(), expected), (dtype, numel, quantised, sparsity)


@requires_cuda
def test_mergekit_yaml_cuda_output_equals_cpu_output(llama_pair, tmp_path):
    """mergekit's `--cuda` executor (options.cuda) writes the same tensors as the CPU run."""
    base, finetuned = llama_pair
    recipe = {**fapm_recipe(base, finetuned, sparsity=0.9), "dtype": "bfloat16"}
    cpu = load_state(run_merge_in_process(recipe, tmp_path / "cpu"))
    gpu = load_state(run_merge_in_process(recipe, tmp_path / "cuda", cuda=True))
    assert set(cpu) == set(gpu)
    for name in cpu:
        assert torch.equal(cpu[name], gpu[name]), name
