"""Model cards: the README.md mergekit writes names each FAPM stage's method (with
the paper's link) and its parameters, and the YAML copied out of a card reproduces
the checkpoint bit for bit, which is how recipes travel between people. The card
`fapm-merge tune` writes for the model it chose names the method actually selected,
the fine-tune (or adapter) and the data files, and parses as a Hub model card."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard

import fapm_merge.methods  # noqa: F401  (registers the methods in this process)
from fapm_merge.workflows.tradeoff import Rule, compute_tradeoff, confirm
from fapm_merge.workflows.tune.card import hub_model_id, model_card
from fapm_merge.workflows.tune.plan import TunePlan
from fapm_merge.workflows.variants import Variant
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


# ------------------------------------------------------------------ tune's model card
# `fapm-merge tune` writes its own README.md for the model it chose (workflows/tune/card.py).
# Regressions (issue 21, "a card you can publish"): with magnitude pruning or WiSE-FT chosen the
# card said "repaired by FAPM" and was tagged fapm; base_model was an absolute local path; a
# LoRA tune named the deleted scratch folder OUT.tune/variants/finetuned; the data files went
# unnamed; and the numbers came from the data that chose the model without saying so.

PROMPTS, WINDOWS, WINDOW = 200, 20, 100
BASE, FT, ADAPTER = "/models/base", "/models/ft", "/adapters/my-lora"
SCRATCH = "/out/chosen.tune/variants/finetuned"  # fapm_lora: tune's merged stand-in, deleted
FT_RIGHT = set(range(180))
RULE = Rule(min_retention=0.95)  # 200 prompts can show a 5% margin, not the default 1%
SELECTION = {"task": ("/data/task.jsonl", "a1" * 32), "text": ("/data/text.txt", "b2" * 32)}
HELD_OUT = {"task": ("/data/held-task.jsonl", "c3" * 32), "text": ("/data/held-text.txt", "d4" * 32)}


def eval_record(model, correct, loss_factor, recipe=None, files=SELECTION, name=None):
    """A results line with per-item values as fapm-merge eval writes it: ``correct``
    prompts right, window losses the same windows' base losses times ``loss_factor``."""
    rng = np.random.default_rng(7 if files is SELECTION else 8)  # the same windows for every model
    base_losses = 300.0 + rng.normal(0.0, 20.0, WINDOWS)
    own = np.random.default_rng(sum(map(ord, model)))
    losses = [float(x) for x in base_losses * loss_factor + own.normal(0.0, 0.5, WINDOWS)]
    tokens = [WINDOW] * WINDOWS
    bits = "".join("1" if i in correct else "0" for i in range(PROMPTS))
    (task_file, task_sha), (text_file, text_sha) = files["task"], files["text"]
    return {
        "model": model, "name": name or model.rsplit("/", 1)[1], "recipe": recipe,
        "metrics": {
            "text": {"file": text_file, "sha256": text_sha, "loss": sum(losses) / sum(tokens),
                     "tokens": sum(tokens), "windows": WINDOWS, "window": WINDOW, "bos": False,
                     "per_item": {"window_loss": losses, "window_tokens": tokens}},
            "task": {"file": task_file, "sha256": task_sha, "accuracy": bits.count("1") / PROMPTS,
                     "examples": PROMPTS, "per_item": {"correct": bits}},
        },
    }


def fapm_recipe(sparsity, beta=None):
    parameters = {} if beta is None else {"beta": beta}
    return {"merge_method": "fapm", "base_model": BASE, "dtype": "float32",
            "models": [{"model": FT, "parameters": {"sparsity": sparsity}}],
            **({"parameters": parameters} if parameters else {})}


def wiseft_recipe(alpha):
    return {"merge_method": "task_arithmetic", "base_model": BASE,
            "models": [{"model": FT, "parameters": {"weight": alpha}}]}


def lora_recipe(**parameters):
    return {"merge_method": "fapm_lora", "base_model": BASE,
            "parameters": {"adapter": ADAPTER, **parameters}}


