"""matplotlib figures (Agg, PNG) for ``fapm-merge tradeoff`` and ``fapm-merge analyze``.

matplotlib is the optional extra ``plot``; a missing install is a clear message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

METHOD_STYLE = {
    "fapm": dict(color="#d62728", marker="o"),
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


def plot_tradeoff(result, path: Path, *, title: str = "") -> Path:
    """Task (normalised to the fine-tuned model) against general ability (normalised
    to the base): one curve per method in order of strength, the two anchors, the
    selected point and the iso-score line through it."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.8), dpi=130)
    curves: Dict[str, list] = {}
    others = []
    for point in result.points:
        if point.method in ("base", "finetuned"):
            continue
        if point.strength is None:
            others.append(point)
        else:
            curves.setdefault(point.method, []).append(point)
    for method, points in sorted(curves.items()):
        points.sort(key=lambda p: p.strength)
        style = METHOD_STYLE.get(method, dict(color="0.4", marker="x"))
        name = points[0].strength_name
        ax.plot(
            [p.general_norm for p in points],
            [p.task_norm for p in points],
            linestyle="-",
            linewidth=1.4,
            markersize=6,
            label=f"{method} ({name} {points[0].strength:g} → {points[-1].strength:g})",
            **style,
        )
        for p in points:
            ax.annotate(f"{p.strength:g}", (p.general_norm, p.task_norm), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=style["color"])
    for p in others:
        ax.plot(p.general_norm, p.task_norm, "x", color="0.4")
        ax.annotate(p.name, (p.general_norm, p.task_norm), fontsize=7, xytext=(4, -8), textcoords="offset points")
    for anchor, style in ((result.base, dict(color="black", marker="P")), (result.finetuned, dict(color="#ff7f0e", marker="*"))):
        ax.plot(anchor.general_norm, anchor.task_norm, linestyle="none", markersize=13,
                label=f"{anchor.method} ({anchor.name})", **style)
    s = result.selected
    ax.plot(s.general_norm, s.task_norm, "o", markersize=17, markerfacecolor="none",
            markeredgecolor="black", markeredgewidth=1.6, label=f"selected: {s.label}")
    # the iso-score line through the selected point: all points on it score the same
    xs = ax.get_xlim()
    w = result.task_weight
    ax.plot(xs, [(s.score - x) / w for x in xs], ":", color="0.5", linewidth=1,
            label=f"{w:g}·task + general = {s.score:.3f}")
    ax.set_xlim(xs)
    ax.set_xlabel("general ability, normalised to base  (perplexity(base) / perplexity(model))")
    ax.set_ylabel("task accuracy, normalised to fine-tuned")
    ax.set_title(title or f"forgetting / task trade-off — selected by {result.rule}", fontsize=10)
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
