"""The FAPM numerical core: scores, exact keep counts, exact top-k selection, masks.

Pure torch. Nothing here knows about mergekit, files or command lines, so every
other part of the package (the mergekit methods, ``sweep``, ``analyze``, the
benchmarks) calls these functions and can never disagree about what is kept.

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
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

DEFAULT_SPARSITY = 0.9
"""The paper's default: reset 90% of each task vector, keep 10%."""

MEAN_BLOCK_ELEMENTS = 1 << 16
"""Fixed block size of the float64 accumulation of mean(|W_pre|)."""

_SAMPLE_SIZE = 1 << 18
_DIRECT_KTHVALUE_MAX = 1 << 18


class FapmInputError(ValueError):
    """An input tensor or parameter that FAPM cannot process; the message says why."""


def _label(name: Optional[str]) -> str:
    return f" in tensor {name!r}" if name else ""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores and deltas are computed in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_elements(device: torch.device) -> int:
    """Chunk size of the streaming passes: cache-sized on CPU, large on GPUs.

    The result never depends on it; only speed and scratch memory do.
    """
    return (1 << 18) if device.type == "cpu" else (1 << 24)


def _exact(value: float) -> Fraction:
    # repr() gives the shortest decimal that round-trips, i.e. what the user wrote
    # in YAML: 0.9 -> 9/10 exactly, so 1 - 0.9 is 1/10 and not 0.0999...98.
    return Fraction(repr(float(value)))


def resolve_density(
    sparsity: Optional[float] = None, density: Optional[float] = None
) -> Fraction:
    """Return the kept share as an exact fraction from ``sparsity`` or ``density``.

    Args:
        sparsity (`float`, *optional*): share of the task vector reset to the base,
            in [0, 1]. Defaults to ``DEFAULT_SPARSITY`` (0.9) when neither is given.
        density (`float`, *optional*): share kept, ``1 - sparsity``; the spelling
            ties/dare recipes use. Giving both is an error.
    """
    if sparsity is not None and density is not None:
        raise FapmInputError(
            f"give either sparsity ({sparsity}) or density ({density}), not both: "
            "density = 1 - sparsity"
        )
    for pname, value in (("sparsity", sparsity), ("density", density)):
        if value is not None and not (
            isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0
        ):
            raise FapmInputError(f"{pname} must be a number in [0, 1], got {value!r}")
    if density is not None:
        return _exact(density)
    return 1 - _exact(DEFAULT_SPARSITY if sparsity is None else sparsity)


def keep_count(
    numel: int, sparsity: Optional[float] = None, density: Optional[float] = None
) -> int:
    """``k = floor(density * numel)`` without floating drift.

    >>> keep_count(1000, sparsity=0.9)
    100
    """
    return math.floor(resolve_density(sparsity, density) * numel)


def _chunk_bounds(numel: int, chunk_elements: int) -> Iterator[Tuple[int, int]]:
    for start in range(0, numel, chunk_elements):
        yield start, min(start + chunk_elements, numel)


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(-1)


def mean_abs(tensor: torch.Tensor) -> float:
    """``mean(|tensor|)`` accumulated in float64 over fixed blocks, as a Python float."""
    flat = _flat(tensor)
    total = 0.0
    for start, end in _chunk_bounds(flat.numel(), MEAN_BLOCK_ELEMENTS):
        total += float(flat[start:end].abs().sum(dtype=torch.float64))
    return total / max(flat.numel(), 1)


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


