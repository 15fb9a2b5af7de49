"""What the FAPM merge methods share: parameter specs, validators, per-group rules.

Parameters are declared once, as data (mergekit ``ParameterSpec``); pydantic runs
the validators while mergekit plans, before any tensor is read. The functions that
turn a tensor group's parameters into keep counts and delta factors are thin: the
rules themselves live in :mod:`fapm_merge.core.rules`.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional

from pydantic import BeforeValidator
from typing_extensions import Annotated

from mergekit.merge_methods.base import ParameterScope, ParameterSpec, TensorGroup

from fapm_merge.core import (
    DEFAULT_LORA_SPARSITY,
    DEFAULT_SPARSITY,
    FapmInputError,
    density_rescale_factors,
    fold_delta_scales,
    resolve_density,
)
from fapm_merge.core.rules import DEFAULT_BETA

PAPER_URL = "https://arxiv.org/abs/2509.08255"


def number_parameter(name: str, low: Optional[float] = None, high: Optional[float] = None):
    """A pydantic pre-validator whose message names the parameter and its range.

    mergekit validates every parameter value while planning, before any tensor is
    read, so a bad recipe fails in the first second with this message.
    """

    def check(value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"fapm parameter {name!r} must be a number, got {value!r}"
                ) from None
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"fapm parameter {name!r} must be finite, got {value!r}")
        if low is not None and value < low or high is not None and value > high:
            bounds = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
            raise ValueError(
                f"fapm parameter {name!r} must be {bounds}, got {value!r}"
                + (" (density = 1 - sparsity)" if name in ("sparsity", "density") else "")
            )
        return value

    return BeforeValidator(check)


def share_parameter(name: str):
    """A share in [0, 1] or None (sparsity, density)."""
    return Annotated[Optional[float], number_parameter(name, 0.0, 1.0)]


_NON_BASE, _SHARED = ParameterScope.NON_BASE, ParameterScope.SHARED

FAPM_PARAMETERS = tuple(
    ParameterSpec(name, value_type, scope, default=default, description=description)
    for name, value_type, scope, default, description in (
        ("sparsity", share_parameter("sparsity"), _NON_BASE, None,
         f"share of the task vector reset to the base (default {DEFAULT_SPARSITY}; "
         f"{DEFAULT_LORA_SPARSITY} for `base+adapter` models)"),
        ("density", share_parameter("density"), _NON_BASE, None,
         "share kept, 1 - sparsity (ties/dare spelling); not with sparsity"),
        ("weight", Annotated[float, number_parameter("weight")], _NON_BASE, 1.0,
         "weight of this model's pruned task vector"),
        ("beta", Annotated[float, number_parameter("beta", 0.0)], _SHARED, DEFAULT_BETA,
         "balance factor of the score; 0 is magnitude pruning"),
        ("lambda", Annotated[float, number_parameter("lambda")], _SHARED, 1.0,
         "scale of the summed pruned task vectors"),
        ("normalize", bool, _SHARED, False, "divide the sum by the sum of weights"),
        ("rescale", bool, _SHARED, False,
         "rescale each kept delta to the L1 norm of its full delta"),
        # next to the L1 `rescale` on purpose: the two are alternatives
        ("density_rescale", bool, _SHARED, False,
         "multiply each kept delta by 1/density, the DARE paper's factor after "
         "random dropping (https://arxiv.org/abs/2311.03099); not with rescale"),
    )
)
"""The parameters of ``fapm`` (and, by name, of the other methods: `shared_specs`),
declared as a table: name, value type (with its validator), scope, default, description."""


def is_lora_reference(model_id: Any) -> bool:
    """A mergekit ``base+adapter`` model reference (its task vector is a LoRA update)."""
    return bool(getattr(model_id, "lora", None))


def densities_for(group: TensorGroup, parameters: dict) -> List:
    """Per fine-tuned model, the exact kept share (a Fraction) for this tensor.

    Turns per-model ``sparsity``/``density`` (or the default, which is the LoRA one
    for ``base+adapter`` inputs) into a density with the core's rule; errors name
    the model and the tensor.
    """
    shares = []
    for entry in group.non_base:
        try:
            shares.append(resolve_density(
                sparsity=parameters["sparsity"][entry.id],
                density=parameters["density"][entry.id],
                lora=is_lora_reference(entry.id),
            ))
        except FapmInputError as error:
            raise FapmInputError(
                f"fapm: model {entry.id}, tensor {group.metadata.name!r}: {error}"
            ) from None
    return shares


def keep_counts_for(group: TensorGroup, parameters: dict) -> List[int]:
    """Per fine-tuned model, the exact number of entries kept in this tensor."""
    numel = group.base.tensor.numel()
    return [math.floor(share * numel) for share in densities_for(group, parameters)]


def delta_scales_for(group: TensorGroup, parameters: dict) -> List[float]:
    """Per fine-tuned model, the factor ``density_rescale`` puts on its kept delta
    (see `fapm_merge.core.rules.density_rescale_factors`)."""
    if not parameters.get("density_rescale"):
        return [1.0] * len(group.non_base)
    try:
        return density_rescale_factors(
            densities_for(group, parameters),
            rescale=bool(parameters.get("rescale")),
            density_rescale=True,
        )
    except FapmInputError as error:
        raise FapmInputError(f"tensor {group.metadata.name!r}: {error}") from None


def weight_arguments(group: TensorGroup, parameters: dict) -> dict:
    """``fapm_merge`` arguments ``weights``, ``lambda_``, ``normalize``, with the
    density_rescale factors folded into the weights."""
    weights = [parameters["weight"][entry.id] for entry in group.non_base]
    return fold_delta_scales(
        weights, delta_scales_for(group, parameters), parameters["lambda"],
        parameters["normalize"],
    )


def shared_specs(*names: str) -> tuple:
    """The `FAPM_PARAMETERS` entries of these names, in that order."""
    by_name = {spec.name: spec for spec in FAPM_PARAMETERS}
    return tuple(by_name[name] for name in names)


__all__ = [
    "FAPM_PARAMETERS",
    "PAPER_URL",
    "delta_scales_for",
    "densities_for",
    "is_lora_reference",
    "keep_counts_for",
    "number_parameter",
    "share_parameter",
    "shared_specs",
    "weight_arguments",
]
