"""Streaming a flat tensor chunk by chunk: chunk bounds, the default chunk size, counts.

Every kernel pass (:mod:`~fapm_merge.core.scores`, :mod:`~fapm_merge.core.selection`,
:mod:`~fapm_merge.core.masks`, :mod:`~fapm_merge.core.merge`) walks its tensors in
these chunks; no result depends on the chunk size, only speed and scratch memory do.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import torch

MAX_CHUNK_ELEMENTS = 1 << 24
"""Counts are float sums of 0/1 flags per chunk: exact up to 2**24 per chunk."""


def default_chunk_elements(device: torch.device) -> int:
    """Chunk size of the streaming passes: cache-sized on CPU, large on GPUs.

    The result never depends on it; only speed and scratch memory do.
    """
    return (1 << 18) if device.type == "cpu" else (1 << 24)


def chunk_bounds(numel: int, chunk_elements: int) -> Iterator[Tuple[int, int]]:
    """``(start, end)`` of each chunk of ``numel`` entries, in index order."""
    for start in range(0, numel, chunk_elements):
        yield start, min(start + chunk_elements, numel)


def flat(tensor: torch.Tensor) -> torch.Tensor:
    """A flat (row-major) view of ``tensor``; a contiguous copy if it is strided."""
    return tensor.contiguous().view(-1)


def count_true(mask: torch.Tensor) -> int:
    """How many entries of ``mask`` are nonzero, as a Python int."""
    return int(torch.count_nonzero(mask))