@torch.no_grad()
def fapm_scores(
    pre: torch.Tensor,
    finetuned: torch.Tensor,
    *,
    beta: float = 1.0,
    chunk_elements: Optional[int] = None,
    name: Optional[str] = None,
) -> Scores:
    """Score every entry of ``dW = finetuned - pre``: ``S = |dW| - beta*m*|dW|/|W_pre|``.

    Args:
        pre (`torch.Tensor`): pre-trained weight ``W_pre``.
        finetuned (`torch.Tensor`): fine-tuned weight ``W_ft``, same shape.
        beta (`float`, defaults to 1.0): the paper's balance factor; 0 gives plain
            magnitude pruning of ``dW``.
        chunk_elements (`int`, *optional*): streaming chunk; never changes the result.
        name (`str`, *optional*): tensor name used in error messages.

    Raises:
        FapmInputError: shapes differ, or an input holds NaN/Inf (or ``dW``
            overflows the compute dtype).
    """
    if pre.shape != finetuned.shape:
        raise FapmInputError(
            f"shape mismatch{_label(name)}: base {tuple(pre.shape)} vs fine-tuned "
            f"{tuple(finetuned.shape)}"
        )
    if not (math.isfinite(beta) and beta >= 0):
        raise FapmInputError(f"beta must be a finite number >= 0, got {beta!r}")
    cdtype = compute_dtype(torch.promote_types(pre.dtype, finetuned.dtype))
    pre_flat, ft_flat = _flat(pre), _flat(finetuned)
    numel = pre_flat.numel()
    chunk = chunk_elements or default_chunk_elements(pre.device)

    mean_pre = mean_abs(pre_flat)
    if not math.isfinite(mean_pre):
        raise FapmInputError(
            f"the base (pre-trained) weight holds NaN or Inf{_label(name)}; "
            "FAPM refuses to write a model from it: check or re-download the base"
        )
    coefficient = float(torch.tensor(beta * mean_pre, dtype=cdtype))

    scores = torch.empty(numel, dtype=cdtype, device=pre.device)
    delta_l1 = 0.0
    for start, end in _chunk_bounds(numel, chunk):
        out = scores[start:end]
        # .to() returns the input itself when the dtype already matches: never
        # modify those views in place (the caller's weights would change).
        pre_part = pre_flat[start:end].to(cdtype)
        abs_delta = torch.sub(ft_flat[start:end].to(cdtype), pre_part).abs_()
        chunk_l1 = float(abs_delta.sum(dtype=torch.float64))
        if not math.isfinite(chunk_l1):
            raise FapmInputError(
                f"the fine-tuned weight holds NaN or Inf{_label(name)} (or W_ft - W_pre "
                "overflows); FAPM refuses to write a model from it: check the checkpoint"
            )
        delta_l1 += chunk_l1
        if coefficient == 0.0:
            out.copy_(abs_delta)
            continue
        torch.mul(abs_delta, coefficient, out=out)
        out.div_(pre_part.abs())
        torch.sub(abs_delta, out, out=out)
        # Only 0/0 (dW == 0 where W_pre == 0) is NaN here; dW == 0 scores 0.
        out.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    return Scores(scores, mean_pre, coefficient, delta_l1)


@dataclass(frozen=True)
class Threshold:
    """Which entries survive: all scores ``> value``, plus the first ``ties_kept``
    scores ``== value`` in flat index order. ``above + ties_kept == k``."""

    k: int
    value: float
    above: int
    ties_kept: int


def _count(mask: torch.Tensor) -> int:
    return int(mask.sum())


