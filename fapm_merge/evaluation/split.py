"""The confirmation split: evaluation data cut into a part that selects and a part that confirms.

A variant chosen as the best of many on some prompts looks better on them than it is
(the winner's curse); its numbers hold up only when measured again on data that did
not choose it. When no held-out files are given, ``tune`` cuts its task and text here:
seeded, so a resumed tune gets the same split, byte for byte.

* **Task**: whole groups when the file has them (a group never on both sides), else
  single prompts, in a seeded shuffle; ``round(share * units)`` of them confirm.
* **Text** of several documents (``.jsonl``, folder): whole documents, the same way.
* **Text** of one document (a plain file): two contiguous parts, cut at the paragraph
  boundary nearest to ``1 - share`` of its characters (else a line boundary, else a
  character): the first part selects, the last confirms. Contiguous, because
  neighbouring windows of one text are correlated: interleaved windows would not be
  held out.

Each side keeps the file order of what it holds. Pure on purpose (no torch, no
mergekit): the split is made before any model loads.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from fapm_merge.evaluation.errors import EvalInputError
from fapm_merge.evaluation.inputs import JSONL_SUFFIX, load_documents, task_lines
from fapm_merge.io.atomic import atomic_output_dir

CONFIRM_SHARE = 0.3
"""The share of the prompts (or groups) and of the text's documents (or characters,
for one document) held out to confirm the selected variant; the rest selects it."""

SPLIT_SEED = 0
"""The seed of the shuffle that assigns prompts, groups and documents to a side."""

SELECTION_TASK, CONFIRMATION_TASK = "select-task.jsonl", "confirm-task.jsonl"
SELECTION_TEXT, CONFIRMATION_TEXT = "select-text", "confirm-text"
"""File names in the split folder; the text's take ``.txt`` (one document) or ``.jsonl``."""

_MIN_PROMPTS = 2  # a paired accuracy comparison on one prompt says nothing


def _confirm_count(units: int, share: float, what: str) -> int:
    """How many of ``units`` confirm: ``share`` of them rounded (half up), at least one
    on each side."""
    if not 0 < share < 1:
        raise EvalInputError(f"the confirmation share must be between 0 and 1, got {share}")
    if units < 2:
        raise EvalInputError(f"{what}: {units} unit(s) to split, but a selection part and a "
                             "confirmation part need at least one each")
    return min(max(math.floor(share * units + 0.5), 1), units - 1)


def _held_out(units: int, share: float, seed: int, what: str) -> set:
    """The indices (of ``range(units)``) that confirm, from a seeded shuffle."""
    order = list(range(units))
    random.Random(seed).shuffle(order)
    return set(order[: _confirm_count(units, share, what)])


def split_task(path: Path, share: float = CONFIRM_SHARE, seed: int = SPLIT_SEED
               ) -> Tuple[List[str], List[str]]:
    """A task file's lines as (selection, confirmation), each in file order.

    Args:
        path (`Path`): a task JSONL file (:func:`fapm_merge.evaluation.inputs.task_lines`).
        share (`float`, defaults to `CONFIRM_SHARE`): the share of units that confirm.
        seed (`int`, defaults to `SPLIT_SEED`): the shuffle's seed.

    Returns:
        The lines exactly as written in the file (without line ends). With groups,
        the units are whole groups; else single prompts.

    Raises:
        EvalInputError: the file cannot be read, has fewer than two units, or one
            side would hold fewer than two prompts.
    """
    entries = task_lines(path)
    grouped = entries[0].group is not None
    units = list(dict.fromkeys(e.group for e in entries)) if grouped else list(range(len(entries)))
    what = f"--task {path} ({'groups' if grouped else 'prompts'})"
    confirm = {units[i] for i in _held_out(len(units), share, seed, what)}
    sides: Tuple[List[str], List[str]] = ([], [])
    for index, entry in enumerate(entries):
        sides[(entry.group if grouped else index) in confirm].append(entry.line)
    for name, side in zip(("selection", "confirmation"), sides):
        if len(side) < _MIN_PROMPTS:
            raise EvalInputError(
                f"--task {path}: its {name} part would hold {len(side)} prompt(s); a paired "
                f"comparison needs at least {_MIN_PROMPTS} on each side: give more prompts "
                f"{'or groups ' if grouped else ''}or separate confirmation files")
    return sides


