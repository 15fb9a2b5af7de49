"""Every recipe in recipes/ (but lora-*.yml, tested with the LoRA code) is parsed and
run against tiny local models, and every FAPM stage in it is checked element by
element against the plain references (tests/reference.py, tests/reference_ties.py).

Recipes name real models; the tests map the base to a tiny Llama and the fine-tunes
to tiny fine-tunes of it. mergekit's gradient and filter semantics are re-stated
plainly below (``plain_setting``) so the check does not borrow mergekit's resolver.
"""

import re

import pytest
import torch
import yaml

from helpers import load_state, run_merge_in_process
from fapm_merge.workflows.demo import TINY_CONFIGS
from recipe_support import (
    RECIPES_DIR,
    build_family,
    family_mapping,
    load_documents,
    recipe_paths,
    run_multi_in_process,
    substitute,
    write_documents,
)
from reference import reference_fapm
from reference_ties import reference_fapm_ties

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
NUM_LAYERS = TINY_CONFIGS["llama"]["num_hidden_layers"]
FAPM_METHODS = {"fapm", "fapm_ties"}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("family"))


def plain_setting(setting, name):
    """mergekit's rules, written out: a list of {filter, value} takes the first
    condition whose filter is a substring of the tensor name (no filter matches
    all); a list of numbers is a gradient over layer position t = layer/(L-1),
    non-layer tensors at t = 0; anything else is the value itself."""
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for condition in setting:
            if condition.get("filter") in (None, "*") or condition["filter"] in name:
                return plain_setting(condition["value"], name)
        return None
    if isinstance(setting, list):
        match = re.search(r"\.layers\.(\d+)\.", name)
        t = int(match.group(1)) / (NUM_LAYERS - 1) if match else 0.0
        position = t * (len(setting) - 1)
        low = int(position)
        high = min(low + 1, len(setting) - 1)
        frac = position - low
        return (1 - frac) * setting[low] + frac * setting[high]
    return setting


def plain_parameter(doc, model_entry, key, name, default):
    for scope in ((model_entry or {}).get("parameters") or {}, doc.get("parameters") or {}):
        if key in scope:
            value = plain_setting(scope[key], name)
            if value is not None:
                return value
    return default


def model_sparsity(doc, entry, name):
    density = plain_parameter(doc, entry, "density", name, None)
    if density is not None:
        return 1.0 - density  # resolve exactly what a user wrote: 0.3 -> 0.7
    return plain_parameter(doc, entry, "sparsity", name, 0.9)


def check_fapm_stage(doc, out_dir):
    """Compare a fapm / fapm_ties stage's written tensors with the references."""
    dtype = DTYPES[doc.get("dtype", "float32")]
    base = {k: v.to(dtype) for k, v in load_state(doc["base_model"]).items()}
    entries = [e if isinstance(e, dict) else {"model": e} for e in doc["models"]]
    inputs = [{k: v.to(dtype) for k, v in load_state(e["model"]).items()} for e in entries]
    written = load_state(out_dir)
    assert set(written) == set(base)
    changed = 0
    for name, pre in base.items():
        sparsities = [model_sparsity(doc, e, name) for e in entries]
        weights = [plain_parameter(doc, e, "weight", name, 1.0) for e in entries]
        lambda_ = plain_parameter(doc, None, "lambda", name, 1.0)
        if doc["merge_method"] == "fapm":
            assert len(entries) == 1 and weights == [1.0] and lambda_ == 1.0, (
                "test_recipes has a reference for one-model fapm recipes only"
            )
            expected, _ = reference_fapm(pre, inputs[0][name], sparsities[0])
        else:
            expected = reference_fapm_ties(
                pre,
                [state[name] for state in inputs],
                sparsities,
                weights,
                lambda_=lambda_,
                normalize=plain_parameter(doc, None, "normalize", name, True),
                consensus=plain_parameter(doc, None, "consensus", name, "sum"),
                density_rescale=plain_parameter(doc, None, "density_rescale", name, False),
            )
        assert written[name].dtype == dtype, name
        assert torch.equal(written[name], expected), f"{name}: differs from the reference"
        changed += int(not torch.equal(written[name], pre))
    assert changed > 0, "the stage wrote the base model back: the recipe does nothing"


