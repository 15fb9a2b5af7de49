"""fapm-merge tradeoff: normalisation, method recognition and the selection rule, by hand."""

import json
import math

import pytest
from click.testing import CliRunner

from fapm_merge.cli import main
from fapm_merge.io.recipe import describe_recipe as describe
from fapm_merge.workflows.tradeoff import Rule, TradeoffError, compute_tradeoff, read_results

WEIGHTED = Rule("weighted")  # these records carry no per-item values: the rule of earlier releases

BASE, FT = "/m/base", "/m/ft"


def record(model, accuracy, loss, recipe=None):
    return {
        "model": model,
        "name": model.rsplit("/", 1)[1],
        "recipe": recipe,
        "metrics": {"text": {"loss": loss}, "task": {"accuracy": accuracy}},
    }


def fapm(sparsity=None, density=None, beta=None):
    params = {k: v for k, v in (("sparsity", sparsity), ("density", density)) if v is not None}
    recipe = {"merge_method": "fapm", "base_model": BASE, "models": [{"model": FT, "parameters": params}]}
    if beta is not None:
        recipe["parameters"] = {"beta": beta}
    return recipe


RECORDS = [
    record(BASE, 0.2, 2.0),
    record(FT, 0.8, 2.5),
    record("/s/fapm-s0.5", 0.8, 2.2, fapm(0.5)),
    record("/s/fapm-s0.9", 0.7, 2.05, fapm(0.9)),
    record("/s/magnitude-s0.9", 0.5, 2.1, fapm(0.9, beta=0.0)),
    record("/s/dare-s0.9", 0.4, 2.3, {"merge_method": "dare_linear", "base_model": BASE,
                                      "models": [{"model": FT, "parameters": {"weight": 1.0, "density": 0.1}}]}),
    record("/s/wiseft-a0.1", 0.3, 2.01, {"merge_method": "task_arithmetic", "base_model": BASE,
                                         "models": [{"model": FT, "parameters": {"weight": 0.1}}]}),
]


def test_recipes_name_method_and_strength():
    assert describe(fapm(0.9)) == ("fapm", 0.9, "sparsity")
    assert describe(fapm(density=0.1)) == ("fapm", 0.9, "sparsity")  # exact complement
    assert describe(fapm()) == ("fapm", 0.9, "sparsity")  # the method's default
    assert describe(fapm(0.7, beta=0)) == ("magnitude", 0.7, "sparsity")
    assert describe(RECORDS[5]["recipe"]) == ("dare", 0.9, "sparsity")
    assert describe(RECORDS[6]["recipe"]) == ("wiseft", 0.1, "alpha")
    assert describe({"merge_method": "ties", "base_model": BASE, "models": []}) == ("ties", None, None)
    assert describe(None) == ("model", None, None)


def test_normalisation_and_selection_by_hand():
    result = compute_tradeoff(RECORDS, rule=WEIGHTED)
    by_name = {p.name: p for p in result.points}
    assert result.base.name == "base" and result.finetuned.name == "ft"
    for rec in RECORDS:
        p = by_name[rec["name"]]
        acc, loss = rec["metrics"]["task"]["accuracy"], rec["metrics"]["text"]["loss"]
        assert p.task_norm == pytest.approx(acc / 0.8)
        assert p.general_norm == pytest.approx(math.exp(2.0 - loss))
        assert p.score == pytest.approx(2 * acc / 0.8 + math.exp(2.0 - loss))
    # by hand: fapm-s0.9 2*0.875+e^-0.05=2.7012; fapm-s0.5 2+e^-0.2=2.8187; ft 2+e^-0.5=2.6065
    assert result.selected.name == "fapm-s0.5"
    assert {p.name: p.method for p in result.points} == {
        "base": "base", "ft": "finetuned", "fapm-s0.5": "fapm", "fapm-s0.9": "fapm",
        "magnitude-s0.9": "magnitude", "dare-s0.9": "dare", "wiseft-a0.1": "wiseft",
    }
    # the weight is the rule's only knob: counting the task once favours general ability
    assert compute_tradeoff(RECORDS, task_weight=0.5).selected.name == "fapm-s0.9"


def test_last_line_per_model_wins_and_foreign_lines_are_ignored(tmp_path):
    path = tmp_path / "r.jsonl"
    lines = [{"note": "not a record"}, record(BASE, 0.9, 9.0)] + RECORDS[1:] + [RECORDS[0]]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    records = read_results(path)
    assert len(records) == len(RECORDS) and records[-1]["name"] == "base"
    assert [r for r in records if r["model"] == BASE][0]["metrics"]["task"]["accuracy"] == 0.2


def test_missing_anchor_or_metrics_is_explained():
    with pytest.raises(TradeoffError, match="no usable line for the base model /m/base"):
        compute_tradeoff(RECORDS[1:], rule=WEIGHTED)
    with pytest.raises(TradeoffError, match="pass --base and --finetuned"):
        compute_tradeoff([record(BASE, 0.2, 2.0), record(FT, 0.8, 2.5)], rule=WEIGHTED)
    zero = [record(BASE, 0.0, 2.0), record(FT, 0.0, 2.5)] + RECORDS[2:]
    with pytest.raises(TradeoffError, match="fine-tuned model scores 0"):
        compute_tradeoff(zero, rule=WEIGHTED)
    partial = RECORDS + [{"model": "/s/x", "name": "x", "recipe": None, "metrics": {"text": {"loss": 1.0}}}]
    assert compute_tradeoff(partial, rule=WEIGHTED).skipped == ["/s/x: needs both --text and --task metrics"]


def test_cli_writes_table_plot_and_json(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in RECORDS))
    out = CliRunner().invoke(main, ["tradeoff", str(path), "--rule", "weighted",
                                    "--json", str(tmp_path / "t.json")])
    assert out.exit_code == 0, out.output
    assert "selected: fapm-s0.5" in out.output
    png = tmp_path / "results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "t.json").read_text())
    assert summary["selected"]["name"] == "fapm-s0.5"
    assert summary["rule"] == "weighted: maximise 2 * task_norm + general_norm"
    assert len(summary["points"]) == len(RECORDS)


def test_non_finite_or_malformed_lines_are_skipped_with_the_reason_never_selected():
    # Regression: a NaN loss (a model with NaN weights, evaluated before eval refused
    # them) was tabled as nan and could anchor the whole normalisation.
    nan_point = record("/s/fapm-s0.7", 0.9, math.nan, fapm(0.7))
    bad_recipe = record("/s/fapm-sx", 0.9, 2.0, fapm("lots"))
    result = compute_tradeoff(RECORDS + [nan_point, bad_recipe], rule=WEIGHTED)
    assert [p.name for p in result.points] == [r["name"] for r in RECORDS]
    assert result.skipped[0].startswith("/s/fapm-s0.7: accuracy 0.9 / loss nan is not finite")
    assert result.skipped[1].startswith("/s/fapm-sx: malformed record (ValueError")
    with pytest.raises(TradeoffError, match=r"no usable line for the base model /m/base \(accuracy 0.2 / loss nan"):
        compute_tradeoff([record(BASE, 0.2, math.nan)] + RECORDS[1:], rule=WEIGHTED)
    with pytest.raises(TradeoffError, match="--task-weight must be a finite number >= 0, got nan"):
        compute_tradeoff(RECORDS, task_weight=math.nan)


def test_results_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"model": "\xff"}\n')
    with pytest.raises(TradeoffError, match=r"r.jsonl: not UTF-8 text .* save it as UTF-8"):
        read_results(path)