def _cut_positions(text: str) -> List[List[int]]:
    """Where a single text may be cut, best kind first: after a blank line (paragraph),
    after a line end, anywhere."""
    paragraphs = [m.end() for m in re.finditer(r"\n[ \t\r\f\v]*\n\s*", text)]
    lines = [m.end() for m in re.finditer(r"\n", text)]
    return [paragraphs, lines, list(range(1, len(text)))]


def _cut_one_document(text: str, share: float, path: Path) -> Tuple[str, str]:
    target = (1 - share) * len(text)
    for positions in _cut_positions(text):
        usable = [p for p in positions if text[:p].strip() and text[p:].strip()]
        if usable:
            cut = min(usable, key=lambda p: (abs(p - target), p))
            return text[:cut], text[cut:]
    raise EvalInputError(f"--text {path} is too short to cut into a selection and a confirmation "
                         "part (one of them would be empty); give a longer text or separate "
                         "confirmation files")


def _one_document(path: Path) -> bool:
    return Path(path).is_file() and Path(path).suffix != JSONL_SUFFIX


def split_text(path: Path, share: float = CONFIRM_SHARE, seed: int = SPLIT_SEED
               ) -> Tuple[List[str], List[str]]:
    """A text's documents as (selection, confirmation), each in document order.

    Args:
        path (`Path`): a text as ``--text`` takes it
            (:func:`fapm_merge.evaluation.inputs.load_documents`).
        share (`float`, defaults to `CONFIRM_SHARE`): the share of documents (of
            characters, for a plain file) that confirm.
        seed (`int`, defaults to `SPLIT_SEED`): the shuffle's seed (a plain file's
            cut does not use it).

    Returns:
        Two lists of documents; for a plain file, one document each: the first part
        of the text and the rest (together, the text as read).

    Raises:
        EvalInputError: the text cannot be read, has fewer than two documents, or
            (a plain file) cannot be cut into two non-blank parts.
    """
    documents = load_documents(path)
    if _one_document(path):
        first, last = _cut_one_document(documents[0], share, path)
        return [first], [last]
    confirm = _held_out(len(documents), share, seed, f"--text {path} (documents)")
    sides: Tuple[List[str], List[str]] = ([], [])
    for index, document in enumerate(documents):
        sides[index in confirm].append(document)
    return sides


@dataclass(frozen=True)
class SplitFiles:
    """The files of a confirmation split (None where no task or text was given).

    Attributes:
        selection_task (`Path`, *optional*), selection_text (`Path`, *optional*):
            what selects the variant.
        confirmation_task (`Path`, *optional*), confirmation_text (`Path`, *optional*):
            what confirms it.
    """

    selection_task: Optional[Path]
    selection_text: Optional[Path]
    confirmation_task: Optional[Path]
    confirmation_text: Optional[Path]


def _jsonl(documents: Sequence[str]) -> str:
    return "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents)


def _write_parts(folder: Path, task_parts: Optional[Sequence[Tuple[str, Sequence[str]]]],
                 text_parts: Optional[Sequence[Tuple[str, Sequence[str]]]], plain: bool) -> dict:
    """Write each ``(name, task lines)`` and ``(stem, documents)`` part into ``folder``,
    which appears whole (built beside it, then replacing it); the paths by name and stem.
    A text part is the ``.txt`` of a plain file's one document, else ``.jsonl``."""
    names = {}
    with atomic_output_dir(folder, overwrite=True) as work:
        for name, lines in task_parts or ():
            (work / name).write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
            names[name] = folder / name
        for stem, documents in text_parts or ():
            name = stem + (".txt" if plain else JSONL_SUFFIX)
            body = documents[0] if plain else _jsonl(documents)
            (work / name).write_bytes(body.encode("utf-8"))
            names[stem] = folder / name
    return names


