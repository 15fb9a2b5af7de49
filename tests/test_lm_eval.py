"""lm-evaluation-harness for real, offline: agreement with fapm-merge eval, the
harness's metrics as tradeoff/tune axes, and the backends' arguments.

The model is a small Llama whose tokenizer (fapm_merge.evaluation.lm_eval.
save_byte_tokenizer(bos=True), built locally with `tokenizers`) maps text to its UTF-8 bytes:
the harness and `fapm-merge eval --tokenizer bytes` then score the very same token
ids. The tasks are the shipped examples/lm_eval_task YAML files, pointed at local
JSON files; nothing touches a hub (HF_HUB_OFFLINE and HF_DATASETS_OFFLINE are set,
HF_HOME is a temporary folder).
"""

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

lm_eval = pytest.importorskip("lm_eval", reason="the 'eval' extra (make test installs it)")

from fapm_merge.cli import main  # noqa: E402
from fapm_merge.evaluation.evaluate import EvalSettings, evaluate_model  # noqa: E402
from fapm_merge.evaluation.lm_eval import (  # noqa: E402
    harness_metrics,
    model_args,
    parse_metric,
    resolve_axes,
    run_lm_eval,
)
from fapm_merge.evaluation.metrics import (  # noqa: E402
    EvalInputError,
    save_byte_tokenizer,
    load_model,
    load_tokenizer,
    sequence_logprobs,
)
from fapm_merge.evaluation.inputs import load_task  # noqa: E402
from fapm_merge.evaluation.results import read_results  # noqa: E402
from fapm_merge.evaluation.settings import TASK_METRIC, TEXT_METRIC  # noqa: E402
from fapm_merge.workflows.demo import DEMO_CONFIG, demo_eval_data, save_pair  # noqa: E402
from fapm_merge.workflows.tradeoff import Rule, TradeoffError, compute_tradeoff  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "lm_eval_task"
# vocabulary 258 and up: 256 bytes, <s>, </s>
BYTE_LLAMA = dict(DEMO_CONFIG, vocab_size=260, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session", autouse=True)
def offline_hf_home(tmp_path_factory):
    """The harness and `datasets` offline, with their caches in a temporary folder."""
    home = tmp_path_factory.mktemp("hf-home")
    saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_DATASETS_CACHE", "HF_DATASETS_OFFLINE")}
    os.environ.update(HF_HOME=str(home), HF_DATASETS_CACHE=str(home / "datasets"),
                      HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def byte_pair(tmp_path_factory):
    """A small Llama pair with a byte-level tokenizer, its proxy task and text, and
    the shipped example tasks pointed at them."""
    root = tmp_path_factory.mktemp("lm-eval-pair")
    base, finetuned = save_pair(BYTE_LLAMA, root / "models")
    for folder in (base, finetuned):
        save_byte_tokenizer(folder, bos=True)
    files = demo_eval_data(base, finetuned, root / "eval", text_tokens=1024, items=24)
    docs = [line for line in files["text"].read_text().splitlines() if line.strip()][:8]
    text_jsonl = root / "eval" / "text.jsonl"
    text_jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tasks = root / "tasks"
    tasks.mkdir()
    for name, data in (("my_task.yaml", files["task"]), ("my_text.yaml", text_jsonl)):
        shipped = (EXAMPLES / name).read_text()
        relative = f"examples/lm_eval_task/{'task' if 'task' in name else 'text'}.jsonl"
        assert relative in shipped
        (tasks / name).write_text(shipped.replace(relative, str(data)))
    return {"base": base, "finetuned": finetuned, "task": files["task"], "text": files["text"],
            "docs": docs, "tasks": tasks, "root": root}


def test_the_byte_tokenizer_is_the_bytes_tokenizer(byte_pair):
    mine, bytes_ = load_tokenizer(None, byte_pair["base"]), load_tokenizer("bytes", byte_pair["base"])
    for text in ("plain ascii", "  spaces\tand\nnewlines ", "ünïcödé €"):
        assert mine.encode(text) == bytes_.encode(text) == list(text.encode())
        assert mine.decode(mine.encode(text)) == text
    assert mine.bos_token_id == 256


def _own_choice_scores(model, tokenizer, item, use_bos):
    prompt = ([tokenizer.bos_token_id] if use_bos else []) + tokenizer.encode(item["prompt"])
    sequences = [prompt + tokenizer.encode(choice) for choice in item["choices"]]
    return [math.fsum(v) for v in sequence_logprobs(model, sequences, [len(prompt)] * len(sequences))]


@pytest.mark.parametrize("bos", [False, True], ids=["add_bos_token=False", "tokenizer default (BOS)"])
def test_the_harness_agrees_with_fapm_eval_item_by_item(byte_pair, bos):
    """Same items, same prompts, same choices: the harness's log-likelihood picks are
    fapm-merge eval's picks, item by item, and the record's per-item values reproduce
    the harness's own aggregate numbers."""
    from lm_eval.tasks import TaskManager

    ft = byte_pair["finetuned"]
    results = lm_eval.simple_evaluate(
        model="hf", model_args=model_args("hf", ft, dtype="float32",
                                          extra=None if bos else "add_bos_token=False"),
        tasks=["my_task", "my_text"], task_manager=TaskManager(include_path=str(byte_pair["tasks"]), include_defaults=False),
        device="cpu", batch_size=8, log_samples=True)
    metrics = harness_metrics(results)
    ours = evaluate_model(ft, EvalSettings(task=byte_pair["task"], use_bos=bos))["metrics"]["task"]

    # the harness's picks and ours, on every item
    model, tokenizer = load_model(ft), load_tokenizer(None, ft)
    items = load_task(byte_pair["task"])
    samples = sorted(results["samples"]["my_task"], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(len(items)))
    for item, sample in zip(items, samples):
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        mine = _own_choice_scores(model, tokenizer, item, bos)
        assert max(range(len(theirs)), key=lambda i: (theirs[i], -i)) == \
            max(range(len(mine)), key=lambda i: (mine[i], -i))
        # the harness moves a prompt's trailing spaces into every continuation: equal
        # for all choices, so compare each choice against the first
        assert [t - theirs[0] for t in theirs] == pytest.approx([m - mine[0] for m in mine], abs=2e-4)
    acc = metrics["lm_eval:my_task/acc"]
    assert acc["per_item"]["correct"] == ours["per_item"]["correct"]
    assert acc["accuracy"] == ours["accuracy"] == results["results"]["my_task"]["acc,none"]
    assert acc["examples"] == len(items)

    # perplexity: one (loglikelihood, words) per document -> loss per word
    ppl = metrics["lm_eval:my_text/word_perplexity"]
    texts = sorted(results["samples"]["my_text"], key=lambda s: s["doc_id"])
    assert [s["doc"]["text"] for s in texts] == byte_pair["docs"]
    # the harness scores the document's tokens after its prefix token (BOS); when the
    # tokenizer adds BOS itself, that BOS is the first scored token (its own quirk)
    prefix = [256, 256] if bos else [256]
    for doc, loss, words in zip(byte_pair["docs"], ppl["per_item"]["window_loss"],
                                ppl["per_item"]["window_tokens"]):
        own = -math.fsum(sequence_logprobs(model, [prefix + list(doc.encode())], [1])[0])
        assert loss == pytest.approx(own, rel=1e-5)
        assert words == len(re.split(r"\s+", doc))
    assert math.exp(ppl["loss"]) == pytest.approx(results["results"]["my_text"]["word_perplexity,none"],
                                                  rel=1e-9)
    assert metrics["lm_eval:my_text/byte_perplexity"]["tokens"] == sum(len(d.encode()) for d in byte_pair["docs"])


def test_eval_command_keeps_harness_metrics_per_item(byte_pair, tmp_path):
    out = tmp_path / "results.jsonl"
    outcome = CliRunner().invoke(main, [
        "eval", str(byte_pair["finetuned"]), "--task", str(byte_pair["task"]), "--no-bos",
        "--lm-eval", "my_task", "--lm-eval-include", str(byte_pair["tasks"]),
        "--lm-eval-model-args", "add_bos_token=False", "--lm-eval-limit", "10", "--out", str(out)])
    assert outcome.exit_code == 0, outcome.output
    assert "lm_eval:my_task/acc" in outcome.output
    record = read_results(out, with_items=True)[0]
    harness = record["metrics"]["lm_eval:my_task/acc"]
    assert harness["examples"] == 10  # --lm-eval-limit reached the harness
    assert harness["per_item"]["correct"] == record["metrics"]["task"]["per_item"]["correct"][:10]
    assert record["settings"]["lm_eval"] == {"backend": "hf", "model_args": "add_bos_token=False",
                                             "limit": 10, "include": str(byte_pair["tasks"])}
    assert "per_item" not in json.loads(out.read_text().splitlines()[0])["metrics"]["lm_eval:my_task/acc"]


def test_an_unknown_task_or_folder_is_a_clear_error(byte_pair, tmp_path):
    with pytest.raises(EvalInputError, match=r"lm-eval knows no task 'no_such_task' \(also looked in "):
        run_lm_eval(byte_pair["finetuned"], "no_such_task", include_path=byte_pair["tasks"])
    with pytest.raises(EvalInputError, match="--lm-eval-include .*: not a folder"):
        run_lm_eval(byte_pair["finetuned"], "my_task", include_path=tmp_path / "missing")


def test_the_harness_absent_is_a_clear_message(monkeypatch, byte_pair):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(EvalInputError, match=r"pip install 'fapm-merge\[eval\]'"):
        run_lm_eval(byte_pair["finetuned"], "my_task")


# ------------------------------------------------------------------ backends


def test_model_args_pass_through():
    folder = Path("/m/x")
    assert model_args("hf", folder, dtype="float32") == "pretrained=/m/x,dtype=float32"
    assert model_args("vllm", folder, dtype="float32",
                      extra="dtype=bfloat16, tensor_parallel_size=8,gpu_memory_utilization=0.8") == \
        "pretrained=/m/x,dtype=bfloat16,tensor_parallel_size=8,gpu_memory_utilization=0.8"
    assert model_args("local-completions", folder, dtype="float32",
                      extra="base_url=http://127.0.0.1:8000/v1/completions,tokenizer=/m/x") == \
        "model=/m/x,base_url=http://127.0.0.1:8000/v1/completions,tokenizer=/m/x"
    with pytest.raises(EvalInputError, match="local-completions needs base_url"):
        model_args("local-completions", folder, dtype="float32")
    with pytest.raises(EvalInputError, match="write KEY=VALUE pairs"):
        model_args("vllm", folder, dtype="float32", extra="tensor_parallel_size")
    with pytest.raises(EvalInputError, match="unknown --lm-eval-backend 'vlm'"):
        model_args("vlm", folder, dtype="float32")


def test_vllm_absent_is_reported_from_the_harness_call(byte_pair):
    """The real harness resolves "vllm" through its registry and fails importing vllm."""
    with pytest.raises(EvalInputError) as error:
        run_lm_eval(byte_pair["finetuned"], "my_task", backend="vllm", include_path=byte_pair["tasks"],
                    extra_model_args="tensor_parallel_size=2")
    message = str(error.value)
    assert message.startswith("--lm-eval-backend vllm cannot start: No module named 'vllm'")
    assert f"model_args pretrained={byte_pair['finetuned']},dtype=float32,tensor_parallel_size=2" in message


VLLM_PROBE = """
import json, sys
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from fapm_merge.evaluation.lm_eval import run_lm_eval

class VLLM(TemplateLM):
    # stands in for lm_eval.models.vllm_causallms:VLLM, whose module needs vllm;
    # the harness's registry accepts it as that placeholder's class
    def __init__(self, **kwargs):
        print("RECEIVED " + json.dumps(kwargs, sort_keys=True), flush=True)
        raise SystemExit(0)

VLLM.__abstractmethods__ = frozenset()  # never used to score: it stops in __init__
VLLM.__module__ = "lm_eval.models.vllm_causallms"
register_model("vllm")(VLLM)
run_lm_eval(sys.argv[1], "my_task", backend="vllm", include_path=sys.argv[2],
            extra_model_args="dtype=bfloat16,tensor_parallel_size=8,data_parallel_size=2,"
                             "gpu_memory_utilization=0.8,max_model_len=4096")
"""


@pytest.mark.slow
def test_vllm_model_args_reach_the_harness_constructor(byte_pair):
    """Our call goes through lm_eval.simple_evaluate and the harness's own
    create_from_arg_string; the constructor registered for "vllm" receives every
    argument, typed by the harness's parser, and each is a named parameter of the
    harness's real VLLM class or one it forwards to vLLM's engine (read from its
    source: vllm cannot be imported here)."""
    import ast

    result = subprocess.run([sys.executable, "-c", textwrap.dedent(VLLM_PROBE),
                             str(byte_pair["finetuned"]), str(byte_pair["tasks"])],
                            capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    line = next((l for l in result.stdout.splitlines() if l.startswith("RECEIVED ")), None)
    assert line, result.stdout[-2000:] + result.stderr[-2000:]
    received = json.loads(line[len("RECEIVED "):])
    assert received == {"pretrained": str(byte_pair["finetuned"]), "dtype": "bfloat16",
                        "tensor_parallel_size": 8, "data_parallel_size": 2,
                        "gpu_memory_utilization": 0.8, "max_model_len": 4096}
    source = Path(lm_eval.__file__).parent / "models" / "vllm_causallms.py"
    code = source.read_text()
    tree = ast.parse(code)
    init = next(node for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name == "VLLM")
    init = next(f for f in init.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    named = {a.arg for a in init.args.args + init.args.kwonlyargs}
    assert {"pretrained", "dtype", "tensor_parallel_size", "data_parallel_size", "max_model_len"} <= named
    # the engine's own arguments (gpu_memory_utilization) go through **kwargs into vllm.LLM
    assert init.args.kwarg is not None and "self.model_args.update(kwargs)" in code
    assert set(received) - named == {"gpu_memory_utilization"}


# ------------------------------------------------------------------ axes


def _records(correct_ft="1" * 40, correct_v="1" * 39 + "0"):
    """Three records with the built-in metrics and identical lm-eval copies of them
    (40 prompts: enough to show one lost answer within the 0.5 margin the tests ask)."""
    def record(model, correct, losses, recipe=None):
        acc = {"accuracy": correct.count("1") / len(correct), "examples": len(correct),
               "per_item": {"correct": correct}}
        text = {"loss": sum(losses) / 40, "windows": 4, "tokens": 40,
                "per_item": {"window_loss": losses, "window_tokens": [10] * 4}}
        return {"model": model, "name": model.rsplit("/", 1)[1], "recipe": recipe, "metrics": {
            "task": dict(acc), "text": dict(text),
            "lm_eval:t/acc": {**acc, "sha256": "d"},
            "lm_eval:p/word_perplexity": {**text, "sha256": "e"},
            "lm_eval": {"results": {}, "groups": {"grp": ["t", "u"]},
                        "unpaired": {"lm_eval:t/f1": "per-sample values are not 0/1 nor (loglikelihood, count)"}}}}

    recipe = {"merge_method": "fapm", "base_model": "/m/base",
              "models": [{"model": "/m/ft", "parameters": {"sparsity": 0.5}}]}
    return [record("/m/base", "0" * 40, [20.0, 21.0, 22.0, 23.0]),
            record("/m/ft", correct_ft, [24.0, 25.0, 26.0, 27.0]),
            record("/s/fapm-s0.5", correct_v, [21.0, 22.0, 23.5, 24.0], recipe)]


def test_a_harness_metric_as_an_axis_gives_the_same_decision_and_intervals():
    records = _records()
    builtin = compute_tradeoff(records, rule=Rule("repair", min_retention=0.5))
    harness = compute_tradeoff(records, rule=Rule("repair", min_retention=0.5),
                               task_metric="lm_eval:t/acc", text_metric="lm_eval:p/word_perplexity")
    assert harness.selected.name == builtin.selected.name == "fapm-s0.5"
    assert [p.to_json() for p in harness.points] == [p.to_json() for p in builtin.points]
    assert harness.to_json()["task_metric"] == "lm_eval:t/acc"
    # a different per-item outcome on the harness metric changes the decision
    changed = _records()
    changed[2]["metrics"]["lm_eval:t/acc"].update(accuracy=0.25, per_item={"correct": "0" * 30 + "1" * 10})
    moved = compute_tradeoff(changed, rule=Rule("repair", min_retention=0.5), task_metric="lm_eval:t/acc")
    assert moved.selected is None and moved.points[2].accuracy == 0.25
    assert moved.points[2].verdict == "acc" and moved.outcome == "none qualifies"


@pytest.mark.parametrize("task_metric, text_metric, message", [
    ("lm_eval:grp/acc", "text", r"--task-metric lm_eval:grp/acc: the results have no such accuracy "
     r"metric \(grp is a group of 2 tasks .* name one, e\.g\. lm_eval:t/METRIC\)"),
    ("lm_eval:t/f1", "text", r"--task-metric lm_eval:t/f1: .*\(the harness reports lm_eval:t/f1 as a "
     r"corpus-level score .*acc, acc_norm or exact_match\)"),
    ("lm_eval:p/word_perplexity", "text", r"lm_eval:p/word_perplexity is a perplexity: use it as "
     r"--text-metric\); they hold lm_eval:t/acc, task"),
    ("task", "lm_eval:t/acc", r"--text-metric lm_eval:t/acc: .*is an accuracy: use it as --task-metric"),
    ("lm_eval:nope/acc", "text", r"--task-metric lm_eval:nope/acc: the results have no such accuracy "
     r"metric; they hold lm_eval:t/acc, task"),
])
def test_a_missing_or_unusable_axis_is_named_with_the_reason(task_metric, text_metric, message):
    with pytest.raises(TradeoffError, match=message):
        compute_tradeoff(_records(), task_metric=task_metric, text_metric=text_metric)


@pytest.mark.slow
def test_tradeoff_with_harness_axes_stays_free_of_torch():
    result = subprocess.run([sys.executable, "-c", "import sys; import fapm_merge.workflows.tradeoff, "
                             "fapm_merge.evaluation.lm_eval; print('torch' in sys.modules)"],
                            capture_output=True, text=True)
    assert result.stdout.split() == ["False"], result.stderr


def test_metric_names_parse_or_fail_clearly():
    assert parse_metric("lm_eval:arc_easy/acc", option="--task-metric").key == "lm_eval:arc_easy/acc"
    assert parse_metric("lm_eval:gsm8k/exact_match,strict-match", option="--task-metric") == \
        ("gsm8k", "exact_match", "strict-match")
    assert parse_metric("lm_eval:wikitext", option="--text-metric",
                        default_metric="word_perplexity").key == "lm_eval:wikitext/word_perplexity"
    with pytest.raises(EvalInputError, match=r"--task-metric 'lm_eval:arc_easy': name the task and its metric"):
        parse_metric("lm_eval:arc_easy", option="--task-metric")
    with pytest.raises(EvalInputError, match=r"--task-metric 'arc_easy/acc': an lm-eval metric is written"):
        parse_metric("arc_easy/acc", option="--task-metric")


def test_axes_resolve_to_record_keys_and_the_harness_tasks_they_need(tmp_path):
    axes = resolve_axes("lm_eval:arc_easy/acc", "lm_eval:wikitext")
    assert (axes.task, axes.text, axes.harness_tasks) == (
        "lm_eval:arc_easy/acc", "lm_eval:wikitext/word_perplexity", ("arc_easy", "wikitext"))
    builtin = resolve_axes(TASK_METRIC, TEXT_METRIC)
    assert (builtin.task, builtin.text, builtin.harness_tasks) == (TASK_METRIC, TEXT_METRIC, ())
    with pytest.raises(EvalInputError, match=r"--task-metric 'lm_eval:arc_easy': name the task"):
        resolve_axes("lm_eval:arc_easy", "text")
    settings = EvalSettings(text=Path("general.txt"), lm_eval_tasks="hellaswag, arc_easy")
    resolved = settings.resolved(axes.harness_tasks)
    assert resolved.text == Path("general.txt").absolute() and resolved.task is None
    assert resolved.lm_eval_tasks == "hellaswag,arc_easy,wikitext"
    assert settings.lm_eval_tasks == "hellaswag, arc_easy"  # a new object; this one unchanged


def test_tradeoff_command_takes_a_harness_axis(tmp_path):
    from fapm_merge.evaluation.results import append_result

    results = tmp_path / "results.jsonl"
    for record in _records():
        append_result(results, record)
    outcome = CliRunner().invoke(main, ["tradeoff", str(results), "--min-retention", "0.5",
                                        "--task-metric", "lm_eval:t/acc", "--text-metric", "lm_eval:p",
                                        "--json", "-"])
    assert outcome.exit_code == 0, outcome.output
    document = json.loads(outcome.output)
    assert document["task_metric"] == "lm_eval:t/acc"
    assert document["text_metric"] == "lm_eval:p/word_perplexity"
    assert document["selected"]["name"] == "fapm-s0.5"
    bad = CliRunner().invoke(main, ["tradeoff", str(results), "--task-metric", "lm_eval:t"])
    assert bad.exit_code == 1 and "name the task and its metric" in bad.output


# ------------------------------------------------------------------ tune


@pytest.mark.slow
def test_tune_selects_from_harness_scores(byte_pair, tmp_path):
    """tune runs the harness on every model and decides on lm_eval:my_task/acc; since
    the harness's per-item outcomes equal fapm-merge eval's on the same items, the
    built-in axis on the same records gives the same table and the same choice."""
    import yaml

    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "fapm", "base_model": str(byte_pair["base"]), "dtype": "float32",
        "models": [{"model": str(byte_pair["finetuned"]), "parameters": {"sparsity": 0.9}}]}))
    out = tmp_path / "out"
    outcome = CliRunner().invoke(main, [
        "tune", str(recipe), str(out), "--task", str(byte_pair["task"]), "--no-bos",
        "--task-metric", "lm_eval:my_task/acc", "--text-metric", "lm_eval:my_text",
        "--lm-eval-include", str(byte_pair["tasks"]), "--lm-eval-model-args", "add_bos_token=False",
        "--sparsity", "0.3,0.9", "--beta", "1", "--baselines", "", "--rule", "max-cf", "--max-cf", "1e9"])
    # no bound: the most accurate model is the fine-tune itself, so nothing is written (3)
    assert outcome.exit_code == 3, outcome.output
    assert "the rule selects finetuned, one of the two models you already have" in outcome.output
    assert "axes: task accuracy from lm_eval:my_task/acc, forgetting from " \
           "lm_eval:my_text/word_perplexity" in " ".join(outcome.output.split())
    work = tmp_path / "out.tune"
    decision = json.loads((work / "tradeoff.json").read_text())
    assert decision["task_metric"] == "lm_eval:my_task/acc"
    records = read_results(work / "results.jsonl", with_items=True)
    assert sorted(Path(r["model"]).name for r in records) == ["base", "fapm-s0.3", "fapm-s0.9", "finetuned"]
    by_model = {r["model"]: r for r in records}
    for point in decision["points"]:
        metrics = by_model[point["model"]]["metrics"]
        assert point["accuracy"] == metrics["lm_eval:my_task/acc"]["accuracy"]
        assert metrics["lm_eval:my_task/acc"]["per_item"]["correct"] == metrics["task"]["per_item"]["correct"]
    builtin = compute_tradeoff(records, rule=Rule("max-cf", max_cf=1e9), task_metric="task",
                               text_metric="lm_eval:my_text/word_perplexity")
    assert builtin.selected.name == decision["selected"]["name"]
    assert [p.to_json() for p in builtin.points] == decision["points"]
    # the harness's metric is the one that decides: max-cf picks its best accuracy
    best = max(decision["points"], key=lambda p: p["accuracy"])
    assert decision["selected"]["accuracy"] == best["accuracy"]
    # a bound under the fine-tune's forgetting selects a variant: re-decided from the
    # same evaluations, rebuilt into OUT with the metric named in its model card
    from fapm_merge.workflows.tune import TuneSettings, run_tune

    ft = next(p for p in decision["points"] if p["method"] == "finetuned")
    variants = [p for p in decision["points"] if p["method"] == "fapm"]
    bound = (max(p["cf_pct"] for p in variants) + ft["cf_pct"]) / 2
    result = run_tune(yaml.safe_load(recipe.read_text()), tmp_path / "chosen", TuneSettings(
        task=byte_pair["task"], task_metric="lm_eval:my_task/acc", text_metric="lm_eval:my_text",
        eval=EvalSettings(use_bos=False, lm_eval_include=byte_pair["tasks"],
                          lm_eval_model_args="add_bos_token=False"),
        sparsities=[0.3, 0.9], betas=[1.0], baselines=[], rule=Rule("max-cf", max_cf=bound), work_dir=work))
    assert result.evaluated == 0 and result.tradeoff.selected.method == "fapm"
    assert "Accuracy is `lm_eval:my_task/acc`" in (tmp_path / "chosen" / "README.md").read_text()


def test_tune_without_task_file_needs_a_harness_metric(byte_pair, tmp_path):
    from fapm_merge.workflows.tune import TuneError, TuneSettings, run_tune

    recipe = {"merge_method": "fapm", "base_model": str(byte_pair["base"]),
              "models": [{"model": str(byte_pair["finetuned"])}]}
    with pytest.raises(TuneError, match=r"--task is required unless --task-metric names an lm-eval metric"):
        run_tune(recipe, tmp_path / "o", TuneSettings(text=byte_pair["text"]))
    with pytest.raises(TuneError, match=r"--text-metric lm_eval:my_task/acc: the general axis is a "
                                        r"perplexity task's word_perplexity or byte_perplexity"):
        run_tune(recipe, tmp_path / "o", TuneSettings(task=byte_pair["task"],
                                                      text_metric="lm_eval:my_task/acc"))
    settings = TuneSettings(text=byte_pair["text"], task_metric="lm_eval:my_task/acc",
                            eval=EvalSettings(lm_eval_backend="local-completions"))
    with pytest.raises(TuneError, match="local-completions asks one server for one model"):
        run_tune(recipe, tmp_path / "o", settings)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tune").exists()


@pytest.mark.slow
def test_tune_on_a_harness_metric_stops_before_the_variants_when_its_prompts_cannot_decide(
        byte_pair, tmp_path):
    """Regression (issue 21): the check that the prompts resolve the retention margin
    skipped harness metrics, so a tune on lm_eval:TASK/METRIC with the default 0.99
    merged and evaluated every variant only to answer "undecided" (hours per variant at
    scale). The prompts are counted from the fine-tune's record, before any variant."""
    from fapm_merge.workflows.tune import TuneError, TuneSettings, run_tune

    recipe = {"merge_method": "fapm", "base_model": str(byte_pair["base"]), "dtype": "float32",
              "models": [{"model": str(byte_pair["finetuned"]), "parameters": {"sparsity": 0.9}}]}
    out = tmp_path / "out"
    seen = []
    with pytest.raises(TuneError) as error:
        run_tune(recipe, out, TuneSettings(
            task_metric="lm_eval:my_task/acc", text_metric="lm_eval:my_text",
            eval=EvalSettings(use_bos=False, lm_eval_include=byte_pair["tasks"],
                              lm_eval_model_args="add_bos_token=False"),
            sparsities=[0.9], baselines=[]), progress=lambda stage, *_: seen.append(stage))
    records = read_results(tmp_path / "out.tune" / "results.jsonl")
    assert [Path(r["model"]).name for r in records] == ["base", "finetuned"]
    accuracy = records[1]["metrics"]["lm_eval:my_task/acc"]["accuracy"]
    assert str(error.value).startswith(
        f"the 24 selection prompts cannot show that a variant keeps 0.99 of the fine-tune's accuracy "
        f"({accuracy:.3f}): that is a margin of {0.01 * accuracy:.3f}, and these prompts resolve about 0.147")
    assert "variants" not in seen and not (tmp_path / "out.tune" / "variants").exists() and not out.exists()