def decided(chosen, others=(), *, finetuned=FT, finetuned_recipe=None, held_out=None):
    """The decision over base, fine-tune, ``chosen`` (a Variant that keeps every fine-tune
    answer and undoes most of the forgetting) and ``others`` (variants that lose prompts);
    ``held_out``: the chosen one's loss factor on held-out data (the check of the choice)."""
    records = [eval_record(BASE, set(range(20)), 1.0),
               eval_record(finetuned, FT_RIGHT, 1.01, finetuned_recipe),  # CF about +3%
               eval_record(f"/out/chosen.tune/variants/{chosen.name}", FT_RIGHT, 1.002, chosen.recipe)]
    records += [eval_record(f"/out/chosen.tune/variants/{v.name}", FT_RIGHT - set(range(40)), 1.0,
                            v.recipe) for v in others]
    result = compute_tradeoff(records, base=BASE, finetuned=finetuned, rule=RULE)
    assert result.selected is not None and result.selected.name == chosen.name, result.reason
    if held_out is not None:
        result.confirmation = confirm(result, [
            eval_record(BASE, set(range(20)), 1.0, files=HELD_OUT),
            eval_record(finetuned, FT_RIGHT, 1.01, files=HELD_OUT),
            eval_record(result.selected.model, FT_RIGHT, held_out, files=HELD_OUT)])
    return result


def card_of(result, chosen, method="fapm", base=BASE, finetuned=FT, **options):
    plan = TunePlan(method, Path(base), Path(finetuned), None, [chosen])
    text = model_card(result, chosen, plan, "fapm-merge tune recipe.yml chosen ...", "chosen", **options)
    return text, ModelCard(text)  # parses: front matter, model-index and all


FAPM_09 = Variant("fapm-s0.9", "fapm", {"sparsity": 0.9}, fapm_recipe(0.9))
MAGNITUDE_05 = Variant("magnitude-s0.5", "magnitude", {"sparsity": 0.5}, fapm_recipe(0.5, beta=0.0))
WISEFT_07 = Variant("wiseft-a0.7", "wiseft", {"alpha": 0.7}, wiseft_recipe(0.7))


def test_tune_card_names_fapm_with_its_parameters_and_tags_it():
    text, card = card_of(decided(FAPM_09, [MAGNITUDE_05, WISEFT_07]), FAPM_09)
    assert "edited by FAPM (Forgetting-Aware Pruning, [arXiv 2509.08255]" in text
    assert "at sparsity 0.9, beta 1 to undo" in text  # beta: the method's default, said
    assert card.data.tags == ["mergekit", "merge", "fapm-merge", "fapm"]
    assert card.data.library_name == "transformers"
    assert f"The fine-tuned model `{FT}` of the base model `{BASE}`" in text
    assert ("compared 3 variants (FAPM at sparsity 0.9; magnitude pruning at sparsity 0.5; "
            "WiSE-FT at alpha 0.7)") in text
    assert "**fapm-s0.9**" in text


@pytest.mark.parametrize("chosen, named, tag", [
    (MAGNITUDE_05, "edited by magnitude pruning (FAPM with beta 0) at sparsity 0.5 to undo", "magnitude-pruning"),
    (WISEFT_07, "edited by WiSE-FT (weight interpolation, [arXiv 2109.01903]"
                "(https://arxiv.org/abs/2109.01903)) at alpha 0.7 to undo", "wise-ft"),
])
def test_tune_card_names_the_baseline_it_chose_not_fapm(chosen, named, tag):
    # Regression (issue 21): "repaired by FAPM" and the fapm tag whatever was selected.
    text, card = card_of(decided(chosen, [FAPM_09]), chosen)
    assert named in text
    assert card.data.tags == ["mergekit", "merge", "fapm-merge", tag]
    assert "Forgetting-Aware" not in text.split("## Why this model")[0].split("compared")[0]


def test_tune_card_of_a_lora_tune_names_the_adapter_and_never_the_scratch_folder():
    # Regression (issue 21): the headline named OUT.tune/variants/finetuned, deleted after the tune.
    chosen = Variant("fapm_lora-s0.1", "fapm_lora", {"sparsity": 0.1}, lora_recipe(sparsity=0.1, beta=0.5))
    wiseft = Variant("wiseft_lora-a0.5", "wiseft_lora", {"alpha": 0.5},
                     lora_recipe(sparsity=0.0, **{"lambda": 0.5}))
    result = decided(chosen, [wiseft], finetuned=SCRATCH, finetuned_recipe=lora_recipe(sparsity=0.0))
    text, card = card_of(result, chosen, method="fapm_lora", finetuned=SCRATCH)
    assert f"The LoRA adapter `{ADAPTER}` applied to the base model `{BASE}`" in text
    assert "edited by FAPM on a LoRA update (Forgetting-Aware Pruning" in text
    assert "at sparsity 0.1, beta 0.5 to undo" in text
    assert SCRATCH not in text
    assert card.data.tags[-1] == "fapm"


