"""fapm-merge tune with screening (issue 23): variants screened on a share of the
selection data, survivors evaluated on the rest, the decision on their whole records.

The demo pair with 120 proxy prompts and a text of 32 documents (two 64-byte passages
each): on it FAPM at beta 1 and WiSE-FT lose most of the task and magnitude pruning
keeps it, so the screening share already shows some variants out.
"""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fapm_merge.cli import main
from fapm_merge.evaluation.evaluate import EvalSettings
from fapm_merge.evaluation.results import read_results
from fapm_merge.workflows.demo import DEMO_CONFIG, demo_documents, demo_eval_data, save_pair
from fapm_merge.workflows.tradeoff import Rule
from fapm_merge.workflows.tune import TuneError, TuneSettings, run_tune
from fapm_merge.workflows.tune.workdir import SCREENING_FILES

pytestmark = pytest.mark.slow

RULE = Rule(min_retention=0.8, min_repair=0.05)
"""A repair rule these 120 proxy prompts can decide, under which a variant qualifies."""


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("screen-demo")
    base, finetuned = save_pair(DEMO_CONFIG, root / "models")
    files = demo_eval_data(base, finetuned, root / "eval", text_tokens=4096, items=120)
    documents = demo_documents(files["text"], root / "eval" / "documents.jsonl")
    recipe = {"merge_method": "fapm", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(finetuned), "parameters": {"sparsity": 0.9}}]}
    return recipe, {"task": files["task"], "text": documents, "plain_text": files["text"]}


def settings(files, **extra):
    return TuneSettings(**{"text": files["text"], "task": files["task"],
                           "eval": EvalSettings(tokenizer="bytes", window=64),
                           "sparsities": [0.7, 0.9], "betas": [0.0, 1.0], "baselines": ["wiseft"],
                           "alphas": [0.5], "rule": RULE, "confirm_share": 0, **extra})


@pytest.fixture(scope="module")
def runs(case, tmp_path_factory):
    recipe, files = case
    root = tmp_path_factory.mktemp("screen-runs")
    screened = run_tune(recipe, root / "screened", settings(files))
    exhaustive = run_tune(recipe, root / "exhaustive", settings(files, screen=False))
    return root, screened, exhaustive


def _prompts_forwarded(*results_files):
    return sum(len(r["metrics"]["task"]["per_item"]["correct"])
               for file in results_files if file.exists()
               for r in read_results(file, with_items=True)
               if Path(r["model"]).parent.name == "variants" and "task" in r["metrics"])


def _names(work, part, metric):
    file = work / SCREENING_FILES[part, metric]
    return {Path(r["model"]).name for r in read_results(file)} if file.exists() else set()


def test_the_screened_tune_picks_the_exhaustive_pick_and_forwards_fewer_prompts(runs):
    root, screened, exhaustive = runs
    assert exhaustive.tradeoff.selected is not None
    assert screened.tradeoff.selected.name == exhaustive.tradeoff.selected.name
    assert exhaustive.screening is None  # --no-screen: today's path, no screening line
    work, all_work = root / "screened.tune", root / "exhaustive.tune"
    assert not (all_work / "screening.json").exists()
    assert not any((all_work / name).exists() for name in SCREENING_FILES.values())
    # prompts x candidates: share + rest against everything on everything
    spent = _prompts_forwarded(*(work / name for name in SCREENING_FILES.values()))
    assert spent < _prompts_forwarded(all_work / "results.jsonl")
    # a survivor's record on the whole data, rebuilt from its two parts, is what
    # evaluating it on everything gives, value for value
    combined = {r["name"]: r for r in read_results(work / "results.jsonl", with_items=True)}
    whole = {r["name"]: r for r in read_results(all_work / "results.jsonl", with_items=True)}
    survivors = [name for name in combined if name not in ("base", "finetuned")]
    assert survivors and set(survivors) < set(whole)
    for name in survivors:
        for metric in ("task", "text"):
            mine, theirs = combined[name]["metrics"][metric], whole[name]["metrics"][metric]
            assert mine["per_item"] == theirs["per_item"]
            assert {k: v for k, v in mine.items() if k != "per_item"} == \
                {k: v for k, v in theirs.items() if k != "per_item"}


