"""matplotlib figures (Agg, PNG) for ``fapm-merge tradeoff`` and ``fapm-merge analyze``.

matplotlib is the optional extra ``plot``; a missing install is a clear message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

from fapm_merge.core.rules import FAPM

METHOD_STYLE = {
    FAPM: dict(color="#d62728", marker="o"),
    "magnitude": dict(color="#1f77b4", marker="s"),
    "dare": dict(color="#2ca02c", marker="^"),
    "wiseft": dict(color="#9467bd", marker="D"),
}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'fapm-merge[plot]'") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders created) and free it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def _error(value, low, high):
    """matplotlib's [below, above] error lengths for a point and its interval ends."""
    return [[max(0.0, value - low)], [max(0.0, high - value)]]


def plot_tradeoff(result, path: Path, *, title: str = "") -> Path:
    """Task accuracy against forgetting (CF% on the general text), one curve per
    method in order of strength, the two anchors, the rule's bounds and the selected
    point circled. Error bars are each point's 95% paired intervals *of its
    difference to the fine-tune* (accuracy, and loss mapped to CF%), drawn around
    the point: a bar that reaches the fine-tune's line is a difference the data
    cannot tell from none."""
    from fapm_merge.evaluation.stats import cf_percent

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.8), dpi=130)
    ft = result.finetuned
    curves: Dict[str, list] = {}
    others = []
    for point in result.points:
        if point.method in ("base", "finetuned"):
            continue
        (curves.setdefault(point.method, []) if point.strength is not None else others).append(point)

    forgetting = ft.loss - result.base.loss

    def bars(point, style):
        if point.loss_vs_ft is None or point.accuracy_vs_ft is None:
            return
        x, y = point.loss_vs_ft, point.accuracy_vs_ft
        ax.errorbar(point.cf_pct, point.accuracy,
                    xerr=_error(point.cf_pct, cf_percent(forgetting + x.low), cf_percent(forgetting + x.high)),
                    yerr=_error(point.accuracy, ft.accuracy + y.low, ft.accuracy + y.high),
                    fmt="none", ecolor=style.get("color", "0.4"), elinewidth=0.8, capsize=2,
                    alpha=0.55)

    for method, points in sorted(curves.items()):
        points.sort(key=lambda p: p.strength)
        style = METHOD_STYLE.get(method.removesuffix("_lora"), dict(color="0.4", marker="x"))
        name = points[0].strength_name
        ax.plot([p.cf_pct for p in points], [p.accuracy for p in points], linestyle="-",
                linewidth=1.4, markersize=6,
                label=f"{method} ({name} {points[0].strength:g} → {points[-1].strength:g})", **style)
        for p in points:
            bars(p, style)
            ax.annotate(f"{p.strength:g}", (p.cf_pct, p.accuracy), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=style["color"])
    for p in others:
        ax.plot(p.cf_pct, p.accuracy, "x", color="0.4")
        bars(p, {})
        ax.annotate(p.name, (p.cf_pct, p.accuracy), fontsize=7, xytext=(4, -8), textcoords="offset points")
    for anchor, style in ((result.base, dict(color="black", marker="P")), (ft, dict(color="#ff7f0e", marker="*"))):
        ax.plot(anchor.cf_pct, anchor.accuracy, linestyle="none", markersize=13,
                label=f"{'base' if anchor is result.base else 'fine-tuned'} ({anchor.name})", **style)
        bars(anchor, style)
    ax.axvline(ft.cf_pct, color="#ff7f0e", linestyle=":", linewidth=1,
               label="forgetting of the fine-tune")
    guide = result.rule.selection.guide(result.rule, ft.accuracy)  # the rule's bound, if any
    if guide is not None:
        axis, value, label = guide
        draw = ax.axhline if axis == "accuracy" else ax.axvline
        draw(value, color="0.5", linestyle="--", linewidth=1, label=label)
    s = result.selected
    if s is not None:
        ax.plot(s.cf_pct, s.accuracy, "o", markersize=17, markerfacecolor="none",
                markeredgecolor="black", markeredgewidth=1.6, label=f"selected: {s.label}")
    ax.set_xlabel("forgetting: CF % on the general text (100 (PPL - PPL_base) / PPL_base)\n"
                  "error bars: 95% paired intervals of the difference to the fine-tune", fontsize=9)
    ax.set_ylabel("task accuracy")
    chosen = f"selected {s.label}" if s is not None else "nothing qualified"
    ax.set_title(title or f"forgetting / task trade-off, rule {result.rule.kind}: {chosen}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="best")
    return _save(fig, path)


def plot_analysis(
    heatmaps: Dict[str, Dict[str, List[float]]],
    histogram: Dict[str, Sequence[float]],
    path: Path,
    *,
    title: str = "",
) -> Path:
    """Layer x module heatmaps (one panel per statistic) and the score histogram.

    Args:
        heatmaps: ``{statistic: {module: [value per layer]}}``.
        histogram: ``{"edges": [...], "positive": [...], "negative": [...]}`` counts
            of entries per score bin (kept/pruned is not known per bin).
        path (`Path`): PNG to write.
    """
    plt = _pyplot()
    import numpy as np

    panels = len(heatmaps) + 1
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.8), dpi=120)
    for ax, (statistic, table) in zip(axes, heatmaps.items()):
        modules = list(table)
        layers = max((len(v) for v in table.values()), default=0)
        grid = np.full((layers, len(modules)), np.nan)
        for column, module in enumerate(modules):
            values = table[module]
            grid[: len(values), column] = values
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(modules)), [m.replace("_proj", "") for m in modules], rotation=60, fontsize=7)
        ax.set_yticks(range(layers))
        ax.set_ylabel("layer")
        ax.set_title(statistic, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
        if layers * len(modules) <= 120:
            for (row, column), value in np.ndenumerate(grid):
                if np.isfinite(value):
                    ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=6, color="white")
    ax = axes[-1]
    edges = np.asarray(histogram["edges"])
    widths = np.diff(edges)
    ax.bar(edges[:-1], histogram["counts"], width=widths, align="edge", color="#1f77b4", edgecolor="none")
    if histogram.get("threshold") is not None:
        ax.axvline(histogram["threshold"], color="#d62728", linestyle="--", linewidth=1,
                   label="median per-tensor threshold")
        ax.legend(fontsize=7)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_yscale("log")
    ax.set_xlabel(histogram.get("xlabel", "FAPM score"))
    ax.set_ylabel("entries")
    ax.set_title("score histogram (all tensors)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
