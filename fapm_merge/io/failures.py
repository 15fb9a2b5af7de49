"""Why a merge stopped, in the user's terms, and the command that fixes it.

A merge fails deep inside mergekit, transformers, huggingface_hub, safetensors or
torch, and the exception names the symptom, not the cause: a relative model path
surfaces as ``OfflineModeIsEnabled`` from the model card, a machine without a GPU
as ``AssertionError: Torch not compiled with CUDA enabled``, a full disk as an
``OSError`` from a shard write. :func:`explain_failure` maps such an exception
(and the recipe that was running) to a :class:`FailureCause`: one line saying what
went wrong and what to run or change. ``fapm-merge sweep`` uses it; so can any
command that merges (``tune``).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from fapm_merge.core.errors import FapmInputError
from fapm_merge.io.model_paths import card_asks_hub, looks_local, reference_parts
from fapm_merge.io.recipe import named_models


@dataclass(frozen=True)
class FailureCause:
    """What stopped a merge and how to fix it.

    Attributes:
        kind (`str`): one of ``model-path`` (a recipe path mergekit mishandles),
            ``hub`` (a download that failed or is impossible offline), ``gpu``,
            ``memory``, ``disk``, ``permission``, ``input`` (a truncated, incomplete
            or broken input checkpoint) and ``unknown``.
        cause (`str`): what went wrong, naming the file, path or device.
        fix (`str`): what to do, as a command or an edit.
    """

    kind: str
    cause: str
    fix: str

    def __str__(self) -> str:
        return f"{self.cause}; {self.fix}"


_CUDA_MISSING = (
    "Torch not compiled with CUDA enabled",
    "Found no NVIDIA driver",
    "No CUDA GPUs are available",
    "CUDA driver initialization failed",
    "no CUDA-capable device is detected",
)
_TRUNCATED = (
    "cannot be opened",
    "incomplete metadata",
    "Error while deserializing header",
    "header too large",
    "file not fully covered",
)
_HUB_URL = re.compile(r"huggingface\.co/api/models/([^\s:]+?)(?:/revision/[^\s:]+)?(?::|\s|$)")


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and the errors it was raised from (``__cause__``/``__context__``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _names(error: BaseException) -> List[str]:
    return [cls.__name__ for cls in type(error).__mro__]


def _last_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _local_inputs(recipe: Optional[Dict[str, Any]]) -> List[str]:
    """The local model folders a recipe reads (adapters of BASE+ADAPTER included)."""
    folders: List[str] = []
    for _where, reference in named_models(recipe or {}):
        for path, _marker in reference_parts(reference):
            if looks_local(path) and os.path.isdir(path) and path not in folders:
                folders.append(path)
    return folders


def _hub_lookups(recipe: Optional[Dict[str, Any]]) -> List[str]:
    """``key: path -> /absolute/path`` for every relative path the card sends to the hub."""
    lines = []
    for where, reference in named_models(recipe or {}):
        for path, _marker in reference_parts(reference):
            if card_asks_hub(path):
                lines.append(f"{where}: {os.path.abspath(path)}")
    return lines


def _broken_input(recipe: Optional[Dict[str, Any]]) -> Optional[str]:
    """The first input shard that cannot be opened, named with safetensors' reason."""
    from fapm_merge.io.checkpoint import open_safetensors

    for folder in _local_inputs(recipe):
        for shard in sorted(Path(folder).glob("*.safetensors")):
            try:
                with open_safetensors(shard):
                    pass
            except FapmInputError:
                return str(shard)
    return None


def _gb(size: int) -> str:
    return f"{size / 1e9:.1f} GB"


