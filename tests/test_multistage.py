"""Multi-stage recipes through the real ``mergekit-multi``: each pipeline's
checkpoints equal running its stages one by one with mergekit's run_merge, bit for
bit. dare_ties drops at random: both runs get the same ``--random-seed`` (mergekit
re-seeds at the start of every stage), and a different seed is shown to differ, so
the equality is not an accident of a method that ignores its seed."""

import pytest
import torch

from helpers import load_state, run_merge_in_process
from recipe_support import (
    RECIPES_DIR,
    build_family,
    family_mapping,
    load_documents,
    run_multi_in_process,
    run_multi_subprocess,
    run_stages_by_hand,
    substitute,
    write_documents,
)

SEED = 42
PIPELINES = [
    "multi-fapm-then-ties.yml",  # (a) FAPM each fine-tune, then ties
    "multi-dare-ties-then-fapm.yml",  # (b) dare_ties several, then FAPM against the base
    "multi-ties-then-fapm-depth-schedule.yml",  # (c) LiNeS-like depth schedule
]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("family"))


def substituted(name, family, **overrides):
    documents = load_documents(RECIPES_DIR / name)
    base, finetunes = family
    documents = substitute(documents, family_mapping(documents, base, finetunes))
    return [{**doc, **overrides} for doc in documents]


def assert_same_checkpoint(left, right):
    a, b = load_state(left), load_state(right)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("recipe", PIPELINES)
def test_pipeline_equals_its_stages_by_hand(recipe, family, tmp_path):
    documents = substituted(recipe, family)
    path = write_documents(documents, tmp_path / recipe)
    # The real console script once (the dare pipeline); the same click command
    # in-process for the others, which saves mergekit's start-up time.
    run = run_multi_subprocess if "dare" in recipe else run_multi_in_process
    run(path, tmp_path / "multi", tmp_path / "stages", "--random-seed", str(SEED))
    by_hand = run_stages_by_hand(documents, tmp_path / "hand", tmp_path / "hand-stages",
                                 random_seed=SEED)
    for stage, folder in by_hand.items():
        multi = tmp_path / "stages" / stage if stage else tmp_path / "multi"
        assert_same_checkpoint(multi, folder)
    base = load_state(family[0])
    final = load_state(tmp_path / "multi")
    assert any(not torch.equal(final[k], base[k]) for k in base), "pipeline changed nothing"


def test_dare_stage_depends_on_the_seed(family, tmp_path):
    """Guards the test above: with another seed the dare_ties stage differs."""
    stage = substituted("multi-dare-ties-then-fapm.yml", family)[0]
    stage.pop("name")
    run_merge_in_process(dict(stage), tmp_path / "s42", random_seed=SEED)
    run_merge_in_process(dict(stage), tmp_path / "s43", random_seed=SEED + 1)
    a, b = load_state(tmp_path / "s42"), load_state(tmp_path / "s43")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_fapm_then_ties_equals_fapm_ties_in_float32(family, tmp_path):
    """Pipeline (a) with ties at density 1 is fapm_ties computed in two passes."""
    documents = substituted("multi-fapm-then-ties.yml", family, dtype="float32")
    path = write_documents(documents, tmp_path / "a.yml")
    run_multi_in_process(path, tmp_path / "multi", tmp_path / "stages")
    base, finetunes = family
    run_merge_in_process({
        "merge_method": "fapm_ties",
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"sparsity": 0.9, "weight": 1.0}}
                   for p in finetunes[:2]],
        "dtype": "float32",
    }, tmp_path / "one-pass")
    assert_same_checkpoint(tmp_path / "multi", tmp_path / "one-pass")


def test_depth_schedule_keeps_more_of_the_update_in_late_layers(family, tmp_path):
    documents = substituted("multi-ties-then-fapm-depth-schedule.yml", family, dtype="float32")
    path = write_documents(documents, tmp_path / "c.yml")
    run_multi_in_process(path, tmp_path / "multi", tmp_path / "stages")
    merged, final = load_state(tmp_path / "stages" / "merged"), load_state(tmp_path / "multi")
    base = load_state(family[0])
    checked = 0
    for name in base:
        late = name.replace(".layers.0.", ".layers.1.")
        if ".layers.0." not in name or base[name].ndim != 2 or any(
            torch.equal(merged[key], base[key]) for key in (name, late)
        ):
            continue  # vectors, and the tensors every toy fine-tune froze
        numel = base[name].numel()
        kept_early = int((final[name] != base[name]).sum())
        kept_late = int((final[late] != base[late]).sum())
        assert kept_early <= int(0.02 * numel) + 1, name  # sparsity 0.98 at the first layer
        assert kept_late <= numel // 5, late  # sparsity 0.8 at the last layer
        assert kept_late > kept_early, late
        assert int((merged[name] != base[name]).sum()) > numel // 5, "ties changed too little"
        checked += 1
    assert checked >= 3
