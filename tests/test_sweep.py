"""fapm-merge sweep: every output equals a single mergekit run of its recipe, bit for bit.

One sweep (FAPM at three strengths plus the three baselines) is built once per
module; each output is compared with mergekit run on the same recipe: the real
`mergekit-yaml` console script for the main FAPM value, mergekit's `run_merge`
(the function `mergekit-yaml` calls) for the rest, to keep the suite fast.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from helpers import fapm_recipe, load_state, run_merge_in_process, run_mergekit_yaml

import fapm_merge.methods.sweep_graph as sweep_module
from fapm_merge.cli import main
from fapm_merge.workflows.sweep import run_sweep
from fapm_merge.workflows.variants import SweepError, build_variants, parse_values

SPARSITIES = [0.5, 0.9, 0.95]


@pytest.fixture(scope="module")
def qwen_pair(model_pairs):
    return model_pairs["qwen2"]  # tied embeddings, attention biases


@pytest.fixture(scope="module")
def swept(qwen_pair, tmp_path_factory):
    """The sweep, with counts of tensor reads and of FAPM score computations."""
    base, finetuned = qwen_pair
    variants = build_variants(
        fapm_recipe(base, finetuned, sparsity=0.3),
        sparsities=SPARSITIES,
        baselines=["magnitude", "dare", "wiseft"],
        seed=7,
    )
    from mergekit.io.tasks import LoadTensor

    calls = {"reads": [], "scores": 0}
    original_execute = LoadTensor.execute
    original_scores = sweep_module.fapm_scores

    def counting_execute(self, *args, **kwargs):
        calls["reads"].append((str(self.model), self.tensor))
        return original_execute(self, *args, **kwargs)

    def counting_scores(*args, **kwargs):
        calls["scores"] += 1
        return original_scores(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(LoadTensor, "execute", counting_execute)
    mp.setattr(sweep_module, "fapm_scores", counting_scores)
    try:
        out = tmp_path_factory.mktemp("sweep") / "out"
        result = run_sweep(variants, out, copy_tokenizer=False, progress=False)
    finally:
        mp.undo()
    return result, variants, calls


def _assert_same_model(ours: Path, theirs: Path):
    a, b = load_state(ours), load_state(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    assert json.loads((ours / "config.json").read_text()) == json.loads(
        (theirs / "config.json").read_text()
    )
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())


@pytest.mark.slow
def test_fapm_output_equals_real_mergekit_yaml(swept, tmp_path):
    result, variants, _ = swept
    variant = next(v for v in variants if v.name == "fapm-s0.9")
    reference = tmp_path / "ref"
    run_mergekit_yaml(variant.recipe, reference)
    _assert_same_model(result.out_dir / variant.name, reference)
    assert (result.out_dir / variant.name / "README.md").read_text() == (
        reference / "README.md"
    ).read_text().replace("ref", variant.name)
    # the recipe written beside the weights is the one that reproduces them
    assert yaml.safe_load((result.out_dir / variant.name / "mergekit_config.yml").read_text()) == variant.recipe


@pytest.mark.parametrize(
    "name", ["fapm-s0.5", "fapm-s0.95", "magnitude-s0.9", "dare-s0.5", "dare-s0.9", "wiseft-a0.1"]
)
def test_every_variant_equals_mergekit_run_merge(swept, tmp_path, name):
    result, variants, _ = swept
    variant = next(v for v in variants if v.name == name)
    options = {"random_seed": variant.seed} if variant.seed is not None else {}
    reference = run_merge_in_process(variant.recipe, tmp_path / "ref", **options)
    _assert_same_model(result.out_dir / name, reference)


def test_recipes_say_what_each_variant_is(swept, qwen_pair):
    _, variants, _ = swept
    base, finetuned = map(str, qwen_pair)
    by_name = {v.name: v.recipe for v in variants}
    assert by_name["fapm-s0.95"]["models"] == [{"model": finetuned, "parameters": {"sparsity": 0.95}}]
    assert by_name["magnitude-s0.9"]["parameters"] == {"beta": 0.0}
    assert by_name["dare-s0.9"]["merge_method"] == "dare_linear"
    assert by_name["dare-s0.9"]["models"][0]["parameters"] == {"weight": 1.0, "density": 0.1}
    assert by_name["wiseft-a0.05"]["merge_method"] == "task_arithmetic"
    assert by_name["wiseft-a0.05"]["models"][0]["parameters"] == {"weight": 0.05}
    assert all(r["base_model"] == base for r in by_name.values())


def test_each_input_tensor_read_once_and_scored_once_per_beta(swept, qwen_pair):
    result, variants, calls = swept
    from fapm_merge.io.checkpoint import safetensors_index

    assert len(calls["reads"]) == len(set(calls["reads"]))  # no tensor read twice
    base, finetuned = qwen_pair
    expected_reads = len(safetensors_index(base)) + len(safetensors_index(finetuned))
    assert len(calls["reads"]) == expected_reads
    # two betas (FAPM 1.0, magnitude 0.0) per floating tensor, whatever the value count
    assert calls["scores"] == 2 * result.tensors
    manifest = json.loads((result.out_dir / "sweep.json").read_text())
    assert [v["name"] for v in manifest["variants"]] == [v.name for v in variants]
    assert manifest["variants"][0] == {
        "name": "fapm-s0.5",
        "method": "fapm",
        "sparsity": 0.5,
        "seed": None,
        "path": str(result.out_dir / "fapm-s0.5"),
    }


def test_density_spelling_gives_the_same_bits(qwen_pair, swept, tmp_path):
    result, _, _ = swept
    base, finetuned = qwen_pair
    variants = build_variants(fapm_recipe(base, finetuned), densities=[0.1])
    assert [v.name for v in variants] == ["fapm-d0.1"]
    out = run_sweep(variants, tmp_path / "d", copy_tokenizer=False, progress=False).out_dir
    a, b = load_state(out / "fapm-d0.1"), load_state(result.out_dir / "fapm-s0.9")
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_failed_sweep_leaves_no_output(qwen_pair, tmp_path):
    # A model folder with a config but no weights fails while merging, mid-run.
    base, finetuned = qwen_pair
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((Path(finetuned) / "config.json").read_text())
    variants = build_variants(fapm_recipe(base, weightless), sparsities=[0.9])
    with pytest.raises(RuntimeError, match="weightless"):  # mergekit: "Unable to find model files"
        run_sweep(variants, tmp_path / "out", copy_tokenizer=False, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weightless"]


def test_missing_model_folder_is_named_before_anything_runs(qwen_pair, tmp_path):
    # Regression: a mistyped local path reached transformers as a hub id and failed
    # with "Repo id must be in the form ..." and a traceback from deep inside it.
    base, _ = qwen_pair
    with pytest.raises(SweepError, match=r"models\[0\]\.model: .*missing-model: no such folder"):
        build_variants(fapm_recipe(base, tmp_path / "missing-model"), sparsities=[0.9])


def test_bad_requests_are_clear(qwen_pair, tmp_path):
    base, finetuned = qwen_pair
    recipe = fapm_recipe(base, finetuned)
    with pytest.raises(SweepError, match="exactly one of --sparsity or --density"):
        build_variants(recipe, sparsities=[0.9], densities=[0.1])
    with pytest.raises(SweepError, match="merge_method: fapm"):
        build_variants({**recipe, "merge_method": "ties"}, sparsities=[0.9])
    with pytest.raises(SweepError, match="unknown baseline"):
        build_variants(recipe, sparsities=[0.9], baselines=["wanda"])
    with pytest.raises(SweepError, match=r"in \[0, 1\]"):
        parse_values("0.5,1.5", "--sparsity")
    with pytest.raises(SweepError, match="twice"):
        parse_values("0.5,0.5", "--sparsity")
    with pytest.raises(SweepError, match="comma-separated numbers"):
        parse_values("0.5;0.7", "--sparsity")


def test_cli_sweep(qwen_pair, tmp_path):
    base, finetuned = qwen_pair
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(fapm_recipe(base, finetuned)))
    out = tmp_path / "sweep"
    args = ["sweep", str(recipe), str(out), "--sparsity", "0.7,0.9", "--baselines", "magnitude", "--no-copy-tokenizer"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    names = [v["name"] for v in json.loads((out / "sweep.json").read_text())["variants"]]
    assert names == ["fapm-s0.7", "fapm-s0.9", "magnitude-s0.7", "magnitude-s0.9"]
    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "exists and is not empty" in again.output


def test_density_rescale_recipes_take_the_kernel_path_and_stay_exact(qwen_pair, tmp_path):
    base, finetuned = qwen_pair
    recipe = fapm_recipe(base, finetuned)
    recipe["parameters"] = {"density_rescale": True}
    (variant,) = build_variants(recipe, sparsities=[0.8])
    out = run_sweep([variant], tmp_path / "s", copy_tokenizer=False, progress=False).out_dir
    reference = run_merge_in_process(variant.recipe, tmp_path / "ref")
    _assert_same_model(out / variant.name, reference)
