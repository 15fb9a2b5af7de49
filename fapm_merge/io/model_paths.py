"""How mergekit will read each model reference of a recipe: a local folder or the hub.

mergekit reads a reference from disk when the path exists and asks the Hugging Face
hub otherwise; its model card asks the hub about some local folders too. These
functions say, before a merge starts, which references are missing folders, which
will be fetched, and which will make the model card ask the hub (offline: a crash
after the weights are written), each with its fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fapm_merge.io.recipe import Problem, named_models


def reference_path(reference: str) -> str:
    """The model path a reference names, without ``+ADAPTER`` and ``@revision``
    (mergekit splits ``+`` first, then ``@``): ``base@main+lora`` -> ``base``."""
    return reference.split("+", 1)[0].split("@", 1)[0]


def looks_local(reference: str) -> bool:
    """Whether a model or adapter reference names a local folder, not a hub id.

    mergekit reads a path from disk when it exists (``ModelReference.local_path``);
    otherwise it asks the hub. A reference that starts with ``/``, ``~`` or ``.``,
    or has more than one ``/`` (a hub id is ``namespace/name``), is meant as a path
    even when it is missing, so a missing one is reported as missing instead of
    being looked up on the hub and failing there, obscurely.

    Args:
        reference (`str`): a model path or hub id, without ``+adapter`` or ``@revision``.
    """
    return (
        reference.startswith(("/", "~", "."))
        or reference.count("/") > 1
        or os.path.exists(reference)
    )


def card_asks_hub(path: str, *, exists: Optional[bool] = None) -> bool:
    """Whether mergekit's model card asks the Hugging Face hub about ``path``.

    A mirror of ``mergekit.card.is_hf`` (mergekit 0.1.5), minus the network:
    a path that starts with ``/`` or ``~`` or has more than one ``/`` is local;
    a path that does not exist is a hub id (no question asked); an existing path
    that is a valid repo id (``models/base``, ``base``) is sent to
    ``huggingface_hub.repo_exists``, after the weights and ``config.json`` were
    written. Offline that raises ``OfflineModeIsEnabled`` and the run stops
    without ``README.md`` and ``mergekit_config.yml``; online it queries the hub
    about a local folder. tests/test_fresh_clone.py checks this mirror against
    mergekit's own function and the real ``mergekit-yaml``.

    Args:
        path (`str`): the model or adapter path, without ``+adapter`` or ``@revision``.
        exists (`bool`, *optional*): whether the path will exist when the card is
            written (a mergekit-multi stage does not exist yet at lint time);
            default: whether it exists now, relative to the current directory.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not path or path[0] in "/~" or path.count("/") > 1:
        return False
    if not (os.path.exists(path) if exists is None else exists):
        return False
    try:
        validate_repo_id(path)  # repo_exists validates before it connects
    except HFValidationError:
        return False
    return True


def reference_parts(reference: str) -> List[Tuple[str, str]]:
    """``(path, marker file)`` of a reference: the model, and the adapter of
    ``BASE+ADAPTER`` (mergekit splits ``+`` first, then ``@revision``)."""
    model, _, adapter = reference.partition("+")
    return [(part.split("@", 1)[0], marker)
            for part, marker in ((model, "config.json"), (adapter, "adapter_config.json")) if part]


def _hub_lookup_problem(where: str, path: str) -> Problem:
    absolute = os.path.abspath(path)
    return Problem(where, (
        f"{path} is a relative path with at most one '/': mergekit reads the folder, "
        f"then its model card asks the Hugging Face hub whether '{path}' is a repo "
        "(offline: OfflineModeIsEnabled after the weights are written, and no README.md "
        f"or mergekit_config.yml); write the absolute path {absolute}"))


def missing_local_models(recipe: Dict[str, Any], stages: Sequence[str] = ()) -> List[Problem]:
    """Models a recipe names by a local path that is missing or is not a model folder.

    mergekit takes a missing path for a hub id and fails deep inside transformers
    ("Repo id must be in the form ...") after its start-up; this names the recipe
    key and the path first. ``BASE+ADAPTER`` references check both folders.

    Args:
        recipe (`Dict[str, Any]`): the parsed YAML recipe.
        stages (`Sequence[str]`, defaults to ()): mergekit-multi stage names (skipped).
    """
    problems: List[Problem] = []
    for where, reference in named_models(recipe):
        if reference_path(reference) in stages:
            continue
        for path, marker in reference_parts(reference):
            if not looks_local(path):
                continue
            part = path
            if path.startswith("~"):
                problems.append(Problem(where, f"{part}: mergekit does not expand ~; write the "
                                        "absolute path"))
                continue
            folder = Path(path)
            if not folder.is_dir():
                problems.append(Problem(where, f"{part}: no such folder; give the path of a "
                                        "local model folder, or a hub id (namespace/name)"))
            elif not (folder / marker).is_file():
                problems.append(Problem(where, f"{part} has no {marker}; point at the "
                                        "folder that holds the checkpoint"))
    return problems