@torch.no_grad()
def find_threshold(
    scores: torch.Tensor, k: int, *, chunk_elements: Optional[int] = None
) -> Threshold:
    """Exact k-th largest score and the tie split, without sorting the whole tensor.

    Args:
        scores (`torch.Tensor`): flat scores (no NaN).
        k (`int`): how many entries to keep, ``0 <= k <= numel``.
        chunk_elements (`int`, *optional*): streaming chunk; never changes the result.
    """
    numel = scores.numel()
    if not 0 <= k <= numel:
        raise FapmInputError(f"keep count {k} outside [0, {numel}]")
    if k == 0:
        return Threshold(0, math.inf, 0, 0)
    chunk = chunk_elements or default_chunk_elements(scores.device)
    rank = numel - k  # 0-based ascending rank of the k-th largest score
    if numel <= _DIRECT_KTHVALUE_MAX:
        value = float(torch.kthvalue(scores, rank + 1).values)
        above = sum(_count(scores[s:e] > value) for s, e in _chunk_bounds(numel, chunk))
        return Threshold(k, value, above, k - above)

    # Bracket the threshold with a deterministic strided sample. The stride is odd
    # so it walks through the columns of row-major matrices instead of one column.
    step = max(1, numel // _SAMPLE_SIZE) | 1
    sample = torch.sort(scores[::step]).values
    size = sample.numel()
    q = rank / numel
    margin = int(6 * math.sqrt(size * q * (1 - q))) + 32
    centre = int(q * size)
    lo = float(sample[max(0, centre - margin)])
    hi = float(sample[min(size - 1, centre + margin)])
    if centre - margin <= 0:
        lo = -math.inf
    if centre + margin >= size - 1:
        hi = math.inf

    below = above_hi = 0
    band: List[torch.Tensor] = []
    for start, end in _chunk_bounds(numel, chunk):
        part = scores[start:end]
        below += _count(part < lo)
        above_hi += _count(part > hi)
        if lo != hi:
            band.append(part[(part >= lo) & (part <= hi)])
    in_band = numel - below - above_hi
    if not below <= rank < below + in_band:
        # The sample missed (adversarial layout): exact but slower fallback.
        value = float(torch.kthvalue(scores, rank + 1).values)
        above = sum(_count(scores[s:e] > value) for s, e in _chunk_bounds(numel, chunk))
        return Threshold(k, value, above, k - above)
    if lo == hi:
        return Threshold(k, lo, above_hi, k - above_hi)
    candidates = torch.cat(band)
    value = float(torch.kthvalue(candidates, rank - below + 1).values)
    above = above_hi + _count(candidates > value)
    return Threshold(k, value, above, k - above)


def iter_keep_chunks(
    scores: torch.Tensor, threshold: Threshold, *, chunk_elements: Optional[int] = None
) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """Yield ``(start, end, keep)`` over the flat scores, in index order.

    ``keep`` is a bool tensor for ``scores[start:end]``; the tie rule (lowest flat
    index first) is applied here and only here.
    """
    chunk = chunk_elements or default_chunk_elements(scores.device)
    ties_left = threshold.ties_kept
    for start, end in _chunk_bounds(scores.numel(), chunk):
        part = scores[start:end]
        keep = part > threshold.value
        if ties_left > 0:
            equal = part == threshold.value
            count = _count(equal)
            if count <= ties_left:
                keep |= equal
                ties_left -= count
            else:
                keep[equal.nonzero().view(-1)[:ties_left]] = True
                ties_left = 0
        yield start, end, keep


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
    """``where(mask, W_ft, W_pre)`` in the inputs' dtype: exact values, no arithmetic."""
    dtype = torch.promote_types(pre.dtype, finetuned.dtype)
    if out is None:
        out = torch.empty(pre.shape, dtype=dtype, device=pre.device)
    pre_flat, ft_flat, out_flat = _flat(pre), _flat(finetuned), out.view(-1)
    for start, end, keep in iter_keep_chunks(
        scores, threshold, chunk_elements=chunk_elements
    ):
        torch.where(
            keep,
            ft_flat[start:end].to(dtype),
            pre_flat[start:end].to(dtype),
            out=out_flat[start:end],
        )
    return out


@torch.no_grad()
def _masked_delta_in_place(
    scores: Scores,
    threshold: Threshold,
    pre_flat: torch.Tensor,
    ft_flat: torch.Tensor,
    chunk_elements: int,
) -> Tuple[torch.Tensor, float]:
    """Overwrite the score buffer with ``mask * dW``; return it and ``sum|mask*dW|``."""
    buffer = scores.values
    kept_l1 = 0.0
    for start, end, keep in iter_keep_chunks(
        buffer, threshold, chunk_elements=chunk_elements
    ):
        delta = torch.sub(
            ft_flat[start:end].to(buffer.dtype), pre_flat[start:end].to(buffer.dtype)
        )
        delta.mul_(keep)
        kept_l1 += float(delta.abs().sum(dtype=torch.float64))
        buffer[start:end] = delta
    return buffer, kept_l1


def l1_rescale_factor(full_l1: float, kept_l1: float, eps: float = 1e-7) -> float:
    """mergekit's ``rescale``: scale the kept delta back to the L1 norm of the full one."""
    if full_l1 < eps or kept_l1 < eps:
        return 1.0
    return full_l1 / kept_l1


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
        raise FapmInputError(f"no fine-tuned model to prune{_label(name)}")
    weights = [1.0] * len(finetuned) if weights is None else list(weights)
    if len(weights) != len(finetuned) or len(keep_counts) != len(finetuned):
        raise FapmInputError("one weight and one keep count per fine-tuned model")
    dtype = pre.dtype
    for tensor in finetuned:
        dtype = torch.promote_types(dtype, tensor.dtype)
    if pre.numel() == 0:
        return pre.to(dtype).clone()
    chunk = chunk_elements or default_chunk_elements(pre.device)
    divisor = sum(weights) if normalize else 1.0
    if abs(divisor) < 1e-8:  # as mergekit's task arithmetic does
        divisor = 1.0
    coefficients = [lambda_ * w / divisor for w in weights]

    if len(finetuned) == 1 and coefficients[0] == 1.0 and not rescale:
        scores = fapm_scores(pre, finetuned[0], beta=beta, chunk_elements=chunk, name=name)
        threshold = find_threshold(scores.values, keep_counts[0], chunk_elements=chunk)
        return select_where(
            pre, finetuned[0], scores.values, threshold, chunk_elements=chunk
        )

    pre_flat = _flat(pre)
    total: Optional[torch.Tensor] = None
    for tensor, k, coefficient in zip(finetuned, keep_counts, coefficients):
        scores = fapm_scores(pre, tensor, beta=beta, chunk_elements=chunk, name=name)
        threshold = find_threshold(scores.values, k, chunk_elements=chunk)
        delta, kept_l1 = _masked_delta_in_place(
            scores, threshold, pre_flat, _flat(tensor), chunk
        )
        factor = l1_rescale_factor(scores.delta_l1, kept_l1) if rescale else 1.0
        if total is None:
            total = delta.mul_(coefficient * factor)
        else:
            total.add_(delta, alpha=coefficient * factor)
        del scores, delta
    assert total is not None
    for start, end in _chunk_bounds(total.numel(), chunk):
        total[start:end] += pre_flat[start:end]
    return total.view(pre.shape).to(dtype)
