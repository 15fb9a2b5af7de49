"""What a new user met following the docs word for word (issue 17), one test per finding.

1. lint passed a recipe whose relative paths mergekit's model card sends to the hub;
2. verify said OK on the half-written output that left;
3. sweep blamed the inputs for a failure caused by the recipe's paths;
4. "use the choice" did not reproduce the model card;
5. documented mergekit commands printed tracebacks on the tokenizer-less demo models;
6. `mergekit-yaml --cuda` without a GPU: an empty folder and a traceback;
7. tables cut tensor names, eval lines wrapped, results fields contradicted each other.

The ground truth is mergekit itself: the real ``mergekit-yaml`` and ``mergekit-multi``
console scripts in a subprocess (run from a temporary directory holding relative
``models/...`` folders, offline), and mergekit's own ``card.is_hf``.
"""

import errno
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from rich.console import Console

from helpers import console_script, fapm_recipe, run_merge_in_process, run_mergekit_yaml
from fapm_merge.cli import main as cli
from fapm_merge.io.lint import lint_recipe
from fapm_merge.workflows.verify import format_report, verify_output

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _relative_recipe(**extra) -> dict:
    return {"merge_method": "fapm", "base_model": "models/base",
            "models": [{"model": "models/finetuned", "parameters": {"sparsity": 0.9}}],
            "dtype": "float32", **extra}


@pytest.fixture(scope="module")
def relative_merge(llama_pair, tmp_path_factory):
    """A user's folder holding models/base and models/finetuned, a recipe naming them
    relatively (r.yml) and one naming them absolutely (fixed.yml, what lint asks
    for), and what plain `mergekit-yaml` did with each, run there, offline."""
    work = tmp_path_factory.mktemp("relative")
    for name, source in zip(("base", "finetuned"), llama_pair):
        shutil.copytree(source, work / "models" / name)
    (work / "r.yml").write_text(yaml.safe_dump(_relative_recipe(), sort_keys=False))
    fixed = _relative_recipe(base_model=f"{work}/models/base")
    fixed["models"][0]["model"] = f"{work}/models/finetuned"
    (work / "fixed.yml").write_text(yaml.safe_dump(fixed, sort_keys=False))
    results = {
        recipe: subprocess.run([console_script("mergekit-yaml"), recipe, out, "--no-copy-tokenizer"],
                               cwd=work, capture_output=True, text=True, env=OFFLINE)
        for recipe, out in (("r.yml", "out"), ("fixed.yml", "fixed-out"))
    }
    return work, results["r.yml"], results["fixed.yml"]


# ------------------------------------------------------------------ 1. lint


@pytest.mark.slow
def test_lint_flags_relative_path_that_mergekit_sends_to_the_hub(relative_merge, monkeypatch):
    work, result, fixed = relative_merge
    # what mergekit does (the behaviour lint must predict): weights and config.json
    # written, then the model card asks the hub about models/... and the run dies
    assert result.returncode != 0
    assert "OfflineModeIsEnabled" in result.stderr and "/api/models/models/" in result.stderr
    assert sorted(p.name for p in (work / "out").iterdir()) == ["config.json", "model.safetensors"]

    monkeypatch.chdir(work)
    outcome = CliRunner().invoke(cli, ["lint", "r.yml"])
    assert outcome.exit_code == 1, outcome.output
    lines = outcome.output.splitlines()
    assert lines[0].startswith("base_model: models/base is a relative path with at most one '/'")
    assert lines[0].endswith(f"write the absolute path {work}/models/base")
    assert lines[1].startswith("models[0].model: models/finetuned is a relative path")
    assert lines[1].endswith(f"write the absolute path {work}/models/finetuned")

    # the fix lint names is the fix: the same merge with those paths finishes
    assert CliRunner().invoke(cli, ["lint", "fixed.yml"]).exit_code == 0
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert (work / "fixed-out" / "README.md").is_file()


class _AskedTheHub(Exception):
    pass


