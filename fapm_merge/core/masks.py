"""Applying a threshold: keep flags, bool masks and ``where(mask, W_ft, W_pre)``.

The third stage of the kernel, after :mod:`~fapm_merge.core.selection`. The tie rule
(among the scores equal to the k-th value, the lowest flat indices are kept) is
applied in `keep_flags` and only there.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from fapm_merge.core.chunks import chunk_bounds, count_true, default_chunk_elements, flat
from fapm_merge.core.selection import Threshold

INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}
"""Integer dtype of the same width, for the bitwise select."""


def keep_flags(
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
    for start, end in chunk_bounds(numel, chunk):
        part = scores[start:end]
        flags = scratch[: end - start].copy_(part)
        if ties_left == 0:
            yield start, end, flags.gt_(value)
            continue
        flags.ge_(value)
        if not all_ties:
            equal = part == value
            count = count_true(equal)
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

    ``keep`` is a fresh bool tensor for ``scores[start:end]`` (see `keep_flags`
    for the tie rule).
    """
    chunk = chunk_elements or default_chunk_elements(scores.device)
    for start, end, flags in keep_flags(scores, threshold, chunk):
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
    pre_flat, ft_flat, out_flat = flat(pre), flat(finetuned), out.view(-1)
    bits = INT_VIEW.get(dtype.itemsize) if dtype.is_floating_point else None
    if pre.dtype != dtype or finetuned.dtype != dtype or bits is None:
        for start, end, flags in keep_flags(scores, threshold, chunk):
            torch.where(
                flags.to(torch.bool),
                ft_flat[start:end].to(dtype),
                pre_flat[start:end].to(dtype),
                out=out_flat[start:end],
            )
        return out
    pre_bits, ft_bits, out_bits = (t.view(bits) for t in (pre_flat, ft_flat, out_flat))
    select = torch.empty(min(chunk, pre_flat.numel()), dtype=bits, device=pre.device)
    for start, end, flags in keep_flags(scores, threshold, chunk):
        ones = select[: end - start]
        ones.copy_(flags).neg_()  # 0 -> 0, 1 -> all bits set
        select_bits(pre_bits[start:end], ft_bits[start:end], ones, out_bits[start:end])
    return out


def select_bits(
    pre_bits: torch.Tensor, ft_bits: torch.Tensor, select: torch.Tensor, out: torch.Tensor
) -> None:
    """``out = pre ^ ((pre ^ ft) & select)`` on integer views of the same width:
    ``W_ft`` where ``select`` has all bits set, ``W_pre`` where it is 0. Exact by
    construction and branch-free."""
    torch.bitwise_xor(pre_bits, ft_bits, out=out)
    out.bitwise_and_(select).bitwise_xor_(pre_bits)

