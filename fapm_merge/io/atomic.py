"""Output folders that appear only when complete.

A merge of a large model takes long and can be interrupted; a half-written folder
must never look like a finished model. Work happens in a hidden sibling folder
(same filesystem, so the final move is a rename) that replaces the target only
after the body of the ``with`` block succeeded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it; set it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _share(folder: Path) -> None:
    """Give ``folder`` and what is in it the modes a plain ``mkdir``/``open`` would.

    mkdtemp makes the folder private (0700) and safetensors writes its shards through
    a private temporary file (0600): left so, colleagues could not read a finished
    model (0755 folders and 0644 files under the usual umask 022)."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o777 & ~mask)
        else:  # executable bits stay as they were
            path.chmod((0o666 | path.stat().st_mode & 0o111) & ~mask)


@contextlib.contextmanager
def atomic_output_dir(target: os.PathLike, *, overwrite: bool = False,
                      same_name: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; move it into place on success.

    Args:
        target (`os.PathLike`): the folder the finished output should have.
        overwrite (`bool`, defaults to False): replace an existing non-empty target.
        same_name (`bool`, defaults to False): the yielded folder has ``target``'s
            own name (inside the hidden temporary folder), for tools that name what
            they write after their output folder: mergekit titles the model card
            with it (``# merged``, not ``# .merged.partial-x1y2``).

    Raises:
        FileExistsError: ``target`` exists, is not empty, and ``overwrite`` is False.
    """
    target = Path(target).absolute()
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output folder {target} exists and is not empty; choose another path "
            "or pass --overwrite"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    work = holder / target.name if same_name else holder
    work.mkdir(exist_ok=True)
    try:
        yield work
    except BaseException:
        shutil.rmtree(holder, ignore_errors=True)
        raise
    _share(work)
    if target.exists():
        shutil.rmtree(target)
    os.replace(work, target)
    if same_name:
        holder.rmdir()
