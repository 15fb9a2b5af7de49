"""mergekit merge methods backed by the FAPM core: thin glue, specs declared as data.

Importing this module registers the methods with mergekit (idempotently), which is
what the start-up hook does the moment ``mergekit.merge_methods`` is imported.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Optional

import torch
from pydantic import BeforeValidator
from typing_extensions import Annotated

from mergekit.merge_methods import registry
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethod,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)

from fapm_merge.core import (
    DEFAULT_SPARSITY,
    FapmInputError,
    fapm_merge,
    resolve_density,
)

PAPER_URL = "https://arxiv.org/abs/2509.08255"

DEFAULT_LORA_SPARSITY = 0.1
"""The paper's advice for LoRA task vectors (already low rank): prune only ~10%."""


def _number(name: str, low: Optional[float] = None, high: Optional[float] = None):
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
            bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise ValueError(
                f"fapm parameter {name!r} must be {bounds}, got {value!r}"
                + (" (density = 1 - sparsity)" if name in ("sparsity", "density") else "")
            )
        return value

    return BeforeValidator(check)


def _share(name: str):
    return Annotated[Optional[float], _number(name, 0.0, 1.0)]


FAPM_PARAMETERS = (
    ParameterSpec(
        "sparsity",
        _share("sparsity"),
        ParameterScope.NON_BASE,
        default=None,
        description=(
            f"share of the task vector reset to the base (default {DEFAULT_SPARSITY}; "
            f"{DEFAULT_LORA_SPARSITY} for `base+adapter` models)"
        ),
    ),
    ParameterSpec(
        "density",
        _share("density"),
        ParameterScope.NON_BASE,
        default=None,
        description="share kept, 1 - sparsity (ties/dare spelling); not with sparsity",
    ),
    ParameterSpec(
        "weight",
        Annotated[float, _number("weight")],
        ParameterScope.NON_BASE,
        default=1.0,
        description="weight of this model's pruned task vector",
    ),
    ParameterSpec(
        "beta",
        Annotated[float, _number("beta", 0.0)],
        ParameterScope.SHARED,
        default=1.0,
        description="balance factor of the score; 0 is magnitude pruning",
    ),
    ParameterSpec(
        "lambda",
        Annotated[float, _number("lambda")],
        ParameterScope.SHARED,
        default=1.0,
        description="scale of the summed pruned task vectors",
    ),
    ParameterSpec(
        "normalize",
        bool,
        ParameterScope.SHARED,
        default=False,
        description="divide the sum by the sum of weights",
    ),
    ParameterSpec(
        "rescale",
        bool,
        ParameterScope.SHARED,
        default=False,
        description="rescale each kept delta to the L1 norm of its full delta",
    ),
    # next to the L1 `rescale` on purpose: the two are alternatives
    ParameterSpec(
        "density_rescale",
        bool,
        ParameterScope.SHARED,
        default=False,
        description=(
            "multiply each kept delta by 1/density, the DARE paper's factor after "
            "random dropping (https://arxiv.org/abs/2311.03099); not with rescale"
        ),
    ),
)


def default_sparsity_for(model_id: Any) -> float:
    """0.9 for full fine-tunes; 0.1 for mergekit `base+adapter` (LoRA) references."""
    return DEFAULT_LORA_SPARSITY if getattr(model_id, "lora", None) else DEFAULT_SPARSITY


def densities_for(group: TensorGroup, parameters: dict) -> list:
    """Per fine-tuned model, the exact kept share (a Fraction) for this tensor.

    The one place that turns per-model ``sparsity``/``density`` (or the default for
    full fine-tunes vs ``base+adapter`` inputs) into a density; errors name the
    model and the tensor.
    """
    shares = []
    for entry in group.non_base:
        sparsity = parameters["sparsity"][entry.id]
        density = parameters["density"][entry.id]
        if sparsity is None and density is None:
            sparsity = default_sparsity_for(entry.id)
        try:
            shares.append(resolve_density(sparsity=sparsity, density=density))
        except FapmInputError as error:
            raise FapmInputError(
                f"fapm: model {entry.id}, tensor {group.metadata.name!r}: {error}"
            ) from None
    return shares