def stage_documents(documents, mapping, intermediate):
    """Substituted stages; named stages point at their mergekit-multi folders."""
    stages = {doc["name"]: str(intermediate / doc["name"]) for doc in documents if "name" in doc}
    return substitute(substitute(documents, mapping), stages)


RECIPES = recipe_paths()


def test_the_library_has_the_promised_recipes():
    names = {path.name for path in RECIPES}
    assert {
        "fapm-default.yml",
        "fapm-layer-schedule.yml",
        "fapm-keep-embeddings-norms.yml",
        "fapm-ties-tasks.yml",
        "fapm-ties-dare-style.yml",
        "multi-fapm-then-ties.yml",
        "multi-dare-ties-then-fapm.yml",
        "multi-ties-then-fapm-depth-schedule.yml",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_documents_it(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header).lower()
    assert len(header) >= 8, "a recipe starts with a comment header"
    for word in ("what it is for", "parameters" if "multi-" not in path.name else "stages",
                 "expected effect", "https://arxiv.org/abs/"):
        assert word in text, f"{path.name}: header lacks {word!r}"


def test_docs_index_links_every_recipe():
    index = (RECIPES_DIR.parent / "docs" / "recipes.md").read_text()
    for path in recipe_paths(include_lora=True):
        assert f"(../recipes/{path.name})" in index, f"docs/recipes.md does not list {path.name}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_and_every_fapm_stage_matches_the_reference(path, family, tmp_path):
    documents = load_documents(path)
    assert documents and all(doc.get("merge_method") for doc in documents)
    assert any(doc["merge_method"] in FAPM_METHODS for doc in documents)
    base, finetunes = family
    mapping = family_mapping(documents, base, finetunes)
    intermediate, out = tmp_path / "stages", tmp_path / "out"
    if len(documents) == 1:
        run_merge_in_process(substitute(documents, mapping)[0], out)
    else:
        recipe = write_documents(substitute(documents, mapping), tmp_path / path.name)
        run_multi_in_process(recipe, out, intermediate, "--random-seed", "7")
    for doc in stage_documents(documents, mapping, intermediate):
        folder = intermediate / doc["name"] if "name" in doc else out
        assert (folder / "config.json").exists(), folder
        if doc["merge_method"] in FAPM_METHODS:
            check_fapm_stage(doc, folder)


def test_plain_setting_states_mergekit_rules():
    # Guards the test's own resolver against silent misuse (it is the "expected").
    schedule = [0.97, 0.9, 0.8]
    assert plain_setting(schedule, "model.embed_tokens.weight") == 0.97
    assert plain_setting(schedule, "model.layers.0.mlp.up_proj.weight") == 0.97
    assert plain_setting(schedule, f"model.layers.{NUM_LAYERS - 1}.mlp.up_proj.weight") == 0.8
    filters = yaml.safe_load("[{filter: norm, value: 0.0}, {value: 0.9}]")
    assert plain_setting(filters, "model.layers.1.input_layernorm.weight") == 0.0
    assert plain_setting(filters, "model.layers.1.self_attn.q_proj.weight") == 0.9


def test_keep_embeddings_recipe_leaves_those_tensors_fine_tuned(family, tmp_path):
    """The filter recipe's promise, stated directly: embeddings, lm_head and every
    norm equal the fine-tune; every attention/MLP matrix is pruned."""
    path = next(p for p in RECIPES if p.name == "fapm-keep-embeddings-norms.yml")
    documents = load_documents(path)
    base, finetunes = family
    config = substitute(documents, family_mapping(documents, base, finetunes))[0]
    config["dtype"] = "float32"
    run_merge_in_process(config, tmp_path / "out")
    written, pre, ft = load_state(tmp_path / "out"), load_state(base), load_state(finetunes[0])
    for name, tensor in written.items():
        if any(key in name for key in ("embed_tokens", "lm_head", "norm")):
            assert torch.equal(tensor, ft[name]), name
        elif not torch.equal(ft[name], pre[name]):
            kept = (tensor != pre[name]).sum().item()
            assert 0 < kept <= tensor.numel() // 10, name