def model_path_problems(recipe: Dict[str, Any], stages: Sequence[str] = ()) -> List[Problem]:
    """Every model reference mergekit would mishandle, each with its fix.

    * a missing local folder, a folder without ``config.json`` (or
      ``adapter_config.json`` for the ``+adapter`` part), a ``~`` path
      (:func:`missing_local_models`);
    * a relative path that mergekit's model card sends to the Hugging Face hub
      (:func:`card_asks_hub`), for the model and the ``+adapter`` part alike.

    Args:
        recipe (`Dict[str, Any]`): the parsed YAML recipe (one document).
        stages (`Sequence[str]`, defaults to ()): names of the mergekit-multi stages of
            the same file; references to them are resolved by mergekit-multi, not here.
    """
    problems = missing_local_models(recipe, stages)
    for where, reference in named_models(recipe):
        if reference_path(reference) in stages:
            continue
        for path, _marker in reference_parts(reference):
            if card_asks_hub(path):
                problems.append(_hub_lookup_problem(where, path))
    return problems


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _in_hub_cache(repo_id: str, revision: Optional[str], marker: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, marker, revision=revision), str)
    except Exception:  # an id the cache layout cannot hold: not cached
        return False


def model_path_notes(recipe: Dict[str, Any], stages: Sequence[str] = ()) -> List[str]:
    """What mergekit will fetch from the Hugging Face hub, said before it happens.

    A reference that is no folder here and does not look like a path is a hub id
    to mergekit: right for ``meta-llama/Meta-Llama-3-8B-Instruct``, wrong for a
    local ``models/base`` run from another directory. Neither can be told apart
    offline, so these are notes, not problems; with ``HF_HUB_OFFLINE`` set the
    note says whether the local hub cache has it.

    Args:
        recipe (`Dict[str, Any]`): the parsed YAML recipe (one document).
        stages (`Sequence[str]`, defaults to ()): mergekit-multi stage names (skipped).
    """
    notes: List[str] = []
    for where, reference in named_models(recipe):
        if reference_path(reference) in stages:
            continue
        model, _, adapter = reference.partition("+")
        for part, marker in ((model, "config.json"), (adapter, "adapter_config.json")):
            if not part:
                continue
            path, _, revision = part.partition("@")
            if not path or looks_local(path):
                continue
            text = (f"{where}: {part} is no folder under {os.getcwd()}, so mergekit will fetch "
                    "it from the Hugging Face hub")
            if _hub_offline():
                text += (" (HF_HUB_OFFLINE is set: " + (
                    "found in the local hub cache)" if _in_hub_cache(path, revision or None, marker)
                    else "it is not in the local hub cache, so the merge will fail)"))
            notes.append(text + "; if it is a local folder, give its absolute path")
    return notes


def stage_reference_findings(
    documents: Sequence[Dict[str, Any]], intermediate_dir: Optional[str] = None
) -> Tuple[List[Problem], List[str]]:
    """What mergekit-multi does with references to earlier stages.

    mergekit-multi replaces a model reference equal to a stage's ``name`` by
    ``os.path.join(--intermediate-dir, name)``. With a one-word relative folder
    (``--intermediate-dir stages``) that is ``stages/first``, which mergekit's model
    card sends to the Hugging Face hub (:func:`card_asks_hub`) once the stage
    exists: offline, the stage that reads it stops after writing its weights.

    Args:
        documents (`Sequence[Dict[str, Any]]`): the file's documents, in order.
        intermediate_dir (`str`, *optional*): the ``--intermediate-dir`` to check;
            without it, a note says which value is safe.

    Returns:
        ``(problems, notes)``; each problem's ``where`` starts with ``stage '<name>'``.
    """
    names = [d["name"] for d in documents if isinstance(d.get("name"), str)]
    problems: List[Problem] = []
    notes: List[str] = []
    for document in documents:
        label = f"stage {document.get('name', 'final')!r}"
        for where, reference in named_models(document):
            stage = reference_path(reference)
            if stage not in names:
                continue
            if intermediate_dir is None:
                notes.append(
                    f"{label}: {where}: reads stage {stage!r} from <intermediate-dir>/{stage}; run "
                    "mergekit-multi with an absolute --intermediate-dir (a one-word relative one, "
                    f"such as `stages`, makes mergekit's model card ask the Hugging Face hub about "
                    f"`stages/{stage}`, which fails offline)")
            elif card_asks_hub(os.path.join(intermediate_dir, stage), exists=True):
                problems.append(Problem(f"{label}: {where}", (
                    f"mergekit-multi reads stage {stage!r} from "
                    f"{os.path.join(intermediate_dir, stage)}, which mergekit's model card sends to "
                    "the Hugging Face hub (offline: OfflineModeIsEnabled after the weights are "
                    f"written); pass --intermediate-dir {os.path.abspath(intermediate_dir)}")))
    return problems, notes


__all__ = [
    "card_asks_hub",
    "looks_local",
    "missing_local_models",
    "model_path_notes",
    "model_path_problems",
    "reference_parts",
    "reference_path",
    "stage_reference_findings",
]
