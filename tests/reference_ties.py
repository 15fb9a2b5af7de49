"""A plain, independent reference of fapm_ties (FAPM mask per model, then TIES).

Written from the definitions only: the FAPM mask comes from tests/reference.py
(argsort, exact decimal keep count), the TIES part is written out step by step
(Yadav et al., https://arxiv.org/abs/2306.01708): weighted pruned deltas, elected
sign per entry, mean over the deltas that agree with it. No mergekit, no core.
"""

from decimal import Decimal

import torch

from reference import reference_keep_count, reference_mask, reference_scores


def reference_pruned_delta(pre, ft, sparsity, beta=1.0):
    """mask * (W_ft - W_pre) in the compute dtype, with the plain FAPM mask."""
    cd = torch.float64 if torch.promote_types(pre.dtype, ft.dtype) == torch.float64 else torch.float32
    scores = reference_scores(pre, ft, beta)
    mask = reference_mask(scores, reference_keep_count(pre.numel(), sparsity)).view(pre.shape)
    return (ft.to(cd) - pre.to(cd)) * mask


def reference_fapm_ties(
    pre,
    finetuned,
    sparsities,
    weights=None,
    *,
    beta=1.0,
    lambda_=1.0,
    normalize=True,
    consensus="sum",
    density_rescale=False,
):
    weights = weights or [1.0] * len(finetuned)
    deltas = []
    for ft, sparsity, weight in zip(finetuned, sparsities, weights):
        delta = reference_pruned_delta(pre, ft, sparsity, beta)
        if density_rescale and sparsity < 1:
            delta = delta * float(1 / (Decimal(1) - Decimal(repr(float(sparsity)))))
        deltas.append(delta * weight)

    if consensus == "sum":
        total = deltas[0].clone()
        for delta in deltas[1:]:
            total = total + delta
        elected = torch.where(total >= 0, 1.0, -1.0)
    else:  # "count": majority of the signs, a tie elects +
        votes = sum(torch.sign(delta) for delta in deltas)
        elected = torch.where(votes >= 0, 1.0, -1.0)

    mixed = torch.zeros_like(deltas[0])
    agreeing_weight = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights):
        agrees = torch.sign(delta) == elected  # a zero delta never agrees
        mixed = mixed + torch.where(agrees, delta, torch.zeros_like(delta))
        agreeing_weight = agreeing_weight + agrees * weight
    if normalize:
        mixed = mixed / torch.where(agreeing_weight == 0, torch.ones_like(mixed), agreeing_weight)
    return (pre.to(mixed.dtype) + mixed * lambda_).to(pre.dtype)
