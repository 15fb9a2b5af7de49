"""FAPM scores: ``S = |dW| - beta * mean(|W_pre|) * |dW| / |W_pre|``, streamed in chunks.

The first stage of the kernel; :mod:`~fapm_merge.core.selection` then finds the
k-th largest score and :mod:`~fapm_merge.core.merge` writes the outputs.

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

Large passes run chunk by chunk on the single-threaded workers of
:mod:`fapm_merge.core.threads`; no result depends on the number of threads.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from fapm_merge.core.chunks import chunk_bounds, default_chunk_elements, flat
from fapm_merge.core.errors import FapmInputError, in_tensor
from fapm_merge.core.rules import DEFAULT_BETA, check_beta
from fapm_merge.core.threads import map_chunks, worker_count

MEAN_BLOCK_ELEMENTS = 1 << 16
"""Fixed block size of the float64 accumulation of mean(|W_pre|)."""

_SERIAL_GRAIN = 1 << 15
"""torch runs an op on one thread up to this many entries (its GRAIN_SIZE)."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores and deltas are computed in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mean_abs(tensor: torch.Tensor) -> float:
    """``mean(|tensor|)`` accumulated in float64 over fixed blocks, as a Python float.

    Each block of ``MEAN_BLOCK_ELEMENTS`` is summed in float64 by one row reduction
    on one thread, and the block sums are added exactly (``math.fsum``), so the
    value depends neither on ``chunk_elements`` nor on the number of threads.
    Scratch: the ``|x|`` of 4 blocks per worker.
    """
    values = flat(tensor)
    numel = values.numel()
    if numel == 0:
        return 0.0
    # One row reduction per 4 blocks (1 MB of float32, cache-sized: 2.7x faster
    # than 16 blocks), not one Python round trip per block; the tail is one more row.
    step = 4 * MEAN_BLOCK_ELEMENTS
    groups = list(chunk_bounds(numel, step))

    def block_sums(_, start: int, end: int) -> List[float]:
        part = values[start:end]
        full = part.numel() // MEAN_BLOCK_ELEMENTS * MEAN_BLOCK_ELEMENTS
        sums = []
        if full:
            rows = part[:full].view(-1, MEAN_BLOCK_ELEMENTS).abs()
            sums = rows.sum(dim=1, dtype=torch.float64).tolist()
        if full < part.numel():
            sums.append(float(part[full:].abs().sum(dtype=torch.float64)))
        return sums

    # In a worker every reduction runs on one thread; in a caller with several
    # torch threads a single row above torch's 32K grain would be split between
    # threads, and its float64 sum could change in the last bit.
    workers = worker_count(values, len(groups), min_chunks=1) if numel > _SERIAL_GRAIN else 0
    per_group = map_chunks(block_sums, groups, workers)
    return math.fsum(itertools.chain.from_iterable(per_group)) / numel


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


class ChunkScorer:
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

        With ``want_l1`` off the return value is 0.0 and the NaN/Inf check of
        ``dW`` rides on the float sum of the scores (a NaN or Inf ``dW`` always
        makes it NaN or Inf), a fraction of a float64 sum's cost.
        """
        n = out.numel()
        if self._pre.numel() < n:
            self._pre = torch.empty(n, dtype=self.dtype, device=self.device)
            self._delta = torch.empty(n, dtype=self.dtype, device=self.device)
        # copy_ converts into our own buffers: the caller's tensors are only read.
        p, a = self._pre[:n], self._delta[:n]
        p.copy_(pre_part)
        a.copy_(ft_part).sub_(p).abs_()
        chunk_l1 = 0.0
        if self.want_l1:
            chunk_l1 = float(a.sum(dtype=torch.float64))
            if not math.isfinite(chunk_l1):
                self._refuse()
        if self.coefficient == 0.0:
            out.copy_(a)
        elif out.device.type == "cpu":
            # CPU addcdiv is self + (value * t1) / t2: with value = -c that is
            # |dW| - (c * |dW|) / |W_pre| bit for bit (negation is exact), in one
            # pass instead of four (tested against the four-op form).
            torch.addcdiv(a, a, p.abs_(), value=-self.coefficient, out=out)
        else:  # addcdiv's order is only checked on CPU: spell it out elsewhere
            out.copy_(a).mul_(self.coefficient)  # in place: cheaper than mul(out=)
            out.div_(p.abs_())
            torch.sub(a, out, out=out)
        # Scores are <= |dW| (no +inf), so a float sum is NaN whenever a NaN is
        # present: one cheap reduction instead of a bool mask per chunk.
        total = float(out.sum()) if n else 0.0
        if not math.isfinite(total):
            if not self.want_l1 and not math.isfinite(float(a.amax())):
                self._refuse()
            if math.isnan(total):
                # 0/0 is the only NaN source, and only where W_pre == 0: dW == 0
                # scores 0, while a dW whose c*|dW| underflowed to 0 (subnormals)
                # still moves a zero weight and scores -inf, as the definition says.
                undefined = torch.isnan(out)
                out[undefined] = torch.where(a[undefined] == 0, 0.0, -math.inf).to(out.dtype)
        return chunk_l1

    def _refuse(self) -> None:
        raise FapmInputError(
            f"the fine-tuned weight holds NaN or Inf{in_tensor(self.name)} (or W_ft - W_pre "
            "overflows); FAPM refuses to write a model from it: check the checkpoint"
        )


def prepare_pair(
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
    beta: float = DEFAULT_BETA,
    chunk_elements: Optional[int] = None,
    name: Optional[str] = None,
    out: Optional[torch.Tensor] = None,
) -> Scores:
    """Score every entry of ``dW = finetuned - pre``: ``S = |dW| - beta*m*|dW|/|W_pre|``.

    Args:
        pre (`torch.Tensor`): pre-trained weight ``W_pre``.
        finetuned (`torch.Tensor`): fine-tuned weight ``W_ft``, same shape.
        beta (`float`, defaults to `DEFAULT_BETA`, 1.0): the paper's balance factor; 0 gives plain
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
    cdtype, mean_pre, coefficient = prepare_pair(pre, finetuned, beta, name)
    pre_flat, ft_flat = flat(pre), flat(finetuned)
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
    bounds = list(chunk_bounds(numel, chunk))

    def fill(scorer: ChunkScorer, start: int, end: int) -> float:
        return scorer(pre_flat[start:end], ft_flat[start:end], scores[start:end])

    chunk_l1 = map_chunks(fill, bounds, worker_count(scores, len(bounds)),
                          lambda: ChunkScorer(coefficient, cdtype, pre.device, name))
    delta_l1 = 0.0
    for value in chunk_l1:  # in chunk order, as one thread would add them
        delta_l1 += value
    return Scores(scores, mean_pre, coefficient, delta_l1)