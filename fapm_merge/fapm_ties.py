"""``fapm_ties``: FAPM pruning of each task vector, then TIES sign election.

TIES (Yadav et al., https://arxiv.org/abs/2306.01708) trims each task vector by
magnitude, elects one sign per entry and averages only the deltas that agree with
it. ``fapm_ties`` replaces the magnitude trim with FAPM's forgetting-aware mask
(https://arxiv.org/abs/2509.08255), per model, with the same semantics as ``fapm``;
election and the disjoint mean are mergekit's own (``get_mask`` and the same
divisor rule as its ``ties``), so the two methods differ only in the trim.

mergekit's sparsifiers are a closed Enum, which is why this is a method of its own
rather than a ``sparsification_method`` of ``ties``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from typing_extensions import Literal

from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)
from mergekit.merge_methods.generalized_task_arithmetic import get_mask

from fapm_merge.core import (
    compute_dtype,
    fapm_scores,
    find_threshold,
    keep_mask,
    l1_rescale_factor,
)
from fapm_merge.methods import (
    FAPM_PARAMETERS,
    PAPER_URL,
    delta_scales_for,
    keep_counts_for,
    register_methods,
)

TIES_URL = "https://arxiv.org/abs/2306.01708"


def _ties_parameters() -> tuple:
    # Same parameters as fapm, but normalize defaults to true as in mergekit's ties:
    # the disjoint *mean* is what TIES defines.
    shared = tuple(
        dataclasses.replace(
            spec,
            default=True,
            description="divide by the sum of the weights that agree with the elected sign",
        )
        if spec.name == "normalize"
        else spec
        for spec in FAPM_PARAMETERS
    )
    return shared + (
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


class FapmTiesMerge(GroupMergeMethod):
    """FAPM-pruned task vectors merged by TIES sign election and disjoint mean.

    Per tensor: for each fine-tuned model i, ``d_i = s_i * mask_i * (W_i - W_pre)``
    where ``mask_i`` keeps the top ``1 - sparsity_i`` FAPM scores (exactly as in
    ``fapm``) and ``s_i`` is 1, the L1 factor (``rescale``) or ``1/density_i``
    (``density_rescale``). With ``w_i`` the weights, the elected sign is
    ``sign(sum_i w_i d_i)`` (``consensus: sum``) or the majority of
    ``sign(d_i)`` (``count``; a tie elects +), and

        ``W = W_pre + lambda * sum_i(agree_i * w_i d_i) / sum_i(agree_i * w_i)``

    where ``agree_i`` is ``sign(d_i) == elected`` (zero deltas never agree) and the
    division (``normalize``, default true) uses 1 where nothing agrees.

    Parameters (YAML): per model ``sparsity`` (default 0.9) or ``density``,
    ``weight`` (default 1.0); shared ``beta`` (1.0), ``lambda`` (1.0),
    ``normalize`` (true), ``rescale`` (false), ``density_rescale`` (false),
    ``consensus`` ("sum"), ``int8_mask`` (false). References: FAPM
    https://arxiv.org/abs/2509.08255, TIES https://arxiv.org/abs/2306.01708.
    """

    spec = MergeMethodSpec(
        name="fapm_ties",
        pretty_name="FAPM-TIES (Forgetting-Aware Pruning + TIES sign election)",
        reference_url=PAPER_URL,
        parameters=_ties_parameters(),
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
    )

    @torch.no_grad()
    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        name = group.metadata.name
        counts = keep_counts_for(group, parameters)
        scales = delta_scales_for(group, parameters)
        dtype = base.dtype
        for entry in entries:
            dtype = torch.promote_types(dtype, entry.tensor.dtype)
        cdtype = compute_dtype(dtype)
        base_c = base.to(cdtype)

        deltas = torch.empty((len(entries), *base.shape), dtype=cdtype, device=base.device)
        for index, (entry, k, scale) in enumerate(zip(entries, counts, scales)):
            scores = fapm_scores(base, entry.tensor, beta=parameters["beta"], name=name)
            mask = keep_mask(scores.values, find_threshold(scores.values, k))
            delta = deltas[index]
            torch.sub(entry.tensor.to(cdtype), base_c, out=delta)
            delta.mul_(mask.view(base.shape))
            del mask
            if parameters["rescale"]:
                kept_l1 = float(delta.abs().sum(dtype=torch.float64))
                scale = l1_rescale_factor(scores.delta_l1, kept_l1)
            del scores
            delta.mul_(scale * parameters["weight"][entry.id])

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
        return (base_c + mixed).to(base.dtype)


fapm_ties_method = FapmTiesMerge()

# Registers this method too when this module is imported first (see register_methods).
register_methods()
