"""fapm-merge: FAPM (Forgetting-Aware Pruning Metric, arXiv 2509.08255) for mergekit.

The package is layered; each folder imports only from the ones listed before it:

* :mod:`fapm_merge.core`: the numerics (scores, exact selection, the keep-count rule);
* :mod:`fapm_merge.io`: files (checkpoints, recipes, LoRA adapters, atomic outputs);
* :mod:`fapm_merge.methods`: the mergekit merge methods ``fapm``, ``fapm_ties``,
  ``fapm_lora`` and every use of mergekit's private API;
* :mod:`fapm_merge.evaluation`: metrics, results files and their statistics;
* :mod:`fapm_merge.workflows`: analyze, sweep, tradeoff, tune, verify, demo;
* :mod:`fapm_merge.cli`: the ``fapm-merge`` command.

Importing this package is cheap: it imports neither torch nor mergekit. The names
below load on first use. Plain ``mergekit-yaml`` gets the methods from the start-up
hook; ``import fapm_merge.methods`` (or ``register_methods()``) registers them too.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "DEFAULT_SPARSITY": "fapm_merge.core",
    "DEFAULT_LORA_SPARSITY": "fapm_merge.core",
    "FapmInputError": "fapm_merge.core",
    "Scores": "fapm_merge.core",
    "Threshold": "fapm_merge.core",
    "fapm_merge": "fapm_merge.core",
    "fapm_scores": "fapm_merge.core",
    "find_threshold": "fapm_merge.core",
    "keep_count": "fapm_merge.core",
    "keep_mask": "fapm_merge.core",
    "resolve_density": "fapm_merge.core",
    "select_where": "fapm_merge.core",
    "fapm_method": "fapm_merge.methods",
    "fapm_ties_method": "fapm_merge.methods",
    "fapm_lora_method": "fapm_merge.methods",
    "register_methods": "fapm_merge.methods",
}


def __getattr__(name):  # PEP 562: load on first use
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fapm_merge' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = sorted(_LAZY)
