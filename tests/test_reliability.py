"""Bad inputs and faults: what a user sees, and that nothing is lost or corrupted.

Each test here is one row of the table in docs/reliability.md (issue 8). Real
parts only: tiny real transformers checkpoints, mergekit's Python API for most
rows, the unmodified ``mergekit-yaml`` in a subprocess for the rows about what
the command line prints and leaves on disk.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from helpers import (
    fapm_recipe,
    load_state,
    run_merge_in_process,
    run_mergekit_yaml,
    truncated_copy,
    variant,
)
from fapm_merge import core
from fapm_merge.core import FapmInputError
from fapm_merge.io.atomic import atomic_output_dir
from fapm_merge.cli import main as cli
from fapm_merge.io.lint import lint_recipe
from fapm_merge.workflows.verify import verify_output
from reference import reference_fapm

PACKAGE = Path(__file__).resolve().parents[1] / "fapm_merge"
DOWN = "model.layers.1.mlp.down_proj.weight"


def assert_no_nan_written(out_dir: Path) -> None:
    """Whatever mergekit managed to write before failing holds no NaN/Inf."""
    for shard in Path(out_dir).glob("*.safetensors"):
        for name, tensor in load_file(shard).items():
            assert torch.isfinite(tensor).all(), f"{name} in {shard} is not finite"


# ------------------------------------------------------------- recipe parameters


@pytest.mark.parametrize(
    "parameters, error, message",
    [  # mergekit validates each parameter with pydantic; the pair is checked per tensor
        ({"sparsity": 1.5}, ValidationError, r"fapm parameter 'sparsity' must be in \[0, 1\], got 1\.5"),
        ({"density": -0.1}, ValidationError, r"fapm parameter 'density' must be in \[0, 1\], got -0\.1"),
        ({"sparsity": "lots"}, ValidationError, r"fapm parameter 'sparsity' must be a number, got 'lots'"),
        ({"weight": float("nan")}, ValidationError, r"fapm parameter 'weight' must be finite"),
        ({"sparsity": 0.5, "density": 0.5}, FapmInputError,
         r"fapm: model .*finetuned, tensor '[^']+': give either sparsity \(0\.5\) or "
         r"density \(0\.5\), not both"),
    ],
    ids=["sparsity>1", "density<0", "non-numeric", "nan-weight", "both"],
)
def test_bad_per_model_parameter_fails_before_writing(llama_pair, tmp_path, parameters, error, message):
    base, ft = llama_pair
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        run_merge_in_process(fapm_recipe(base, ft, **parameters), out)
    assert not out.exists() or not any(out.iterdir())


def test_negative_beta_names_the_parameter(llama_pair, tmp_path):
    base, ft = llama_pair
    recipe = dict(fapm_recipe(base, ft), parameters={"beta": -1})
    with pytest.raises(ValidationError, match=r"fapm parameter 'beta' must be >= 0, got -1\.0"):
        run_merge_in_process(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_base_model_fails_at_plan_time(llama_pair, tmp_path):
    base, ft = llama_pair
    recipe = {"merge_method": "fapm", "dtype": "float32",
              "models": [{"model": str(ft)}, {"model": str(base)}]}
    with pytest.raises(ValueError, match="Merge method requires a base input"):
        run_merge_in_process(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_no_finetuned_model_fails_at_plan_time(llama_pair, tmp_path):
    base, _ = llama_pair
    recipe = {"merge_method": "fapm", "dtype": "float32", "base_model": str(base),
              "models": [{"model": str(base)}]}
    with pytest.raises(ValueError, match="requires at least 1 non-base inputs"):
        run_merge_in_process(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_parameter_is_silently_dropped_by_mergekit_and_caught_by_lint(llama_pair, tmp_path):
    # mergekit 0.1.5 quirk: unknown keys under `parameters:` are ignored, so a typo
    # merges at the default sparsity. The merge "succeeds"; verify --recipe catches it.
    base, ft = llama_pair
    recipe = dict(fapm_recipe(base, ft), parameters={"spasity": 0.5})
    out = run_merge_in_process(recipe, tmp_path / "out")
    default = load_state(run_merge_in_process(fapm_recipe(base, ft), tmp_path / "default"))
    assert all(torch.equal(t, default[n]) for n, t in load_state(out).items())
    problems = lint_recipe(recipe)
    assert [p.where for p in problems] == ["parameters.spasity"]
    assert "unknown parameter for fapm (mergekit ignores it silently)" in problems[0].message


def test_lint_names_missing_model_folders_and_leaves_hub_ids_alone(llama_pair, tmp_path):
    base, ft = llama_pair
    recipe = {
        "merge_method": "fapm",
        "base_model": str(tmp_path / "no-base"),
        "models": [
            {"model": f"{base}+{tmp_path / 'no-adapter'}"},
            {"model": str(tmp_path)},  # a folder, but not a model's
            {"model": "your-org/some-finetune"},  # a hub id: not checked offline
            {"model": str(ft)},
        ],
    }
    assert [str(p) for p in lint_recipe(recipe)] == [
        f"base_model: {tmp_path / 'no-base'}: no such folder; give the path of a local "
        "model folder, or a hub id (namespace/name)",
        f"models[0].model: {tmp_path / 'no-adapter'}: no such folder; give the path of a "
        "local model folder, or a hub id (namespace/name)",
        f"models[1].model: {tmp_path} has no config.json; point at the folder that holds "
        "the checkpoint",
    ]


def test_shared_parameter_written_per_model_is_caught_by_lint(llama_pair):
    base, ft = llama_pair
    problems = lint_recipe(fapm_recipe(base, ft, beta=0.5, sparsity=0.5, density=0.5))
    text = [str(p) for p in problems]
    assert any("models[0].parameters.beta" in t and "move it to the top-level" in t for t in text)
    assert any("either sparsity or density" in t for t in text)


def test_lint_reports_rescale_with_density_rescale_before_the_merge(llama_pair):
    # Regression: mergekit only raised this clash at the first tensor, after start-up;
    # lint (and the docs that point to it) must catch it before a run.
    base, ft = llama_pair
    both = dict(fapm_recipe(base, ft), parameters={"rescale": True, "density_rescale": True})
    assert [str(p) for p in lint_recipe(both)] == [
        "parameters: choose one of rescale (L1 norm of the full delta) and "
        "density_rescale (1/density, DARE-style), not both"
    ]
    one = dict(fapm_recipe(base, ft), parameters={"rescale": False, "density_rescale": True})
    assert lint_recipe(one) == []


@pytest.mark.slow
def test_mergekit_yaml_prints_parameter_error_and_writes_nothing(llama_pair, tmp_path):
    base, ft = llama_pair
    out = tmp_path / "out"
    result = run_mergekit_yaml(fapm_recipe(base, ft, sparsity=1.5), out, check=False)
    assert result.returncode != 0
    assert "fapm parameter 'sparsity' must be in [0, 1], got 1.5 (density = 1 - sparsity)" in result.stderr
    assert not out.exists()


# ------------------------------------------------------------------------ inputs


@pytest.mark.parametrize("side", ["finetuned", "base"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_names_the_tensor_and_writes_no_nan(llama_pair, tmp_path, side, value):
    base, ft = llama_pair

    def poison(state):
        state[DOWN][3, 4] = value

    broken = variant(ft if side == "finetuned" else base, tmp_path / "broken", poison)
    recipe = fapm_recipe(broken, ft) if side == "base" else fapm_recipe(base, broken)
    label = "fine-tuned weight" if side == "finetuned" else r"base \(pre-trained\) weight"
    with pytest.raises(core.FapmInputError, match=f"{label} holds NaN or Inf in tensor '{DOWN}'"):
        run_merge_in_process(recipe, tmp_path / "out")
    assert_no_nan_written(tmp_path / "out")


def test_resized_vocabulary_says_how_to_align_tokenizers(llama_pair, tmp_path):
    base, ft = llama_pair

    def grow(state):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            state[name] = torch.cat([state[name], torch.zeros(8, state[name].shape[1])])

    resized = variant(ft, tmp_path / "resized", grow)
    with pytest.raises(ValueError, match=r"Tensor size mismatch for (lm_head|model\.embed_tokens)"
                       r"\.weight: \[\(72, 32\), \(64, 32\)\]\. Align vocabulary axes with "
                       r"tokenizer configuration"):
        run_merge_in_process(fapm_recipe(base, resized), tmp_path / "out")


def test_shape_mismatch_in_the_core_names_the_tensor():
    with pytest.raises(core.FapmInputError, match=r"shape mismatch in tensor 'a\.b': base \(2, 3\) vs fine-tuned \(3, 2\)"):
        core.fapm_merge(torch.zeros(2, 3), [torch.zeros(3, 2)], keep_counts=[1], name="a.b")


def test_tensor_missing_on_one_side_names_tensor_and_model(llama_pair, tmp_path):
    base, ft = llama_pair
    missing = variant(ft, tmp_path / "missing", lambda s: s.pop(DOWN))
    with pytest.raises(RuntimeError, match=f"Tensor {re.escape(DOWN)} required but not present "
                       f"in model {re.escape(str(missing))}"):
        run_merge_in_process(fapm_recipe(base, missing), tmp_path / "out")


def test_truncated_safetensors_input_is_found_by_verify(llama_pair, tmp_path):
    base, ft = llama_pair
    weights = truncated_copy(ft, tmp_path / "truncated", (ft / "model.safetensors").stat().st_size // 2)
    truncated = weights.parent
    # mergekit's own message does not name the file ...
    with pytest.raises(SafetensorError, match="incomplete metadata, file not fully covered"):
        run_merge_in_process(fapm_recipe(base, truncated), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # ... so troubleshooting.md says: run fapm-merge verify on each input folder.
    result = CliRunner().invoke(cli, ["verify", str(truncated), "--checkpoint-only"])
    assert result.exit_code == 1
    assert "PROBLEM model.safetensors: cannot be opened" in result.output
    assert "truncated or corrupt" in result.output


def test_identical_base_and_finetuned_gives_the_base(llama_pair, tmp_path):
    base, _ = llama_pair
    twin = shutil.copytree(base, tmp_path / "twin")
    out = load_state(run_merge_in_process(fapm_recipe(base, twin), tmp_path / "out"))
    pre = load_state(base)
    assert out.keys() == pre.keys()
    assert all(torch.equal(out[name], pre[name]) for name in pre)


def test_mixed_dtypes_bf16_base_fp32_finetune(llama_pair, tmp_path):
    base, ft = llama_pair
    base16 = variant(base, tmp_path / "base-bf16", dtype=torch.bfloat16)
    recipe = dict(fapm_recipe(base16, ft))
    recipe.pop("dtype")  # let mergekit promote: bf16 vs fp32 computes in fp32
    out = load_state(run_merge_in_process(recipe, tmp_path / "out"))
    pre, post = load_state(base16), load_state(ft)
    # mergekit promotes each group to fp32 before the kernel, so fp32 is written;
    # every bf16 base value is exact in fp32, so pruned entries are still W_pre.
    assert {t.dtype for t in out.values()} == {torch.float32}
    expected, _ = reference_fapm(pre[DOWN].float(), post[DOWN], sparsity=0.9)
    assert torch.equal(out[DOWN], expected)
    assert verify_output(tmp_path / "out", recipe).ok


def test_tied_embeddings_merge_and_verify(model_pairs, tmp_path):
    base, ft = model_pairs["qwen2"]  # tie_word_embeddings: no lm_head.weight stored
    recipe = fapm_recipe(base, ft, sparsity=0.8)
    out = load_state(run_merge_in_process(recipe, tmp_path / "out"))
    assert "lm_head.weight" not in out and "model.embed_tokens.weight" in out
    report = verify_output(tmp_path / "out", recipe)
    assert report.ok, report.problems
    assert report.invariants_checked == len(out)


def test_integer_buffer_and_zero_size_tensors_pass_through():
    ids = torch.arange(12, dtype=torch.int64).view(1, 12)
    assert torch.equal(core.fapm_merge(ids, [ids.clone()], keep_counts=[1]), ids)
    assert core.fapm_merge(ids, [ids.clone()], keep_counts=[1]).dtype == torch.int64
    empty = torch.zeros(0, 4, dtype=torch.bfloat16)
    out = core.fapm_merge(empty, [empty.clone()], keep_counts=[0])
    assert out.shape == (0, 4) and out.dtype == torch.bfloat16


# -------------------------------------------------------------- output integrity


@pytest.mark.slow
def test_plain_mergekit_yaml_leaves_a_partial_folder_that_verify_rejects(llama_pair, tmp_path):
    # Documented behaviour of mergekit 0.1.5: shards are written as they fill, the
    # index and config.json only at the end; a failure mid-run leaves the shards.
    base, ft = llama_pair
    broken = variant(ft, tmp_path / "nan", lambda s: s[DOWN].__setitem__((0, 0), float("nan")))
    out = tmp_path / "out"
    result = run_mergekit_yaml(fapm_recipe(base, broken), out, "--out-shard-size", "20K",
                               check=False)
    assert result.returncode == 1
    assert f"holds NaN or Inf in tensor '{DOWN}'" in result.stderr
    left = sorted(p.name for p in out.iterdir())
    assert left and all(name.endswith(".safetensors") for name in left)  # partial shards
    assert_no_nan_written(out)
    result = CliRunner().invoke(cli, ["verify", str(out)])
    assert result.exit_code == 1
    assert "config.json: missing: the merge did not finish" in result.output
    assert "shards but no model.safetensors.index.json" in result.output


def test_atomic_output_dir_leaves_nothing_on_failure_and_keeps_old_output(tmp_path):
    target = tmp_path / "merged"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as work:
            (work / "model-1.safetensors").write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(target, overwrite=True) as work:
            (work / "config.json").write_text("new")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    assert (target / "config.json").read_text() == "{}"
    with pytest.raises(FileExistsError, match="exists and is not empty; choose another path or pass --overwrite"):
        with atomic_output_dir(target):
            pass


def test_finished_outputs_are_readable_by_others(tmp_path, llama_pair):
    """Regression (issue 22): outputs were created 0700 (mkdtemp) and safetensors'
    shards 0600 (written through a private temporary file), so colleagues could not
    read a repaired model; a plain mkdir/open gives 0755/0644 under umask 022."""
    import os
    import stat
    import tempfile

    old = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "merged") as work:
            handle, private = tempfile.mkstemp(dir=work, suffix=".safetensors")  # 0600, as safetensors
            os.close(handle)
            (work / "sub").mkdir(mode=0o700)
        out = CliRunner().invoke(cli, ["sweep", str(_sweep_recipe(tmp_path, llama_pair)),
                                       str(tmp_path / "sweep"), "--sparsity", "0.9",
                                       "--baselines", "", "--no-copy-tokenizer"])
        assert out.exit_code == 0, out.output
    finally:
        os.umask(old)
    for folder in (tmp_path / "merged", tmp_path / "sweep"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        for path in folder.rglob("*"):
            assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
    assert list((tmp_path / "sweep").rglob("*.safetensors"))


def _sweep_recipe(tmp_path, pair):
    import yaml

    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(fapm_recipe(*pair, sparsity=0.9)))
    return path


@pytest.fixture(scope="module")
def good_output(llama_pair, tmp_path_factory):
    base, ft = llama_pair
    recipe = fapm_recipe(base, ft, sparsity=0.7)
    out = run_merge_in_process(recipe, tmp_path_factory.mktemp("verify") / "out")
    return recipe, out


def test_verify_accepts_a_good_output_and_recomputes_every_tensor(good_output, tmp_path):
    recipe, out = good_output
    report = verify_output(out, recipe)
    assert report.ok, report.problems
    assert report.tensors == report.invariants_checked == len(load_state(out))
    recipe_file = tmp_path / "recipe.yml"
    recipe_file.write_text(json.dumps(recipe))  # JSON is YAML
    result = CliRunner().invoke(cli, ["verify", str(out), "--recipe", str(recipe_file)])
    assert result.exit_code == 0 and result.output.strip().endswith("OK")


@pytest.mark.parametrize("fault", ["one_entry", "nan", "missing", "truncated", "wrong_sparsity"])
def test_verify_rejects_a_damaged_output(good_output, tmp_path, fault):
    recipe, out = good_output
    damaged = shutil.copytree(out, tmp_path / "damaged")
    weights = damaged / "model.safetensors"
    state = load_file(weights)
    if fault == "one_entry":
        state[DOWN][1, 2] += 1e-3
    elif fault == "nan":
        state[DOWN][1, 2] = float("nan")
    elif fault == "missing":
        del state[DOWN]
    if fault != "wrong_sparsity":
        save_file(state, weights, metadata={"format": "pt"})
    if fault == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    if fault == "wrong_sparsity":
        recipe = fapm_recipe(Path(recipe["base_model"]), Path(recipe["models"][0]["model"]),
                             sparsity=0.9)
    report = verify_output(damaged, recipe)
    text = "\n".join(map(str, report.problems))
    expected = {
        "one_entry": f"{DOWN}: 1 entries equal neither the base nor the fine-tuned value",
        "nan": f"{DOWN}: 1 NaN/Inf entries: do not use this output",
        "missing": f"{DOWN}: in the base model but missing from the output",
        "truncated": "model.safetensors: cannot be opened",
        "wrong_sparsity": "entries differ from the FAPM selection of k=",
    }[fault]
    assert not report.ok and expected in text, text


# ------------------------------------------------------------------ supply chain


def test_weights_are_read_through_safetensors_only():
    # Every torch.load in the package must be the adapter reader's opt-in branch,
    # with weights_only=True; nothing passes trust_remote_code=True on its own.
    loads = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path
        assert "pickle.load" not in text and "import pickle" not in text, path
        loads += [(path.name, line) for line in text.splitlines() if "torch.load(" in line]
    assert all("weights_only=True" in line for _, line in loads), loads
    assert {name for name, _ in loads} <= {"lora_adapter.py"}


def test_trust_remote_code_is_only_ever_forwarded_from_mergekit_options():
    uses = [
        (path.name, line.strip())
        for path in PACKAGE.rglob("*.py")
        for line in path.read_text().splitlines()
        if "trust_remote_code" in line
    ]
    assert all(re.search(r"trust_remote_code\s*=\s*(options|self\.options|opts?)\.trust_remote_code"
                         r"|trust_remote_code\s*=\s*trust_remote_code|trust_remote_code:\s*bool",
                         line) for _, line in uses), uses


def test_verify_skips_invariants_when_tokenizers_are_realigned(good_output):
    # With `tokenizer:` mergekit permutes vocabulary rows before the kernel, so a
    # bit-for-bit recomputation would report false damage; verify says it skipped.
    recipe, out = good_output
    report = verify_output(out, dict(recipe, tokenizer={"source": "base"}))
    assert report.ok and report.invariants_checked == 0
    assert "the recipe re-aligns tokenizers" in " ".join(report.notes)


def test_verify_flags_a_pickle_only_checkpoint(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    report = verify_output(folder)
    assert not report.ok
    assert "no .safetensors files: not a finished merge, or a pickle-only checkpoint" in str(report.problems[0])


def test_lint_command_reports_silently_ignored_keys_before_a_merge(tmp_path):
    """`fapm-merge lint` flags a typo and a shared key under models[i] (mergekit drops both)."""
    from click.testing import CliRunner

    from fapm_merge.cli import main

    recipe = tmp_path / "typo.yml"
    recipe.write_text(
        "merge_method: fapm\nbase_model: org/base\nmodels:\n  - model: org/ft\n"
        "    parameters:\n      spasity: 0.5\n      beta: 0.5\n"
    )
    result = CliRunner().invoke(main, ["lint", str(recipe)])
    assert result.exit_code == 1
    assert "models[0].parameters.spasity: unknown parameter" in result.output
    assert "models[0].parameters.beta" in result.output and "top-level" in result.output
    clean = tmp_path / "clean.yml"
    clean.write_text(recipe.read_text().replace("spasity", "sparsity").replace("      beta: 0.5\n", ""))
    assert CliRunner().invoke(main, ["lint", str(clean)]).exit_code == 0


def test_commands_refuse_bad_options_before_any_work(llama_pair, tmp_path):
    """Regression: these reached torch or matplotlib and ended in their tracebacks."""
    base, ft = llama_pair
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(fapm_recipe(base, ft)))
    cases = [
        (["sweep", str(recipe), str(tmp_path / "s"), "--sparsity", "0.9", "--device", "gpu0"],
         "'gpu0' is not a torch device"),
        (["eval", str(base), "--text", str(recipe), "--batch-size", "0"], "0 is not in the range x>=1"),
        (["demo", str(tmp_path / "d"), "--sparsity", "2"], "2.0 is not in the range 0.0<=x<=1.0"),
        (["analyze", str(base), str(ft), "--plot", str(tmp_path / "p.txt")], "give a .png"),
    ]
    for args, message in cases:
        outcome = CliRunner().invoke(cli, args)
        assert outcome.exit_code == 2 and message in outcome.output, (args, outcome.output)
        assert outcome.exception is None or isinstance(outcome.exception, SystemExit)
    assert not (tmp_path / "s").exists() and not (tmp_path / "d").exists()


def test_unreadable_inputs_are_named_by_analyze_verify_and_sweep(llama_pair, tmp_path):
    """A truncated shard: safetensors' own message names no file."""
    base, ft = llama_pair
    shard = truncated_copy(ft, tmp_path / "truncated", 1000)
    truncated = shard.parent
    named = f"{shard}: cannot be opened"
    outcome = CliRunner().invoke(cli, ["analyze", str(base), str(truncated)])
    assert outcome.exit_code == 1 and named in outcome.output
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(fapm_recipe(base, truncated)))
    outcome = CliRunner().invoke(cli, ["sweep", str(recipe), str(tmp_path / "s"), "--sparsity", "0.9"])
    assert outcome.exit_code == 1 and "the sweep stopped" in outcome.output
    # the sweep names the broken shard and the folder to check (issue 17), not "FOLDER"
    assert f"{shard} is truncated or corrupt" in outcome.output
    assert f"fapm-merge verify {truncated}" in outcome.output and not (tmp_path / "s").exists()
    out = run_merge_in_process(fapm_recipe(base, ft), tmp_path / "out")
    report = verify_output(out, fapm_recipe(base, truncated))
    assert [p.where for p in report.problems] == ["recipe inputs"]
    assert named in report.problems[0].message
    report = verify_output(out, fapm_recipe(base, ft, sparsity=1.5))
    assert [str(p) for p in report.problems] == [
        "models[0].parameters.sparsity: fapm parameter 'sparsity' must be in [0, 1], got 1.5 "
        "(density = 1 - sparsity)"
    ]
    assert "FAPM invariants not checked: sparsity must be a number in [0, 1], got 1.5" in report.notes


