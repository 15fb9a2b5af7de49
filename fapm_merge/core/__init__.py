"""The numerical core of fapm-merge: pure torch and plain numbers.

* the kernel, one module per stage, streamed in chunks (:mod:`~fapm_merge.core.chunks`):
  :mod:`~fapm_merge.core.scores` (FAPM scores), :mod:`~fapm_merge.core.selection`
  (exact top-k threshold), :mod:`~fapm_merge.core.masks` (keep masks, the select)
  and :mod:`~fapm_merge.core.merge` (pruned deltas, the merged tensor ``fapm_merge``).
* :mod:`~fapm_merge.core.rules`: how many entries are kept (sparsity, density and
  their defaults, LoRA included), merge coefficients and the other numeric rules
  every caller must agree on.

Nothing here imports mergekit or touches a file; the rules need no torch, so
the kernel (and torch) load only when one of its names is first used.
"""

from importlib import import_module

from fapm_merge.core.errors import FapmInputError
from fapm_merge.core.rules import (
    DEFAULT_LORA_SPARSITY,
    DEFAULT_SPARSITY,
    check_beta,
    complement,
    default_sparsity,
    density_rescale_factors,
    exact_decimal,
    fold_delta_scales,
    is_exact_select,
    keep_count,
    merge_coefficients,
    resolve_density,
    resolve_sparsity,
)

_KERNEL = {
    "MEAN_BLOCK_ELEMENTS": "scores",
    "Scores": "scores",
    "compute_dtype": "scores",
    "fapm_scores": "scores",
    "mean_abs": "scores",
    "default_chunk_elements": "chunks",
    "Threshold": "selection",
    "find_threshold": "selection",
    "iter_keep_chunks": "masks",
    "keep_mask": "masks",
    "select_where": "masks",
    "PrunedDelta": "merge",
    "fapm_merge": "merge",
    "l1_rescale_factor": "merge",
    "pruned_delta": "merge",
}
"""Where each kernel name lives (under ``fapm_merge.core.``)."""


def __getattr__(name):  # PEP 562: the kernel (and torch) load on first use
    if name in _KERNEL:
        return getattr(import_module(f"fapm_merge.core.{_KERNEL[name]}"), name)
    raise AttributeError(f"module 'fapm_merge.core' has no attribute {name!r}")


__all__ = [
    "DEFAULT_LORA_SPARSITY",
    "DEFAULT_SPARSITY",
    "FapmInputError",
    "MEAN_BLOCK_ELEMENTS",
    "PrunedDelta",
    "Scores",
    "Threshold",
    "check_beta",
    "complement",
    "compute_dtype",
    "default_chunk_elements",
    "default_sparsity",
    "density_rescale_factors",
    "exact_decimal",
    "fapm_merge",
    "fapm_scores",
    "find_threshold",
    "fold_delta_scales",
    "is_exact_select",
    "iter_keep_chunks",
    "keep_count",
    "keep_mask",
    "l1_rescale_factor",
    "mean_abs",
    "merge_coefficients",
    "pruned_delta",
    "resolve_density",
    "resolve_sparsity",
    "select_where",
]
