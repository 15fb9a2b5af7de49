"""Can torch on this machine use a device? Asked before any work starts.

Two questions with one probe: :func:`check_device` for a device this process will
use (``eval``, ``sweep`` and ``tune --device``), :func:`merge_device_problems` for
the device a later ``mergekit-yaml --cuda/--device`` will use (``lint``).
"""

from __future__ import annotations

from typing import List, Optional

from fapm_merge.core.errors import FapmMergeError

_DEVICE_NAMES = "use cpu, cuda or cuda:N"


class DeviceError(FapmMergeError, ValueError):
    """A device torch does not know or this machine does not have; the message says
    which to use instead."""


def _torch_device(name: str):
    """``torch.device(name)``, or None when torch does not know the name."""
    import torch

    try:
        return torch.device(name)
    except (RuntimeError, ValueError):
        return None


def check_device(name: str) -> None:
    """Raise :class:`DeviceError` unless this process can compute on device ``name``.

    Args:
        name (`str`): a torch device name: ``cpu``, ``cuda``, ``cuda:1``, ...
    """
    import torch

    device = _torch_device(name)
    if device is None:
        raise DeviceError(f"{name!r} is not a torch device; {_DEVICE_NAMES}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{name!r}: CUDA is not available here (torch {torch.__version__}); use cpu")


def merge_device_problems(name: str, option: str) -> List[str]:
    """Why ``mergekit-yaml OPTION`` would fail on this machine, before it creates its output.

    mergekit creates the output folder first and moves the first tensor to the
    device after (AssertionError: Torch not compiled with CUDA enabled), so a
    missing GPU costs an empty folder and a traceback; the method code runs too
    late to stop it (docs/troubleshooting.md).

    Args:
        name (`str`): the device the merge will use (``cuda`` for ``--cuda``).
        option (`str`): how the user gives it (``--cuda``, ``--device cuda:1``), for
            the messages.
    """
    import torch

    device = _torch_device(name)
    if device is None:
        return [f"{option}: {name!r} is not a torch device; {_DEVICE_NAMES}"]
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "was built without CUDA" if torch.version.cuda is None else "finds no GPU"
        return [f"{option}: torch {torch.__version__} here {why}, so mergekit-yaml {option} "
                "would stop at the first tensor (AssertionError: Torch not compiled with CUDA "
                f"enabled) and leave an empty output folder; drop {option}: the merge runs on "
                "the CPU"]
    index: Optional[int] = device.index
    if device.type == "cuda" and index is not None and index >= torch.cuda.device_count():
        return [f"{option}: this machine has {torch.cuda.device_count()} GPU(s); "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"]
    return []


__all__ = ["DeviceError", "check_device", "merge_device_problems"]
