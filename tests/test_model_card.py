"""Model cards: the README.md mergekit writes names each FAPM stage's method (with
the paper's link) and its parameters, and the YAML copied out of a card reproduces
the checkpoint bit for bit, which is how recipes travel between people."""

import pytest
import torch
import yaml

import fapm_merge.methods  # noqa: F401  (registers the methods in this process)
from helpers import load_state, run_merge_in_process
from recipe_support import (
    RECIPES_DIR,
    build_family,
    card_yaml,
    family_mapping,
    load_documents,
    run_cli,
    run_multi_in_process,
    substitute,
    substitute_text,
    write_documents,
)

PAPER = "https://arxiv.org/abs/2509.08255"
PRETTY = {"fapm": "FAPM (Forgetting-Aware Pruning)",
          "fapm_ties": "FAPM-TIES (Forgetting-Aware Pruning + TIES sign election)"}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("family"), size=3)


def assert_same_checkpoint(left, right):
    a, b = load_state(left), load_state(right)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_card_names_stage(folder, doc):
    readme = (folder / "README.md").read_text()
    method = doc["merge_method"]
    assert f"merged using the [{PRETTY[method]}]({PAPER}) merge method" in readme
    shown = yaml.safe_load(card_yaml(folder / "README.md"))
    assert shown["merge_method"] == method
    assert per_model_parameters(shown) == {
        entry["model"]: entry["parameters"] for entry in doc["models"]
    }
    assert shown.get("parameters") == doc.get("parameters")


def per_model_parameters(config):
    """{model: parameters} from a card's YAML: mergekit-yaml shows the recipe as
    written (`models:`), mergekit-multi the normalised `modules: ... sources:` form."""
    if "models" in config:
        entries = config["models"]
    else:
        entries = [
            source
            for module in config["modules"].values()
            for piece in module["slices"]
            for source in piece["sources"]
        ]
    return {e["model"]: e["parameters"] for e in entries if e.get("parameters")}


@pytest.mark.slow
def test_mergekit_yaml_card_carries_the_commented_recipe_and_reproduces(family, tmp_path):
    """Plain mergekit-yaml puts the recipe text itself, header comments included,
    into the card; running that text again gives the same tensors."""
    path = RECIPES_DIR / "fapm-ties-tasks.yml"
    base, finetunes = family
    mapping = family_mapping(load_documents(path), base, finetunes)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(substitute_text(path.read_text(), mapping))
    run_cli("mergekit-yaml", recipe, tmp_path / "out", "--no-copy-tokenizer")

    (doc,) = substitute(load_documents(path), mapping)
    assert_card_names_stage(tmp_path / "out", doc)
    copied = card_yaml(tmp_path / "out" / "README.md")
    assert "# What it is for" in copied  # the documentation travels with the model
    run_merge_in_process(yaml.safe_load(copied), tmp_path / "again")
    assert_same_checkpoint(tmp_path / "out", tmp_path / "again")


def test_every_fapm_stage_of_a_pipeline_has_its_own_card(family, tmp_path):
    """mergekit-multi writes a card per stage; each FAPM stage's card names fapm and
    its parameters, and copying the final card reproduces the final checkpoint."""
    path = RECIPES_DIR / "multi-fapm-then-ties.yml"
    base, finetunes = family
    documents = substitute(load_documents(path), family_mapping(load_documents(path), base, finetunes))
    run_multi_in_process(write_documents(documents, tmp_path / "a.yml"), tmp_path / "out",
                         tmp_path / "stages")
    fapm_stages = [doc for doc in documents if doc["merge_method"] in PRETTY]
    assert len(fapm_stages) == 2
    for doc in fapm_stages:
        folder = tmp_path / "stages" / doc["name"]
        assert_card_names_stage(folder, doc)
        copied = yaml.safe_load(card_yaml(folder / "README.md"))
        run_merge_in_process(copied, tmp_path / f"again-{doc['name']}")
        assert_same_checkpoint(folder, tmp_path / f"again-{doc['name']}")
    final = yaml.safe_load(card_yaml(tmp_path / "out" / "README.md"))
    assert final["merge_method"] == "ties"
    assert set(per_model_parameters(final)) == {
        str(tmp_path / "stages" / doc["name"]) for doc in fapm_stages
    }
    run_merge_in_process(final, tmp_path / "again-final")
    assert_same_checkpoint(tmp_path / "out", tmp_path / "again-final")
