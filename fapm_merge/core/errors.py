"""The package's error base class and the numerical core's input error.

Every error fapm-merge raises on purpose derives from :class:`FapmMergeError`, so a
caller (the command line) catches one class and lets real bugs through."""

from __future__ import annotations

from typing import Optional


class FapmMergeError(Exception):
    """Base of every error fapm-merge raises for bad input or a stopped run; the
    message says what is wrong and what to do."""


class FapmInputError(FapmMergeError, ValueError):
    """An input tensor or parameter that FAPM cannot process; the message says why."""


def in_tensor(name: Optional[str]) -> str:
    """`` in tensor 'name'`` for messages, or nothing when the tensor has no name."""
    return f" in tensor {name!r}" if name else ""
