"""What a user does with FAPM, each a library function first (the CLI is a thin shell).

``analyze`` (what FAPM would keep, before merging), ``sweep`` (many merges, one read),
``tradeoff`` (the decision), ``verify`` (check an output), ``demo`` (the embedded
default pair). They import mergekit only where they merge (``sweep``).
"""