def write_confirmation_split(task: Optional[Path], text: Optional[Path], folder: Path,
                             share: float = CONFIRM_SHARE, seed: int = SPLIT_SEED) -> SplitFiles:
    """Split the task and the text (:func:`split_task`, :func:`split_text`) into ``folder``.

    Writes ``select-task.jsonl`` and ``confirm-task.jsonl`` (the task's lines as
    written), ``select-text`` and ``confirm-text`` (``.txt`` parts of a plain file,
    else ``.jsonl`` of ``{"text": ...}`` lines). The same inputs give the same bytes
    (a resumed tune finds the same digests). The folder appears whole: it is built
    beside ``folder`` and replaces it, so give the split a folder of its own.

    Args:
        task (`Path`, *optional*): a task JSONL file.
        text (`Path`, *optional*): a text file, ``.jsonl`` text or folder of ``.txt`` files.
        folder (`Path`): where the files go (replaced).
        share (`float`, defaults to `CONFIRM_SHARE`): the share held out to confirm.
        seed (`int`, defaults to `SPLIT_SEED`): the shuffle's seed.
    """
    if task is None and text is None:
        raise EvalInputError("nothing to split: give a task file, a text or both")
    # everything is read and checked before the folder is touched
    task_sides = split_task(task, share, seed) if task is not None else None
    text_sides = split_text(text, share, seed) if text is not None else None
    names = _write_parts(Path(folder).absolute(),
                         task_sides and list(zip((SELECTION_TASK, CONFIRMATION_TASK), task_sides)),
                         text_sides and list(zip((SELECTION_TEXT, CONFIRMATION_TEXT), text_sides)),
                         text is not None and _one_document(text))
    return SplitFiles(names.get(SELECTION_TASK), names.get(SELECTION_TEXT),
                      names.get(CONFIRMATION_TASK), names.get(CONFIRMATION_TEXT))


SCREEN_TASK, REST_TASK = "screen-task.jsonl", "rest-task.jsonl"
SCREEN_TEXT, REST_TEXT = "screen-text", "rest-text"
"""File names of the screening split (tune's screening share and the rest); the text's
take ``.jsonl``."""


def write_screening_split(task: Path, text: Path, folder: Path, prompts: Sequence[int],
                          documents: Sequence[int]) -> SplitFiles:
    """The task lines and documents of tune's screening share and of the rest, into ``folder``.

    The share is chosen from a measured record
    (:func:`fapm_merge.workflows.tradeoff.screen.share_of`); this writes it:
    ``screen-task.jsonl`` with the lines numbered ``prompts`` (file order, as written),
    ``rest-task.jsonl`` with the others; ``screen-text.jsonl`` with the ``documents``
    numbered ``documents`` and ``rest-text.jsonl`` with the others that give windows.
    Written like :func:`write_confirmation_split` (same bytes from the same inputs; the
    folder replaced whole). ``selection_*`` are the share's files, ``confirmation_*`` the rest's.

    Args:
        task (`Path`): the selection task file.
        text (`Path`): the selection text, of several documents (a ``.jsonl`` or a folder).
        folder (`Path`): where the files go (replaced).
        prompts (`Sequence[int]`): the share's prompts, by their index in the task file.
        documents (`Sequence[int]`): ``(share, rest)``: two sequences of document indices.
    """
    if _one_document(text):
        raise EvalInputError(f"--text {text} is one document; the screening share takes whole documents")
    lines = [entry.line for entry in task_lines(task)]
    chosen = set(prompts)
    all_documents = load_documents(text)
    share, rest = documents
    names = _write_parts(
        Path(folder).absolute(),
        [(SCREEN_TASK, [line for i, line in enumerate(lines) if i in chosen]),
         (REST_TASK, [line for i, line in enumerate(lines) if i not in chosen])],
        [(SCREEN_TEXT, [all_documents[i] for i in share]), (REST_TEXT, [all_documents[i] for i in rest])],
        plain=False)
    return SplitFiles(names[SCREEN_TASK], names[SCREEN_TEXT], names[REST_TASK], names[REST_TEXT])


__all__ = ["CONFIRMATION_TASK", "CONFIRMATION_TEXT", "CONFIRM_SHARE", "REST_TASK", "REST_TEXT",
           "SCREEN_TASK", "SCREEN_TEXT", "SELECTION_TASK", "SELECTION_TEXT", "SPLIT_SEED",
           "SplitFiles", "split_task", "split_text", "write_confirmation_split",
           "write_screening_split"]