def test_tune_card_keeps_base_model_only_for_a_hub_id():
    # Regression (issue 21): base_model: /abs/local/path, which the Hub cannot link.
    result = decided(FAPM_09)
    _, local = card_of(result, FAPM_09)
    assert local.data.base_model is None and "base_model" not in local.data.to_dict()
    snapshot = "/home/me/.cache/huggingface/hub/models--org--tiny-base/snapshots/0123abc"
    text, cached = card_of(result, FAPM_09, base=snapshot)
    assert cached.data.base_model == "org/tiny-base"
    assert f"`{snapshot}` (Hub: `org/tiny-base`)" in text


def test_hub_model_id_takes_hub_ids_and_hub_cache_folders_never_local_paths(tmp_path, monkeypatch):
    assert hub_model_id("org/name") == "org/name"
    assert hub_model_id("gpt2") == "gpt2"
    assert hub_model_id("/models/base") is None  # absolute
    assert hub_model_id("./base") is None and hub_model_id("~/base") is None
    assert hub_model_id("a/b/c") is None  # more than one '/': a path
    assert hub_model_id("org/na me") is None  # no valid repo id
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    assert hub_model_id("models/base") is None  # a folder here, though it reads like an id
    assert hub_model_id("/c/hub/models--org--name/snapshots/abc/") == "org/name"
    assert hub_model_id("/c/hub/models--gpt2/snapshots/abc") == "gpt2"
    assert hub_model_id("/c/hub/models--org--name/blobs") is None


def test_tune_card_names_the_data_files_with_their_digests():
    text, _ = card_of(decided(FAPM_09, held_out=1.003), FAPM_09)
    for role, files in (("selection", SELECTION), ("held-out check", HELD_OUT)):
        for what, (path, digest) in files.items():
            assert f"| {what} ({role}) | `{path}` | `{digest}` |" in text
    assert "split off" not in text
    text, _ = card_of(decided(FAPM_09, held_out=1.003), FAPM_09,
                      split_from={"task": Path("/data/all-task.jsonl"), "text": Path("/data/all-text.txt")})
    assert ("split off (seeded, whole documents and prompt groups) the task file `/data/all-task.jsonl` "
            "and the text file `/data/all-text.txt`") in text


def test_tune_card_publishes_model_index_exactly_when_held_out_numbers_exist():
    result = decided(FAPM_09, [WISEFT_07])
    text, card = card_of(result, FAPM_09)
    assert "model-index" not in text and card.data.eval_results is None
    assert "Every number in this card comes from the data that chose the model" in text
    assert "exact one-sided McNemar" not in text  # the rule decides by Tango's interval now
    assert "Tango's score interval" in text

    confirmed = decided(FAPM_09, [WISEFT_07], held_out=1.003)
    text, card = card_of(confirmed, FAPM_09)
    check = confirmed.confirmation
    assert check.status == "confirmed"
    assert f"Checked on data that did not choose it: {check.sentence()}." in text
    assert "The table further down comes from the selection data" in text
    assert card.data.model_name == "chosen"
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"accuracy", "cf_pct"}
    assert results["accuracy"].metric_value == pytest.approx(check.accuracy["selected"], abs=1e-6)
    assert results["accuracy"].dataset_revision == HELD_OUT["task"][1]
    assert results["accuracy"].dataset_name == "held-task.jsonl (held out)"
    assert results["cf_pct"].metric_value == pytest.approx(check.cf["selected"].estimate, abs=1e-4)
    assert results["cf_pct"].dataset_revision == HELD_OUT["text"][1]


def test_tune_card_says_when_the_held_out_data_contradict_the_choice():
    result = decided(FAPM_09, held_out=1.02)  # forgets more than the fine-tune on held-out text
    text, card = card_of(result, FAPM_09)
    assert result.confirmation.status == "contradicted"
    assert "**The held-out data do not confirm the selection (contradicted)**" in text
    assert {r.metric_type for r in card.data.eval_results} == {"accuracy", "cf_pct"}  # still published
