"""The evaluation layer's input error, in a module without torch: ``tradeoff`` and the
lm-eval metric names use it without loading a model library."""

from fapm_merge.core.errors import FapmMergeError


class EvalInputError(FapmMergeError, ValueError):
    """A model, tokenizer or data file that cannot be evaluated; the message says why."""


__all__ = ["EvalInputError"]
