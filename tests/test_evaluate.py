"""fapm-merge eval: the metrics against values computed by hand from a tiny model's logits."""

import json
import math
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner

from helpers import truncated_copy, variant
from fapm_merge.cli import main
from fapm_merge.evaluation.evaluate import evaluate_model
from fapm_merge.evaluation.inputs import load_documents, load_task
from fapm_merge.evaluation.metrics import (
    ByteTokenizer,
    EvalInputError,
    greedy_continuation,
    load_model,
    mean_token_loss,
    sequence_logprobs,
    task_accuracy,
    text_windows,
)
from fapm_merge.evaluation.results import data_digest, file_digest
from fapm_merge.evaluation.settings import EvalSettings
from fapm_merge.workflows.demo import TINY_CONFIGS, save_pair

TEXT = "abcdefghij klmnopqrstuvwxyz, the end. " * 2  # 76 bytes


class Latin1Tokenizer(ByteTokenizer):
    """Bytes that always round-trip (any model output decodes to the same ids)."""

    def encode(self, text):
        return list(text.encode("latin-1"))

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("latin-1")


class BosTokenizer(ByteTokenizer):
    bos_token_id = 0


@pytest.fixture(scope="module")
def pair256(tmp_path_factory):
    """A tiny Llama pair with a 256-token vocabulary (byte tokens)."""
    return save_pair(dict(TINY_CONFIGS["llama"], vocab_size=256), tmp_path_factory.mktemp("p256"))


@pytest.fixture(scope="module")
def model(pair256):
    return load_model(pair256[0])


def hand_nll(logits_row, target):
    """-log softmax(logits)[target], written out with Python floats."""
    values = [float(x) for x in logits_row]
    top = max(values)
    return math.log(sum(math.exp(v - top) for v in values)) + top - values[target]


def hand_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double()


@pytest.mark.parametrize("tokenizer_class, window", [(ByteTokenizer, 25), (BosTokenizer, 25), (ByteTokenizer, 7)])
def test_text_loss_equals_hand_computation(model, tokenizer_class, window):
    tokenizer = tokenizer_class()
    ids = tokenizer.encode(TEXT)
    bos = [0] if tokenizer.bos_token_id is not None else []
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = bos + ids[start : start + window]
        if len(chunk) < 2:
            continue  # 76 = 3*25 + 1: without BOS the last single byte predicts nothing
        logits = hand_logits(model, chunk)
        for position in range(1, len(chunk)):
            total += hand_nll(logits[position - 1], chunk[position])
            count += 1
    result = mean_token_loss(model, tokenizer, [TEXT], window=window, batch_size=3)
    assert result["tokens"] == count
    assert result["windows"] == math.ceil(len(ids) / window) - (not bos and len(ids) % window == 1)
    assert result["loss"] == pytest.approx(total / count, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-6)


def test_windows_are_consecutive_and_cover_the_text():
    assert text_windows(list(range(7)), 3, []) == [[0, 1, 2], [3, 4, 5]]  # [6] predicts nothing
    assert text_windows(list(range(7)), 3, [9]) == [[9, 0, 1, 2], [9, 3, 4, 5], [9, 6]]
    with pytest.raises(EvalInputError, match="--window"):
        text_windows([1, 2], 0, [])


def test_max_tokens_cuts_the_text(model):
    tokenizer = ByteTokenizer()
    cut = mean_token_loss(model, tokenizer, [TEXT], window=10, max_tokens=20)
    same = mean_token_loss(model, tokenizer, [TEXT[:20]], window=10)
    assert cut == same and cut["tokens"] == 18


def hand_greedy(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(hand_logits(model, ids)[-1].argmax()))
    return ids[len(prompt) :]


