"""What a user does with FAPM, each a library function first (the CLI is a thin shell).

``analyze`` (what FAPM would keep, before merging), ``variants`` (what a sweep makes)
and ``sweep`` (many merges, one read), ``tradeoff`` (the decision), ``tune`` (the
whole loop), ``verify`` (check an output), ``demo`` (the embedded default pair).
Only importing ``sweep`` loads mergekit; ``tune`` loads it when it merges, and
``variants`` and ``verify`` when they check a recipe against mergekit's own recipe
model (:mod:`fapm_merge.io.lint`).
"""
