"""The kernel's outputs: pruned task vectors and the merged tensor (`fapm_merge`).

The last stage, built on :mod:`~fapm_merge.core.scores`,
:mod:`~fapm_merge.core.selection` and :mod:`~fapm_merge.core.masks`. Pure torch:
nothing here knows about mergekit, files or command lines, so every other part of
the package (the mergekit methods, ``sweep``, ``analyze``, the benchmarks) calls
these functions and can never disagree about what is kept.

* Output ``W_pre + mask * dW``; with one fine-tuned model at coefficient 1 it is
  ``where(mask, W_ft, W_pre)``, so kept entries equal ``W_ft`` and pruned entries
  equal ``W_pre`` bit for bit.

For one model at coefficient 1 on a large CPU tensor (`_select_in_one_pass`) the
counting pass of the selection also writes the output, so no score buffer is kept:
scratch is the band (~0.1 byte per element); elsewhere it is the score buffer (4
bytes per element; 8 for float64 inputs) plus the band. Large passes run chunk by
chunk on the single-threaded workers of :mod:`fapm_merge.core.threads`; no result
depends on the number of threads.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from fapm_merge.core.chunks import (
    MAX_CHUNK_ELEMENTS,
    chunk_bounds,
    count_true,
    default_chunk_elements,
    flat,
)
from fapm_merge.core.errors import FapmInputError, in_tensor
from fapm_merge.core.masks import INT_VIEW, keep_flags, select_bits, select_where
from fapm_merge.core.rules import DEFAULT_BETA, is_exact_select, merge_coefficients
from fapm_merge.core.scores import ChunkScorer, fapm_scores, prepare_pair
from fapm_merge.core.selection import (
    band_limit,
    bracket,
    exact_threshold,
    find_threshold,
    sample_step,
    selects_directly,
    true_positions,
)
from fapm_merge.core.threads import caller_on_one_thread, map_chunks, worker_count


def l1_rescale_factor(full_l1: float, kept_l1: float, eps: float = 1e-7) -> float:
    """mergekit's ``rescale``: scale the kept delta back to the L1 norm of the full one."""
    if full_l1 < eps or kept_l1 < eps:
        return 1.0
    return full_l1 / kept_l1


@dataclass(frozen=True)
class PrunedDelta:
    """One pruned task vector.

    Attributes:
        values (`torch.Tensor`): ``mask * dW``, flat, in the compute dtype.
        rescale_factor (`float`): the L1 factor of `l1_rescale_factor` with
            ``rescale``, else 1.0; callers fold it into their own coefficient, so
            the delta is scaled with one rounding.
    """

    values: torch.Tensor
    rescale_factor: float


@torch.no_grad()
def pruned_delta(
    pre: torch.Tensor,
    finetuned: torch.Tensor,
    k: int,
    *,
    beta: float = DEFAULT_BETA,
    rescale: bool = False,
    out: Optional[torch.Tensor] = None,
    chunk_elements: Optional[int] = None,
    name: Optional[str] = None,
) -> PrunedDelta:
    """``mask * dW``, flat, in the compute dtype, and its rescale factor.

    ``mask`` keeps the ``k`` highest FAPM scores (the tie rule of `keep_flags`).
    With ``rescale`` the factor is `l1_rescale_factor` (mergekit's ``rescale``: the
    kept delta scaled back to the full delta's L1 norm), else 1.0. The scores are
    written into ``out`` (or a new buffer) and overwritten by the delta, so the
    delta costs no memory beyond the score buffer.

    Args:
        pre (`torch.Tensor`): ``W_pre``.
        finetuned (`torch.Tensor`): ``W_ft``, same shape.
        k (`int`): entries kept (see `fapm_merge.core.rules.keep_count`).
        beta (`float`, defaults to `DEFAULT_BETA`, 1.0): the score's balance factor.
        rescale (`bool`, defaults to False): apply the L1 factor.
        out (`torch.Tensor`, *optional*): flat buffer in the compute dtype.
        chunk_elements (`int`, *optional*): streaming chunk; never changes the result.
        name (`str`, *optional*): tensor name used in error messages.
    """
    chunk = chunk_elements or default_chunk_elements(pre.device)
    scores = fapm_scores(pre, finetuned, beta=beta, chunk_elements=chunk, name=name, out=out)
    threshold = find_threshold(scores.values, k, chunk_elements=chunk)
    buffer = scores.values
    pre_flat, ft_flat = flat(pre), flat(finetuned)
    kept_l1 = 0.0
    for start, end, flags in keep_flags(buffer, threshold, chunk):
        delta = torch.sub(
            ft_flat[start:end].to(buffer.dtype), pre_flat[start:end].to(buffer.dtype)
        )
        delta.mul_(flags)  # flags are 0/1: same products as a bool mask
        if rescale:
            # on one thread: torch would split a chunk's sum between its threads,
            # and the float64 total (so the rescale factor) could change in the
            # last bit with the thread count
            with caller_on_one_thread(pre):
                kept_l1 += float(delta.abs().sum(dtype=torch.float64))
        buffer[start:end] = delta
    factor = l1_rescale_factor(scores.delta_l1, kept_l1) if rescale else 1.0
    return PrunedDelta(buffer, factor)