@pytest.mark.parametrize("path", [
    "models/base", "base", "./models/base", "../sibling", "a/b/c", "bad..name", "-dash",
    "org/not-here", "notthere", "/abs/models/base", "~/models/base", "models/base/",
])
def test_card_asks_hub_mirrors_mergekits_own_rule(path, tmp_path, monkeypatch):
    """card_asks_hub() against mergekit.card.is_hf with the network cut just below
    huggingface_hub's own repo id validation (which runs first, offline or not)."""
    from huggingface_hub import HfApi
    from mergekit import card

    from fapm_merge.io.model_paths import card_asks_hub

    for folder in ("work/models/base", "work/base", "sibling", "work/a/b/c", "work/bad..name",
                   "work/-dash"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path / "work")

    def repo_info(self, repo_id, **kwargs):
        raise _AskedTheHub(repo_id)

    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    try:
        card.is_hf(path)
        asked = False
    except _AskedTheHub:
        asked = True
    assert card_asks_hub(path) == asked


def test_lint_flags_the_relative_adapter_part_of_base_plus_adapter(tmp_path, monkeypatch):
    """mergekit's card checks the LoRA path of BASE+ADAPTER with the same rule."""
    from huggingface_hub import HfApi
    from mergekit import card
    from mergekit.common import ModelReference

    from fapm_merge.io.model_paths import model_path_problems

    (tmp_path / "adapters" / "a").mkdir(parents=True)
    (tmp_path / "adapters" / "a" / "adapter_config.json").write_text("{}")
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "base" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(HfApi, "repo_info", lambda self, repo_id, **kw: asked.append(repo_id))
    list(card.extract_hf_paths([ModelReference.parse("/abs/base+adapters/a")]))
    assert asked == ["adapters/a"]
    recipe = {"merge_method": "fapm", "base_model": "/abs/base",
              "models": [{"model": "/abs/base+adapters/a"}]}
    wrong = [p for p in model_path_problems(recipe) if "relative path" in p.message]
    assert [(p.where, p.message.split(" is ")[0]) for p in wrong] == [("models[0].model", "adapters/a")]


@pytest.mark.slow
def test_lint_flags_a_one_word_intermediate_dir_that_mergekit_multi_sends_to_the_hub(
        llama_pair, tmp_path, monkeypatch):
    base, ft = llama_pair
    documents = [
        {"name": "first", **fapm_recipe(base, ft, sparsity=0.9)},
        {"merge_method": "fapm", "base_model": str(base), "dtype": "float32",
         "models": [{"model": "first", "parameters": {"sparsity": 0.5}}]},
    ]
    (tmp_path / "multi.yml").write_text(yaml.safe_dump_all(documents, sort_keys=False))
    monkeypatch.chdir(tmp_path)

    def multi(stages):
        return subprocess.run([console_script("mergekit-multi"), "multi.yml", "--intermediate-dir", stages,
                               "--out-path", f"final-{Path(stages).name}", "--no-copy-tokenizer"],
                              cwd=tmp_path, capture_output=True, text=True, env=OFFLINE)

    relative = multi("stages")  # what mergekit-multi does with a one-word relative folder
    assert relative.returncode != 0 and "api/models/stages/first" in relative.stderr
    assert not (tmp_path / "final-stages" / "README.md").exists()

    flagged = CliRunner().invoke(cli, ["lint", "multi.yml", "--intermediate-dir", "stages"])
    assert flagged.exit_code == 1
    assert flagged.output.startswith("stage 'final': models[0].model: mergekit-multi reads stage "
                                     "'first' from stages/first")
    assert f"pass --intermediate-dir {tmp_path}/stages" in flagged.output
    noted = CliRunner().invoke(cli, ["lint", "multi.yml"])
    assert noted.exit_code == 0 and "note: stage 'final': models[0].model: reads stage 'first'" \
        in noted.output and "absolute --intermediate-dir" in noted.output
    absolute = str(tmp_path / "abs-stages")
    assert CliRunner().invoke(cli, ["lint", "multi.yml", "--intermediate-dir", absolute]).exit_code == 0
    done = multi(absolute)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "final-abs-stages" / "README.md").is_file()


