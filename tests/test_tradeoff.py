"""fapm-merge tradeoff: normalisation, method recognition and the selection rule, by hand."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from fapm_merge.cli import main
from fapm_merge.evaluation.noninferiority import tango_interval
from fapm_merge.io.recipe import describe_recipe as describe
from fapm_merge.workflows.tradeoff import Rule, TradeoffError, compute_tradeoff, read_results

WEIGHTED = Rule("weighted")  # needs no paired intervals, so it also decides on RECORDS (no per-item values)

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


# ----------------------------------------------------------------- paired records

PROMPTS, WINDOWS, WINDOW = 1000, 20, 100  # 1000 prompts: enough to show a 1% margin for one lost answer


def paired_record(model, correct, loss_factor, recipe=None, task_sha="task", text_sha="text",
                  losses=None):
    """A results line with per-item values, as fapm-merge eval writes it in memory:
    ``correct`` prompts right (the first ones), window losses = base's times a factor
    (or ``losses`` as given)."""
    rng = np.random.default_rng(7)  # the same windows for every model: that is the pairing
    base_losses = 300.0 + rng.normal(0.0, 20.0, WINDOWS)
    own = np.random.default_rng(sum(map(ord, model)))  # each model's own small noise
    if losses is None:
        losses = [float(x) for x in base_losses * loss_factor + own.normal(0.0, 0.5, WINDOWS)]
    tokens = [WINDOW] * WINDOWS
    bits = "".join("1" if i in correct else "0" for i in range(PROMPTS))
    return {
        "model": model,
        "name": model.rsplit("/", 1)[1],
        "recipe": recipe,
        "metrics": {
            "text": {"loss": sum(losses) / sum(tokens), "tokens": sum(tokens), "windows": WINDOWS,
                     "window": WINDOW, "sha256": text_sha, "bos": False,
                     "per_item": {"window_loss": losses, "window_tokens": tokens}},
            "task": {"accuracy": bits.count("1") / PROMPTS, "examples": PROMPTS, "sha256": task_sha,
                     "per_item": {"correct": bits}},
        },
    }


FT_RIGHT = set(range(900))  # accuracy 0.9: the margin at retention 0.99 is 0.009
PAIRED = [
    paired_record(BASE, set(range(100)), 1.0),
    paired_record(FT, FT_RIGHT, 1.01),  # learned the task, forgets (CF about +3%)
    # DARE keeps every fine-tune answer, gets 30 more, and forgets more than the fine-tune
    paired_record("/s/dare-s0.95", FT_RIGHT | set(range(900, 930)), 1.015,
                  {"merge_method": "dare_linear", "base_model": BASE,
                   "models": [{"model": FT, "parameters": {"weight": 1.0, "density": 0.05}}]}),
    # FAPM loses one prompt (shown within the margin) and undoes most of the forgetting
    paired_record("/s/fapm-s0.9", FT_RIGHT - {0}, 1.002, fapm(0.9)),
    # magnitude undoes all of it but loses 20 prompts: shown below the margin
    paired_record("/s/magnitude-s0.9", FT_RIGHT - set(range(20)), 1.0, fapm(0.9, beta=0.0)),
]


def test_weighted_rule_picks_more_forgetting_than_the_fine_tune_and_the_default_does_not():
    # Regression (issue 13): on the replication, maximise 2*task_norm + general_norm chose
    # DARE at 0.95, which forgets more than the unrepaired fine-tune.
    weighted = compute_tradeoff(PAIRED, rule=WEIGHTED)
    assert weighted.selected.name == "dare-s0.95"
    assert weighted.selected.cf_pct > weighted.finetuned.cf_pct
    assert any("forgets more than the fine-tune" in w for w in weighted.warnings)

    default = compute_tradeoff(PAIRED)
    assert default.rule.kind == "repair"
    assert default.selected.name == "fapm-s0.9"
    assert default.selected.cf_pct < default.finetuned.cf_pct
    verdicts = {p.name: p.verdict for p in default.points}
    assert verdicts == {"base": "anchor", "ft": "anchor", "dare-s0.95": "forg",
                        "fapm-s0.9": "selected", "magnitude-s0.9": "acc"}
    assert default.outcome == "selected" and default.point_pick is fapm_of(default)
    fapm_point = default.selected
    # one lost answer of 1000: Tango's one-sided lower bound lies inside the margin 0.009
    assert default.margin == pytest.approx(0.01 * 0.9)
    lower, upper = tango_interval(0, 1, PROMPTS, one_sided=True)
    assert fapm_point.noninferiority.lower_bound == pytest.approx(lower)
    assert fapm_point.noninferiority.upper_bound == pytest.approx(upper)
    assert -default.margin < lower < -1 / PROMPTS and fapm_point.noninferiority.verdict == "qualifies"
    assert fapm_point.retention == pytest.approx(899 / 900)
    ft, base = default.finetuned, default.base
    assert fapm_point.repaired == pytest.approx((ft.cf_pct - fapm_point.cf_pct) / ft.cf_pct)  # CF units
    assert 0.7 < fapm_point.repaired < 0.9  # about (1.01 - 1.002) / 0.01
    assert fapm_point.accuracy_vs_ft.low <= -1 / PROMPTS <= fapm_point.accuracy_vs_ft.high
    # magnitude loses 20 of 900 answers: its one-sided upper bound is below -margin (shown worse)
    magnitude = next(p for p in default.points if p.name == "magnitude-s0.9")
    assert magnitude.noninferiority.upper_bound == pytest.approx(tango_interval(0, 20, PROMPTS, one_sided=True)[1])
    assert magnitude.noninferiority.upper_bound < -default.margin


def fapm_of(result, name="fapm-s0.9"):
    return next(p for p in result.points if p.name == name)


def test_metrics_follow_their_definitions():
    result = compute_tradeoff(PAIRED)
    base, ft = result.base, result.finetuned
    for point in result.points:
        assert point.cf_pct == pytest.approx(100 * (math.exp(point.loss - base.loss) - 1))
        # repaired is the share of the fine-tune's CF taken away, in CF (not loss) units
        assert point.repaired == pytest.approx((ft.cf_pct - point.cf_pct) / ft.cf_pct)
        assert point.retention == pytest.approx(point.accuracy / ft.accuracy)
        if point is base:  # no CF against itself, no CF cut: shown "-"
            assert point.cf_interval is None and point.cf_reduction is None
        else:
            assert point.cf_interval.low <= point.cf_pct <= point.cf_interval.high
        if point is ft:  # no interval against itself
            assert point.accuracy_vs_ft is None and point.noninferiority is None
            continue
        assert point.accuracy_vs_ft.estimate == pytest.approx(point.accuracy - ft.accuracy)
        assert point.accuracy_vs_ft.low < point.accuracy_vs_ft.estimate < point.accuracy_vs_ft.high
        if point is not base:
            reduction = point.cf_reduction
            assert reduction.estimate == pytest.approx(ft.cf_pct - point.cf_pct)
            assert math.isfinite(reduction.low) and math.isfinite(reduction.high)
            assert reduction.low <= reduction.estimate <= reduction.high
            assert point.repair.significant == (point.loss_vs_ft.high < 0)
    assert result.forgetting.cf.estimate == pytest.approx(ft.cf_pct) and result.forgetting.significant


def test_a_retention_of_1_is_refused_as_unshowable():
    with pytest.raises(TradeoffError, match="--min-retention 1 asks a variant to lose no accuracy at all"):
        Rule(min_retention=1.0)
    with pytest.raises(TradeoffError, match="--min-repair must be in \\[0, 1\\], got 1.5"):
        Rule(min_repair=1.5)


def test_nothing_qualifies_is_said_plainly_with_the_closest_candidates():
    # fapm-s0.9 repairs 81% but the rule asks for 90%: nothing qualifies, and it is the closest
    result = compute_tradeoff(PAIRED, rule=Rule(min_repair=0.9))
    assert result.selected is None and result.outcome == "none qualifies"
    assert {p.name: p.verdict for p in result.points if p.method not in ("base", "finetuned")} == {
        "dare-s0.95": "forg", "fapm-s0.9": "small", "magnitude-s0.9": "acc"}
    assert result.reason.startswith("no variant qualifies")
    assert [p.name for p in result.closest] == ["fapm-s0.9", "magnitude-s0.9", "dare-s0.95"]
    assert "fapm-s0.9: accuracy -0.001 [" in result.reason and "(small)" in result.reason
    assert "repairing at least 90% of its forgetting" in result.reason
    assert "Keep the fine-tuned model" in result.reason


@pytest.mark.parametrize("factor", [0.99, 1.0001])
def test_a_fine_tune_that_did_not_forget_measurably_leaves_nothing_to_repair(factor):
    """Regression (issue 21): only CF <= 0 stopped the rule, so a fine-tune whose CF
    interval included 0 still got a winner. 0.99: CF below 0; 1.0001: CF +0.01% within noise."""
    records = [paired_record(BASE, set(range(100)), 1.0), paired_record(FT, FT_RIGHT, factor)] + PAIRED[3:]
    result = compute_tradeoff(records)
    assert result.selected is None and result.outcome == "no forgetting"
    cf = result.forgetting.cf
    assert cf.low <= 0 and not result.forgetting.significant
    assert (cf.estimate > 0) == (factor > 1)
    assert result.reason.startswith("no measurable forgetting on this text: the fine-tune's CF is "
                                    f"{cf.estimate:+.2f}% [{cf.low:+.2f}, {cf.high:+.2f}]")
    assert "keep the fine-tune" in result.reason
    assert {p.verdict for p in result.points} == {"-"}
    assert result.point_pick is None  # nothing is weighed, not even on point estimates


def test_max_cf_rule_takes_the_best_accuracy_under_the_bound():
    result = compute_tradeoff(PAIRED, rule=Rule("max-cf", max_cf=1.0))
    assert result.selected.name == "fapm-s0.9"  # dare and the fine-tune are above 1% CF
    assert compute_tradeoff(PAIRED, rule=Rule("max-cf", max_cf=10.0)).selected.name == "dare-s0.95"
    with pytest.raises(TradeoffError, match="needs --max-cf"):
        Rule("max-cf")


def test_warnings_say_when_the_evidence_cannot_decide():
    # Two variants whose losses differ by 0.1%: the repair between them is noise.
    close = [paired_record("/s/fapm-s0.95", FT_RIGHT - {1}, 1.0021, fapm(0.95))]
    result = compute_tradeoff(PAIRED + close)
    assert result.selected.name == "fapm-s0.9"
    runner = [w for w in result.warnings if "cannot be told apart" in w]
    assert len(runner) == 1 and "fapm-s0.95" in runner[0] and "windows (now 20) would resolve it" in runner[0]


def window_losses(record_):
    return record_["metrics"]["text"]["per_item"]["window_loss"]


def test_a_difference_near_zero_is_called_undecided_not_a_window_count():
    """Regression: with the estimate almost on the bound, a warning asked for 134,944
    prompts (the replication's LoRA arm, 400 evaluated): arithmetic, not advice. The
    runner-up warning is where that count is still computed."""
    fapm_losses = window_losses(PAIRED[3])
    # the same losses, shifted +-0.3 window by window and by 0.001 in all: a difference
    # of 5e-7 per token with a spread of about 1e-3
    twin = [x + (0.3 if i % 2 else -0.3) + (0.001 if i == 0 else 0.0) for i, x in enumerate(fapm_losses)]
    result = compute_tradeoff(PAIRED + [paired_record("/s/fapm-s0.95", FT_RIGHT - {0}, None, fapm(0.95),
                                                      losses=twin)])
    assert result.selected.name == "fapm-s0.9"  # tied, and the milder edit
    [warning] = [w for w in result.warnings if "cannot be told apart" in w]
    assert "more windows would not settle it" in warning and "treat the question as undecided" in warning
    # a runner-up 0.1% of loss away: a count of windows is real advice
    close = compute_tradeoff(PAIRED + [paired_record("/s/fapm-s0.95", FT_RIGHT - {1}, 1.0021, fapm(0.95))])
    [warning] = [w for w in close.warnings if "cannot be told apart" in w]
    assert "windows (now 20) would resolve it" in warning and "undecided" not in warning


def test_records_measured_on_other_data_or_without_items_are_refused():
    other = paired_record("/s/fapm-s0.5", FT_RIGHT, 1.01, fapm(0.5), task_sha="another task")
    with pytest.raises(TradeoffError, match="measured on different task files"):
        compute_tradeoff(PAIRED + [other])
    with pytest.raises(TradeoffError, match="carry no per-item values .* choose --rule weighted"):
        compute_tradeoff(RECORDS)
    other_base = dict(paired_record("/s/x", FT_RIGHT, 1.0, fapm(0.5)))
    other_base["recipe"] = {**fapm(0.5), "base_model": "/m/another-base"}
    with pytest.raises(TradeoffError, match="mix merges of different models"):
        compute_tradeoff(PAIRED + [other_base])


def test_results_and_items_files_round_trip_through_eval_s_writer(tmp_path):
    from fapm_merge.evaluation.results import append_result, items_path

    path = tmp_path / "results.jsonl"
    for record_ in PAIRED:
        append_result(path, record_)
    lines = path.read_text().splitlines()
    assert all("per_item" not in line for line in lines)  # short lines: items live beside them
    assert items_path(path).exists()
    again = read_results(path)
    assert [{k: v for k, v in r.items() if k != "items"} for r in again] == PAIRED
    assert compute_tradeoff(again).selected.name == "fapm-s0.9"
    items_path(path).unlink()
    with pytest.raises(TradeoffError, match="results.items.jsonl .* is missing"):
        read_results(path)


@pytest.mark.parametrize("json_out", [None, "-"])
def test_cli_exits_3_when_nothing_is_selected_as_tune_does(tmp_path, json_out):
    """Regression (issue 22): tradeoff exited 0 when nothing qualified, tune 3."""
    from fapm_merge.evaluation.results import append_result

    path = tmp_path / "results.jsonl"
    for record_ in PAIRED:
        append_result(path, record_)
    args = ["tradeoff", str(path), "--rule", "max-cf", "--plot", str(tmp_path / "p.png")]
    out = CliRunner().invoke(main, args + ["--max-cf", "-50"] + (["--json", json_out] if json_out else []))
    assert out.exit_code == 3, out.output
    assert "no point has CF <= -50%" in out.output
    chosen = CliRunner().invoke(main, args + ["--max-cf", "50"])
    assert chosen.exit_code == 0, chosen.output


@pytest.mark.parametrize("width", [40, 60, 80, 120])
def test_the_table_never_cuts_a_number_at_any_width(width):
    """Regression (issue 22): a DARE row read `[+22550.30,+…` at 80 and 120 columns, and
    below 80 digits were cut silently (`+0.` for `+0.65`)."""
    from rich.console import Console

    from fapm_merge.workflows.tradeoff import tradeoff_table

    far = paired_record("/s/dare-s0.99", FT_RIGHT - set(range(40)), 3.0,
                        {"merge_method": "dare_linear", "base_model": BASE,
                         "models": [{"model": FT, "parameters": {"weight": 1.0, "density": 0.01}}]})
    result = compute_tradeoff(PAIRED + [far])
    console = Console(width=width, record=True)
    console.print(tradeoff_table(result, width=width))
    text = console.export_text()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width
    shown = text.split()
    for p in result.points:
        for interval, digits in ((p.cf_interval, 2), (p.accuracy_vs_ft, 3), (p.cf_reduction, 2)):
            if interval is None:  # the anchors against themselves: shown "-"
                continue
            low, high = f"{interval.low:+.{digits}f}", f"{interval.high:+.{digits}f}"
            assert f"[{low},{high}]" in shown or (f"[{low}," in shown and f"{high}]" in shown), (p.name, low, high)
        assert f"{p.cf_pct:+.2f}" in shown
    assert "◀" in text and "acc" in shown and "forg" in shown  # every column is there: the verdicts too
    assert "-" in shown  # the anchors' missing intervals
    if width < 60:  # too narrow for one table: the columns in parts, and it says so
        assert f"the table is shown in 2 parts at {width} columns" in " ".join(shown)


def test_the_table_fits_80_columns_and_json_is_for_scripts(tmp_path):
    from rich.console import Console

    from fapm_merge.workflows.tradeoff import tradeoff_table

    result = compute_tradeoff(PAIRED)
    console = Console(width=80, record=True)
    console.print(tradeoff_table(result))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for name in ("magnitude-s0.9", "fapm-s0.9", "dare-s0.95"):  # whole names, not "magni…"
        assert name in text
    assert "[-0.0" in text  # intervals are shown

    from fapm_merge.evaluation.results import append_result

    path = tmp_path / "results.jsonl"
    for record_ in PAIRED:
        append_result(path, record_)
    out = CliRunner().invoke(main, ["tradeoff", str(path), "--json", "--plot", str(tmp_path / "p.png")])
    assert out.exit_code == 0, out.output
    document = json.loads(out.stdout)
    assert document["selected"]["name"] == "fapm-s0.9"
    assert document["selected"]["cf_interval"]["low"] <= document["selected"]["cf_pct"]
    assert document["rule_settings"]["kind"] == "repair"


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(860, 950), st.floats(0.97, 1.06)), min_size=1, max_size=4))
def test_the_default_rule_never_selects_more_forgetting_than_the_fine_tune(variants):
    records = PAIRED[:2] + [
        paired_record(f"/s/fapm-s0.{index + 1}", set(range(right)), factor, fapm((index + 1) / 10))
        for index, (right, factor) in enumerate(variants)
    ]
    result = compute_tradeoff(records)
    if result.selected is not None:
        assert result.selected.loss < result.finetuned.loss
        assert result.selected.cf_pct < result.finetuned.cf_pct
        assert result.selected.retention >= 0.99
        # shown, not estimated: non-inferior at the margin, a significant repair of >= 10%
        assert result.selected.noninferiority.lower_bound > -result.margin
        assert result.selected.repair.significant and result.selected.repaired >= 0.1