def explain_failure(
    error: BaseException,
    *,
    recipe: Optional[Dict[str, Any]] = None,
    recipe_path: Optional[os.PathLike] = None,
    out_dir: Optional[os.PathLike] = None,
    outputs: int = 1,
) -> FailureCause:
    """Map an exception raised by a merge to its cause and the fix.

    Args:
        error (`BaseException`): what the merge raised (the chain of ``__cause__``
            and ``__context__`` is searched too).
        recipe (`Dict[str, Any]`, *optional*): the recipe being merged; lets the
            answer name the recipe key, the input folder or the absolute path.
        recipe_path (`os.PathLike`, *optional*): its file, named in suggested commands.
        out_dir (`os.PathLike`, *optional*): where the output was being written.
        outputs (`int`, defaults to 1): models written at once (a sweep writes one
            per value); sizes the disk space the fix asks for.

    Returns:
        FailureCause: ``str(cause)`` is one line for the user.
    """
    recipe_name = str(recipe_path) if recipe_path is not None else "RECIPE"
    chain = list(_chain(error))
    text = " | ".join(str(e) for e in chain)
    names = {name for e in chain for name in _names(e)}

    # -- the Hugging Face hub, reached because of a recipe path, or not reachable
    if "OfflineModeIsEnabled" in names or "offline mode is enabled" in text:
        match = _HUB_URL.search(text)
        asked = match.group(1) if match else None
        lookups = _hub_lookups(recipe)
        if lookups:
            return FailureCause(
                "model-path",
                f"mergekit's model card asked the Hugging Face hub about "
                f"'{asked or 'a relative model path'}' (a relative path with at most one '/' "
                "in the recipe) and HF_HUB_OFFLINE is set",
                f"write absolute paths in {recipe_name} ({'; '.join(lookups)}); "
                f"`fapm-merge lint {recipe_name}` lists every such path",
            )
        return FailureCause(
            "hub",
            f"the merge needs '{asked or 'a model'}' from the Hugging Face hub and "
            "HF_HUB_OFFLINE is set",
            f"download it first (`huggingface-cli download {asked or 'ORG/NAME'} --local-dir "
            "DIR`) and write DIR's absolute path in the recipe, or unset HF_HUB_OFFLINE",
        )
    if "HFValidationError" in names or "Repo id must" in text:
        quoted = [q for q in re.findall(r"'([^']+)'", text)
                  if q not in ("repo_name", "namespace/repo_name")]
        path = quoted[-1] if quoted else "a model path"
        return FailureCause(
            "model-path",
            f"no folder {path} exists here ({os.getcwd()}), so mergekit took it for a hub id",
            f"fix the path in {recipe_name}: `fapm-merge lint {recipe_name}` names the recipe key",
        )
    hub_errors = {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError",
                  "EntryNotFoundError", "LocalEntryNotFoundError"}
    network_errors = {"ConnectError", "ConnectionError", "ConnectTimeout"}
    if names & hub_errors or (names & network_errors and "huggingface" in text):
        match = _HUB_URL.search(text)
        repo = match.group(1) if match else "a model"
        return FailureCause(
            "hub",
            f"the Hugging Face hub could not give '{repo}' ({_last_line(error)})",
            "check the id and your access (`hf auth login` for gated models), or download it "
            "and write the local folder's absolute path in the recipe",
        )

    # -- the GPU
    if any(marker in text for marker in _CUDA_MISSING):
        import torch

        has = "has no CUDA" if torch.version.cuda is None else "finds no usable GPU"
        return FailureCause(
            "gpu",
            f"no GPU: torch {torch.__version__} here {has} ({_last_line(error)})",
            "run it without --cuda / --device cuda (the merge runs on the CPU); "
            "`fapm-merge lint RECIPE --cuda` checks this before a merge",
        )
    if names & {"OutOfMemoryError"} or "CUDA out of memory" in text:
        return FailureCause(
            "memory",
            "the GPU ran out of memory",
            "merge on the CPU (drop --cuda / --device cuda), or write fewer outputs at once",
        )
    if "MemoryError" in names:
        return FailureCause(
            "memory",
            "the machine ran out of memory",
            "write fewer outputs at once, or use mergekit-yaml --out-shard-size 1B "
            "(mergekit holds each output shard in memory until it is written)",
        )

    # -- the disk
    os_errors = [e for e in chain if isinstance(e, OSError) and e.errno is not None]
    for os_error in os_errors:
        if os_error.errno in (errno.ENOSPC, errno.EDQUOT):
            where = Path(out_dir or os_error.filename or ".").absolute()
            probe = where if where.exists() else where.parent
            while not probe.exists() and probe != probe.parent:
                probe = probe.parent
            free = _gb(shutil.disk_usage(probe).free)
            need = ""
            inputs = _local_inputs(recipe)
            if inputs:
                size = sum(p.stat().st_size for p in Path(inputs[0]).glob("*.safetensors"))
                need = f"; {outputs} output(s) of about {_gb(size)} each need {_gb(size * outputs)}"
            return FailureCause(
                "disk",
                f"the disk holding {where} is full ({free} free{need})",
                "free space there, or write the output to a folder on a larger disk",
            )
        if os_error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            target = os_error.filename or out_dir or "the output folder"
            return FailureCause(
                "permission",
                f"cannot write {target} ({os_error.strerror})",
                "choose an output folder you can write to",
            )

    # -- the inputs
    if any(marker in text for marker in _TRUNCATED) or "SafetensorError" in names:
        broken = _broken_input(recipe)
        if broken:
            return FailureCause(
                "input",
                f"{broken} is truncated or corrupt",
                f"re-download {Path(broken).parent} (`fapm-merge verify {Path(broken).parent}` "
                "checks the whole folder)",
            )
        folders = _local_inputs(recipe)
        return FailureCause(
            "input",
            f"an input checkpoint cannot be read ({_last_line(error)})",
            "check each input folder: " + ("; ".join(f"`fapm-merge verify {f}`" for f in folders)
                                           if folders else "`fapm-merge verify FOLDER`"),
        )
    match = re.search(r"Tensor (\S+) required but not present in model (\S+)", text)
    if match:
        return FailureCause(
            "input",
            f"{match.group(2)} lacks tensor {match.group(1)} (an incomplete download, or "
            "another architecture)",
            f"`fapm-merge verify {match.group(2)}`; re-download it or use the matching model",
        )
    if isinstance(error, FapmInputError):
        return FailureCause("input", str(error), "fix that input and run again")

    return FailureCause(
        "unknown",
        f"{type(error).__name__}: {_last_line(error)}",
        f"run `fapm-merge lint {recipe_name}` and `fapm-merge verify FOLDER` on each input; "
        "if both pass, report it with the command line",
    )


__all__ = ["FailureCause", "explain_failure"]