def keep_counts_for(group: TensorGroup, parameters: dict) -> list:
    """Per fine-tuned model, the exact number of entries kept in this tensor."""
    numel = group.base.tensor.numel()
    return [math.floor(share * numel) for share in densities_for(group, parameters)]


def delta_scales_for(group: TensorGroup, parameters: dict) -> list:
    """Per fine-tuned model, the factor ``density_rescale`` puts on its kept delta.

    ``1 / density`` with ``density_rescale: true`` (DARE's unbiased-expectation
    correction, https://arxiv.org/abs/2311.03099, applied to FAPM's deterministic
    mask), else 1.0. A model with density 0 keeps nothing, so its factor is 1.0.
    Raises FapmInputError when both ``rescale`` (L1) and ``density_rescale`` are on:
    each one alone fixes the scale of the kept delta, so the pair is ambiguous.
    """
    if not parameters.get("density_rescale"):
        return [1.0] * len(group.non_base)
    if parameters.get("rescale"):
        raise FapmInputError(
            f"tensor {group.metadata.name!r}: choose one of rescale (L1 norm of the "
            "full delta) and density_rescale (1/density, DARE-style), not both"
        )
    return [
        float(1 / share) if share > 0 else 1.0
        for share in densities_for(group, parameters)
    ]


def _fold_delta_scales(group: TensorGroup, parameters: dict) -> dict:
    """fapm_merge arguments with the density_rescale factors folded into the weights.

    The factors scale the deltas, not the normalisation, so ``normalize`` still
    divides by ``sum(weight_i)`` (as mergekit's dare_ties does); folding keeps the
    core unchanged.
    """
    weights = [parameters["weight"][entry.id] for entry in group.non_base]
    scales = delta_scales_for(group, parameters)
    if all(scale == 1.0 for scale in scales):
        return dict(weights=weights, lambda_=parameters["lambda"],
                    normalize=parameters["normalize"])
    divisor = sum(weights) if parameters["normalize"] else 1.0
    if abs(divisor) < 1e-8:  # the core's (and mergekit's) guard
        divisor = 1.0
    return dict(
        weights=[w * s for w, s in zip(weights, scales)],
        lambda_=parameters["lambda"] / divisor,
        normalize=False,
    )


class FapmMerge(GroupMergeMethod):
    """FAPM: reset the task-vector entries most likely to cause forgetting.

    Per tensor and per fine-tuned model, ``S = |dW| - beta * mean(|W_pre|) * |dW| /
    |W_pre|``; the top ``1 - sparsity`` share of ``S`` is kept and the rest goes back
    to the pre-trained value (https://arxiv.org/abs/2509.08255).
    """

    spec = MergeMethodSpec(
        name="fapm",
        pretty_name="FAPM (Forgetting-Aware Pruning)",
        reference_url=PAPER_URL,
        parameters=FAPM_PARAMETERS,
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
    )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        return fapm_merge(
            base,
            [entry.tensor for entry in group.non_base],
            keep_counts=keep_counts_for(group, parameters),
            beta=parameters["beta"],
            rescale=parameters["rescale"],
            **_fold_delta_scales(group, parameters),
            name=group.metadata.name,
        ).to(base.dtype)


fapm_method = FapmMerge()

METHODS: tuple = (fapm_method,)
_lock = threading.Lock()


def register_methods() -> None:
    """Make every fapm-merge method known to mergekit by name; safe to call again."""
    # fapm_ties imports this module, so it is imported here, late, and outside the
    # lock (its own import calls this function); while it is the module being
    # imported (partially initialised) it registers itself at its end.
    from fapm_merge import fapm_ties

    extra = getattr(fapm_ties, "fapm_ties_method", None)
    # fapm_lora (native LoRA adapter path): same late-import pattern
    from fapm_merge import lora_method

    lora = getattr(lora_method, "fapm_lora_method", None)
    with _lock:
        known = {method.spec.name for method in registry.registered_methods()}
        late = tuple(m for m in (extra, lora) if m is not None)
        for method in METHODS + late:
            if method.spec.name not in known:
                registry.register(method)


def get_method(name: str) -> MergeMethod:
    """The registered method object for ``name`` (after registering ours)."""
    register_methods()
    return registry.get(name)


register_methods()
