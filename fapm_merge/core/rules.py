"""The keep-count rule and the other numbers every part of fapm-merge must agree on.

Plain numbers in, plain numbers out: no tensors, no mergekit objects, no files. The
mergekit methods, ``sweep``, ``analyze``, ``verify`` and ``tradeoff`` all call these
functions, so a default or a rule is written exactly once.

Method: Huang, Cheng, Wang, "Mitigating Catastrophic Forgetting in Large Language
Models with Forgetting-aware Pruning", EMNLP 2025, https://arxiv.org/abs/2509.08255
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import List, Optional, Sequence

from fapm_merge.core.errors import FapmInputError

DEFAULT_SPARSITY = 0.9
"""The paper's default for full fine-tunes: reset 90% of each task vector, keep 10%."""

DEFAULT_LORA_SPARSITY = 0.1
"""The paper's advice for LoRA task vectors (already low rank): prune only ~10%."""

DEFAULT_BETA = 1.0
"""FAPM's balance factor in the paper's score; 0 gives plain magnitude pruning of dW."""

FAPM = "fapm"
FAPM_TIES = "fapm_ties"
FAPM_LORA = "fapm_lora"
"""The merge-method names this package registers with mergekit."""

_NEAR_ZERO_DIVISOR = 1e-8
"""mergekit's guard: a sum of weights smaller than this divides by 1 instead."""


def exact_decimal(value: float) -> Fraction:
    """The decimal the user wrote, as an exact fraction (0.9 -> 9/10).

    ``repr()`` gives the shortest decimal that round-trips, i.e. what the YAML said,
    so ``1 - 0.9`` is exactly 1/10 and not 0.09999999999999998.
    """
    return Fraction(repr(float(value)))


def complement(value: float) -> float:
    """``1 - value`` in exact decimal arithmetic: sparsity 0.9 <-> density 0.1."""
    return float(1 - exact_decimal(value))


def default_sparsity(*, lora: bool = False) -> float:
    """The sparsity used when a recipe gives neither sparsity nor density.

    Args:
        lora (`bool`, defaults to False): the task vector is a LoRA update
            (``fapm_lora``, or a mergekit ``base+adapter`` model).
    """
    return DEFAULT_LORA_SPARSITY if lora else DEFAULT_SPARSITY


def resolve_density(
    sparsity: Optional[float] = None,
    density: Optional[float] = None,
    *,
    lora: bool = False,
) -> Fraction:
    """The kept share as an exact fraction, from ``sparsity`` or ``density``.

    Args:
        sparsity (`float`, *optional*): share of the task vector reset to the base,
            in [0, 1].
        density (`float`, *optional*): share kept, ``1 - sparsity``; the spelling
            ties/dare recipes use. Giving both is an error.
        lora (`bool`, defaults to False): which default applies when neither is
            given: `DEFAULT_SPARSITY` (0.9) or `DEFAULT_LORA_SPARSITY` (0.1).
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
        return exact_decimal(density)
    return 1 - exact_decimal(default_sparsity(lora=lora) if sparsity is None else sparsity)


def resolve_sparsity(
    sparsity: Optional[float] = None,
    density: Optional[float] = None,
    *,
    lora: bool = False,
) -> float:
    """The share reset, as a float, from either spelling (for tables and plots)."""
    return float(1 - resolve_density(sparsity, density, lora=lora))


def keep_count(
    numel: int,
    sparsity: Optional[float] = None,
    density: Optional[float] = None,
    *,
    lora: bool = False,
) -> int:
    """``k = floor(density * numel)`` without floating drift.

    >>> keep_count(1000, sparsity=0.9)
    100
    """
    return math.floor(resolve_density(sparsity, density, lora=lora) * numel)


def check_beta(beta: float) -> None:
    """Refuse a balance factor that is not a finite number >= 0."""
    if not (math.isfinite(beta) and beta >= 0):
        raise FapmInputError(f"beta must be a finite number >= 0, got {beta!r}")


def _divisor(weights: Sequence[float], normalize: bool) -> float:
    divisor = sum(weights) if normalize else 1.0
    return 1.0 if abs(divisor) < _NEAR_ZERO_DIVISOR else divisor


def merge_coefficients(
    weights: Sequence[float], lambda_: float = 1.0, normalize: bool = False
) -> List[float]:
    """Per model, the factor on its pruned task vector: ``lambda * w_i / divisor``.

    ``divisor`` is ``sum(w_i)`` with ``normalize`` (1 when that sum is within 1e-8
    of zero, as mergekit's task arithmetic does), else 1.
    """
    divisor = _divisor(weights, normalize)
    return [lambda_ * w / divisor for w in weights]


def is_exact_select(
    coefficients: Sequence[float], *, rescale: bool = False, density_rescale: bool = False
) -> bool:
    """True when the output is ``where(mask, W_ft, W_pre)``: every entry is the
    fine-tuned or the pre-trained value, bit for bit.

    That holds for one fine-tuned model added at coefficient exactly 1 with no
    rescaling of its kept entries; the kernel then takes its fused fast path, and
    ``verify`` can recompute the output exactly.
    """
    return (
        len(coefficients) == 1
        and coefficients[0] == 1.0
        and not rescale
        and not density_rescale
    )


def density_rescale_factors(
    densities: Sequence[Fraction], *, rescale: bool = False, density_rescale: bool = False
) -> List[float]:
    """Per model, the factor ``density_rescale`` puts on its kept delta.

    ``1 / density`` with ``density_rescale`` (DARE's unbiased-expectation correction,
    https://arxiv.org/abs/2311.03099, applied to FAPM's deterministic mask), else
    1.0. A model with density 0 keeps nothing, so its factor is 1.0.

    Raises:
        FapmInputError: both ``rescale`` (L1) and ``density_rescale`` are on: each
            one alone fixes the scale of the kept delta, so the pair is ambiguous.
    """
    if not density_rescale:
        return [1.0] * len(densities)
    if rescale:
        raise FapmInputError(
            "choose one of rescale (L1 norm of the full delta) and density_rescale "
            "(1/density, DARE-style), not both"
        )
    return [float(1 / share) if share > 0 else 1.0 for share in densities]


def fold_delta_scales(
    weights: Sequence[float], scales: Sequence[float], lambda_: float, normalize: bool
) -> dict:
    """``fapm_merge`` weight arguments with per-model delta factors folded in.

    The factors scale the deltas, not the normalisation, so ``normalize`` still
    divides by ``sum(weight_i)`` (as mergekit's dare_ties does).
    """
    if all(scale == 1.0 for scale in scales):
        return dict(weights=list(weights), lambda_=lambda_, normalize=normalize)
    return dict(
        weights=[w * s for w, s in zip(weights, scales)],
        lambda_=lambda_ / _divisor(weights, normalize),
        normalize=False,
    )


__all__ = [
    "DEFAULT_BETA",
    "DEFAULT_LORA_SPARSITY",
    "DEFAULT_SPARSITY",
    "FAPM",
    "FAPM_LORA",
    "FAPM_TIES",
    "check_beta",
    "complement",
    "default_sparsity",
    "density_rescale_factors",
    "exact_decimal",
    "fold_delta_scales",
    "is_exact_select",
    "keep_count",
    "merge_coefficients",
    "resolve_density",
    "resolve_sparsity",
]
