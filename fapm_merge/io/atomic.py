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
def atomic_output_dir(target: os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; move it into place on success.

    Args:
        target (`os.PathLike`): the folder the finished output should have.
        overwrite (`bool`, defaults to False): replace an existing non-empty target.

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
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(work, target)
