"""The evaluation data as eval reads it: the text's documents and the task's prompts.

One reader each, used by ``fapm-merge eval``, tune's checks before any merge and the
confirmation split (:mod:`fapm_merge.evaluation.split`), so they never disagree about
what a file holds. Light on purpose (no torch): tune checks its inputs and splits them
before loading a model library.

**Text** (``--text``) is one of:

* a plain text file: one document, the whole file;
* a ``.jsonl`` file: one JSON object per line with a string ``"text"``, each a
  document (other keys are ignored, blank lines skipped);
* a folder: every ``*.txt`` file in it, sorted by name, each a document.

Windows never cross documents, so a bootstrap can resample whole documents.

**Task** (``--task``): JSON lines, the formats of :mod:`fapm_merge.evaluation.metrics`;
a line may carry ``"group"`` (a string or an int, e.g. the movie or source a prompt
comes from). If one line has a group, every line must: prompts are then resampled
and split by whole groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from fapm_merge.evaluation.errors import EvalInputError
from fapm_merge.io.jsonl import iter_jsonl

JSONL_SUFFIX = ".jsonl"
"""A text file with this suffix holds one document per line (``{"text": ...}``)."""

DOCUMENT_GLOB = "*.txt"
"""The files of a text folder, one document each."""


def _read_utf8(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise EvalInputError(
            f"--text {path} is not UTF-8 text ({error.reason} at byte {error.start}); "
            "convert it to UTF-8"
        ) from None


def document_files(folder: Path) -> List[Path]:
    """The ``*.txt`` files of a text folder, sorted by name (the documents' order)."""
    files = sorted((p for p in Path(folder).glob(DOCUMENT_GLOB) if p.is_file()), key=lambda p: p.name)
    if not files:
        raise EvalInputError(
            f"--text {folder} is a folder without .txt files; put one document per .txt file "
            "in it, or give a text file or a .jsonl file of {\"text\": ...} lines"
        )
    return files


def load_documents(path: Path) -> List[str]:
    """The documents of an evaluation text (the module docstring gives the three forms).

    Args:
        path (`Path`): a plain text file (one document), a ``.jsonl`` file (one
            ``{"text": ...}`` object per line) or a folder of ``.txt`` files.

    Raises:
        EvalInputError: a file that is not UTF-8, a ``.jsonl`` line that is not an
            object with a non-blank string ``"text"`` (named as file:line), a
            ``.jsonl`` file without documents, a folder without ``.txt`` files.
    """
    path = Path(path)
    if not path.exists():
        raise EvalInputError(f"--text {path} not found")
    if path.is_dir():
        return [_read_utf8(file) for file in document_files(path)]
    if path.suffix != JSONL_SUFFIX:
        return [_read_utf8(path)]
    documents = []
    for number, value in iter_jsonl(path, EvalInputError):
        where = f"{path}:{number}"
        if not isinstance(value, dict) or not isinstance(value.get("text"), str):
            raise EvalInputError(f"{where}: each line of a .jsonl text needs a string 'text' "
                                 "(one document per line)")
        if not value["text"].strip():
            raise EvalInputError(f"{where}: 'text' is empty; remove the line or give the document")
        documents.append(value["text"])
    if not documents:
        raise EvalInputError(f"--text {path} holds no documents (one {{\"text\": ...}} object per line)")
    return documents


@dataclass(frozen=True)
class TaskLine:
    """One prompt of a task file: the line as written and what it means.

    Attributes:
        line (`str`): the JSON line exactly as in the file (without the line end).
        item (`dict`): the checked example: ``prompt``, ``answer`` (a choice index
            when there are ``choices``), ``choices``, and ``group`` (as a string)
            when the file has groups.
    """

    line: str
    item: dict

    @property
    def group(self) -> Optional[str]:
        return self.item.get("group")


def _check_item(item, where: str) -> dict:
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or "answer" not in item:
        raise EvalInputError(f"{where}: each line needs a string 'prompt' and an 'answer'")
    if "choices" in item:
        choices = item["choices"]
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
            raise EvalInputError(f"{where}: 'choices' must be a list of at least two strings")
        if len(set(choices)) != len(choices):  # equal scores: the pick would be arbitrary
            raise EvalInputError(f"{where}: 'choices' lists the same text twice")
        answer = item["answer"]
        if isinstance(answer, str):
            if answer not in choices:
                raise EvalInputError(f"{where}: answer {answer!r} is not one of the choices")
            answer = choices.index(answer)
        # bool is an int in Python: `"answer": true` must not mean choice 1
        if isinstance(answer, bool) or not (isinstance(answer, int) and 0 <= answer < len(choices)):
            raise EvalInputError(
                f"{where}: answer must be a choice index (0 to {len(choices) - 1}) or a "
                f"choice's text, got {answer!r}"
            )
        checked = {"prompt": item["prompt"], "choices": choices, "answer": answer}
    elif isinstance(item["answer"], str) and item["answer"].strip():
        checked = {"prompt": item["prompt"], "answer": item["answer"]}
    else:
        raise EvalInputError(f"{where}: 'answer' must be a non-empty string (or add 'choices')")
    if "group" in item:
        group = item["group"]
        # a bool is an int in Python, and true/false names no source
        if isinstance(group, bool) or not isinstance(group, (str, int)) or str(group) == "":
            raise EvalInputError(f"{where}: 'group' must be a non-empty string or an int "
                                 f"(e.g. the movie or source id), got {group!r}")
        checked["group"] = str(group)
    return checked


def task_lines(path: Path) -> List[TaskLine]:
    """Read and check a task JSONL file: its prompts in file order, each with its line.

    Raises:
        EvalInputError: a missing file, a line that is no valid example (named as
            file:line), groups on some lines only (naming the first line without
            one), a file without examples.
    """
    path = Path(path)
    if not path.exists():
        raise EvalInputError(f"task file {path} not found")
    checked = [(number, _check_item(item, f"{path}:{number}"))
               for number, item in iter_jsonl(path, EvalInputError)]
    if not checked:
        raise EvalInputError(f"task file {path} has no examples")
    grouped = [number for number, item in checked if "group" in item]
    if grouped and len(grouped) < len(checked):
        number = next(number for number, item in checked if "group" not in item)
        raise EvalInputError(
            f"{path}:{number}: this line has no 'group' but line {grouped[0]} has one; when "
            "any line names a group every line must (prompts are resampled by group)")
    # the same reading as iter_jsonl's (a BOM dropped), for the lines as written
    raw = Path(path).read_text(encoding="utf-8-sig").splitlines()
    return [TaskLine(raw[number - 1], item) for number, item in checked]


def load_task(path: Path) -> List[dict]:
    """The checked examples of a task JSONL file, in file order (:func:`task_lines`)."""
    return [entry.item for entry in task_lines(path)]


__all__ = ["DOCUMENT_GLOB", "JSONL_SUFFIX", "TaskLine", "document_files", "load_documents",
           "load_task", "task_lines"]
