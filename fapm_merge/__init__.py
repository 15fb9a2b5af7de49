"""fapm-merge: FAPM (Forgetting-Aware Pruning Metric, arXiv 2509.08255) for mergekit.

Importing the package registers its merge methods with mergekit (idempotently);
plain ``mergekit-yaml`` gets them from the start-up hook without any import.
The numerical core lives in :mod:`fapm_merge.core` and is free of mergekit.
"""

from fapm_merge.core import (
    DEFAULT_SPARSITY,
    FapmInputError,
    Scores,
    Threshold,
    fapm_merge,
    fapm_scores,
    find_threshold,
    keep_count,
    keep_mask,
    resolve_density,
    select_where,
)
from fapm_merge.methods import fapm_method, register_methods

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SPARSITY",
    "FapmInputError",
    "Scores",
    "Threshold",
    "fapm_merge",
    "fapm_method",
    "fapm_scores",
    "find_threshold",
    "keep_count",
    "keep_mask",
    "register_methods",
    "resolve_density",
    "select_where",
]
