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
    if target.exists():
        shutil.rmtree(target)
    os.replace(work, target)
    if same_name:
        holder.rmdir()
