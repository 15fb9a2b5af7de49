"""The repair family (issue 23): FAPM over sparsity x beta, LiNeS, FAPM with a depth
schedule. Each is a plain recipe: its sweep output equals mergekit run on that recipe,
bit for bit, and the recipe says per layer what LiNeS and the schedule prescribe.
"""

import re

import pytest
import torch
import yaml
from click.testing import CliRunner

from helpers import fapm_recipe, load_state, run_merge_in_process, run_mergekit_yaml

from fapm_merge.cli import main
from fapm_merge.core.rules import keep_count
from fapm_merge.io.recipe import describe_recipe, method_family
from fapm_merge.workflows.demo import TINY_CONFIGS, save_pair
from fapm_merge.workflows.sweep import run_sweep
from fapm_merge.workflows.tune.plan import FAMILY_BETAS
from fapm_merge.workflows.variants import (DEPTH_SCHEDULES, LINES_ALPHAS, SweepError, build_variants,
                                           lines_weights, parse_values)

LAYERS = 4  # enough for an interior layer: LiNeS's schedule is not just its two ends


@pytest.fixture(scope="module")
def deep_pair(tmp_path_factory):
    """A llama pico pair with four layers and its own lm_head (untied)."""
    config = {**TINY_CONFIGS["llama"], "num_hidden_layers": LAYERS}
    return save_pair(config, tmp_path_factory.mktemp("deep") / "pair")


@pytest.fixture(scope="module")
def family_sweep(deep_pair, tmp_path_factory):
    base, finetuned = deep_pair
    variants = build_variants(fapm_recipe(base, finetuned), sparsities=[0.5, 0.9], betas=[0.0, 0.5, 1.0],
                              baselines=["magnitude", "lines", "depth"], lines_alphas=[0.25])
    out = tmp_path_factory.mktemp("family") / "out"
    return run_sweep(variants, out, copy_tokenizer=False, progress=False), {v.name: v for v in variants}


