"""fapm-merge tune end to end: the demo pair and a real peft LoRA adapter.

The full fine-tune is the `fapm-merge demo` pair with its documented proxy
evaluation files (fewer items and a shorter text than the demo's, for time). The
LoRA case is a real adapter made by peft on a small Llama. The chosen model is
compared with what the real `mergekit-yaml` makes of its recipe, bit for bit.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from helpers import load_state, run_mergekit_yaml
from fapm_merge.cli import main
from fapm_merge.evaluation.evaluate import EvalSettings
from fapm_merge.evaluation.results import read_results
from fapm_merge.workflows.demo import DEMO_CONFIG, build_model, demo_eval_data, save_pair
from fapm_merge.workflows.tradeoff import Rule
from fapm_merge.workflows.tune import TuneError, TuneSettings, run_tune

SWEEP = dict(sparsities=[0.3, 0.9], betas=[1.0], baselines=["magnitude"])  # the old grid: tune's default is the family


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The demo pair, its proxy eval files (40 items, 2048 bytes of text) and recipe."""
    root = tmp_path_factory.mktemp("tune-demo")
    base, finetuned = save_pair(DEMO_CONFIG, root / "models")
    files = demo_eval_data(base, finetuned, root / "eval", text_tokens=2048, items=40)
    recipe = {"merge_method": "fapm", "base_model": str(base),
              "models": [{"model": str(finetuned), "parameters": {"sparsity": 0.9}}],
              "dtype": "float32"}
    return root, recipe, files


def settings(files, **extra):
    return TuneSettings(text=files["text"], task=files["task"],
                        eval=EvalSettings(tokenizer="bytes", window=256), **{**SWEEP, **extra})


@pytest.fixture(scope="session")
def first_run(demo, tmp_path_factory):
    """One default tune on the demo pair, watching how many variants sit on disk."""
    root, recipe, files = demo
    out = tmp_path_factory.mktemp("tune-run") / "chosen"
    on_disk = []

    def progress(stage, done, total, detail):
        variants = out.with_name("chosen.tune") / "variants"
        on_disk.append(len(list(variants.iterdir())) if variants.exists() else 0)

    result = run_tune(recipe, out, settings(files, max_on_disk=1), progress=progress)
    return out, result, on_disk