@torch.no_grad()
def _fused_single(
    pre: torch.Tensor, finetuned: torch.Tensor, k: int, beta: float, chunk: int,
    name: Optional[str],
) -> torch.Tensor:
    """One model at coefficient 1: ``where(mask, W_ft, W_pre)``.

    Same result as ``fapm_scores`` + ``find_threshold`` + ``select_where``. Large
    CPU tensors take `_select_in_one_pass`; the rest (and the rare tensor whose
    sample misled the bracket or whose band is too big) take `_three_passes`.
    """
    one_pass = (
        pre.device.type == "cpu"
        and pre.dtype == finetuned.dtype
        and pre.dtype.itemsize in INT_VIEW
        and not selects_directly(pre.numel())
    )
    if not one_pass:
        cdtype, _, coefficient = prepare_pair(pre, finetuned, beta, name)
        return _three_passes(pre, finetuned, k, cdtype, coefficient, chunk, name)
    # every op of this call runs on one thread: the passes on the pool's workers,
    # the small rest here
    with caller_on_one_thread(pre):
        cdtype, _, coefficient = prepare_pair(pre, finetuned, beta, name)
        out = _select_in_one_pass(pre, finetuned, k, cdtype, coefficient, chunk, name)
        if out is None:
            out = _three_passes(pre, finetuned, k, cdtype, coefficient, chunk, name)
    return out


def _three_passes(
    pre: torch.Tensor, finetuned: torch.Tensor, k: int, cdtype: torch.dtype,
    coefficient: float, chunk: int, name: Optional[str],
) -> torch.Tensor:
    """``where(mask, W_ft, W_pre)`` through a full score buffer.

    The counting pass of the selection reads each score chunk right after computing
    it, while it is still in cache; then one pass writes the output. Scratch: the
    score buffer (4 bytes per element, 8 for float64 inputs), the band and a few
    chunk-sized buffers.
    """
    pre_flat, ft_flat = flat(pre), flat(finetuned)
    numel = pre_flat.numel()
    scores = torch.empty(numel, dtype=cdtype, device=pre.device)
    scorer = ChunkScorer(coefficient, cdtype, pre.device, name, want_l1=False)

    def fill(start: int, end: int) -> None:
        scorer(pre_flat[start:end], ft_flat[start:end], scores[start:end])

    sample = None
    if not selects_directly(numel) and 0 < k:
        sample = _sampled_scores(scorer, pre_flat, ft_flat)
    threshold = exact_threshold(scores, k, chunk, fill=fill, sample=sample)
    return select_where(pre, finetuned, scores, threshold, chunk_elements=chunk)


