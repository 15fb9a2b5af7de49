"""The FAPM kernel under concurrency, and the selection paths ordinary inputs never take.

mergekit's ``--multi-gpu`` executor runs merge kernels in threads, one per device.
Without GPUs the same situation is reproduced on CPU: several threads run the real
kernel at once on different tensors (large enough for the sampled, chunked paths)
and every result must equal the one computed alone. The second half forces the
exact fallbacks of the selection (a strided sample fooled by the layout, a band of
candidates too large to gather) and checks them against the plain reference.
"""

import threading

import pytest
import torch

from fapm_merge.core import selection
from fapm_merge.core import fapm_merge, fapm_scores, find_threshold, keep_count, keep_mask
from fapm_merge.methods import register_methods

from reference import reference_fapm, reference_mask

SIZE = selection._DIRECT_KTHVALUE_MAX * 2 + 4099  # above the direct path: sampled + chunked


def _pair(seed, numel=SIZE, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    pre = torch.randn(numel, generator=gen) * 0.02
    ft = pre + torch.randn(numel, generator=gen) * 3e-4
    pre[: numel // 50] = 0.0  # zero base weights (-inf scores) and untouched entries
    ft[numel // 100 : numel // 25] = pre[numel // 100 : numel // 25]
    return pre.to(dtype).view(-1, 1), ft.to(dtype).view(-1, 1)


def _run_concurrently(jobs):
    """Run every callable in its own thread, all released at once; return results."""
    barrier = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def work(i, job):
        try:
            barrier.wait()
            results[i] = job()
        except BaseException as error:  # surfaced below, never swallowed
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def test_concurrent_kernels_equal_the_single_threaded_results():
    pairs = [_pair(seed) for seed in range(4)]
    sparsities = [0.9, 0.5, 0.99, 0.9]
    keeps = [keep_count(SIZE, sparsity=s) for s in sparsities]
    alone = [
        fapm_merge(pre, [ft], keep_counts=[k]) for (pre, ft), k in zip(pairs, keeps)
    ]
    # each one also equals the plain reference, so "equal" means "right"
    for (pre, ft), sparsity, result in zip(pairs, sparsities, alone):
        assert torch.equal(result, reference_fapm(pre, ft, sparsity=sparsity)[0])
    jobs = [
        (lambda pre=pre, ft=ft, k=k, chunk=chunk: fapm_merge(
            pre, [ft], keep_counts=[k], chunk_elements=chunk))
        for (pre, ft), k, chunk in zip(pairs, keeps, [None, 4097, None, 65536])
    ]
    for _ in range(2):  # twice: thread interleavings differ between runs
        together = _run_concurrently(jobs)
        for got, expected in zip(together, alone):
            assert torch.equal(got, expected)


def test_concurrent_multi_model_and_selection_calls_equal_serial_ones():
    pre, ft_a = _pair(10, dtype=torch.float32)
    _, ft_b = _pair(11, dtype=torch.float32)
    k = keep_count(SIZE, sparsity=0.8)

    def multi():
        return fapm_merge(pre, [ft_a, ft_b], keep_counts=[k, k], weights=[0.3, 0.7],
                          rescale=True)

    def select():
        scores = fapm_scores(pre, ft_b).values
        return keep_mask(scores, find_threshold(scores, k))

    expected = [multi(), select()]
    together = _run_concurrently([multi, select, multi, select])
    assert torch.equal(together[0], expected[0]) and torch.equal(together[2], expected[0])
    assert torch.equal(together[1], expected[1]) and torch.equal(together[3], expected[1])


def test_register_methods_from_many_threads_registers_once():
    from mergekit.merge_methods import registry

    _run_concurrently([register_methods] * 8)
    names = [method.spec.name for method in registry.registered_methods()]
    assert names.count("fapm") == 1


def _spy_on_gather(monkeypatch):
    """Count calls of the real ``_gather`` (only the exact fallback calls it)."""
    calls = []
    real = selection._gather

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(selection, "_gather", spy)
    return calls


def test_sample_fooled_by_the_layout_falls_back_to_the_exact_bisection(monkeypatch):
    calls = _spy_on_gather(monkeypatch)
    gen = torch.Generator().manual_seed(7)
    scores = torch.rand(SIZE, generator=gen) + 10
    # every sampled position holds a value far below all the others: the bracket
    # the sample suggests holds none of the real k-th values
    sampled = scores[:: selection.sample_step(SIZE)]
    sampled.copy_(-torch.rand(sampled.numel(), generator=gen))
    for k in (1, SIZE // 10, SIZE // 2):
        mask = keep_mask(scores, find_threshold(scores, k), chunk_elements=9973)
        assert torch.equal(mask, reference_mask(scores, k))
    assert calls, "the fooled sample did not reach the fallback"


def test_sample_fooled_upwards_falls_back_below_the_bracket(monkeypatch):
    # The mirror of the test above: every sampled position holds a value far above
    # all the others, so the k-th value lies below the bracket ("missed low").
    calls = _spy_on_gather(monkeypatch)
    gen = torch.Generator().manual_seed(7)
    scores = torch.rand(SIZE, generator=gen)
    sampled = scores[:: selection.sample_step(SIZE)]
    sampled.copy_(100 + torch.rand(sampled.numel(), generator=gen))
    for k in (SIZE // 10, SIZE // 2, SIZE - 1):
        mask = keep_mask(scores, find_threshold(scores, k), chunk_elements=9973)
        assert torch.equal(mask, reference_mask(scores, k))
    assert calls, "the fooled sample did not reach the fallback"


def test_band_too_large_to_gather_is_narrowed_by_counting(monkeypatch):
    calls = _spy_on_gather(monkeypatch)
    monkeypatch.setattr(selection, "_BAND_MIN_LIMIT", 1000)  # limit is then numel // 64
    gen = torch.Generator().manual_seed(3)
    ties = torch.randint(0, 5, (SIZE,), generator=gen).float()
    ties[::97] = -float("inf")
    spread = ties + torch.randn(SIZE, generator=gen) * 1e-3
    # spread: the sample's band holds ~2% of the entries, over the limit, so
    # counting passes bisect the value range until it is small enough to gather;
    # ties: a few distinct values, the bisection ends on one value and the ties
    # there must go to the lowest flat indices
    for scores in (spread, ties):
        for k in (1, SIZE // 10, SIZE // 3, SIZE - 1):
            threshold = find_threshold(scores, k)
            mask = keep_mask(scores, threshold, chunk_elements=4096)
            assert int(mask.sum()) == k
            assert torch.equal(mask, reference_mask(scores, k))
    assert calls, "the big band did not reach the counting fallback"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_order_keys_sort_like_the_floats_they_encode(dtype):
    values = torch.tensor(
        [-float("inf"), -3.0e38, -1.0, -1e-40, -0.0, 0.0, 1e-45, 1.0, 3.0e38, float("inf")],
        dtype=dtype,
    ).tolist()
    keys = [selection._key(v, dtype) for v in values]
    assert keys == sorted(keys)
    assert keys[4] == keys[5] == 0  # -0.0 == 0.0 share a key
    for value, key in zip(values, keys):
        assert selection._from_key(key, dtype) == value