@pytest.mark.slow
def test_tune_evaluates_every_model_once_and_keeps_the_disk_bounded(first_run):
    out, result, on_disk = first_run
    work = out.with_name("chosen.tune")
    records = read_results(work / "results.jsonl")
    names = sorted(Path(r["model"]).name for r in records)
    assert names == sorted(["base", "finetuned", "fapm-s0.3", "fapm-s0.9",
                            "magnitude-s0.3", "magnitude-s0.9"])
    assert result.evaluated == 6 and result.reused == 0
    assert max(on_disk) <= 1  # --max-on-disk 1: merge, evaluate, delete, one at a time
    assert not (work / "variants").exists() or not any((work / "variants").iterdir())
    assert (work / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    decision = json.loads((work / "tradeoff.json").read_text())
    assert decision["rule_settings"]["kind"] == "repair"
    assert {p["name"] for p in decision["points"]} == set(names)
    if result.out_dir is None:  # nothing qualified: said, and nothing written
        assert not out.exists()
        assert "nothing written" in result.message


def _variant_under_the_fine_tune(work):
    """A max-cf bound that selects a variant: the best-accuracy variant forgetting less
    than the fine-tune (computed from the first run's own table)."""
    decision = json.loads((work / "tradeoff.json").read_text())
    ft = decision["finetuned"]
    candidates = [p for p in decision["points"]
                  if p["method"] not in ("base", "finetuned") and p["cf_pct"] < ft["cf_pct"]]
    best = max(candidates, key=lambda p: p["accuracy"])
    higher = [p["cf_pct"] for p in decision["points"]
              if p["cf_pct"] > best["cf_pct"] and p["accuracy"] > best["accuracy"]]
    bound = (best["cf_pct"] + min(higher)) / 2 if higher else best["cf_pct"] + 1e-9
    return best["name"], bound


@pytest.mark.slow
def test_a_new_rule_reuses_every_evaluation_and_the_chosen_model_equals_mergekit_yaml(
        first_run, demo, tmp_path):
    out, _, _ = first_run
    _, recipe, files = demo
    work = out.with_name("chosen.tune")
    name, bound = _variant_under_the_fine_tune(work)
    chosen = tmp_path / "chosen"
    result = run_tune(recipe, chosen, settings(files, work_dir=work,
                                               rule=Rule("max-cf", max_cf=bound)))
    assert result.evaluated == 0 and result.reused == 6
    assert result.tradeoff.selected.name == name
    assert result.out_dir == chosen.absolute()
    card = (chosen / "README.md").read_text()
    assert "max-cf: the highest accuracy among points" in card and "## The trade-off" in card
    assert f"**{name}**" in card and "```yaml" in card
    assert (chosen / "tradeoff.png").exists() and (chosen / "tradeoff.json").exists()
    # the recipe beside the weights is the variant's; mergekit-yaml on it gives the same bits
    again = tmp_path / "again"
    run_mergekit_yaml(yaml.safe_load((chosen / "mergekit_config.yml").read_text()), again)
    mine, theirs = load_state(chosen), load_state(again)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert json.loads((chosen / "config.json").read_text()) == json.loads((again / "config.json").read_text())


@pytest.mark.slow
def test_an_interrupted_tune_resumes_with_finished_evaluations(demo, tmp_path):
    _, recipe, files = demo
    out = tmp_path / "out"
    evaluated = []

    def stop_after_one_variant(stage, done, total, detail):
        if stage == "variants" and done == 1:
            raise KeyboardInterrupt  # as Ctrl-C between two variants

    with pytest.raises(KeyboardInterrupt):
        run_tune(recipe, out, settings(files, sparsities=[0.9]), progress=stop_after_one_variant)
    work = out.with_name("out.tune")
    evaluated = [Path(r["model"]).name for r in read_results(work / "results.jsonl")]
    assert evaluated == ["base", "finetuned", "fapm-s0.9"]
    assert not out.exists()
    result = run_tune(recipe, out, settings(files, sparsities=[0.9]))
    assert result.reused == 3 and result.evaluated == 1  # only magnitude-s0.9 was left
    lines = (work / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4  # no model evaluated twice


@pytest.mark.slow
def test_a_work_folder_of_another_tune_is_refused(first_run, demo, tmp_path):
    out, _, _ = first_run
    _, recipe, files = demo
    with pytest.raises(TuneError, match="holds a tune made with other settings .*variants.*--restart"):
        run_tune(recipe, tmp_path / "x", settings(files, work_dir=out.with_name("chosen.tune"),
                                                    sparsities=[0.5]))


@pytest.mark.parametrize("case", ["empty task", "short text", "short documents", "fine-tune scores 0",
                                  "hub id", "misspelt folder"])
def test_bad_input_is_a_clear_error_and_nothing_is_written(case, demo, tmp_path):
    root, recipe, files = demo
    text, task = files["text"], files["task"]
    if case == "empty task":
        task = tmp_path / "task.jsonl"
        task.write_text("\n")
        match = "has no examples"
    elif case == "short text":
        text = tmp_path / "short.txt"
        text.write_text("a short line\n")
        match = r"gives 13 tokens, 0 full window\(s\) of 256"
    elif case == "short documents":  # 600 bytes in all, but windows never cross documents
        text = tmp_path / "short.jsonl"
        text.write_text(("{\"text\": \"%s\"}\n" % ("x" * 200)) * 3)
        match = r"gives 600 tokens, 0 full window\(s\) of 256"
    elif case == "fine-tune scores 0":  # every answer is a choice the fine-tune never picks
        task = tmp_path / "task.jsonl"
        items = [json.loads(line) for line in files["task"].read_text().splitlines()]
        for item in items:
            item["answer"] = (item["answer"] + 1) % len(item["choices"])
        task.write_text("".join(json.dumps(item) + "\n" for item in items))
        match = "the fine-tuned model scores 0 on --task"
    elif case == "hub id":
        recipe = {**recipe, "base_model": "someone/some-model"}
        match = "tune evaluates models from local folders"
    else:  # regression (issue 22): was the hub-id advice; lint and sweep say "no such folder"
        recipe = {**recipe, "base_model": str(root / "models" / "bsae")}
        match = r"base_model: .*bsae: no such folder"
    out = tmp_path / "out"
    with pytest.raises(TuneError, match=match):
        run_tune(recipe, out, TuneSettings(text=text, task=task,
                                           eval=EvalSettings(tokenizer="bytes", window=256), **SWEEP))
    assert not out.exists()


# ----------------------------------------------------------------- LoRA

SMALL = dict(DEMO_CONFIG, vocab_size=256, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def lora_case(tmp_path_factory):
    """A small Llama (byte vocabulary), a real peft LoRA adapter on it, eval files."""
    from peft import LoraConfig, PeftModel, get_peft_model

    root = tmp_path_factory.mktemp("tune-lora")
    base_dir = root / "base"
    build_model(SMALL, seed=0).save_pretrained(base_dir)
    torch.manual_seed(3)
    peft_model = get_peft_model(build_model(SMALL, seed=0), LoraConfig(
        r=4, lora_alpha=16, init_lora_weights=False,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    adapter = root / "adapter"
    peft_model.save_pretrained(adapter)
    merged = root / "merged-by-peft"  # only to make the proxy eval files
    PeftModel.from_pretrained(build_model(SMALL, seed=0), str(adapter)).merge_and_unload() \
        .save_pretrained(merged)
    files = demo_eval_data(base_dir, merged, root / "eval", text_tokens=2048, items=30)
    recipe = {"merge_method": "fapm_lora", "base_model": str(base_dir.resolve()),
              "models": [{"model": str(base_dir.resolve())}],
              "parameters": {"adapter": str(adapter.resolve())}, "dtype": "float32"}
    return root, recipe, files, merged


@pytest.mark.slow
def test_tune_on_a_real_lora_adapter(lora_case, tmp_path):
    root, recipe, files, merged = lora_case
    out = tmp_path / "chosen"
    first = run_tune(recipe, out, TuneSettings(
        text=files["text"], task=files["task"], eval=EvalSettings(tokenizer="bytes", window=128),
        sparsities=[0.1, 0.5], betas=[1.0], baselines=["magnitude", "wiseft"], alphas=[0.5], keep_variants=True))
    work = out.with_name("chosen.tune")
    names = sorted(Path(r["model"]).name for r in read_results(work / "results.jsonl"))
    assert names == sorted(["base", "finetuned", "fapm_lora-s0.1", "fapm_lora-s0.5",
                            "magnitude_lora-s0.1", "magnitude_lora-s0.5", "wiseft_lora-a0.5"])
    # the fine-tuned anchor is fapm_lora at sparsity 0: peft's merge, bit for bit
    mine, peft_merged = load_state(work / "variants" / "finetuned"), load_state(merged)
    assert all(torch.equal(mine[k], peft_merged[k]) for k in mine)
    methods = {p.name: p.method for p in first.tradeoff.points}
    assert methods["fapm_lora-s0.1"] == "fapm_lora" and methods["wiseft_lora-a0.5"] == "wiseft_lora"
    assert methods["finetuned"] == "finetuned"
    # a rule that picks a variant; the chosen model equals mergekit-yaml on its recipe
    name, bound = _variant_under_the_fine_tune(work)
    chosen = tmp_path / "lora-chosen"
    result = run_tune(recipe, chosen, TuneSettings(
        text=files["text"], task=files["task"], eval=EvalSettings(tokenizer="bytes", window=128),
        sparsities=[0.1, 0.5], betas=[1.0], baselines=["magnitude", "wiseft"], alphas=[0.5],
        rule=Rule("max-cf", max_cf=bound), work_dir=work))
    assert result.evaluated == 0 and result.tradeoff.selected.name == name
    again = tmp_path / "again"
    run_mergekit_yaml(yaml.safe_load((chosen / "mergekit_config.yml").read_text()), again)
    a, b = load_state(chosen), load_state(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_tune_command_line_reports_stages_and_exit_status(demo, tmp_path):
    root, recipe, files = demo
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "tune", str(recipe_path), str(out), "--text", str(files["text"]), "--task", str(files["task"]),
        "--tokenizer", "bytes", "--sparsity", "0.9", "--beta", "1", "--baselines", "", "--min-repair", "1.0"])
    # a repair of all the forgetting is not met by a pruned variant on this proxy task: nothing chosen
    assert result.exit_code == 3, result.output
    decision = json.loads((out.with_name("out.tune") / "tradeoff.json").read_text())
    assert decision["selected"] is None
    assert decision["outcome"] in ("undecided", "none qualifies", "no forgetting")
    # Regression (issue 22): the "nothing selected" explanation was printed twice
    printed = " ".join(result.output.split())
    opening = " ".join(decision["reason"].split()[:6])
    assert "nothing written to" in printed and printed.count(opening) == 1, (opening, printed)
    assert not out.exists()
    shutil.rmtree(out.with_name("out.tune"))


@pytest.mark.slow
def test_a_failure_inside_a_merge_names_its_cause_and_the_rerun_resumes(demo, tmp_path, monkeypatch):
    """Regression: tune let an exception from inside mergekit (here the disk filling up
    while a shard is written) end in a traceback, where sweep names the cause."""
    import errno

    import fapm_merge.workflows.sweep as sweep_module

    root, recipe, files = demo
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    args = ["tune", str(recipe_path), str(out), "--text", str(files["text"]), "--task", str(files["task"]),
            "--tokenizer", "bytes", "--sparsity", "0.9", "--beta", "1", "--baselines", ""]

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "shard"))

    monkeypatch.setattr(sweep_module, "run_sweep", disk_full)
    failed = CliRunner().invoke(main, args)
    assert failed.exit_code == 1 and not isinstance(failed.exception, OSError), failed.output
    assert "tune stopped:" in failed.output and "disk" in failed.output.lower()
    assert "the same command resumes" in failed.output and "Traceback" not in failed.output
    assert not out.exists()
    monkeypatch.undo()
    resumed = CliRunner().invoke(main, args)
    assert resumed.exit_code in (0, 3), resumed.output  # 3: no variant qualifies on this proxy
    assert "1 evaluated, 2 reused" in resumed.output  # base and fine-tune were kept
    shutil.rmtree(out.with_name("out.tune"))


def test_ctrl_c_says_the_same_command_resumes(demo, tmp_path, monkeypatch):
    """Regression (issue 22): Ctrl-C ended in click's bare "Aborted!"."""
    import fapm_merge.workflows.tune as tune_package

    root, recipe, files = demo
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(yaml.safe_dump(recipe))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune_package, "run_tune", interrupted)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["tune", str(recipe_path), str(out), "--text", str(files["text"]),
                                       "--task", str(files["task"])])
    assert result.exit_code == 130
    assert "interrupted: run the same command to resume" in result.output
    assert str(out.with_name("out.tune")) in result.output
    assert "Aborted!" not in result.output
