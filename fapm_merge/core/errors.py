"""The one error type of the numerical core."""

from __future__ import annotations

from typing import Optional


class FapmInputError(ValueError):
    """An input tensor or parameter that FAPM cannot process; the message says why."""


def in_tensor(name: Optional[str]) -> str:
    """`` in tensor 'name'`` for messages, or nothing when the tensor has no name."""
    return f" in tensor {name!r}" if name else ""