def test_greedy_exact_match(model):
    tokenizer = Latin1Tokenizer()
    examples = []
    for prompt in ("hello", "the cat", "abc", "xyz", "0123", "ok, "):
        generated = hand_greedy(model, tokenizer.encode(prompt), 3)
        assert greedy_continuation(model, tokenizer.encode(prompt), 3) == generated
        text = tokenizer.decode(generated)
        if text == text.strip():  # answers are compared after strip()
            examples.append((prompt, text))
    assert len(examples) >= 2
    (p1, right), (p2, other) = examples[:2]
    wrong = "".join(chr(ord(c) ^ 1) for c in other)  # same length, differs everywhere
    items = [{"prompt": p1, "answer": right}, {"prompt": p2, "answer": wrong}]
    result = task_accuracy(model, tokenizer, items)
    assert result["accuracy"] == 0.5 and result["correct"] == 1 and result["examples"] == 2
    assert result["by_kind"] == {"generate": {"examples": 2, "correct": 1}}


def hand_choice_scores(model, tokenizer, prompt, choices):
    prompt_ids = tokenizer.encode(prompt)
    scores = []
    for choice in choices:
        ids = prompt_ids + tokenizer.encode(choice)
        logits = hand_logits(model, ids)
        scores.append(-sum(hand_nll(logits[j - 1], ids[j]) for j in range(len(prompt_ids), len(ids))))
    return scores


def test_choices_log_likelihood(model):
    tokenizer = ByteTokenizer()
    choices = [" red", " green", " a much longer choice", " b"]
    items = []
    for prompt in ("colour:", "pick one:"):
        scores = hand_choice_scores(model, tokenizer, prompt, choices)
        best = max(range(4), key=scores.__getitem__)
        worst = min(range(4), key=scores.__getitem__)
        assert best != worst
        items.append((prompt, best, worst))
    data = [
        {"prompt": items[0][0], "choices": choices, "answer": items[0][1]},  # right
        {"prompt": items[1][0], "choices": choices, "answer": items[1][2]},  # wrong
    ]
    result = task_accuracy(model, tokenizer, data)
    assert result["accuracy"] == 0.5 and result["by_kind"] == {"choices": {"examples": 2, "correct": 1}}


def test_task_file_errors_name_the_line(tmp_path):
    path = tmp_path / "task.jsonl"
    cases = [
        ('{"prompt": "a"}', "needs a string 'prompt' and an 'answer'"),
        ('{"prompt": "a", "choices": ["x", "y"], "answer": "z"}', "not one of the choices"),
        ('{"prompt": "a", "choices": ["x"], "answer": 0}', "at least two strings"),
        ('{"prompt": "a", "answer": ""}', "non-empty string"),
        ("not json", "not JSON"),
    ]
    for line, message in cases:
        path.write_text('{"prompt": "p", "answer": "q"}\n' + line + "\n")
        with pytest.raises(EvalInputError, match=message) as info:
            load_task(path)
        assert f"{path}:2" in str(info.value)
    path.write_text('{"prompt": "p", "choices": ["x", "y"], "answer": "y"}\n')
    assert load_task(path) == [{"prompt": "p", "choices": ["x", "y"], "answer": 1}]


def test_cli_appends_one_line_per_model_with_recipe(pair256, tmp_path):
    base, finetuned = pair256
    merged = tmp_path / "merged"
    merged.mkdir()
    for item in finetuned.iterdir():
        (merged / item.name).write_bytes(item.read_bytes())
    recipe = {"merge_method": "fapm", "base_model": str(base), "models": [{"model": str(finetuned)}]}
    (merged / "mergekit_config.yml").write_text(yaml.safe_dump(recipe))
    text, task = tmp_path / "text.txt", tmp_path / "task.jsonl"
    text.write_text(TEXT)
    task.write_text(json.dumps({"prompt": "x", "choices": [" a", " b"], "answer": 0}) + "\n")
    results = tmp_path / "results.jsonl"
    results.write_text('{"earlier": true}\n')
    args = ["eval", str(base), str(merged), "--text", str(text), "--task", str(task),
            "--tokenizer", "bytes", "--window", "25", "--out", str(results)]
    outcome = CliRunner().invoke(main, args)
    assert outcome.exit_code == 0, outcome.output
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert lines[0] == {"earlier": True} and len(lines) == 3
    assert lines[1]["model"] == str(base) and lines[1]["recipe"] is None
    assert lines[2]["recipe"] == recipe
    expected = mean_token_loss(load_model(merged), ByteTokenizer(), [TEXT], window=25)
    assert lines[2]["metrics"]["text"]["loss"] == pytest.approx(expected["loss"], rel=1e-9)
    assert lines[2]["metrics"]["task"]["examples"] == 1