def _layer(name):
    match = re.search(r"\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _mergekit_gradient(values, layer):
    """The value mergekit gives a tensor of layer index ``layer`` (None: a tensor outside
    the layers, planned at t = 0) from the gradient ``values``: its own
    ``evaluate_setting`` at ``t = i / (L - 1)`` (``MergePlanner.plan_slice``)."""
    from mergekit.config import evaluate_setting

    t = 0.0 if layer is None else layer / (LAYERS - 1)
    return evaluate_setting("", list(values), t, validate=float)


# ----------------------------------------------------------------- the variants, as data


def test_beta_grid_names_and_recipes(deep_pair):
    base, finetuned = map(str, deep_pair)
    variants = build_variants(fapm_recipe(base, finetuned), sparsities=[0.9], betas=[0, 0.25, 1, 2],
                              baselines=["magnitude"])
    by_name = {v.name: v for v in variants}
    # beta 0 and the magnitude baseline are one recipe, made once, under magnitude's name
    assert list(by_name) == ["magnitude-s0.9", "fapm-b0.25-s0.9", "fapm-s0.9", "fapm-b2.0-s0.9"]
    assert by_name["magnitude-s0.9"].recipe["parameters"] == {"beta": 0.0}
    assert by_name["fapm-b0.25-s0.9"].recipe["parameters"] == {"beta": 0.25}
    assert by_name["fapm-b2.0-s0.9"].recipe["parameters"] == {"beta": 2.0}
    # beta 1 is the default: the recipe a sweep without --beta writes, key for key
    (today,) = build_variants(fapm_recipe(base, finetuned), sparsities=[0.9])
    assert by_name["fapm-s0.9"].recipe == today.recipe and today.name == "fapm-s0.9"
    assert "parameters" not in today.recipe
    assert [(v.method, v.strength) for v in variants] == [
        ("magnitude", {"sparsity": 0.9, "beta": 0.0}), ("fapm-b0.25", {"sparsity": 0.9, "beta": 0.25}),
        ("fapm", {"sparsity": 0.9, "beta": 1.0}), ("fapm-b2.0", {"sparsity": 0.9, "beta": 2.0})]


def test_lines_and_depth_recipes(deep_pair):
    base, finetuned = map(str, deep_pair)
    variants = build_variants(fapm_recipe(base, finetuned), sparsities=[0.9], baselines=["lines", "depth"])
    by_name = {v.name: v for v in variants}
    assert list(by_name) == ["fapm-s0.9", "fapm-depth-s0.9to0.0", "fapm-depth-s0.95to0.5",
                             "lines-a0.0", "lines-a0.25", "lines-a0.5", "lines-a0.75"]
    assert by_name["lines-a0.25"].recipe == {
        "merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
        "models": [{"model": finetuned, "parameters": {"weight": [0.25, 1.0]}}]}
    assert by_name["fapm-depth-s0.9to0.0"].recipe == {
        "merge_method": "fapm", "base_model": base, "dtype": "float32",
        "models": [{"model": finetuned, "parameters": {"sparsity": [0.9, 0.0]}}]}
    assert [v.name for v in variants if v.method == "lines"] == [f"lines-a{a}" for a in LINES_ALPHAS]


def test_lines_weights_per_layer_are_the_papers_schedule():
    # LiNeS: lambda(l) = alpha + beta_L (l - 1) / (L - 1), beta_L = 1 - alpha (one task);
    # dyadic values, so mergekit's interpolation is exact
    assert [_mergekit_gradient(lines_weights(0.25), i) for i in range(LAYERS)] == [0.25, 0.5, 0.75, 1.0]
    assert [_mergekit_gradient(lines_weights(0.0), i) for i in range(LAYERS)] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert _mergekit_gradient(lines_weights(0.25), None) == 0.25  # embeddings, final norm, lm_head
    # the depth schedule (0.9, 0.0): sparsity falls linearly, 0.9 outside the layers
    assert [_mergekit_gradient([0.9, 0.0], i) for i in range(LAYERS)] == pytest.approx([0.9, 0.6, 0.3, 0.0],
                                                                                       abs=1e-15)
    assert _mergekit_gradient([0.9, 0.0], None) == 0.9


def test_lora_family_recipes(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    recipe = {"merge_method": "fapm_lora", "base_model": str(base), "models": [{"model": str(base)}],
              "parameters": {"adapter": str(tmp_path / "adapter"), "sparsity": 0.1}}
    variants = build_variants(recipe, sparsities=[0.1], betas=[0.0, 0.5, 1.0],
                              baselines=["magnitude", "lines", "depth"], lines_alphas=[0.5])
    by_name = {v.name: v for v in variants}
    assert list(by_name) == ["magnitude_lora-s0.1", "fapm_lora-b0.5-s0.1", "fapm_lora-s0.1",
                             "fapm_lora-depth-s0.3to0.0", "fapm_lora-depth-s0.5to0.1", "lines_lora-a0.5"]
    adapter = str(tmp_path / "adapter")
    assert by_name["fapm_lora-b0.5-s0.1"].recipe["parameters"] == {"adapter": adapter, "sparsity": 0.1,
                                                                   "beta": 0.5}
    assert by_name["lines_lora-a0.5"].recipe["parameters"] == {"adapter": adapter, "sparsity": 0.0,
                                                               "lambda": [0.5, 1.0]}
    assert by_name["fapm_lora-depth-s0.3to0.0"].recipe["parameters"] == {"adapter": adapter,
                                                                        "sparsity": [0.3, 0.0]}
    assert DEPTH_SCHEDULES["fapm_lora"][0] == (0.3, 0.0)


def test_describe_recipe_tells_the_family_apart():
    base, ft = "/m/base", "/m/ft"

    def fapm(beta=None, **model):
        recipe = {"merge_method": "fapm", "base_model": base, "models": [{"model": ft, "parameters": model}]}
        if beta is not None:
            recipe["parameters"] = {"beta": beta}
        return recipe

    def task_arithmetic(weight):
        return {"merge_method": "task_arithmetic", "base_model": base,
                "models": [{"model": ft, "parameters": {"weight": weight}}]}

    assert describe_recipe(fapm(sparsity=0.9)) == ("fapm", 0.9, "sparsity")
    assert describe_recipe(fapm(1.0, sparsity=0.9)) == ("fapm", 0.9, "sparsity")
    assert describe_recipe(fapm(0.0, sparsity=0.5)) == ("magnitude", 0.5, "sparsity")
    assert describe_recipe(fapm(0.5, sparsity=0.7)) == ("fapm-b0.5", 0.7, "sparsity")
    assert describe_recipe(fapm(2, density=0.1)) == ("fapm-b2.0", 0.9, "sparsity")
    assert describe_recipe(fapm(sparsity=[0.9, 0.0])) == ("fapm-depth", None, None)
    assert describe_recipe(fapm(0.0, density=[0.1, 1.0])) == ("magnitude-depth", None, None)
    assert describe_recipe(task_arithmetic(0.3)) == ("wiseft", 0.3, "alpha")
    assert describe_recipe(task_arithmetic([0.25, 1.0])) == ("lines", 0.25, "alpha")
    assert describe_recipe(task_arithmetic([0.2, 0.8])) == ("lines-top0.8", 0.2, "alpha")
    assert describe_recipe(task_arithmetic([0.1, 0.5, 1.0])) == ("task_arithmetic", None, None)
    lora = {"merge_method": "fapm_lora", "base_model": base, "models": [{"model": base}],
            "parameters": {"adapter": "/a", "sparsity": 0.1, "beta": 0.25}}
    assert describe_recipe(lora) == ("fapm_lora-b0.25", 0.1, "sparsity")
    lora["parameters"] = {"adapter": "/a", "sparsity": 0.0, "lambda": [0.5, 1.0]}
    assert describe_recipe(lora) == ("lines_lora", 0.5, "alpha")
    lora["parameters"] = {"adapter": "/a", "sparsity": 0.0, "lambda": 0.5}
    assert describe_recipe(lora) == ("wiseft_lora", 0.5, "alpha")
    assert [method_family(m) for m in ("fapm-b0.5", "fapm-depth", "magnitude_lora-depth", "lines",
                                       "fapm_lora-b2.0")] == ["fapm", "fapm", "magnitude_lora", "lines",
                                                              "fapm_lora"]


def test_every_variant_is_labelled_as_its_recipe_reads(deep_pair):
    base, finetuned = deep_pair
    for variant in build_variants(fapm_recipe(base, finetuned, sparsity=0.3), sparsities=[0.5, 0.9],
                                  betas=FAMILY_BETAS, baselines=["magnitude", "wiseft", "lines", "depth"]):
        assert describe_recipe(variant.recipe)[0] == variant.method, variant.name


def test_bad_betas_are_clear(deep_pair, tmp_path):
    assert parse_values("0,0.25,2", "--beta", high=None) == [0.0, 0.25, 2.0]
    with pytest.raises(SweepError, match=r"--beta values must be >= 0, got -1.0"):
        parse_values("-1", "--beta", high=None)
    base, finetuned = deep_pair
    second = tmp_path / "second"  # a second fine-tune: LiNeS scales one update
    second.mkdir()
    (second / "config.json").write_text("{}")
    recipe = fapm_recipe(base, finetuned)
    recipe["models"].append({"model": str(second)})
    with pytest.raises(SweepError, match="LiNeS baselines need exactly one fine-tuned model"):
        build_variants(recipe, sparsities=[0.9], baselines=["lines"])


# ----------------------------------------------------------------- the outputs, as mergekit makes them


@pytest.mark.parametrize("name", ["fapm-b0.5-s0.9", "magnitude-s0.5", "lines-a0.25",
                                  "fapm-depth-s0.9to0.0", "fapm-depth-s0.95to0.5"])
def test_family_outputs_equal_mergekit_run_merge(family_sweep, tmp_path, name):
    result, by_name = family_sweep
    reference = run_merge_in_process(by_name[name].recipe, tmp_path / "ref")
    ours, theirs = load_state(result.out_dir / name), load_state(reference)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fapm-b0.5-s0.9", "lines-a0.25", "fapm-depth-s0.9to0.0"])
def test_family_outputs_equal_real_mergekit_yaml(family_sweep, tmp_path, name):
    result, by_name = family_sweep
    written = yaml.safe_load((result.out_dir / name / "mergekit_config.yml").read_text())
    assert written == by_name[name].recipe
    reference = tmp_path / name
    run_mergekit_yaml(written, reference)
    ours, theirs = load_state(result.out_dir / name), load_state(reference)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_lines_scales_each_layer_and_the_rest_at_alpha(family_sweep, deep_pair):
    result, _ = family_sweep
    base, finetuned = (load_state(p) for p in deep_pair)
    out = load_state(result.out_dir / "lines-a0.25")
    seen = set()
    for name, tensor in out.items():
        weight = _mergekit_gradient([0.25, 1.0], _layer(name))
        seen.add(weight)
        expected = base[name] + weight * (finetuned[name] - base[name])
        assert torch.allclose(tensor, expected, rtol=0, atol=1e-6), name
    assert seen == {0.25, 0.5, 0.75, 1.0}
    # lm_head, the embeddings and the final norm sit at alpha (LiNeS's rule outside the blocks)
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} <= set(out)


def test_depth_schedule_keeps_a_share_growing_with_depth(family_sweep, deep_pair):
    result, _ = family_sweep
    base, finetuned = (load_state(p) for p in deep_pair)
    out = load_state(result.out_dir / "fapm-depth-s0.9to0.0")
    layers_kept = []
    for name, tensor in out.items():
        sparsity = _mergekit_gradient([0.9, 0.0], _layer(name))
        changed, updated = int((tensor != base[name]).sum()), int((finetuned[name] != base[name]).sum())
        assert changed == min(keep_count(tensor.numel(), sparsity=sparsity), updated), name
        layers_kept.append((_layer(name), changed))
        assert torch.equal(tensor[tensor != base[name]], finetuned[name][tensor != base[name]]), name
    assert {layer for layer, changed in layers_kept if changed} >= {0, LAYERS - 1}  # not a vacuous check


def test_cli_sweep_beta(deep_pair, tmp_path):
    base, finetuned = deep_pair
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(fapm_recipe(base, finetuned)))
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, ["sweep", str(recipe), str(out), "--sparsity", "0.9", "--beta", "0,0.5,1",
                                       "--baselines", "magnitude,lines", "--no-copy-tokenizer"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(
        ["magnitude-s0.9", "fapm-b0.5-s0.9", "fapm-s0.9"] + [f"lines-a{a}" for a in LINES_ALPHAS])
