"""An independent, plainly written FAPM reference (argsort, no chunks, no tricks).

It states the definition as directly as possible so the fast kernel can be checked
against it: float32 (float64 for float64 inputs) scores, m = mean(|W_pre|), dW == 0
scores 0, W_pre == 0 with dW != 0 scores -inf, k = floor(density * numel) by exact
decimal arithmetic, ties broken by the lowest flat index (stable sort).
"""

from decimal import Decimal
import math

import torch


def reference_keep_count(numel, sparsity):
    return math.floor((Decimal(1) - Decimal(repr(float(sparsity)))) * numel)


def reference_scores(pre, ft, beta=1.0, coefficient=None):
    """FAPM scores; ``coefficient`` (c = beta * m), when given, replaces the one
    computed here from ``beta`` and mean(|W_pre|)."""
    cd = torch.float64 if torch.promote_types(pre.dtype, ft.dtype) == torch.float64 else torch.float32
    pre_c, ft_c = pre.to(cd).flatten(), ft.to(cd).flatten()
    abs_delta = (ft_c - pre_c).abs()
    abs_pre = pre_c.abs()
    if coefficient is None:
        m = pre.double().abs().mean().item() if pre.numel() else 0.0
        c = float(torch.tensor(beta * m, dtype=cd))
    else:
        c = coefficient
    if c == 0:
        return abs_delta
    # same operation order as the formula reads: |dW| - (c*|dW|)/|W_pre|
    raw = abs_delta - (c * abs_delta) / abs_pre
    scores = torch.where(abs_pre == 0, torch.full_like(raw, -math.inf), raw)
    return torch.where(abs_delta == 0, torch.zeros_like(raw), scores)


def reference_mask(scores, k):
    order = torch.argsort(scores, descending=True, stable=True)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def reference_fapm(pre, ft, sparsity=0.9, beta=1.0):
    """W_pre where pruned, W_ft where kept, in the inputs' dtype."""
    scores = reference_scores(pre, ft, beta)
    k = reference_keep_count(pre.numel(), sparsity)
    mask = reference_mask(scores, k).view(pre.shape)
    return torch.where(mask, ft, pre), mask