def test_lint_checks_values_required_parameters_structure_and_stages(tmp_path):
    """Regression: lint said 'no problems found' for recipes mergekit rejects at once,
    and could not read a mergekit-multi file at all."""
    recipe = {"merge_method": "fapm", "base_model": "org/base",
              "models": [{"model": "org/ft", "parameters": {"sparsity": [0.5, 1.5]}}],
              "parameters": {"beta": "lots"}}
    assert [str(p) for p in lint_recipe(recipe)] == [
        "parameters.beta: fapm parameter 'beta' must be a number, got 'lots'",
        "models[0].parameters.sparsity: fapm parameter 'sparsity' must be in [0, 1], got 1.5 "
        "(density = 1 - sparsity)",
    ]
    no_base = {"merge_method": "fapm", "models": [{"model": "org/ft"}]}
    assert [p.where for p in lint_recipe(no_base)] == ["base_model"]
    no_adapter = {"merge_method": "fapm_lora", "base_model": "org/base", "models": [{"model": "org/base"}]}
    assert [str(p) for p in lint_recipe(no_adapter)][0].startswith(
        "parameters: fapm_lora needs parameter 'adapter'")
    assert [str(p) for p in lint_recipe({"merge_method": "fapm", "base_model": "a/b", "models": "abc"})] == [
        "models: Input should be a valid list"
    ]
    stages = tmp_path / "multi.yml"
    stages.write_text(
        "name: first\nmerge_method: fapm\nbase_model: org/base\nmodels: [{model: org/ft}]\n"
        "parameters: {spasity: 0.5}\n---\n"
        "name: second\nmerge_method: fapm\nbase_model: org/base\nmodels: [{model: first}]\n"
    )
    outcome = CliRunner().invoke(cli, ["lint", str(stages)])
    assert outcome.exit_code == 1
    assert outcome.output.startswith("stage 'first': parameters.spasity: unknown parameter")