def _sampled_scores(
    scorer: ChunkScorer, pre_flat: torch.Tensor, ft_flat: torch.Tensor
) -> torch.Tensor:
    """The scores at the positions ``[::sample_step(numel)]``, computed from the
    inputs alone; scoring is elementwise, so they equal the full pass's bit for bit."""
    numel = pre_flat.numel()
    step = sample_step(numel)
    sample = torch.empty((numel + step - 1) // step, dtype=scorer.dtype, device=scorer.device)
    scorer(pre_flat[::step], ft_flat[::step], sample)
    return sample


def _select_in_one_pass(
    pre: torch.Tensor, finetuned: torch.Tensor, k: int, cdtype: torch.dtype,
    coefficient: float, chunk: int, name: Optional[str],
) -> Optional[torch.Tensor]:
    """``where(mask, W_ft, W_pre)`` for same-dtype CPU inputs, without a score buffer.

    A strided sample brackets the k-th largest score in ``[lo, hi]``. One pass,
    chunk by chunk on the pool's workers, scores the chunk and writes the output
    at once: ``W_ft`` above ``hi`` (kept whatever the exact threshold is),
    ``W_pre`` elsewhere; it keeps the positions and scores inside ``[lo, hi]``
    (the band, ~1-3% of the entries). ``kthvalue`` on the band gives the exact
    k-th value, and the band's kept entries (the tie rule: lowest flat index
    first) are then copied from ``W_ft``. Scratch: the band (12 bytes per band
    entry, at most max(4M, numel / 64) entries) and a few chunk-sized buffers per
    worker; the output is the only full-size allocation.

    Returns None when the sample misled the bracket or the band is too big (heavy
    ties at the threshold): the caller then runs `_three_passes`, which narrows
    such cases exactly.
    """
    pre_flat, ft_flat = flat(pre), flat(finetuned)
    numel = pre_flat.numel()
    bits = INT_VIEW[pre.dtype.itemsize]
    out = torch.empty(pre.shape, dtype=pre.dtype, device=pre.device)
    pre_bits, ft_bits, out_bits = (t.view(bits) for t in (pre_flat, ft_flat, out.view(-1)))
    chunk = min(chunk, MAX_CHUNK_ELEMENTS)
    rank = numel - k  # 0-based ascending rank of the k-th largest score
    keep_all, gather = k == numel, 0 < k < numel
    lo = hi = math.inf  # k == 0: nothing is above hi, every entry gets W_pre
    if gather:
        scorer = ChunkScorer(coefficient, cdtype, pre.device, name, want_l1=False)
        lo, hi = bracket(_sampled_scores(scorer, pre_flat, ft_flat), numel, rank)
    limit = band_limit(numel)
    band_total = [0]  # entries in the band so far, over all workers
    band_lock = threading.Lock()
    size = min(chunk, numel)

    def scratch():
        return (
            ChunkScorer(coefficient, cdtype, pre.device, name, want_l1=False),
            torch.empty(size, dtype=cdtype),  # scores
            torch.empty(size, dtype=bits),  # select mask: 0 or all bits set
            torch.empty(size, dtype=cdtype),  # band flags
            torch.empty(size, dtype=torch.bool),
        )

    def run(state, start: int, end: int):
        scorer, score_buf, select_buf, band_buf, mask_buf = state
        n = end - start
        part = score_buf[:n]
        scorer(pre_flat[start:end], ft_flat[start:end], part)
        target = out_bits[start:end]
        if keep_all:
            target.copy_(ft_bits[start:end])
            return 0, 0, None
        # above the band: all bits set, else 0; pre ^ ((pre ^ ft) & select) on the
        # integer views is then W_ft or W_pre exactly, branch-free
        select = torch.gt(part, hi, out=select_buf[:n]).neg_()
        select_bits(pre_bits[start:end], ft_bits[start:end], select, target)
        if not gather:  # k == 0: no counts needed
            return 0, 0, None
        # float flags and float sums: several times cheaper on CPU than bool or
        # integer ones, and exact (integers <= chunk <= 2**24)
        band = torch.ge(part, lo, out=band_buf[:n])
        at_least_lo = int(band.sum())
        inside = int(band.add_(select).sum())  # 1 in [lo, hi]: not above hi
        above = at_least_lo - inside
        with band_lock:
            band_total[0] += inside
            too_big = band_total[0] > limit  # then the caller falls back anyway
        if inside == 0 or too_big:
            return above, inside, None
        mask = mask_buf[:n]
        mask.copy_(band)
        positions = true_positions(mask)
        values = part.index_select(0, positions)
        return above, inside, (positions.add_(start), values)

    bounds = list(chunk_bounds(numel, chunk))
    results = map_chunks(run, bounds, worker_count(out, len(bounds)), scratch)
    if not gather:
        return out
    above_hi = sum(r[0] for r in results)
    inside = sum(r[1] for r in results)
    below = numel - above_hi - inside
    if inside > limit or not below <= rank < numel - above_hi:
        return None
    # chunk order, ascending inside each chunk: the band is in flat index order
    found = [r[2] for r in results if r[2] is not None]
    positions = torch.cat([f[0] for f in found])
    values = torch.cat([f[1] for f in found])
    value = float(torch.kthvalue(values, rank - below + 1).values)
    keep = values > value
    ties = k - above_hi - count_true(keep)  # scores == value to keep, lowest index first
    keep[torch.nonzero(values == value).view(-1)[:ties]] = True
    kept = positions.masked_select(keep)
    out_bits.index_copy_(0, kept, ft_bits.index_select(0, kept))
    return out


@torch.no_grad()
def fapm_merge(
    pre: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    keep_counts: Sequence[int],
    weights: Optional[Sequence[float]] = None,
    beta: float = DEFAULT_BETA,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = False,
    chunk_elements: Optional[int] = None,
    name: Optional[str] = None,
) -> torch.Tensor:
    """FAPM-prune each task vector with its own mask, then add them to the base.

    ``W_pre + lambda * sum_i(weight_i * prune_i(dW_i))``, divided by ``sum(weight_i)``
    when ``normalize`` is on; each pruned delta is scaled back to the L1 norm of its
    full delta when ``rescale`` is on. Returns a tensor in the inputs' promoted dtype.

    Args:
        pre (`torch.Tensor`): pre-trained weight.
        finetuned (`Sequence[torch.Tensor]`): one or more fine-tuned weights.
        keep_counts (`Sequence[int]`): entries kept per model (see `keep_count`).
        weights (`Sequence[float]`, *optional*): per-model weight, default 1.0 each.
        beta (`float`, defaults to `DEFAULT_BETA`, 1.0): balance factor of the score.
        lambda_ (`float`, defaults to 1.0): scale of the summed pruned deltas.
        normalize (`bool`, defaults to False): divide by the sum of weights.
        rescale (`bool`, defaults to False): L1 rescale of each pruned delta.
        chunk_elements (`int`, *optional*): streaming chunk; never changes the result.
        name (`str`, *optional*): tensor name used in error messages.
    """
    if not finetuned:
        raise FapmInputError(f"no fine-tuned model to prune{in_tensor(name)}")
    weights = [1.0] * len(finetuned) if weights is None else list(weights)
    if len(weights) != len(finetuned) or len(keep_counts) != len(finetuned):
        raise FapmInputError("one weight and one keep count per fine-tuned model")
    dtype = pre.dtype
    for tensor in finetuned:
        dtype = torch.promote_types(dtype, tensor.dtype)
    if pre.numel() == 0:
        return pre.to(dtype).clone()
    chunk = chunk_elements or default_chunk_elements(pre.device)
    coefficients = merge_coefficients(weights, lambda_, normalize)

    if is_exact_select(coefficients, rescale=rescale):
        return _fused_single(pre, finetuned[0], keep_counts[0], beta, chunk, name)

    pre_flat = flat(pre)
    total: Optional[torch.Tensor] = None
    for tensor, k, coefficient in zip(finetuned, keep_counts, coefficients):
        delta = pruned_delta(pre, tensor, k, beta=beta, rescale=rescale,
                             chunk_elements=chunk, name=name)
        scale = coefficient * delta.rescale_factor
        if total is None:
            total = delta.values.mul_(scale)
        else:
            total.add_(delta.values, alpha=scale)
        del delta
    assert total is not None
    for start, end in chunk_bounds(total.numel(), chunk):
        total[start:end] += pre_flat[start:end]
    return total.view(pre.shape).to(dtype)