def test_lint_notes_what_mergekit_will_fetch_from_the_hub_without_failing(tmp_path, monkeypatch):
    from fapm_merge.io.lint import lint_documents

    monkeypatch.chdir(tmp_path)
    recipe = {"merge_method": "fapm", "base_model": "org/base", "models": [{"model": "org/ft"}]}
    (tmp_path / "hub.yml").write_text(yaml.safe_dump(recipe))
    outcome = CliRunner().invoke(cli, ["lint", "hub.yml"])
    assert outcome.exit_code == 0
    assert (f"note: base_model: org/base is no folder under {tmp_path}, so mergekit will fetch it "
            "from the Hugging Face hub (HF_HUB_OFFLINE is set: it is not in the local hub cache, "
            "so the merge will fail); if it is a local folder, give its absolute path") in outcome.output
    assert lint_recipe(recipe) == []  # hub ids stay legitimate
    assert lint_documents([recipe]) == ([], [line[len("note: "):] for line in
                                              outcome.output.splitlines()[:2]])


# ---------------------------------------------------------------- 2. verify


@pytest.mark.slow
def test_verify_refuses_the_half_written_output_of_the_offline_card_crash(relative_merge, monkeypatch):
    work, _, _ = relative_merge
    monkeypatch.chdir(work)
    outcome = CliRunner().invoke(cli, ["verify", "out", "--recipe", "r.yml"])
    assert outcome.exit_code == 1
    assert "PROBLEM README.md: missing: mergekit writes the model card and the recipe last" in outcome.output
    assert "PROBLEM mergekit_config.yml: missing" in outcome.output
    assert "relative path(s) models/base, models/finetuned" in outcome.output
    assert outcome.output.strip().endswith("FAILED: 2 problem(s)")

    # Regression (issue 22): the README's form, no --recipe, said "OK as a checkpoint" on
    # this half-written output; mergekit writes mergekit_config.yml last, so it is refused
    bare = CliRunner().invoke(cli, ["verify", "out"])
    assert bare.exit_code == 1
    assert "PROBLEM mergekit_config.yml: missing: mergekit writes the recipe last" in bare.output
    assert "--checkpoint-only" in bare.output
    assert bare.output.strip().endswith("FAILED: 1 problem(s)")

    files = CliRunner().invoke(cli, ["verify", "out", "--checkpoint-only"])
    assert files.exit_code == 0  # an input model looks the same: its files are all it can check
    last = files.output.strip().splitlines()[-1]
    assert last == "OK as a checkpoint; not verified as a merge (give --recipe RECIPE)"
    assert "not checked: no recipe (no --recipe, and the folder has no mergekit_config.yml)" in files.output
    assert "0 checked" not in files.output


@pytest.fixture(scope="module")
def good_output(llama_pair, tmp_path_factory):
    base, ft = llama_pair
    recipe = fapm_recipe(base, ft, sparsity=0.7)
    return recipe, run_merge_in_process(recipe, tmp_path_factory.mktemp("verify17") / "out")


@pytest.mark.slow
def test_verify_uses_the_recipe_mergekit_wrote_into_the_folder(relative_merge):
    work, _, _ = relative_merge
    out = work / "fixed-out"  # mergekit-yaml copied fixed.yml into it
    report = verify_output(out)
    assert report.recipe_source == "mergekit_config.yml in the folder"
    assert report.ok and report.invariants_checked == report.tensors > 0
    text = format_report(report)
    assert text.endswith("\nOK")
    assert f"checked: {report.tensors} tensors recomputed: the FAPM selection, bit for bit" in text
    assert "checked: model card (README.md) and mergekit_config.yml present" in text


@pytest.mark.parametrize("edit, expected", [
    ({"vocab_size": 65}, "lm_head.weight: shape (64, 32) but config.json describes (65, 32)"),
    ({"num_hidden_layers": 3}, "model.layers.2.input_layernorm.weight: config.json describes a "
                               "LlamaForCausalLM with this tensor but the output lacks it"),
])
def test_verify_refuses_a_config_that_does_not_match_the_tensors(good_output, tmp_path, edit, expected):
    recipe, out = good_output
    copy = shutil.copytree(out, tmp_path / "out")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **edit}))
    report = verify_output(copy, recipe)
    assert not report.ok
    assert any(str(p).startswith(expected) for p in report.problems), report.problems