def test_bytes_tokenizer_needs_256_tokens(llama_pair, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    outcome = CliRunner().invoke(main, ["eval", str(llama_pair[0]), "--text", str(text), "--tokenizer", "bytes", "--out", str(tmp_path / "r.jsonl")])
    assert outcome.exit_code != 0 and "at least 256 tokens; this model has 64" in outcome.output


def test_model_without_tokenizer_is_a_clear_error(pair256, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    outcome = CliRunner().invoke(main, ["eval", str(pair256[0]), "--text", str(text), "--out", str(tmp_path / "r.jsonl")])
    assert outcome.exit_code != 0 and "--tokenizer bytes" in outcome.output


def test_lm_eval_absent_is_a_clear_message(pair256, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the 'eval' extra were not installed
    outcome = CliRunner().invoke(main, ["eval", str(pair256[0]), "--lm-eval", "hellaswag", "--out", str(tmp_path / "r.jsonl")])
    assert outcome.exit_code != 0
    assert "pip install 'fapm-merge[eval]'" in outcome.output


def test_pickled_only_model_folder_is_refused(tmp_path):
    """Weights load through safetensors only: a .bin-only folder is never unpickled."""
    from fapm_merge.evaluation.metrics import load_model
    from fapm_merge.workflows.demo import TINY_CONFIGS, build_model

    build_model(TINY_CONFIGS["llama"]).save_pretrained(tmp_path / "m")
    for weights in (tmp_path / "m").glob("*.safetensors"):
        torch.save({}, tmp_path / "m" / "pytorch_model.bin")
        weights.unlink()
    with pytest.raises(EvalInputError, match="safetensors"):
        load_model(tmp_path / "m")


def test_models_that_would_give_meaningless_scores_are_refused(pair256, tmp_path):
    """Regression: a NaN weight gave 'loss nan', a missing weight was silently
    initialised at random, and both exited 0 and wrote a results line."""
    name = "model.layers.0.self_attn.q_proj.weight"

    def nan(state):
        state[name][0, 0] = math.nan

    def missing(state):
        del state[name]

    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    for edit, message in ((nan, f"weight '{name}' holds NaN or Inf"),
                          (missing, f"lacks 1 weight\\(s\\) the model needs \\({name}\\)")):
        folder = variant(pair256[0], tmp_path / edit.__name__, edit)
        with pytest.raises(EvalInputError, match=message):
            load_model(folder)
        results = tmp_path / f"{edit.__name__}.jsonl"
        outcome = CliRunner().invoke(main, ["eval", str(folder), "--text", str(text), "--tokenizer",
                                            "bytes", "--out", str(results)])
        assert outcome.exit_code == 1 and "fapm-merge verify" in outcome.output
        assert not results.exists()


def test_unreadable_inputs_are_named(pair256, tmp_path):
    text = tmp_path / "latin1.txt"
    text.write_bytes("caf\xe9".encode("latin-1"))
    outcome = CliRunner().invoke(main, ["eval", str(pair256[0]), "--text", str(text), "--tokenizer",
                                        "bytes", "--out", str(tmp_path / "r.jsonl")])
    assert outcome.exit_code == 1 and "is not UTF-8 text" in outcome.output
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "sweep.json").write_text("{}")
    outcome = CliRunner().invoke(main, ["eval", str(sweep_dir), "--text", str(text)])
    assert outcome.exit_code == 1 and "is not a sweep manifest" in outcome.output
    truncated = truncated_copy(pair256[0], tmp_path / "truncated", 1000).parent
    with pytest.raises(EvalInputError, match="transformers cannot load it \\(SafetensorError"):
        load_model(truncated)


def test_window_longer_than_the_model_and_boolean_answers_are_refused(model, tmp_path):
    """Regression: a window past GPT-2's learned positions died in an IndexError inside
    the embedding; `"answer": true` counted as choice 1; a UTF-8 BOM was 'not JSON'."""
    gpt2 = load_model(save_pair(dict(TINY_CONFIGS["gpt2"], vocab_size=256), tmp_path / "gpt2")[0])
    limit = gpt2.config.n_positions
    with pytest.raises(EvalInputError, match=f"--window {limit + 1} exceeds the {limit} positions"):
        mean_token_loss(gpt2, ByteTokenizer(), [TEXT * 200], window=limit + 1)
    short = TEXT[: limit // 2]  # only real windows count: a short text fits any window
    assert mean_token_loss(gpt2, ByteTokenizer(), [short], window=limit + 1)["tokens"] == len(short) - 1
    # rotary models run past max_position_embeddings: no limit for them
    assert mean_token_loss(model, ByteTokenizer(), [TEXT], window=model.config.max_position_embeddings + 1)
    task = tmp_path / "task.jsonl"
    task.write_text('{"prompt": "a", "choices": ["x", "y"], "answer": true}\n')
    with pytest.raises(EvalInputError, match=r"choice index \(0 to 1\) or a choice's text, got True"):
        load_task(task)
    task.write_text('{"prompt": "a", "choices": ["x", "x"], "answer": 1}\n')
    with pytest.raises(EvalInputError, match="lists the same text twice"):
        load_task(task)
    task.write_bytes('\ufeff{"prompt": "a", "answer": "b"}\n'.encode("utf-8"))
    assert load_task(task) == [{"prompt": "a", "answer": "b"}]


def test_forward_passes_run_on_single_threaded_workers_and_give_the_same_values(model):
    """Issue 22: text batches and task items run on the kernel's pool of one-thread
    workers (a busy core then delays one pass, not every op); every value is the one
    the calling thread computes with its own torch threads."""
    import threading

    tokenizer = Latin1Tokenizer()
    items = [{"prompt": p, "choices": [" red", " green", " blue"], "answer": i % 3}
             for i, p in enumerate(("colour:", "pick:", "a", "b c"))]
    items += [{"prompt": p, "answer": "xy"} for p in ("hello", "the cat")]
    seen = []  # (thread, its torch thread count) of every forward pass
    hook = model.register_forward_pre_hook(
        lambda *_: seen.append((threading.get_ident(), torch.get_num_threads())))
    before = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            seen.clear()
            results[threads] = (mean_token_loss(model, tokenizer, [TEXT], window=7, batch_size=2),
                                task_accuracy(model, tokenizer, items))
            callers = {ident for ident, _ in seen}
            if threads == 1:  # one thread: no workers, everything here as before
                assert callers == {threading.get_ident()}
            else:
                assert threading.get_ident() not in callers
                assert {count for _, count in seen} == {1}
    finally:
        torch.set_num_threads(before)
        hook.remove()
    assert json.dumps(results[1]) == json.dumps(results[2])


# ----------------------------------------------------------------- text as documents

DOCUMENTS = ["the first document, a line of words. " * 2, "second: short", "a third one\nof two lines\n"]


def _evaluate_text(model_dir, text, **options):
    settings = EvalSettings(text=text, tokenizer="bytes", **{"window": 16, "batch_size": 1, **options})
    return evaluate_model(model_dir, settings)["metrics"]["text"]


def test_one_text_file_is_one_document_with_the_old_windows_bit_for_bit(pair256, model, tmp_path):
    """A plain file keeps today's windows of the whole file and the same losses, bit for bit."""
    text = tmp_path / "general.txt"
    text.write_text(TEXT)
    result = _evaluate_text(pair256[0], text, batch_size=3, max_tokens=60)
    ids = ByteTokenizer().encode(TEXT)[:60]  # the old windowing: the whole file, then cut
    windows = text_windows(ids, 16, [])
    batches = [windows[i : i + 3] for i in range(0, len(windows), 3)]
    old = [-math.fsum(v) for batch in batches for v in sequence_logprobs(model, batch, [1] * len(batch))]
    assert result["per_item"]["window_loss"] == old
    assert result["per_item"]["window_tokens"] == [len(w) - 1 for w in windows]
    assert result["per_item"]["window_document"] == [0] * len(windows)
    assert result["documents"] == 1 and result["sha256"] == file_digest(text)


def test_documents_are_windowed_alone_in_jsonl_and_folder_forms(pair256, model, tmp_path):
    lines = tmp_path / "general.jsonl"
    lines.write_text("".join(json.dumps({"text": d, "source": n}) + "\n\n" for n, d in enumerate(DOCUMENTS)))
    folder = tmp_path / "general"
    folder.mkdir()
    for name, document in zip(["b.txt", "c.txt", "d.txt"], DOCUMENTS):
        (folder / name).write_text(document)
    (folder / "notes.md").write_text("not a document")  # only .txt files count
    alone = [mean_token_loss(model, ByteTokenizer(), [d], window=16, batch_size=1)["per_item"]
             for d in DOCUMENTS]
    for path in (lines, folder):
        result = _evaluate_text(pair256[0], path)
        per_item = result["per_item"]
        assert per_item["window_loss"] == [v for a in alone for v in a["window_loss"]]
        assert per_item["window_tokens"] == [v for a in alone for v in a["window_tokens"]]
        assert per_item["window_document"] == [n for n, a in enumerate(alone) for _ in a["window_loss"]]
        assert result["documents"] == 3 and result["windows"] == len(per_item["window_loss"])
        assert result["tokens"] == sum(len(d.encode()) - math.ceil(len(d.encode()) / 16) for d in DOCUMENTS)
    assert _evaluate_text(pair256[0], folder)["sha256"] == data_digest(folder)


def test_max_tokens_runs_over_the_documents_in_order_and_cuts_the_last(pair256, model, tmp_path):
    lines = tmp_path / "general.jsonl"
    lines.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    first = len(DOCUMENTS[0].encode())  # 76 bytes
    result = _evaluate_text(pair256[0], lines, max_tokens=first + 5)
    cut = mean_token_loss(model, ByteTokenizer(), [DOCUMENTS[0], DOCUMENTS[1][:5]], window=16, batch_size=1)
    assert result["per_item"] == cut["per_item"] and result["documents"] == 2
    assert result["per_item"]["window_document"][-1] == 1 and result["tokens"] == (first - 5) + 4


def test_folder_digest_follows_names_and_bytes(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("one")
    (folder / "b.txt").write_text("two")
    digest = data_digest(folder)
    (folder / "readme.md").write_text("ignored")
    assert data_digest(folder) == digest
    (folder / "b.txt").rename(folder / "c.txt")
    renamed = data_digest(folder)
    (folder / "c.txt").write_text("two!")
    assert len({digest, renamed, data_digest(folder)}) == 3


@pytest.mark.parametrize("case, message", [
    ("not an object", r"general.jsonl:2: each line of a .jsonl text needs a string 'text'"),
    ("no text", r"general.jsonl:2: each line of a .jsonl text needs a string 'text'"),
    ("empty text", r"general.jsonl:2: 'text' is empty"),
    ("no documents", r"general.jsonl holds no documents"),
    ("folder without txt", r"docs is a folder without .txt files"),
    ("latin-1 file in folder", r"docs.b.txt is not UTF-8 text"),
    ("latin-1 plain file", r"general.txt is not UTF-8 text"),
])
def test_bad_text_inputs_are_named(case, message, tmp_path):
    lines, folder, plain = tmp_path / "general.jsonl", tmp_path / "docs", tmp_path / "general.txt"
    folder.mkdir()
    first = json.dumps({"text": "fine"}) + "\n"
    path = {"not an object": lines, "no text": lines, "empty text": lines, "no documents": lines,
            "folder without txt": folder, "latin-1 file in folder": folder,
            "latin-1 plain file": plain}[case]
    if case == "not an object":
        lines.write_text(first + '["a list"]\n')
    elif case == "no text":
        lines.write_text(first + '{"body": "x"}\n')
    elif case == "empty text":
        lines.write_text(first + '{"text": "  \\n"}\n')
    elif case == "no documents":
        lines.write_text("\n\n")
    elif case == "folder without txt":
        (folder / "a.md").write_text("x")
    elif case == "latin-1 file in folder":
        (folder / "a.txt").write_text("fine")
        (folder / "b.txt").write_bytes("caf\xe9".encode("latin-1"))
    else:
        plain.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(EvalInputError, match=message):
        load_documents(path)


# ----------------------------------------------------------------- task groups


def test_task_groups_reach_the_per_item_values(pair256, tmp_path):
    task = tmp_path / "task.jsonl"
    groups = ["m1", 7, "m1", 7, "m2"]
    task.write_text("".join(json.dumps({"prompt": f"p{n}", "choices": [" a", " b"], "answer": 0,
                                        "group": g}) + "\n" for n, g in enumerate(groups)))
    assert [item["group"] for item in load_task(task)] == ["m1", "7", "m1", "7", "m2"]
    metric = evaluate_model(pair256[0], EvalSettings(task=task, tokenizer="bytes"))["metrics"]["task"]
    assert metric["per_item"]["group"] == ["m1", "7", "m1", "7", "m2"] and metric["groups"] == 3
    task.write_text("".join(json.dumps({"prompt": f"p{n}", "answer": "x"}) + "\n" for n in range(2)))
    metric = evaluate_model(pair256[0], EvalSettings(task=task, tokenizer="bytes"))["metrics"]["task"]
    assert "groups" not in metric and set(metric["per_item"]) == {"correct"}  # records unchanged


def test_task_groups_are_all_or_none(tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": "a", "answer": "b", "group": 3}\n'
                    '{"prompt": "c", "answer": "d"}\n')
    with pytest.raises(EvalInputError, match=r"task.jsonl:1: this line has no 'group' but line 3 has one; "
                                             "when any line names a group every line must"):
        load_task(task)
    for bad in ("true", "[1]", '""', "null"):
        task.write_text('{"prompt": "a", "answer": "b", "group": %s}\n' % bad)
        with pytest.raises(EvalInputError, match=r"task.jsonl:1: 'group' must be a non-empty string or an int"):
            load_task(task)


def test_cli_takes_a_folder_of_documents(pair256, tmp_path):
    """`eval --text` accepts a folder (it refused directories before documents)."""
    folder = tmp_path / "general"
    folder.mkdir()
    for n, document in enumerate(DOCUMENTS):
        (folder / f"{n}.txt").write_text(document)
    results = tmp_path / "results.jsonl"
    outcome = CliRunner().invoke(main, ["eval", str(pair256[0]), "--text", str(folder), "--tokenizer",
                                        "bytes", "--window", "16", "--out", str(results)])
    assert outcome.exit_code == 0, outcome.output
    record = json.loads(results.read_text())
    assert record["metrics"]["text"]["documents"] == 3
    assert record["metrics"]["text"]["sha256"] == data_digest(folder)
    items = json.loads(results.with_name("results.items.jsonl").read_text())
    assert sorted(set(items["text"]["window_document"])) == [0, 1, 2]


def test_choice_scores_from_the_last_positions_equal_the_full_logits_bit_for_bit(model):
    # Guards a speed-up (issue 22): scoring a choice asks the model for the logits of the
    # positions that predict a choice token only (logits_to_keep); every log-probability
    # must be what the full projection of every position gives, to the last bit.
    import torch

    from fapm_merge.evaluation.metrics import _logits_to_keep, sequence_logprobs

    assert _logits_to_keep(model) == "logits_to_keep"  # the short path is the one tested

    tokenizer = ByteTokenizer()
    prompt = tokenizer.encode("a prompt long enough that most positions are not scored:")
    sequences = [prompt + tokenizer.encode(c) for c in (" red", " a much longer choice", " b")]
    starts = [len(prompt)] * len(sequences)
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)], attention[row, : len(seq)] = torch.tensor(seq), 1
    with torch.inference_mode():
        full = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits.float(), dim=-1)
    expected = [[float(full[row, j - 1, seq[j]].double()) for j in range(len(prompt), len(seq))]
                for row, seq in enumerate(sequences)]
    assert sequence_logprobs(model, sequences, starts) == expected
