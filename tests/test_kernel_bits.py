"""The kernel's bits: the plain reference, the stored digests, any thread count.

Every output here must equal the plain argsort reference of ``reference.py`` bit for
bit, for every dtype, for tensors on the one-pass path and on the fallback paths,
with 1, 2 and 4 torch threads. What the reference cannot pin down to the last bit
(float64 sums over values spread across many decades: the mean, the L1 rescale,
several models; the score formula on extremes) is compared with the digests that
``kernel_cases.py`` stored from the kernel before issue 20 split it into modules.

With several torch threads a single float64 sum above torch's 32K grain is split
between threads, so its last bit could depend on the thread count; the kernel sums
every row on one thread, so the digests hold at every count.
"""

import math

import pytest
import torch

from fapm_merge import core
from fapm_merge.core import FapmInputError, fapm_merge, keep_count, merge, selection, threads
from helpers import bits, torch_threads
from kernel_cases import BIG, GROUPS, compute, extreme_pair, pair, stored
from reference import reference_fapm, reference_scores


@pytest.mark.parametrize("group, count", [
    ("selection", 1),
    *(("float64-sums", count) for count in (1, 2, 4)),
])
def test_outputs_equal_the_stored_digests(group, count):
    with torch_threads(count):
        got = compute(group)
    want = stored(group)
    assert got.keys() == want.keys() == {name for name, _ in GROUPS[group]()}
    inputs = [name for name in want if name.endswith("/inputs") and got[name] != want[name]]
    assert not inputs, f"torch's random generator changed, not the kernel: {inputs}"
    assert {name: got[name] for name in want if got[name] != want[name]} == {}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_one_pass_path_equals_the_reference(dtype, kind):
    pre, ft = pair(BIG, dtype, seed=1, kind=kind)
    for sparsity in (0.0, 0.1, 0.5, 0.9, 0.999, 1.0):
        k = keep_count(BIG, sparsity=sparsity)
        got = fapm_merge(pre, [ft], keep_counts=[k])
        assert torch.equal(bits(got), bits(reference_fapm(pre, ft, sparsity)[0])), (dtype, kind, sparsity)


@pytest.mark.parametrize("shape", [(513, 1031), (1024, 1024), (3, 300_007), (700_001,)])
@pytest.mark.parametrize("chunk", [None, 4096, 65_537])
def test_shapes_and_chunks_equal_the_reference(shape, chunk):
    numel = math.prod(shape)
    pre, ft = pair(numel, torch.bfloat16, seed=numel)
    pre, ft = pre.view(shape), ft.view(shape)
    for beta in (1.0, 0.0, 2.5):
        k = keep_count(numel, sparsity=0.9)
        got = fapm_merge(pre, [ft], keep_counts=[k], beta=beta, chunk_elements=chunk)
        assert got.shape == pre.shape
        assert torch.equal(bits(got), bits(reference_fapm(pre, ft, 0.9, beta)[0]))