def test_verify_refuses_a_shard_the_index_names_but_the_folder_lacks(llama_pair, tmp_path):
    base, ft = llama_pair
    recipe = fapm_recipe(base, ft)
    out = run_merge_in_process(recipe, tmp_path / "out", out_shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 1
    (out / shards[-1]).unlink()
    report = verify_output(out, recipe)
    assert f"{shards[-1]}: listed in the index but missing: the merge did not finish; run it " \
           "again into an empty folder" in [str(p) for p in report.problems]


# ----------------------------------------------------------------- 3. sweep


@pytest.mark.slow
def test_sweep_names_the_recipe_path_not_the_inputs_when_mergekit_would_ask_the_hub(
        relative_merge, monkeypatch):
    work, _, _ = relative_merge
    monkeypatch.chdir(work)
    outcome = CliRunner().invoke(cli, ["sweep", "r.yml", "swept", "--sparsity", "0.5,0.9",
                                       "--no-copy-tokenizer"])
    assert outcome.exit_code == 1
    assert "base_model: models/base is a relative path" in outcome.output
    assert f"write the absolute path {work}/models/base" in outcome.output
    assert "verify FOLDER" not in outcome.output and "Check each input" not in outcome.output
    assert not list(work.glob("swept*")) and not list(work.glob(".swept*"))


@pytest.mark.parametrize("raised, kind, words", [
    (OSError(errno.ENOSPC, "No space left on device"), "disk", "is full ("),
    (AssertionError("Torch not compiled with CUDA enabled"), "gpu", "run it without --cuda"),
    (RuntimeError("Found no NVIDIA driver on your system."), "gpu", "no GPU: torch"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/out"), "permission", "cannot write /ro/out"),
    (RuntimeError("Tensor model.norm.weight required but not present in model /m/ft"), "input",
     "/m/ft lacks tensor model.norm.weight"),
    (ValueError("something else"), "unknown", "ValueError: something else"),
])
def test_sweep_failures_name_the_cause_and_the_fix(llama_pair, tmp_path, monkeypatch, raised, kind, words):
    """The CLI reports the cause (disk, GPU, permission, input) instead of sending the
    user to check inputs that are fine."""
    import fapm_merge.workflows.sweep as sweep_module
    from fapm_merge.io.failures import explain_failure

    base, ft = llama_pair
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(fapm_recipe(base, ft)))

    def failing(*args, **kwargs):
        raise raised

    monkeypatch.setattr(sweep_module, "run_sweep", failing)
    outcome = CliRunner().invoke(cli, ["sweep", str(recipe), str(tmp_path / "s"), "--sparsity", "0.9"])
    assert outcome.exit_code == 1 and isinstance(outcome.exception, SystemExit)
    assert outcome.output.startswith("Error: the sweep stopped, nothing was written: ")
    assert words in outcome.output, outcome.output
    assert "Check each input folder" not in outcome.output
    assert explain_failure(raised).kind == kind


@pytest.mark.slow
def test_explain_failure_sends_offline_hub_errors_to_the_recipe_path(relative_merge, monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    from fapm_merge.io.failures import explain_failure

    work, _, _ = relative_merge
    monkeypatch.chdir(work)
    error = OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/models/models/base: "
                                 "offline mode is enabled.")
    cause = explain_failure(error, recipe=_relative_recipe(), recipe_path=Path("r.yml"))
    assert cause.kind == "model-path"
    assert f"write absolute paths in r.yml (base_model: {work}/models/base; models[0].model: " \
           f"{work}/models/finetuned)" in str(cause)
    hub = explain_failure(OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/models/"
                                               "org/name: offline"), recipe={"base_model": "org/name"})
    assert hub.kind == "hub" and "huggingface-cli download org/name" in hub.fix


