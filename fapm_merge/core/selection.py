"""Exact top-k selection: the k-th largest score and the tie split, without a full sort.

The second stage of the kernel, after :mod:`~fapm_merge.core.scores`. How many
entries are kept (``k = keep_count(...)``) is :mod:`fapm_merge.core.rules`' job;
applying the result (keep flags, masks, the select) is
:mod:`~fapm_merge.core.masks`'.

* Keep exactly ``k`` entries: every score strictly above the k-th largest score,
  and among the scores equal to it the ones with the lowest flat (row-major)
  index. The rule only uses comparisons and counts, so CPU and CUDA pick the same
  set.

Selection never sorts the whole tensor: a strided sample brackets the threshold,
one counting pass over the scores gathers the (small) band of candidates, and
``kthvalue`` on that band gives the exact k-th value; a band that is too big, or a
sample that misled the bracket, is narrowed exactly by counting passes that bisect
the value range. Up to ``_DIRECT_KTHVALUE_MAX`` entries, ``kthvalue`` on the whole
tensor is cheaper.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from fapm_merge.core.chunks import (
    MAX_CHUNK_ELEMENTS,
    chunk_bounds,
    count_true,
    default_chunk_elements,
)
from fapm_merge.core.errors import FapmInputError

_SAMPLE_SIZE = 1 << 18
"""Largest strided sample of the scores that brackets the k-th value."""

_SAMPLE_MIN = 1 << 15
"""Smallest sample; in between the sample is numel / 64 (its cost stays ~flat)."""

_DIRECT_KTHVALUE_MAX = 1 << 18
"""Up to this many entries, ``kthvalue`` on the whole tensor is cheapest."""

_BAND_MIN_LIMIT = 1 << 22
"""Candidates gathered for the exact k-th value: at most max(this, numel // 64),
i.e. <= 1/16 byte per element; a bigger band (heavy ties at the threshold, a
layout that fools the sample) is narrowed by counting passes instead."""


def selects_directly(numel: int) -> bool:
    """Whether ``kthvalue`` on the whole tensor selects (small tensors), rather than
    a sampled bracket, a band and, where needed, counting passes."""
    return numel <= _DIRECT_KTHVALUE_MAX


def band_limit(numel: int) -> int:
    """Most candidates gathered into the band (see ``_BAND_MIN_LIMIT``)."""
    return max(_BAND_MIN_LIMIT, numel // 64)


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


def sample_step(numel: int) -> int:
    """Stride of the sample that brackets the k-th value: ``scores[::step]``."""
    target = min(_SAMPLE_SIZE, max(_SAMPLE_MIN, numel // 64))
    # Odd, so the strided sample walks through the columns of row-major matrices.
    return max(1, numel // target) | 1


def bracket(sample: torch.Tensor, numel: int, rank: int) -> Tuple[float, float]:
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


def true_positions(mask: torch.Tensor) -> torch.Tensor:
    """``nonzero(mask)`` (int64, ascending) for a sparse bool mask that starts
    8-byte aligned, 3-4x faster on CPU: find the 8-entry words of the mask holding
    any True first, then look inside those words only."""
    n8 = mask.numel() - mask.numel() % 8
    words = mask[:n8].view(torch.int64)
    hits = torch.nonzero(words).view(-1)
    # the hit words' bytes, flat: entry i of it is entry 8 * hits[i // 8] + i % 8
    inside = torch.nonzero(words.index_select(0, hits).view(torch.bool)).view(-1)
    found = hits.index_select(0, inside >> 3).mul_(8).add_(inside & 7)
    if n8 == mask.numel():
        return found
    return torch.cat([found, torch.nonzero(mask[n8:]).view(-1).add_(n8)])


def _compress(part: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``part[mask]`` for a sparse mask that starts 8-byte aligned (see `true_positions`)."""
    return part[true_positions(mask)]


def _gather(scores: torch.Tensor, lo: Optional[float], hi: float, chunk: int) -> torch.Tensor:
    """All scores ``lo < s <= hi`` (``lo`` None: no lower bound), in index order."""
    parts = []
    for start, end in chunk_bounds(scores.numel(), chunk):
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
    limit = band_limit(numel)
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
        cnt_mid = sum(count_true(scores[s:e] <= mid) for s, e in chunk_bounds(numel, chunk))
        if cnt_mid > rank:
            hi_key, cnt_hi = mid_key, cnt_mid
        else:
            lo_key, cnt_lo = mid_key, cnt_mid
    value = float(torch.kthvalue(band, rank - cnt_lo + 1).values)
    above = numel - cnt_hi + count_true(band > value)
    return Threshold(k, value, above, k - above, count_true(band == value))


def exact_threshold(
    scores: torch.Tensor,
    k: int,
    chunk: int,
    fill: Optional[Callable[[int, int], None]] = None,
    sample: Optional[torch.Tensor] = None,
) -> Threshold:
    """The selection engine behind `find_threshold` and the fused `fapm_merge` path.

    ``fill(start, end)``, when given, computes ``scores[start:end]`` just before the
    counting pass reads it (while it is still in cache); ``sample`` must then be the
    scores at ``[::sample_step(numel)]``, computed by the caller from the inputs.
    """
    numel = scores.numel()
    if not 0 <= k <= numel:
        raise FapmInputError(f"keep count {k} outside [0, {numel}]")
    chunk = min(chunk, MAX_CHUNK_ELEMENTS)
    bounds = list(chunk_bounds(numel, chunk))
    if fill is not None and (k == 0 or selects_directly(numel)):
        for start, end in bounds:
            fill(start, end)
        fill = None
    if k == 0:
        return Threshold(0, math.inf, 0, 0)
    if scores.dtype not in _KEY_FORMATS:  # e.g. bfloat16 scores: exact in float32
        scores = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    rank = numel - k  # 0-based ascending rank of the k-th largest score
    if selects_directly(numel):
        value = float(torch.kthvalue(scores, rank + 1).values)
        above = sum(count_true(scores[s:e] > value) for s, e in bounds)
        equal = sum(count_true(scores[s:e] == value) for s, e in bounds)
        return Threshold(k, value, above, k - above, equal)

    if sample is None:
        sample = scores[:: sample_step(numel)]
    lo, hi = bracket(sample, numel, rank)
    limit = band_limit(numel)
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
    value; if the sample was fooled or the band is too big, counting passes bisect
    the value range. Scratch: the band (at most ``band_limit(numel)`` = max(4M,
    numel/64) entries) and a few chunk-sized buffers; scores in another dtype than
    float32/float64 (e.g. bfloat16) are first copied to float32.

    Args:
        scores (`torch.Tensor`): flat scores (no NaN).
        k (`int`): how many entries to keep, ``0 <= k <= numel``.
        chunk_elements (`int`, *optional*): streaming chunk; never changes the result.
    """
    chunk = chunk_elements or default_chunk_elements(scores.device)
    return exact_threshold(scores, k, chunk)