def test_screening_json_gives_every_candidate_a_verdict_and_its_cost(runs):
    root, screened, _ = runs
    work = root / "screened.tune"
    document = json.loads((work / "screening.json").read_text())
    names = ["magnitude-s0.7", "magnitude-s0.9", "fapm-s0.7", "fapm-s0.9", "wiseft-a0.5"]
    assert sorted(c["name"] for c in document["candidates"]) == sorted(names)
    rest = _names(work, "rest", "task")
    outs = [c for c in document["candidates"] if c["status"] == "out"]
    assert outs, "the share shows nothing out: the test would not test screening"
    share_data = document["share_data"]
    for candidate in document["candidates"]:
        name, status, rule = candidate["name"], candidate["status"], candidate["rule"]
        assert status in ("keep", "out") and candidate["reason"]
        share_cost, rest_cost = candidate["cost"]["share"], candidate["cost"]["rest"]
        # each part's text first; its prompts where the text did not show it out (a part's
        # record cost holds what it forwarded)
        if rule != "line":
            assert name in _names(work, "screen", "text") and share_cost["window_tokens"] == share_data["window_tokens"]
        on_share_prompts = name in _names(work, "screen", "task")
        assert share_cost is None or share_cost["prompts"] == (share_data["prompts"] if on_share_prompts else 0)
        if status == "keep":  # shown to keep the task on all the prompts: its text's rest too
            assert name in rest and name in _names(work, "rest", "text") and rest_cost["prompts"] > 0
            assert rest_cost["window_tokens"] > 0
        elif rule == "accuracy" and name in rest:  # not shown to keep it on all of them
            assert candidate["reason"].startswith("not shown to keep the task on all the selection prompts")
        else:  # never on the rest
            assert name not in rest and rest_cost is None
    assert set(document["kept"]) == _names(work, "rest", "text")
    assert 0 < document["confidence"] < 1 and document["stages"]
    assert document["cost"]["screened"]["prompts"] < document["cost"]["exhaustive"]["prompts"]
    assert screened.screening == document["summary"]
    assert document["summary"].startswith(f"screened 5 candidates on 30% of the selection data: {len(outs)} out")
    assert document["summary"].endswith(f"; {len(rest)} evaluated on the rest")
    card = (root / "screened" / "README.md").read_text()
    assert "## Screening" in card and "screened 5 candidates on a share" in card


def test_a_screened_tune_run_again_evaluates_nothing(runs, case, tmp_path):
    root, _, _ = runs
    recipe, files = case
    work = root / "screened.tune"
    names = [name for name in [*SCREENING_FILES.values(), "results.jsonl"] if (work / name).exists()]
    before = {name: (work / name).read_text() for name in names}
    again = run_tune(recipe, tmp_path / "again", settings(files, work_dir=work))
    evaluations = sum(len(read_results(work / name)) for name in SCREENING_FILES.values()
                      if (work / name).exists())
    assert again.evaluated == 0 and again.reused == 2 + evaluations
    assert {name: (work / name).read_text() for name in before} == before
    # the switch decides what was evaluated: the other one is another tune
    with pytest.raises(TuneError, match="they differ in: .*screening"):
        run_tune(recipe, tmp_path / "x", settings(files, work_dir=work, screen=False))


def test_a_one_document_text_skips_screening_and_says_why(case, tmp_path):
    """The demo's text is one plain file: no whole documents to share. Screening is
    skipped with the reason (not an error), and without it the betas default to the
    paper's one, not the family."""
    recipe, files = case
    out = tmp_path / "out"
    result = run_tune(recipe, out, settings(files, text=files["plain_text"], sparsities=[0.9], betas=None,
                                            baselines=[]))
    work = out.with_name("out.tune")
    assert result.screening == ("screening skipped: --text general.txt is one document (a plain file), "
                                "and screening shares whole documents; give a .jsonl of documents or a "
                                "folder of .txt files to screen; every candidate is evaluated on all the "
                                "selection data")
    assert json.loads((work / "screening.json").read_text())["screened"] is False
    assert sorted(Path(r["model"]).name for r in read_results(work / "results.jsonl")) == \
        ["base", "fapm-s0.9", "finetuned"]
    assert not any((work / name).exists() for name in SCREENING_FILES.values())


def test_screening_defaults_the_betas_to_the_family_and_the_help_says_so():
    from fapm_merge.workflows.tune.plan import FAMILY_BETAS

    result = CliRunner().invoke(main, ["tune", "--help"], terminal_width=200)
    printed = " ".join(result.output.split())
    assert "--screen / --no-screen" in printed and "--screen-share FLOAT" in printed
    assert "Share of the selection prompts (whole groups) and documents every variant is screened on. [default: 0.3]" in printed
    assert f"default: the family {','.join(f'{b:g}' for b in FAMILY_BETAS)} when screening" in printed


def test_a_screen_share_outside_0_1_is_refused_before_anything_runs(tmp_path):
    # regression: --screen-share 1.5 was reported only once screening began, after the
    # anchors' evaluation
    recipe = {"merge_method": "fapm", "base_model": str(tmp_path / "nowhere"),
              "models": [{"model": str(tmp_path / "nowhere-ft")}]}
    for share in (0.0, 1.0, 1.5):
        with pytest.raises(TuneError, match=r"--screen-share must be between 0 and 1.*got " + str(share)):
            run_tune(recipe, tmp_path / "out", TuneSettings(text=tmp_path / "t.txt", screen_share=share))
    assert not (tmp_path / "out.tune").exists()