def test_explain_failure_names_the_truncated_input_shard(llama_pair, tmp_path):
    from safetensors import SafetensorError

    from helpers import truncated_copy
    from fapm_merge.io.failures import explain_failure

    base, ft = llama_pair
    shard = truncated_copy(ft, tmp_path / "ft", 1000)
    cause = explain_failure(SafetensorError("Error while deserializing header: incomplete metadata"),
                            recipe=fapm_recipe(base, shard.parent))
    assert cause.kind == "input" and str(cause).startswith(f"{shard} is truncated or corrupt")


# ---------------------------------------------------------- 4. use the choice


@pytest.mark.slow
def test_use_the_choice_reproduces_the_variant_bit_for_bit_including_the_card(llama_pair, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from fapm_merge.workflows.choice import use_the_choice
    from fapm_merge.evaluation.metrics import save_byte_tokenizer
    from fapm_merge.workflows.sweep import run_sweep
    from fapm_merge.workflows.variants import build_variants

    base = shutil.copytree(llama_pair[0], tmp_path / "base")
    save_byte_tokenizer(base)  # a tokenizer to copy, as real models (and the demo's) have
    recipe = fapm_recipe(base, llama_pair[1])
    variants = build_variants(recipe, sparsities=[0.9], baselines=["dare"], seed=3)
    sweep = run_sweep(variants, tmp_path / "sweep", progress=False).out_dir
    for variant in variants:
        folder = sweep / variant.name
        choice = use_the_choice(folder, out_parent=tmp_path / "chosen")
        assert choice.command[0] == "mergekit-yaml" and choice.shell in choice.advice
        result = subprocess.run([console_script("mergekit-yaml"), *choice.command[1:]], cwd=tmp_path,
                                capture_output=True, text=True, env=OFFLINE)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
        again = tmp_path / "chosen" / variant.name
        files = sorted(p.name for p in folder.iterdir())
        assert files == sorted(p.name for p in again.iterdir())
        assert "README.md" in files and "tokenizer.json" in files
        for name in files:
            assert (folder / name).read_bytes() == (again / name).read_bytes(), (variant.name, name)
    # why the folder's name matters: the command the guide used to give (`... merged/`)
    # titles the card after an output folder without a name
    run_merge(MergeConfiguration.model_validate(variants[0].recipe), f"{tmp_path}/merged/",
              MergeOptions(copy_tokenizer=False, lazy_unpickle=False))
    assert "\n# Untitled Model (1)\n" in (tmp_path / "merged" / "README.md").read_text()
    assert "\n# fapm-s0.9\n" in (sweep / "fapm-s0.9" / "README.md").read_text()


@pytest.mark.slow
def test_use_the_choice_says_what_to_do_when_the_finetuned_model_or_the_base_wins(demo_dir):
    from fapm_merge.workflows.choice import use_the_choice

    finetuned = use_the_choice(demo_dir / "models" / "finetuned", role="finetuned")
    assert finetuned.command is None
    assert finetuned.advice.startswith(f"the fine-tuned model itself scores best: use "
                                       f"{demo_dir / 'models' / 'finetuned'} as it is")
    base = use_the_choice(demo_dir / "models" / "base", role="base")
    assert base.command is None and "use " + str(demo_dir / "models" / "base") in base.advice
    plain = use_the_choice(demo_dir / "models" / "base")
    assert plain.command is None and "holds no mergekit_config.yml" in plain.advice


@pytest.mark.slow
def test_demo_model_card_is_titled_after_its_folder(demo_dir):
    """Regression: the demo merged into a hidden temporary folder, and mergekit
    titled the card after it ('# .merged.partial-kth2m5t0')."""
    card = (demo_dir / "merged" / "README.md").read_text()
    assert "\n# merged\n" in card and ".partial-" not in card


# --------------------------------------------------------------- 5. tokenizer


@pytest.mark.slow
def test_documented_mergekit_commands_run_without_tracebacks_on_the_demo_models(demo_dir, tmp_path):
    """The guide's and lora.md's mergekit-yaml lines have no --no-copy-tokenizer; on the
    demo models they printed mergekit's 'Failed to copy tokenizer' traceback."""
    result = subprocess.run([console_script("mergekit-yaml"), str(demo_dir / "recipe.yml"), "merged"],
                            cwd=tmp_path, capture_output=True, text=True, env=OFFLINE)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Failed to copy tokenizer" not in result.stderr
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "merged").iterdir()}