@pytest.mark.parametrize("count", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_outputs_do_not_depend_on_the_thread_count(count, dtype):
    pre, ft = pair(BIG * 3, dtype, seed=5, kind="wide")
    k = keep_count(pre.numel(), sparsity=0.9)
    with torch_threads(1):
        expected = fapm_merge(pre, [ft], keep_counts=[k])
    with torch_threads(count):
        assert torch.equal(bits(fapm_merge(pre, [ft], keep_counts=[k])), bits(expected))
        scores = core.fapm_scores(pre, ft)
        assert torch.equal(scores.values, reference_scores(pre, ft))
        with torch_threads(1):
            serial = core.fapm_scores(pre, ft)
        assert scores.delta_l1 == serial.delta_l1 and scores.mean_abs_pre == serial.mean_abs_pre


@pytest.mark.parametrize("numel", [
    core.MEAN_BLOCK_ELEMENTS + 40_000,  # one block (one row) and a tail over 32K
    core.MEAN_BLOCK_ELEMENTS * 9 + 33_000,  # the last group: one block and the tail
])
def test_mean_is_the_serial_one_at_every_thread_count(numel):
    # f32 magnitudes over 30 decades: float64 sums of 64K of them differ in the
    # last bits when torch splits a row between threads
    pre, _ = pair(numel, torch.float32, seed=numel, kind="wide")
    with torch_threads(1):
        serial = core.mean_abs(pre)
    for count in (1, 2, 4):
        with torch_threads(count):
            assert core.mean_abs(pre) == serial


def test_pool_workers_run_torch_on_one_thread():
    with torch_threads(4):
        assert threads.worker_count(torch.empty(8), chunks=10) == 4
        seen = threads.map_chunks(lambda _, s, e: torch.get_num_threads(), [(0, 1)] * 8, 4)
        assert seen == [1] * 8
        assert torch.get_num_threads() == 4  # the caller's budget is untouched
        # a kernel called from a worker runs there, inline: no nested pool wait
        nested = threads.map_chunks(
            lambda _, s, e: threads.worker_count(torch.empty(8), chunks=10), [(0, 1)] * 4, 4)
        assert nested == [0] * 4
        with torch.no_grad():  # grad mode is per thread: workers take the caller's
            modes = threads.map_chunks(lambda _, s, e: torch.is_grad_enabled(), [(0, 1)] * 4, 4)
        assert modes == [False] * 4
    with torch_threads(1):
        assert threads.worker_count(torch.empty(8), chunks=10) == 0


def test_the_caller_runs_on_one_thread_during_the_call_and_gets_its_count_back(monkeypatch):
    seen = []
    real = merge._select_in_one_pass

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(merge, "_select_in_one_pass", spy)
    pre, ft = pair(BIG, torch.bfloat16, seed=6)
    k = keep_count(BIG, sparsity=0.9)
    with torch_threads(3):
        got = fapm_merge(pre, [ft], keep_counts=[k])
        assert torch.get_num_threads() == 3
    assert seen == [1]  # small ops in the caller: no parallel regions
    assert torch.equal(got, reference_fapm(pre, ft, 0.9)[0])


def test_nan_in_the_finetuned_weight_is_refused_from_a_worker_and_the_pool_goes_on():
    pre, ft = pair(BIG, torch.bfloat16, seed=2)
    bad = ft.clone()
    bad[BIG - 10] = float("nan")
    k = keep_count(BIG, sparsity=0.9)
    with torch_threads(2):
        for sparsity in (0.9, 0.0, 1.0):  # one-pass path, keep all, keep none
            with pytest.raises(FapmInputError, match="layers.3.mlp"):
                fapm_merge(pre, [bad], keep_counts=[keep_count(BIG, sparsity=sparsity)],
                           name="layers.3.mlp")
            assert torch.get_num_threads() == 2  # the caller's count came back
        assert torch.equal(fapm_merge(pre, [ft], keep_counts=[k]), reference_fapm(pre, ft, 0.9)[0])


def _spy(monkeypatch, name):
    calls = []
    real = getattr(merge, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(merge, name, spy)
    return calls


def test_a_band_too_big_falls_back_to_the_three_pass_kernel(monkeypatch):
    calls = _spy(monkeypatch, "_three_passes")
    monkeypatch.setattr(selection, "_BAND_MIN_LIMIT", 1000)  # limit is then numel // 64
    pre, ft = pair(BIG, torch.bfloat16, seed=3, kind="ties")
    for sparsity in (0.1, 0.5, 0.9):
        k = keep_count(BIG, sparsity=sparsity)
        got = fapm_merge(pre, [ft], keep_counts=[k])
        assert torch.equal(bits(got), bits(reference_fapm(pre, ft, sparsity)[0]))
    assert calls, "the heavy ties did not reach the fallback"


@pytest.mark.parametrize("direction", [-1.0, 1.0])
def test_a_misled_sample_falls_back_to_the_three_pass_kernel(monkeypatch, direction):
    # W_ft differs from W_pre only at the sampled positions (by a lot, in either
    # direction of the score): the bracket from the sample holds none of the
    # real k-th values
    calls = _spy(monkeypatch, "_three_passes")
    pre, ft = pair(BIG, torch.float32, seed=4)
    step = selection.sample_step(BIG)
    if direction > 0:
        ft[::step] = pre[::step] + 1.0  # sampled scores far above all others
    else:
        ft[::step] = pre[::step]  # sampled scores 0, below the others at keep 10%
        ft[BIG // 2:] = pre[BIG // 2:] + 0.01
    for sparsity in (0.5, 0.9):
        k = keep_count(BIG, sparsity=sparsity)
        got = fapm_merge(pre, [ft], keep_counts=[k])
        assert torch.equal(got, reference_fapm(pre, ft, sparsity)[0])
    assert calls, "the misled sample did not reach the fallback"


def test_cpu_score_equals_the_four_step_formula_on_extreme_values():
    # The CPU score pass uses addcdiv(|dW|, |dW|, |W_pre|, value=-c); this pins
    # down that it rounds exactly like the reference's four steps
    # |dW| - (c * |dW|) / |W_pre|, including subnormals, overflow to inf and 0/0.
    # The reference takes the kernel's c: its own mean(|W_pre|) sums in another
    # order, which over 600 decades changes the last bit of c (the stored digests
    # pin c and sum(|dW|) down).
    for dtype in (torch.float32, torch.float64):
        pre, ft = extreme_pair(dtype)
        for beta in (1.0, 1e-30, 3.7):
            got = core.fapm_scores(pre, ft, beta=beta, chunk_elements=65_536)
            expected = reference_scores(pre, ft, coefficient=got.coefficient)
            assert torch.equal(got.values, expected), (dtype, beta)