def test_lint_leaves_legitimate_references_alone_and_reports_mergekit_structure_errors():
    """Regression guards from the review of lint's new checks."""
    revision = {"merge_method": "fapm", "base_model": "meta-llama/Llama-3.2-1B@refs/pr/12",
                "models": [{"model": "org/ft"}]}
    assert lint_recipe(revision) == []  # a hub id with a slashed revision is not a path
    tilde = {"merge_method": "fapm", "base_model": "~/base", "models": [{"model": "org/ft"}]}
    assert [str(p) for p in lint_recipe(tilde)] == [
        "base_model: ~/base: mergekit does not expand ~; write the absolute path"
    ]
    modules = {"merge_method": "slerp", "modules": {"default": {
        "slices": [{"sources": [{"model": "a/b", "layer_range": [0, 2]},
                                {"model": "c/d", "layer_range": [0, 2]}]}],
        "base_model": "a/b", "parameters": {"t": 0.5}}}}
    assert lint_recipe(modules) == []
    # mergekit's own model validators raise RuntimeError, not a pydantic error
    assert [str(p) for p in lint_recipe({"merge_method": "fapm", "base_model": "org/base"})] == [
        "recipe: Exactly one of 'models', 'slices', or 'modules' must be present"
    ]


def test_lint_reports_a_broken_mergekit_install_as_it_is(llama_pair, monkeypatch):
    # a failing import of mergekit's method registry is the install's fault, not an
    # unknown method: lint must not swallow it and pass the recipe unchecked
    import sys

    import mergekit.merge_methods

    base, ft = llama_pair
    monkeypatch.delattr(mergekit.merge_methods, "registry")
    monkeypatch.setitem(sys.modules, "mergekit.merge_methods.registry", None)
    with pytest.raises(ImportError, match="mergekit.merge_methods.registry"):
        lint_recipe(dict(fapm_recipe(base, ft), parameters={"spasity": 0.5}))


@pytest.mark.parametrize("command", ["tune", "eval", "sweep"])
def test_cuda_flag_points_to_device_cuda(command, tmp_path):
    """Regression (issue 22): mergekit-yaml's --cuda typed here gave click's bare
    "No such option: --cuda"."""
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: fapm\n")
    arguments = {"tune": [str(recipe), str(tmp_path / "out")], "eval": [str(tmp_path)],
                 "sweep": [str(recipe), str(tmp_path / "out")]}[command]
    result = CliRunner().invoke(cli, [command, *arguments, "--cuda"])
    assert result.exit_code == 2
    assert "--cuda is mergekit-yaml's flag; here it is --device cuda" in result.output
    assert not (tmp_path / "out").exists()
