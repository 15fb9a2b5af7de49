"""The trade-off plot keeps every point readable (issue 22): a far-off point does not
squeeze the others, the decision region has its own zoomed panel, labels never overlap."""

import itertools

import pytest

pytest.importorskip("matplotlib")

from fapm_merge.workflows.plots import OUTLIER_SPAN, tradeoff_figure  # noqa: E402
from fapm_merge.workflows.tradeoff import Rule, compute_tradeoff  # noqa: E402

BASE, FT = "/m/base", "/m/ft"


def record(name, accuracy, loss, recipe=None):
    return {"model": f"/s/{name}", "name": name, "recipe": recipe,
            "metrics": {"text": {"loss": loss}, "task": {"accuracy": accuracy}}}


def recipe(method, sparsity=None, weight=None, beta=None):
    params = {"sparsity": sparsity} if sparsity is not None else {"weight": weight}
    out = {"merge_method": method, "base_model": BASE, "models": [{"model": FT, "parameters": params}]}
    if beta is not None:
        out["parameters"] = {"beta": beta}
    return out


def crowded_with_an_outlier():
    """The documented sweep's shape: DARE at 0.99 forgets thousands of percent, and
    magnitude/WiSE-FT points crowd under the fine-tune's star."""
    records = [{**record("base", 0.2, 2.0), "model": BASE}, {**record("ft", 0.9, 2.03), "model": FT}]
    for s in (0.1, 0.3, 0.5):
        records.append(record(f"magnitude-s{s}", 0.9 - s / 100, 2.029 - s / 1000, recipe("fapm", s, beta=0)))
        records.append(record(f"fapm-s{s}", 0.89 - s / 50, 2.02 - s / 100, recipe("fapm", s)))
    records.append(record("dare-s0.99", 0.5, 12.0, recipe("dare_linear", 0.99)))
    return compute_tradeoff(records, rule=Rule("weighted"))


def test_a_far_point_is_clipped_named_and_leaves_the_others_room():
    result = crowded_with_an_outlier()
    fig = tradeoff_figure(result)
    whole = fig.axes[0]
    outlier = next(p for p in result.points if p.name == "dare-s0.99")
    low, high = whole.get_xlim()
    assert high < outlier.cf_pct  # the axis does not run to +2,000,000%
    span = abs(result.finetuned.cf_pct - result.base.cf_pct)
    assert high - low <= 2 * (OUTLIER_SPAN + 1) * max(span, 1.0)
    named = [t.get_text() for t in whole.texts if "dare-s0.99" in t.get_text()]
    assert named and "off the axis" in named[0] and f"{outlier.cf_pct:+,.0f}%" in named[0]


def test_the_zoomed_panel_shows_the_fine_tune_and_the_bound():
    result = crowded_with_an_outlier()
    zoomed = tradeoff_figure(result).axes[1]
    low, high = zoomed.get_ylim()
    assert low < 0.99 * result.finetuned.accuracy < result.finetuned.accuracy < high
    assert high - low < 0.1  # a zoom, not the whole accuracy range


def test_labels_overlap_neither_each_other_nor_a_point():
    """Regression: tune's plot put the magnitude 0.1/0.3 labels under the fine-tune's star."""
    fig = tradeoff_figure(crowded_with_an_outlier())
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        boxes = [t.get_window_extent(renderer) for t in ax.texts if t.get_text()]
        assert boxes
        assert all(t.get_gid() != "unplaced" for t in ax.texts)
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b)


def test_no_label_covers_the_anchors_or_the_selection_ring():
    result = crowded_with_an_outlier()
    fig = tradeoff_figure(result)
    renderer = fig.canvas.get_renderer()
    from matplotlib.transforms import Bbox

    for ax in fig.axes:
        for anchor, size in ((result.finetuned, 17), (result.base, 13)):
            x, y = ax.transData.transform((anchor.cf_pct, anchor.accuracy))
            half = size / 2 * fig.dpi / 72
            ring = Bbox.from_extents(x - half, y - half, x + half, y + half)
            assert not any(t.get_window_extent(renderer).overlaps(ring) for t in ax.texts if t.get_text())
