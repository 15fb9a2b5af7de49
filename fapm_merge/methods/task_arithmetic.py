"""``fapm`` and ``fapm_ties``: FAPM-pruned task vectors, summed or merged by TIES.

One frozen class, two instances, as mergekit declares ties, dare and della
(``merge_methods/registry.py``): the instances differ only in data.

* ``fapm`` (no sign election): ``W_pre + lambda * sum_i(c_i * prune_i(dW_i))``.
  With one model at coefficient 1 (the common case) the kernel's fused path writes
  ``where(mask, W_ft, W_pre)`` directly.
* ``fapm_ties`` (sign election): TIES (Yadav et al., https://arxiv.org/abs/2306.01708)
  with FAPM's forgetting-aware mask in place of the magnitude trim. Election and the
  disjoint mean are mergekit's own (``get_mask`` and the divisor rule of its
  ``ties``), so the two differ only in the trim.

mergekit's sparsifiers are a closed Enum, so FAPM cannot be a
``sparsification_method`` of mergekit's own ``GeneralizedTaskArithmeticMerge``.
Each pruned task vector comes from :func:`fapm_merge.core.pruned_delta`; the keep
counts and factors from :mod:`fapm_merge.methods.common`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from typing_extensions import Literal

from mergekit.merge_methods.base import (BasePolicy, GroupMergeMethod, InputContract, MergeMethodSpec,
                                         ParameterScope, ParameterSpec, TensorGroup)
from mergekit.merge_methods.generalized_task_arithmetic import get_mask

from fapm_merge.core import compute_dtype, fapm_merge, pruned_delta
from fapm_merge.core.rules import FAPM, FAPM_TIES
from fapm_merge.methods.common import (
    FAPM_PARAMETERS,
    PAPER_URL,
    delta_scales_for,
    keep_counts_for,
    weight_arguments,
)

_SIGN_ELECTION_PARAMETERS = (
    ParameterSpec(
        "consensus",
        Literal["sum", "count"],
        ParameterScope.SHARED,
        default="sum",
        description=(
            "sign election: 'sum' (TIES paper: sign of the summed weighted deltas) "
            "or 'count' (majority of signs)"
        ),
    ),
    ParameterSpec(
        "int8_mask",
        bool,
        ParameterScope.SHARED,
        default=False,
        description="hold the sign mask in int8 to save memory (same result)",
    ),
)


@dataclass(frozen=True)
class FapmTaskArithmetic(GroupMergeMethod):
    """FAPM-pruned task arithmetic; with ``elect_sign``, TIES sign election on top.

    Per tensor and per fine-tuned model i, ``mask_i`` keeps the top ``1 -
    sparsity_i`` share of ``S = |dW| - beta * mean(|W_pre|) * |dW| / |W_pre|``
    (https://arxiv.org/abs/2509.08255) and ``d_i = s_i * mask_i * dW_i`` with
    ``s_i`` 1, the L1 factor (``rescale``) or ``1/density_i`` (``density_rescale``).

    Without sign election: ``W = W_pre + lambda * sum_i(w_i d_i) / D``, ``D`` the
    sum of weights with ``normalize`` (default false), else 1.

    With sign election: the elected sign is ``sign(sum_i w_i d_i)`` (``consensus:
    sum``) or the majority of ``sign(d_i)`` (``count``; a tie elects +), and
    ``W = W_pre + lambda * sum_i(agree_i w_i d_i) / sum_i(agree_i w_i)`` where
    ``agree_i`` is ``sign(d_i) == elected`` (zero deltas never agree) and the
    division (``normalize``, default true) uses 1 where nothing agrees.

    Attributes:
        method_name (`str`): the ``merge_method`` name in recipes.
        pretty_name (`str`): the name mergekit's model card shows.
        elect_sign (`bool`): TIES sign election and disjoint mean.
        default_normalize (`bool`): ``normalize`` when the recipe does not say.
    """

    method_name: str
    pretty_name: str
    elect_sign: bool
    default_normalize: bool

    @cached_property
    def spec(self) -> MergeMethodSpec:
        parameters = FAPM_PARAMETERS
        if self.default_normalize:
            parameters = tuple(
                dataclasses.replace(
                    spec,
                    default=True,
                    description="divide by the sum of the weights that agree with the "
                    "elected sign" if self.elect_sign else spec.description,
                )
                if spec.name == "normalize" else spec
                for spec in parameters
            )
        if self.elect_sign:
            parameters = parameters + _SIGN_ELECTION_PARAMETERS
        return MergeMethodSpec(
            name=self.method_name,
            pretty_name=self.pretty_name,
            reference_url=PAPER_URL,
            parameters=parameters,
            contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
        )

    @torch.no_grad()
    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        if not self.elect_sign:
            return fapm_merge(
                base,
                [entry.tensor for entry in group.non_base],
                keep_counts=keep_counts_for(group, parameters),
                beta=parameters["beta"],
                rescale=parameters["rescale"],
                **weight_arguments(group, parameters),
                name=group.metadata.name,
            ).to(base.dtype)
        return self._elect_and_mix(group, parameters)

    def _elect_and_mix(self, group: TensorGroup, parameters: dict) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        counts = keep_counts_for(group, parameters)
        scales = delta_scales_for(group, parameters)
        dtype = base.dtype
        for entry in entries:
            dtype = torch.promote_types(dtype, entry.tensor.dtype)
        cdtype = compute_dtype(dtype)

        deltas = torch.empty((len(entries), *base.shape), dtype=cdtype, device=base.device)
        for index, (entry, k, scale) in enumerate(zip(entries, counts, scales)):
            delta = pruned_delta(
                base, entry.tensor, k, beta=parameters["beta"], rescale=parameters["rescale"],
                out=deltas[index].view(-1), name=group.metadata.name,
            )
            deltas[index].mul_(scale * delta.rescale_factor * parameters["weight"][entry.id])

        weights = torch.tensor(
            [parameters["weight"][entry.id] for entry in entries],
            dtype=cdtype,
            device=base.device,
        ).view(-1, *([1] * base.dim()))
        mask_dtype = torch.int8 if parameters["int8_mask"] else cdtype
        agree = get_mask(deltas, method=parameters["consensus"], mask_dtype=mask_dtype)
        mixed = (deltas * agree).sum(dim=0)
        if parameters["normalize"]:
            divisor = (weights * agree).sum(dim=0)
            divisor[divisor == 0] = 1
            mixed /= divisor
        if parameters["lambda"] != 1:
            mixed *= parameters["lambda"]
        return (base.to(cdtype) + mixed).to(base.dtype)


fapm_method = FapmTaskArithmetic(
    method_name=FAPM,
    pretty_name="FAPM (Forgetting-Aware Pruning)",
    elect_sign=False,
    default_normalize=False,
)

fapm_ties_method = FapmTaskArithmetic(
    method_name=FAPM_TIES,
    pretty_name="FAPM-TIES (Forgetting-Aware Pruning + TIES sign election)",
    elect_sign=True,
    default_normalize=True,
)

__all__ = ["FapmTaskArithmetic", "fapm_method", "fapm_ties_method"]
