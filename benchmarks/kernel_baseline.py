"""Baseline of ``bench_kernel.py --baseline``: the FAPM kernel as it was before issue 15.

A frozen copy (three passes through a full score buffer, torch's own threads on
every op), timed side by side with ``fapm_merge.core``; neither the package nor the
tests use it. What follows is its docstring as it was.

The FAPM kernel: scores, exact top-k selection, masks, the merged tensor.

Pure torch. Nothing here knows about mergekit, files or command lines, so every
other part of the package (the mergekit methods, ``sweep``, ``analyze``, the
benchmarks) calls these functions and can never disagree about what is kept. How
many entries are kept (``keep_count``) and the other numeric rules live in
:mod:`fapm_merge.core.rules`.

Method: Huang, Cheng, Wang, "Mitigating Catastrophic Forgetting in Large Language
Models with Forgetting-aware Pruning", EMNLP 2025, https://arxiv.org/abs/2509.08255

Definitions (docs/method.md states them with the reasons):

* ``dW = W_ft - W_pre`` in the *compute dtype*: float64 for float64 inputs, else
  float32.
* ``m = mean(|W_pre|)`` over the whole tensor, accumulated in float64 over fixed
  blocks of ``MEAN_BLOCK_ELEMENTS`` (so it does not depend on ``chunk_elements``),
  then ``c = beta * m`` rounded to the compute dtype.
* ``S = |dW| - c * |dW| / |W_pre|``, evaluated in that order. ``dW == 0`` scores
  exactly 0 (the reference script's 0/0 NaN is gone); ``W_pre == 0`` with
  ``dW != 0`` scores ``-inf``; ``c == 0`` (beta 0 or an all-zero ``W_pre``) leaves
  ``S = |dW|``, plain magnitude pruning.
* Keep exactly ``k = floor(density * numel)`` entries, computed in exact rational
  arithmetic from the decimal value the user wrote (sparsity 0.9 of 1000 keeps 100).
* Tie rule: every score strictly above the k-th largest score is kept; among the
  scores equal to it, the ones with the lowest flat (row-major) index are kept.
  The rule only uses comparisons and counts, so CPU and CUDA pick the same set.
* Output ``W_pre + mask * dW``; with one fine-tuned model at coefficient 1 it is
  ``where(mask, W_ft, W_pre)``, so kept entries equal ``W_ft`` and pruned entries
  equal ``W_pre`` bit for bit.

Selection never sorts the whole tensor: a strided sample brackets the threshold,
one counting pass over the scores gathers the (small) band of candidates, and
``kthvalue`` on that band gives the exact k-th value. Scratch memory is the float32
score buffer (4 bytes per element; 8 for float64 inputs) plus the band.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from fapm_merge.core.errors import FapmInputError, in_tensor
from fapm_merge.core.rules import check_beta, is_exact_select, merge_coefficients

MEAN_BLOCK_ELEMENTS = 1 << 16
"""Fixed block size of the float64 accumulation of mean(|W_pre|)."""

_SAMPLE_SIZE = 1 << 18
"""Largest strided sample of the scores that brackets the k-th value."""

_SAMPLE_MIN = 1 << 15
"""Smallest sample; in between the sample is numel / 64 (its cost stays ~flat)."""

_DIRECT_KTHVALUE_MAX = 1 << 18
"""Up to this many entries, ``kthvalue`` on the whole tensor is cheapest."""

_MAX_CHUNK = 1 << 24
"""Counts are float sums of 0/1 flags per chunk: exact up to 2**24 per chunk."""

_BAND_MIN_LIMIT = 1 << 22
"""Candidates gathered for the exact k-th value: at most max(this, numel // 64),
i.e. <= 1/16 byte per element; a bigger band (heavy ties at the threshold, a
layout that fools the sample) is narrowed by counting passes instead."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores and deltas are computed in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_elements(device: torch.device) -> int:
    """Chunk size of the streaming passes: cache-sized on CPU, large on GPUs.

    The result never depends on it; only speed and scratch memory do.
    """
    return (1 << 18) if device.type == "cpu" else (1 << 24)


def _chunk_bounds(numel: int, chunk_elements: int) -> Iterator[Tuple[int, int]]:
    for start in range(0, numel, chunk_elements):
        yield start, min(start + chunk_elements, numel)


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(-1)


def mean_abs(tensor: torch.Tensor) -> float:
    """``mean(|tensor|)`` accumulated in float64 over fixed blocks, as a Python float.

    Each block of ``MEAN_BLOCK_ELEMENTS`` is summed in float64 by one row reduction
    and the block sums are added exactly (``math.fsum``), so the value never depends
    on ``chunk_elements``. Scratch: the ``|x|`` of 16 blocks at a time.
    """
    flat = _flat(tensor)
    numel = flat.numel()
    if numel == 0:
        return 0.0
    full = numel // MEAN_BLOCK_ELEMENTS
    blocks = flat[: full * MEAN_BLOCK_ELEMENTS].view(full, MEAN_BLOCK_ELEMENTS)
    # One row reduction per 16 blocks, not one Python round trip per block.
    sums = [
        blocks[start : start + 16].abs().sum(dim=1, dtype=torch.float64)
        for start in range(0, full, 16)
    ]
    tail = flat[full * MEAN_BLOCK_ELEMENTS :]
    if tail.numel():
        sums.append(tail.abs().sum(dtype=torch.float64).view(1))
    return math.fsum(torch.cat(sums).tolist()) / numel


@dataclass(frozen=True)
class Scores:
    """FAPM scores of one task vector, flattened, with by-products of the same pass.

    Attributes:
        values (`torch.Tensor`): flat scores in the compute dtype.
        mean_abs_pre (`float`): ``m = mean(|W_pre|)``.
        coefficient (`float`): ``c = beta * m`` as rounded to the compute dtype.
        delta_l1 (`float`): ``sum(|dW|)`` in float64 (rescale and statistics use it).
    """

    values: torch.Tensor
    mean_abs_pre: float
    coefficient: float
    delta_l1: float


class _Scorer:
    """Computes scores chunk by chunk into caller-given views, reusing its scratch.

    One instance per call (never shared between threads): the two float scratch
    buffers are what keeps the score pass in cache instead of allocating full-size
    temporaries.
    """

    def __init__(self, coefficient: float, dtype: torch.dtype, device, name, want_l1=True):
        self.coefficient, self.dtype, self.device, self.name = coefficient, dtype, device, name
        self.want_l1 = want_l1
        self._pre = self._delta = torch.empty(0, dtype=dtype, device=device)

    def __call__(self, pre_part: torch.Tensor, ft_part: torch.Tensor, out: torch.Tensor) -> float:
        """Write the scores of one chunk into ``out``; return ``sum(|dW|)`` (float64).

        With ``want_l1`` off the return value is only a finite stand-in: the
        NaN/Inf check then uses ``max(|dW|)``, a fraction of a float64 sum's cost.
        """
        n = out.numel()
        if self._pre.numel() < n:
            self._pre = torch.empty(n, dtype=self.dtype, device=self.device)
            self._delta = torch.empty(n, dtype=self.dtype, device=self.device)
        # copy_ converts into our own buffers: the caller's tensors are only read.
        p, a = self._pre[:n], self._delta[:n]
        p.copy_(pre_part)
        a.copy_(ft_part)
        a.sub_(p).abs_()
        if self.want_l1:
            chunk_l1 = float(a.sum(dtype=torch.float64))
        else:  # NaN or Inf anywhere makes the max NaN or Inf
            chunk_l1 = float(a.amax()) if n else 0.0
        if not math.isfinite(chunk_l1):
            raise FapmInputError(
                f"the fine-tuned weight holds NaN or Inf{in_tensor(self.name)} (or W_ft - W_pre "
                "overflows); FAPM refuses to write a model from it: check the checkpoint"
            )
        if self.coefficient == 0.0:
            out.copy_(a)
            return chunk_l1
        # Same operation order as the definition: |dW| - (c * |dW|) / |W_pre|.
        out.copy_(a).mul_(self.coefficient)  # in place: cheaper than mul(out=) on CPU
        out.div_(p.abs_())
        torch.sub(a, out, out=out)
        # 0/0 is the only NaN source, and only where W_pre == 0: dW == 0 scores 0,
        # while a dW whose c*|dW| underflowed to 0 (subnormals) still moves a zero
        # weight and scores -inf, as the definition says.
        # Scores are <= |dW| (no +inf), so a float sum is NaN whenever a NaN is
        # present: one cheap reduction instead of a bool mask per chunk.
        if n and math.isnan(float(out.sum())):
            undefined = torch.isnan(out)
            out[undefined] = torch.where(a[undefined] == 0, 0.0, -math.inf).to(out.dtype)
        return chunk_l1


def _prepare(
    pre: torch.Tensor, finetuned: torch.Tensor, beta: float, name: Optional[str]
) -> Tuple[torch.dtype, float, float]:
    """Validate a pair; return the compute dtype, ``m`` and ``c = beta * m``."""
    if pre.shape != finetuned.shape:
        raise FapmInputError(
            f"shape mismatch{in_tensor(name)}: base {tuple(pre.shape)} vs fine-tuned "
            f"{tuple(finetuned.shape)}"
        )
    check_beta(beta)
    cdtype = compute_dtype(torch.promote_types(pre.dtype, finetuned.dtype))
    mean_pre = mean_abs(pre)
    if not math.isfinite(mean_pre):
        raise FapmInputError(
            f"the base (pre-trained) weight holds NaN or Inf{in_tensor(name)}; "
            "FAPM refuses to write a model from it: check or re-download the base"
        )
    return cdtype, mean_pre, float(torch.tensor(beta * mean_pre, dtype=cdtype))


@torch.no_grad()
def fapm_scores(
    pre: torch.Tensor,
    finetuned: torch.Tensor,
    *,
    beta: float = 1.0,
    chunk_elements: Optional[int] = None,
    name: Optional[str] = None,
    out: Optional[torch.Tensor] = None,
) -> Scores:
    """Score every entry of ``dW = finetuned - pre``: ``S = |dW| - beta*m*|dW|/|W_pre|``.

    Args:
        pre (`torch.Tensor`): pre-trained weight ``W_pre``.
        finetuned (`torch.Tensor`): fine-tuned weight ``W_ft``, same shape.
        beta (`float`, defaults to 1.0): the paper's balance factor; 0 gives plain
            magnitude pruning of ``dW``.
        chunk_elements (`int`, *optional*): streaming chunk; never changes the result.
        name (`str`, *optional*): tensor name used in error messages.
        out (`torch.Tensor`, *optional*): flat, contiguous buffer of ``numel``
            entries in the compute dtype to write the scores into (a caller that
            overwrites scores with deltas, as `pruned_delta` does, saves a buffer).

    Raises:
        FapmInputError: shapes differ, or an input holds NaN/Inf (or ``dW``
            overflows the compute dtype).
    """
    cdtype, mean_pre, coefficient = _prepare(pre, finetuned, beta, name)
    pre_flat, ft_flat = _flat(pre), _flat(finetuned)
    numel = pre_flat.numel()
    chunk = chunk_elements or default_chunk_elements(pre.device)
    if out is None:
        scores = torch.empty(numel, dtype=cdtype, device=pre.device)
    else:
        if out.dtype != cdtype or out.numel() != numel or not out.is_contiguous():
            raise FapmInputError(
                f"score buffer{in_tensor(name)}: need {numel} contiguous {cdtype} "
                f"entries, got {out.numel()} {out.dtype}"
            )
        scores = out.view(-1)
    scorer = _Scorer(coefficient, cdtype, pre.device, name)
    delta_l1 = 0.0
    for start, end in _chunk_bounds(numel, chunk):
        delta_l1 += scorer(pre_flat[start:end], ft_flat[start:end], scores[start:end])
    return Scores(scores, mean_pre, coefficient, delta_l1)


@dataclass(frozen=True)
class Threshold:
    """Which entries survive: all scores ``> value``, plus the first ``ties_kept``
    scores ``== value`` in flat index order. ``above + ties_kept == k``.

    ``equal`` (how many scores equal ``value`` in all, when known) only lets the
    keep pass skip the tie bookkeeping when every tie is kept.
    """

    k: int
    value: float
    above: int
    ties_kept: int
    equal: Optional[int] = None


def _count(mask: torch.Tensor) -> int:
    return int(torch.count_nonzero(mask))


# Order-preserving integer keys of floats (sign-magnitude -> two's complement), so
# the fallback can bisect the value range exactly: key(a) < key(b) iff a < b, and
# -0.0 and +0.0 share key 0.
_KEY_FORMATS = {torch.float32: ("<f", "<i", 0x7FFFFFFF), torch.float64: ("<d", "<q", (1 << 63) - 1)}


def _key(value: float, dtype: torch.dtype) -> int:
    ffmt, ifmt, mask = _KEY_FORMATS[dtype]
    bits = struct.unpack(ifmt, struct.pack(ffmt, value))[0]
    return bits if bits >= 0 else -(bits & mask)


def _from_key(key: int, dtype: torch.dtype) -> float:
    ffmt, ifmt, mask = _KEY_FORMATS[dtype]
    unsigned = key if key >= 0 else (-key) | (mask + 1)  # set the sign bit
    return struct.unpack(ffmt, struct.pack(ifmt.upper(), unsigned))[0]


def _sample_step(numel: int) -> int:
    target = min(_SAMPLE_SIZE, max(_SAMPLE_MIN, numel // 64))
    # Odd, so the strided sample walks through the columns of row-major matrices.
    return max(1, numel // target) | 1


def _bracket(sample: torch.Tensor, numel: int, rank: int) -> Tuple[float, float]:
    """``[lo, hi]`` that holds the rank-th smallest score with near certainty."""
    size = sample.numel()
    q = rank / numel
    margin = int(6 * math.sqrt(size * q * (1 - q))) + 32
    centre = int(q * size)
    # Two order statistics of the sample (kthvalue is 1-based), not a full sort.
    lo = (-math.inf if centre - margin <= 0
          else float(torch.kthvalue(sample, centre - margin + 1).values))
    hi = (math.inf if centre + margin >= size - 1
          else float(torch.kthvalue(sample, centre + margin + 1).values))
    return lo, hi


def _compress(part: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``part[mask]`` for a sparse mask that starts 8-byte aligned, about twice as
    fast on CPU: find the 8-entry words of the mask holding any True first, then
    select within those words only."""
    n8 = mask.numel() - mask.numel() % 8
    words = torch.nonzero(mask[:n8].view(torch.int64)).view(-1)
    rows = part[:n8].view(-1, 8)[words]
    found = rows[mask[:n8].view(-1, 8)[words]]
    if n8 == mask.numel():
        return found
    return torch.cat([found, part[n8:][mask[n8:]]])


def _gather(scores: torch.Tensor, lo: Optional[float], hi: float, chunk: int) -> torch.Tensor:
    """All scores ``lo < s <= hi`` (``lo`` None: no lower bound), in index order."""
    parts = []
    for start, end in _chunk_bounds(scores.numel(), chunk):
        part = scores[start:end]
        inside = part <= hi
        if lo is not None:
            inside &= part > lo
        parts.append(part[inside])
    return torch.cat(parts)


def _narrow(
    scores: torch.Tensor, k: int, lo_key: int, cnt_lo: int, hi_key: int, cnt_hi: int,
    band: Optional[torch.Tensor], chunk: int,
) -> Threshold:
    """Exact k-th largest score from a key interval ``(lo_key, hi_key]`` that holds it.

    ``cnt_lo``/``cnt_hi`` count the scores with key ``<= lo_key``/``<= hi_key``;
    ``band``, when given, holds exactly the scores inside the interval. Without a
    band, bisect the key range with counting passes (no memory beyond a bool chunk)
    until the interval is small enough to gather or is a single value.
    """
    numel, dtype = scores.numel(), scores.dtype
    rank = numel - k
    floor_key = _key(-math.inf, dtype) - 1  # below every score: "no lower bound"
    limit = max(_BAND_MIN_LIMIT, numel // 64)
    while band is None:
        if hi_key - lo_key == 1:  # the interval is one value: it is the k-th
            return Threshold(k, _from_key(hi_key, dtype), numel - cnt_hi,
                             k - (numel - cnt_hi), cnt_hi - cnt_lo)
        if cnt_hi - cnt_lo <= limit:
            lo = None if lo_key == floor_key else _from_key(lo_key, dtype)
            band = _gather(scores, lo, _from_key(hi_key, dtype), chunk)
            break
        mid_key = (lo_key + hi_key) // 2
        mid = _from_key(mid_key, dtype)
        cnt_mid = sum(_count(scores[s:e] <= mid) for s, e in _chunk_bounds(numel, chunk))
        if cnt_mid > rank:
            hi_key, cnt_hi = mid_key, cnt_mid
        else:
            lo_key, cnt_lo = mid_key, cnt_mid
    value = float(torch.kthvalue(band, rank - cnt_lo + 1).values)
    above = numel - cnt_hi + _count(band > value)
    return Threshold(k, value, above, k - above, _count(band == value))


def _threshold(
    scores: torch.Tensor,
    k: int,
    chunk: int,
    fill: Optional[Callable[[int, int], None]] = None,
    sample: Optional[torch.Tensor] = None,
) -> Threshold:
    """The selection engine behind `find_threshold` and the fused `fapm_merge` path.

    ``fill(start, end)``, when given, computes ``scores[start:end]`` just before the
    counting pass reads it (while it is still in cache); ``sample`` must then be the
    scores at ``[::_sample_step(numel)]``, computed by the caller from the inputs.
    """
    numel = scores.numel()
    if not 0 <= k <= numel:
        raise FapmInputError(f"keep count {k} outside [0, {numel}]")
    chunk = min(chunk, _MAX_CHUNK)
    bounds = list(_chunk_bounds(numel, chunk))
    if fill is not None and (k == 0 or numel <= _DIRECT_KTHVALUE_MAX):
        for start, end in bounds:
            fill(start, end)
        fill = None
    if k == 0:
        return Threshold(0, math.inf, 0, 0)
    if scores.dtype not in _KEY_FORMATS:  # e.g. bfloat16 scores: exact in float32
        scores = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    rank = numel - k  # 0-based ascending rank of the k-th largest score
    if numel <= _DIRECT_KTHVALUE_MAX:
        value = float(torch.kthvalue(scores, rank + 1).values)
        above = sum(_count(scores[s:e] > value) for s, e in bounds)
        equal = sum(_count(scores[s:e] == value) for s, e in bounds)
        return Threshold(k, value, above, k - above, equal)

    if sample is None:
        sample = scores[:: _sample_step(numel)]
    lo, hi = _bracket(sample, numel, rank)
    limit = max(_BAND_MIN_LIMIT, numel // 64)
    above_hi = inside = 0
    parts: Optional[List[torch.Tensor]] = []
    # Comparisons in place on float scratch and float sums are several times
    # cheaper than bool-valued comparisons and bool sums on CPU; the sums are exact
    # (integers <= chunk <= 2**24).
    size = min(chunk, numel)
    over = torch.empty(size, dtype=scores.dtype, device=scores.device)
    band_flags = torch.empty_like(over)
    band_mask = torch.empty(size, dtype=torch.bool, device=scores.device)
    for start, end in bounds:
        if fill is not None:
            fill(start, end)
        part = scores[start:end]
        n = end - start
        t, u = over[:n], band_flags[:n]
        t.copy_(part).gt_(hi)  # 1 above the band
        u.copy_(part).ge_(lo).sub_(t)  # 1 inside [lo, hi]
        above_hi += int(t.sum())
        n_in = int(u.sum())
        inside += n_in
        if parts is None or n_in == 0:
            continue
        mask = band_mask[:n]
        mask.copy_(u)
        parts.append(_compress(part, mask))
        if inside > limit:  # heavy ties or a fooled sample: count only, narrow later
            parts = None
    below = numel - above_hi - inside
    lo_key = _key(lo, scores.dtype) - 1
    hi_key = _key(hi, scores.dtype)
    band = torch.cat(parts) if parts is not None else None
    if rank < below:  # the sample missed low: the k-th lies below lo
        return _narrow(scores, k, _key(-math.inf, scores.dtype) - 1, 0, lo_key, below, None, chunk)
    if rank >= numel - above_hi:  # missed high: above hi
        return _narrow(scores, k, hi_key, numel - above_hi, _key(math.inf, scores.dtype), numel, None, chunk)
    return _narrow(scores, k, lo_key, below, hi_key, numel - above_hi, band, chunk)


@torch.no_grad()
def find_threshold(
    scores: torch.Tensor, k: int, *, chunk_elements: Optional[int] = None
) -> Threshold:
    """Exact k-th largest score and the tie split, without sorting the whole tensor.

    A strided sample brackets the k-th value, one counting pass over the scores
    gathers the (small) band of candidates, ``kthvalue`` on the band gives the exact
    value; if the sample was fooled, counting passes bisect the value range. Scratch:
    the band (<= max(4M, numel/64) entries) and one bool chunk.

    Args:
        scores (`torch.Tensor`): flat scores (no NaN).
        k (`int`): how many entries to keep, ``0 <= k <= numel``.
        chunk_elements (`int`, *optional*): streaming chunk; never changes the result.
    """
    chunk = chunk_elements or default_chunk_elements(scores.device)
    return _threshold(scores, k, chunk)


def _keep_flags(
    scores: torch.Tensor, threshold: Threshold, chunk: int
) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """Yield ``(start, end, flags)``: 1 where kept, 0 where pruned, in the scores'
    dtype. The tie rule (lowest flat index first) is applied here and only here.

    ``flags`` is a reused scratch buffer, valid until the next step. Flags are
    made by comparisons in place on float scratch, several times cheaper on CPU
    than bool-valued comparisons.
    """
    numel = scores.numel()
    value = threshold.value
    ties_left = threshold.ties_kept
    # Every tie kept (the common case): one comparison per entry, no bookkeeping.
    all_ties = threshold.equal is not None and threshold.equal == ties_left
    scratch = torch.empty(min(chunk, numel), dtype=scores.dtype, device=scores.device)
    for start, end in _chunk_bounds(numel, chunk):
        part = scores[start:end]
        flags = scratch[: end - start].copy_(part)
        if ties_left == 0:
            yield start, end, flags.gt_(value)
            continue
        flags.ge_(value)
        if not all_ties:
            equal = part == value
            count = _count(equal)
            if count <= ties_left:
                ties_left -= count
            else:  # drop the ties past the budget: the lowest flat indices stay
                flags[equal.nonzero().view(-1)[ties_left:]] = 0
                ties_left = 0
        yield start, end, flags


def iter_keep_chunks(
    scores: torch.Tensor, threshold: Threshold, *, chunk_elements: Optional[int] = None
) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """Yield ``(start, end, keep)`` over the flat scores, in index order.

    ``keep`` is a fresh bool tensor for ``scores[start:end]`` (see `_keep_flags`
    for the tie rule).
    """
    chunk = chunk_elements or default_chunk_elements(scores.device)
    for start, end, flags in _keep_flags(scores, threshold, chunk):
        yield start, end, flags.to(torch.bool)


@torch.no_grad()
def keep_mask(
    scores: torch.Tensor, threshold: Threshold, *, chunk_elements: Optional[int] = None
) -> torch.Tensor:
    """The whole flat bool mask of kept entries (for statistics and tests)."""
    mask = torch.empty(scores.numel(), dtype=torch.bool, device=scores.device)
    for start, end, keep in iter_keep_chunks(
        scores, threshold, chunk_elements=chunk_elements
    ):
        mask[start:end] = keep
    return mask


@torch.no_grad()
def select_where(
    pre: torch.Tensor,
    finetuned: torch.Tensor,
    scores: torch.Tensor,
    threshold: Threshold,
    *,
    out: Optional[torch.Tensor] = None,
    chunk_elements: Optional[int] = None,
) -> torch.Tensor:
    """``where(mask, W_ft, W_pre)`` in the inputs' dtype: exact values, no arithmetic.

    When both inputs already have the output dtype, the select is done on their
    bits: ``pre ^ ((pre ^ ft) & -flag)`` on integer views, exact by construction and
    branch-free (``torch.where`` with a random mask is several times slower on CPU).
    """
    dtype = torch.promote_types(pre.dtype, finetuned.dtype)
    if out is None:
        out = torch.empty(pre.shape, dtype=dtype, device=pre.device)
    chunk = chunk_elements or default_chunk_elements(pre.device)
    pre_flat, ft_flat, out_flat = _flat(pre), _flat(finetuned), out.view(-1)
    bits = _INT_VIEW.get(dtype.itemsize) if dtype.is_floating_point else None
    if pre.dtype != dtype or finetuned.dtype != dtype or bits is None:
        for start, end, flags in _keep_flags(scores, threshold, chunk):
            torch.where(
                flags.to(torch.bool),
                ft_flat[start:end].to(dtype),
                pre_flat[start:end].to(dtype),
                out=out_flat[start:end],
            )
        return out
    pre_bits, ft_bits, out_bits = (t.view(bits) for t in (pre_flat, ft_flat, out_flat))
    select = torch.empty(min(chunk, pre_flat.numel()), dtype=bits, device=pre.device)
    for start, end, flags in _keep_flags(scores, threshold, chunk):
        ones = select[: end - start]
        ones.copy_(flags).neg_()  # 0 -> 0, 1 -> all bits set
        target = out_bits[start:end]
        torch.bitwise_xor(pre_bits[start:end], ft_bits[start:end], out=target)
        target.bitwise_and_(ones).bitwise_xor_(pre_bits[start:end])
    return out


_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}
"""Integer dtype of the same width, for the bitwise select."""


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
    beta: float = 1.0,
    rescale: bool = False,
    out: Optional[torch.Tensor] = None,
    chunk_elements: Optional[int] = None,
    name: Optional[str] = None,
) -> PrunedDelta:
    """``mask * dW``, flat, in the compute dtype, and its rescale factor.

    ``mask`` keeps the ``k`` highest FAPM scores (the tie rule of `_keep_flags`).
    With ``rescale`` the factor is `l1_rescale_factor` (mergekit's ``rescale``: the
    kept delta scaled back to the full delta's L1 norm), else 1.0. The scores are
    written into ``out`` (or a new buffer) and overwritten by the delta, so the
    delta costs no memory beyond the score buffer.

    Args:
        pre (`torch.Tensor`): ``W_pre``.
        finetuned (`torch.Tensor`): ``W_ft``, same shape.
        k (`int`): entries kept (see `fapm_merge.core.rules.keep_count`).
        beta (`float`, defaults to 1.0): the score's balance factor.
        rescale (`bool`, defaults to False): apply the L1 factor.
        out (`torch.Tensor`, *optional*): flat buffer in the compute dtype.
        chunk_elements (`int`, *optional*): streaming chunk; never changes the result.
        name (`str`, *optional*): tensor name used in error messages.
    """
    chunk = chunk_elements or default_chunk_elements(pre.device)
    scores = fapm_scores(pre, finetuned, beta=beta, chunk_elements=chunk, name=name, out=out)
    threshold = find_threshold(scores.values, k, chunk_elements=chunk)
    buffer = scores.values
    pre_flat, ft_flat = _flat(pre), _flat(finetuned)
    kept_l1 = 0.0
    for start, end, flags in _keep_flags(buffer, threshold, chunk):
        delta = torch.sub(
            ft_flat[start:end].to(buffer.dtype), pre_flat[start:end].to(buffer.dtype)
        )
        delta.mul_(flags)  # flags are 0/1: same products as a bool mask
        if rescale:
            kept_l1 += float(delta.abs().sum(dtype=torch.float64))
        buffer[start:end] = delta
    factor = l1_rescale_factor(scores.delta_l1, kept_l1) if rescale else 1.0
    return PrunedDelta(buffer, factor)


@torch.no_grad()
def _fused_single(
    pre: torch.Tensor, finetuned: torch.Tensor, k: int, beta: float, chunk: int,
    name: Optional[str],
) -> torch.Tensor:
    """One model at coefficient 1: ``where(mask, W_ft, W_pre)`` in three passes.

    Same result as ``fapm_scores`` + ``find_threshold`` + ``select_where``, but the
    counting pass of the selection reads each score chunk right after computing it,
    while it is still in cache: one pass for ``m``, one that scores and counts, one
    that writes the output. Scratch: the score buffer (4 bytes per element, 8 for
    float64 inputs), the band and a few chunk-sized buffers.
    """
    cdtype, _, coefficient = _prepare(pre, finetuned, beta, name)
    pre_flat, ft_flat = _flat(pre), _flat(finetuned)
    numel = pre_flat.numel()
    scores = torch.empty(numel, dtype=cdtype, device=pre.device)
    scorer = _Scorer(coefficient, cdtype, pre.device, name, want_l1=False)

    def fill(start: int, end: int) -> None:
        scorer(pre_flat[start:end], ft_flat[start:end], scores[start:end])

    sample = None
    if numel > _DIRECT_KTHVALUE_MAX and 0 < k:
        # The bracket comes from scores computed at the sampled positions only;
        # scoring is elementwise, so they equal the full pass's bit for bit.
        step = _sample_step(numel)
        sample = torch.empty((numel + step - 1) // step, dtype=cdtype, device=pre.device)
        scorer(pre_flat[::step], ft_flat[::step], sample)
    threshold = _threshold(scores, k, chunk, fill=fill, sample=sample)
    return select_where(pre, finetuned, scores, threshold, chunk_elements=chunk)


@torch.no_grad()
def fapm_merge(
    pre: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    keep_counts: Sequence[int],
    weights: Optional[Sequence[float]] = None,
    beta: float = 1.0,
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
        beta (`float`, defaults to 1.0): balance factor of the score.
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

    pre_flat = _flat(pre)
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
    for start, end in _chunk_bounds(total.numel(), chunk):
        total[start:end] += pre_flat[start:end]
    return total.view(pre.shape).to(dtype)