@pytest.mark.slow
def test_demo_tokenizer_is_the_byte_tokenizer_eval_uses(demo_dir, tmp_path):
    from transformers import AutoTokenizer

    from fapm_merge.evaluation.evaluate import EvalSettings, evaluate_model

    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "models" / "base")
    text = "héllo, wörld ~ {}\n\tend"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == list(text.encode("utf-8")) and tokenizer.decode(ids) == text
    (tmp_path / "t.txt").write_text(text * 8)
    own = evaluate_model(demo_dir / "models" / "base", EvalSettings(text=tmp_path / "t.txt"))
    raw = evaluate_model(demo_dir / "models" / "base",
                         EvalSettings(text=tmp_path / "t.txt", tokenizer="bytes"))
    assert own["metrics"]["text"]["loss"] == raw["metrics"]["text"]["loss"]


# ------------------------------------------------------------------ 6. --cuda


def test_lint_cuda_fails_fast_in_one_line_without_a_gpu(llama_pair, tmp_path, monkeypatch):
    base, ft = llama_pair
    (tmp_path / "r.yml").write_text(yaml.safe_dump(fapm_recipe(base, ft)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for option in (["--cuda"], ["--device", "cuda:0"]):
        outcome = CliRunner().invoke(cli, ["lint", str(tmp_path / "r.yml"), *option])
        assert outcome.exit_code == 1, outcome.output
        (line,) = outcome.output.splitlines()
        assert line.startswith(f"{' '.join(option)}: torch {torch.__version__} here ")
        assert line.endswith("the merge runs on the CPU")
    assert CliRunner().invoke(cli, ["lint", str(tmp_path / "r.yml"), "--device", "cpu"]).exit_code == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="documents what happens without a GPU")
@pytest.mark.slow
def test_mergekit_yaml_cuda_without_a_gpu_leaves_an_empty_folder_as_documented(llama_pair, tmp_path):
    """mergekit creates OUT before any plugin code can see the device: the reason the
    plugin cannot fail first, documented in troubleshooting.md."""
    from fapm_merge.io.failures import explain_failure

    base, ft = llama_pair
    result = run_mergekit_yaml(fapm_recipe(base, ft), tmp_path / "out", "--cuda", check=False)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message in ("AssertionError: Torch not compiled with CUDA enabled",
                       "RuntimeError: Found no NVIDIA driver on your system. Please check that you "
                       "have an NVIDIA GPU and installed a driver from "
                       "http://www.nvidia.com/Download/index.aspx") or "CUDA" in message
    assert (tmp_path / "out").is_dir() and not any((tmp_path / "out").iterdir())
    guide = (Path(__file__).resolve().parent.parent / "docs" / "troubleshooting.md").read_text()
    assert "`AssertionError: Torch not compiled with CUDA\n  enabled`" in guide
    assert "fapm-merge lint RECIPE\n  --cuda" in guide
    assert explain_failure(AssertionError(message.split(": ", 1)[1])).kind == "gpu"
    assert not verify_output(tmp_path / "out").ok


# ---------------------------------------------------------- 7. 80 columns


def _first_column(text: str) -> str:
    """The name column of a rendered table, its wrapped lines joined."""
    cells = [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")]
    return "".join(cells)


@pytest.mark.slow
def test_tables_fit_80_columns_with_whole_tensor_names(demo_dir, llama_pair):
    from fapm_merge.workflows.analyze import analysis_table, analyze
    from fapm_merge.workflows.demo import MergeSummary, TensorSummary, summarize_merge

    console = Console(width=80, record=True)
    summary = summarize_merge(demo_dir / "models" / "base", demo_dir / "models" / "finetuned",
                              demo_dir / "merged")
    console.print(summary.table(title="FAPM demo", limit=100))
    long_names = ["model.layers.31.post_attention_layernorm.weight",
                  "model.layers.10.self_attn.q_proj.weight", "model.embed_tokens.weight"]
    synthetic = MergeSummary([TensorSummary(n, 525_336_576, 1, 1, 0.5, 1.0) for n in long_names])
    console.print(synthetic.table(title="8B-sized"))
    base, ft = llama_pair
    console.print(analysis_table(analyze(base, ft, sparsity=0.9, progress=False)))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    names = _first_column(text)
    for name in [row.name for row in summary.rows] + long_names + ["lm_head.weight", "model.norm.weight"]:
        assert name in names, name


@pytest.mark.slow
def test_eval_progress_lines_fit_80_columns(demo_dir, tmp_path):
    """Regression: `[2/22] finetuned: ... (55.7 s)` was 81-82 characters and wrapped."""
    # through the command, with the folder names a sweep gives; a wide COLUMNS so
    # that nothing but the command itself decides where lines break; a terminal
    # (TTY_COMPATIBLE: rich's own switch), where these lines are printed, not log lines
    model = tmp_path / "magnitude-s0.95"
    model.symlink_to(demo_dir / "models" / "finetuned", target_is_directory=True)
    (tmp_path / "t.txt").write_text("general text, " * 40)
    (tmp_path / "task.jsonl").write_text(json.dumps({"prompt": "a", "choices": [" b", " c"], "answer": 0}) + "\n")
    outcome = CliRunner().invoke(cli, ["eval", str(demo_dir / "models" / "base"), str(model),
                                       "--text", str(tmp_path / "t.txt"), "--task",
                                       str(tmp_path / "task.jsonl"), "--tokenizer", "bytes",
                                       "--out", str(tmp_path / "r.jsonl")],
                                 env={"COLUMNS": "200", "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "0"})
    assert outcome.exit_code == 0, outcome.output
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", outcome.output)  # the terminal's escape codes
    assert "[2/2] magnitude-s0.95: loss " in shown
    # the progress lines and their continuations (not transformers' loading bars, nor
    # the closing line that names the results file, as long as its path)
    progress = [line for line in shown.splitlines()
                if line.startswith(("[1/2]", "[2/2]", " ")) and "it/s]" not in line]
    assert len(progress) >= 2 and max(len(line) for line in progress) <= 80, progress

    from fapm_merge.evaluation.results import progress_line

    record = {"name": "magnitude-s0.95", "seconds": 32.7,
              "metrics": {"text": {"loss": 7.6620, "perplexity": 2126.05},
                          "task": {"accuracy": 0.95, "examples": 120}}}
    line = progress_line(22, 22, record)
    assert line == "[22/22] magnitude-s0.95: loss 7.6620, ppl 2126.05; task 95.0% of 120; 32.7 s"
    wrapped = progress_line(3, 22, {**record, "name": "Meta-Llama-3-8B-Instruct-medqa-sft-fapm-s0.95"})
    assert wrapped.splitlines()[0] == "[3/22] Meta-Llama-3-8B-Instruct-medqa-sft-fapm-s0.95"
    assert all(len(part) <= 80 for part in wrapped.splitlines())


@pytest.mark.slow
def test_results_line_settings_cannot_contradict_the_metrics(demo_dir, tmp_path):
    """Regression: `settings.bos: true` beside `metrics.text.bos: false` (the byte
    tokenizer has no BOS token; --bos asks for one only when there is one)."""
    from fapm_merge.evaluation.evaluate import EvalSettings, evaluate_model

    (tmp_path / "t.txt").write_text("some general text " * 20)
    record = evaluate_model(demo_dir / "models" / "base",
                            EvalSettings(text=tmp_path / "t.txt", tokenizer="bytes", use_bos=True))
    assert record["settings"]["bos"] is False
    assert record["settings"]["bos"] == record["metrics"]["text"]["bos"]
