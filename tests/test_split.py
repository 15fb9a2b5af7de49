"""The confirmation split (issue 21): disjoint sides that together are the input, whole
groups and documents, seeded, the share respected, a plain text cut at a paragraph."""

import json
import subprocess
import sys

import pytest

from fapm_merge.evaluation.errors import EvalInputError
from fapm_merge.evaluation.inputs import load_documents, load_task
from fapm_merge.evaluation.split import (
    CONFIRM_SHARE,
    SPLIT_SEED,
    split_task,
    split_text,
    write_confirmation_split,
)


def _task(path, count, groups=None):
    lines = []
    for n in range(count):
        item = {"prompt": f"p{n}", "answer": f"a{n}"}
        if groups is not None:
            item["group"] = groups[n]
        lines.append(json.dumps(item, separators=(",", ":")) if n % 2 else json.dumps(item))
    path.write_text("\n".join(lines) + "\n")
    return lines


def test_prompts_split_into_disjoint_sides_in_file_order(tmp_path):
    path = tmp_path / "task.jsonl"
    lines = _task(path, 20)
    selection, confirmation = split_task(path)
    assert len(confirmation) == round(CONFIRM_SHARE * 20) == 6 and len(selection) == 14
    assert sorted(selection + confirmation) == sorted(lines)  # exact text, each line once
    assert not set(selection) & set(confirmation)
    assert selection == [line for line in lines if line in selection]  # file order kept
    assert confirmation == [line for line in lines if line in confirmation]
    assert split_task(path) == (selection, confirmation)  # seeded
    assert split_task(path, seed=SPLIT_SEED + 1) != (selection, confirmation)
    assert len(split_task(path, share=0.5)[1]) == 10


def test_groups_stay_whole(tmp_path):
    path = tmp_path / "task.jsonl"
    groups = [f"movie{n % 7}" for n in range(40)]
    _task(path, 40, groups)
    selection, confirmation = split_task(path)
    group_of = lambda line: json.loads(line)["group"]  # noqa: E731
    held = {group_of(line) for line in confirmation}
    assert len(held) == round(CONFIRM_SHARE * 7) == 2
    assert not held & {group_of(line) for line in selection}
    assert len(selection) + len(confirmation) == 40


def test_task_refusals_name_the_file(tmp_path):
    path = tmp_path / "task.jsonl"
    _task(path, 1)
    with pytest.raises(EvalInputError, match=r"task.jsonl \(prompts\): 1 unit\(s\) to split"):
        split_task(path)
    _task(path, 6, ["a", "a", "a", "a", "a", "b"])  # "b" alone on one side: 1 prompt
    with pytest.raises(EvalInputError, match=r"task.jsonl: its (selection|confirmation) part would hold 1 prompt"):
        split_task(path)
    _task(path, 4, ["a", "a", "a", "a"])
    with pytest.raises(EvalInputError, match=r"\(groups\): 1 unit\(s\)"):
        split_task(path)
    _task(path, 10)
    with pytest.raises(EvalInputError, match="between 0 and 1"):
        split_task(path, share=1.0)


def test_documents_split_whole_and_seeded(tmp_path):
    path = tmp_path / "general.jsonl"
    documents = [f"document {n}\nwith lines" for n in range(10)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    selection, confirmation = split_text(path)
    assert len(confirmation) == 3 and sorted(selection + confirmation) == sorted(documents)
    assert selection == [d for d in documents if d in selection]
    assert split_text(path, seed=5) != (selection, confirmation)
    folder = tmp_path / "docs"
    folder.mkdir()
    for n, document in enumerate(documents):
        (folder / f"{n:02d}.txt").write_text(document)
    assert split_text(folder) == (selection, confirmation)  # the same documents, the same split
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "alone"}) + "\n")
    with pytest.raises(EvalInputError, match=r"one.jsonl \(documents\): 1 unit\(s\)"):
        split_text(one)


def test_one_text_is_cut_at_the_paragraph_nearest_the_share(tmp_path):
    path = tmp_path / "general.txt"
    paragraphs = [f"Paragraph {n}. " + "word " * 20 for n in range(10)]
    text = "\n\n".join(paragraphs) + "\n"
    path.write_text(text)
    (first,), (last,) = split_text(path)
    assert first + last == text and first.endswith("\n\n") and last.startswith("Paragraph 7.")
    # 7 of 10 equal paragraphs select: the boundary nearest 70% of the characters
    path.write_text("one line\n" * 10)  # no blank line: a line boundary
    (first,), (last,) = split_text(path)
    assert first == "one line\n" * 7 and last == "one line\n" * 3
    path.write_text("x" * 100)  # one line: a character
    assert split_text(path) == (["x" * 70], ["x" * 30])
    path.write_text("x\n\n   \n")
    with pytest.raises(EvalInputError, match="general.txt is too short to cut"):
        split_text(path)


def test_written_split_is_byte_deterministic_and_reads_back(tmp_path):
    task, text = tmp_path / "task.jsonl", tmp_path / "general.jsonl"
    lines = _task(task, 12, [n // 2 for n in range(12)])
    documents = [f"doc {n} é" for n in range(5)]
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    files = write_confirmation_split(task, text, tmp_path / "split")
    assert files.selection_text.name == "select-text.jsonl" and files.confirmation_task.name == "confirm-task.jsonl"
    first = {p.name: p.read_bytes() for p in (tmp_path / "split").iterdir()}
    assert sorted(first) == ["confirm-task.jsonl", "confirm-text.jsonl", "select-task.jsonl", "select-text.jsonl"]
    again = write_confirmation_split(task, text, tmp_path / "split")
    assert again == files and {p.name: p.read_bytes() for p in (tmp_path / "split").iterdir()} == first
    chosen = files.selection_task.read_text().splitlines() + files.confirmation_task.read_text().splitlines()
    assert sorted(chosen) == sorted(lines)
    assert len(load_task(files.selection_task)) + len(load_task(files.confirmation_task)) == 12
    assert sorted(load_documents(files.selection_text) + load_documents(files.confirmation_text)) == sorted(documents)
    plain = tmp_path / "general.txt"
    plain.write_text("first paragraph\n\nsecond paragraph\n\nthird\n")
    files = write_confirmation_split(None, plain, tmp_path / "split-plain")
    assert files.selection_task is None and files.confirmation_text.name == "confirm-text.txt"
    assert files.selection_text.read_text() + files.confirmation_text.read_text() == plain.read_text()


def test_a_refused_split_leaves_the_folder_alone(tmp_path):
    folder = tmp_path / "split"
    folder.mkdir()
    (folder / "keep").write_text("x")
    task = tmp_path / "task.jsonl"
    _task(task, 1)
    with pytest.raises(EvalInputError):
        write_confirmation_split(task, None, folder)
    assert (folder / "keep").exists()


def test_the_split_module_loads_neither_torch_nor_mergekit():
    code = ("import sys, fapm_merge.evaluation.split; "
            "print(sorted(m for m in ('torch', 'mergekit') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
