"""matplotlib figures (Agg, PNG) for ``fapm-merge tradeoff`` and ``fapm-merge analyze``.

matplotlib is the optional extra ``plot``; a missing install is a clear message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

from fapm_merge.core.rules import FAPM
from fapm_merge.io.recipe import method_family

METHOD_STYLE = {
    FAPM: dict(color="#d62728", marker="o"),
    "magnitude": dict(color="#1f77b4", marker="s"),
    "dare": dict(color="#2ca02c", marker="^"),
    "wiseft": dict(color="#9467bd", marker="D"),
    "lines": dict(color="#ff7f0e", marker="v"),
}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'fapm-merge[plot]'") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, *, layout: bool = True) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders created) and free it.

    ``layout=False`` when labels were placed after the layout: moving the axes again
    would move the points under their labels."""
    if layout:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def _error(value, low, high):
    """matplotlib's [below, above] error lengths for a point and its interval ends."""
    return [[max(0.0, value - low)], [max(0.0, high - value)]]


OUTLIER_SPAN = 3.0
"""A point lies far off when its CF% is further from the anchors than this many times
the fine-tune's forgetting (|CF_ft - CF_base|, at least 1 point of CF): it is drawn at
the axis edge, marked and named, so it cannot squeeze the other points into one line."""

ZOOM_MARGIN = 0.5
"""The zoomed panel shows accuracies from the retention bound minus this share of the
distance between the bound and the fine-tune's accuracy, up to a little above it."""

_LABEL_OFFSETS = [(dx * r, dy * r) for r in (5, 9, 14, 21, 30, 42)
                  for dx, dy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))]
"""Label offsets from their point (typographic points), nearest first."""


def _overlaps(box, boxes) -> bool:
    return any(box.overlaps(other) for other in boxes)


def place_labels(ax, labels, obstacles=()) -> list:
    """Annotate each ``(x, y, text, color)`` in ``labels`` at the nearest offset where its
    box overlaps no label placed before it, no marker in ``obstacles`` (``(x, y, size)``:
    data units and the marker's size in points) and stays inside the axes; a label moved
    far from its point gets a leader line.

    A deterministic greedy search, chosen over iterative force layouts because its
    result is guaranteed free of overlaps (a test checks it). Call it after the figure's
    layout is final. Returns the placed annotations; a label with no free place in the
    search radius is placed at its farthest candidate and reported by name in its ``gid``.
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    from matplotlib.transforms import Bbox

    taken = []
    for x, y, size in obstacles:
        (px, py), half = ax.transData.transform((x, y)), size / 2 * fig.dpi / 72
        taken.append(Bbox.from_extents(px - half, py - half, px + half, py + half))
    placed = []
    for x, y, text, color in labels:
        chosen = None
        for dx, dy in _LABEL_OFFSETS:
            note = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points",
                               fontsize=7, color=color,
                               ha="left" if dx > 0 else "right" if dx < 0 else "center",
                               va="bottom" if dy > 0 else "top" if dy < 0 else "center")
            box = note.get_window_extent(renderer)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if inside and not _overlaps(box, taken):
                chosen = (note, box, max(abs(dx), abs(dy)))
                break
            note.remove()
        if chosen is None:  # crowded beyond the search radius: the last candidate, flagged
            note = ax.annotate(text, (x, y), xytext=_LABEL_OFFSETS[-1], textcoords="offset points",
                               fontsize=7, color=color)
            note.set_gid("unplaced")
            chosen = (note, note.get_window_extent(renderer), 99)
        note, box, distance = chosen
        if distance > 9:
            ax.annotate("", (x, y), xytext=(box.x0 + box.width / 2, box.y0 + box.height / 2),
                        textcoords="figure pixels",
                        arrowprops=dict(arrowstyle="-", color=color, linewidth=0.5, alpha=0.6))
        taken.append(box)
        placed.append(note)
    return placed


def _guide(result):
    """The rule's bound on the plane, ``(axis, value, label)``, or None."""
    return result.rule.selection.guide(result.rule, result.finetuned.accuracy)


def _decision_bounds(result):
    """The rule's bounds on the plane: (least accuracy or None, largest CF% or None)."""
    guide = _guide(result)
    if guide is None:
        return None, None
    axis, value, _ = guide
    return (value, None) if axis == "accuracy" else (None, value)


def _x_range(result, points):
    """The CF% range that holds the anchors and every point not far off (OUTLIER_SPAN)."""
    anchors = [result.base.cf_pct, result.finetuned.cf_pct]
    span = max(abs(anchors[1] - anchors[0]), 1.0) * OUTLIER_SPAN
    low, high = min(anchors) - span, max(anchors) + span
    inside = [p.cf_pct for p in points if low <= p.cf_pct <= high] + anchors
    bound = _decision_bounds(result)[1]
    if bound is not None and low <= bound <= high:
        inside.append(bound)
    pad = max((max(inside) - min(inside)) * 0.08, 0.05)
    return min(inside) - pad, max(inside) + pad


def _draw_plane(ax, result, xlim, ylim, *, zoom: bool) -> list:
    """One panel: curves, anchors, bounds, intervals and the selection, within ``xlim``
    and ``ylim``; returns the labels to place once the layout is final."""
    from fapm_merge.evaluation.stats import cf_percent

    ft = result.finetuned
    curves: Dict[str, list] = {}
    others = []
    for point in result.points:
        if point.method in ("base", "finetuned"):
            continue
        (curves.setdefault(point.method, []) if point.strength is not None else others).append(point)
    forgetting = ft.loss - result.base.loss
    labels, far = [], []

    def visible(p):
        return xlim[0] <= p.cf_pct <= xlim[1] and ylim[0] <= p.accuracy <= ylim[1]

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
        style = METHOD_STYLE.get(method_family(method).removesuffix("_lora"), dict(color="0.4", marker="x"))
        name = points[0].strength_name
        ax.plot([p.cf_pct for p in points], [p.accuracy for p in points], linestyle="-",
                linewidth=1.4, markersize=6,
                label=f"{method} ({name} {points[0].strength:g} → {points[-1].strength:g})", **style)
        for p in points:
            if visible(p):
                bars(p, style)
                labels.append((p.cf_pct, p.accuracy, f"{p.strength:g}", style["color"]))
            elif not zoom and not xlim[0] <= p.cf_pct <= xlim[1]:
                far.append((p, style["color"]))
    for p in others:
        ax.plot(p.cf_pct, p.accuracy, "x", color="0.4")
        if visible(p):
            bars(p, {})
            labels.append((p.cf_pct, p.accuracy, p.name, "0.2"))
        elif not zoom and not xlim[0] <= p.cf_pct <= xlim[1]:
            far.append((p, "0.4"))
    for anchor, style in ((result.base, dict(color="black", marker="P")), (ft, dict(color="#ff7f0e", marker="*"))):
        ax.plot(anchor.cf_pct, anchor.accuracy, linestyle="none", markersize=13,
                label=f"{'base' if anchor is result.base else 'fine-tuned'} ({anchor.name})", **style)
        bars(anchor, style)
    ax.axvline(ft.cf_pct, color="#ff7f0e", linestyle=":", linewidth=1, label="forgetting of the fine-tune")
    guide = _guide(result)
    if guide is not None:
        axis, value, label = guide
        draw = ax.axhline if axis == "accuracy" else ax.axvline
        draw(value, color="0.5", linestyle="--", linewidth=1, label=label)
    s = result.selected
    if s is not None:
        ax.plot(s.cf_pct, s.accuracy, "o", markersize=17, markerfacecolor="none",
                markeredgecolor="black", markeredgewidth=1.6, label=f"selected: {s.label}")
    # far-off points: at the edge they lie beyond, an arrow head pointing out, named with their CF
    for p, color in far:
        edge = xlim[1] if p.cf_pct > xlim[1] else xlim[0]
        ax.plot(edge, p.accuracy, ">" if p.cf_pct > xlim[1] else "<", color=color, markersize=8,
                clip_on=False, zorder=5)
        labels.append((edge, p.accuracy, f"{p.name}: CF {p.cf_pct:+,.0f}% (off the axis)", color))
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    return labels


def plot_tradeoff(result, path: Path, *, title: str = "") -> Path:
    """Write :func:`tradeoff_figure` as a PNG at ``path``."""
    return _save(tradeoff_figure(result, title=title), path, layout=False)


def tradeoff_figure(result, *, title: str = ""):
    """Task accuracy against forgetting (CF% on the general text), one curve per
    method in order of strength, the two anchors, the rule's bounds and the selected
    point circled. Error bars are each point's 95% paired intervals *of its
    difference to the fine-tune* (accuracy, and loss mapped to CF%), drawn around
    the point: a bar that reaches the fine-tune's line is a difference the data
    cannot tell from none.

    Two panels: every point (a point far off, e.g. DARE at 0.99, is drawn at the
    axis edge and named with its CF, see :data:`OUTLIER_SPAN`), and the region the
    rule decides in, zoomed: accuracies around the fine-tune's and the retention
    bound. Labels never overlap each other or a point (:func:`place_labels`).
    """
    plt = _pyplot()
    fig, (whole, zoomed) = plt.subplots(1, 2, figsize=(13, 5.8), dpi=130)
    ft = result.finetuned
    points = [p for p in result.points if p.method not in ("base", "finetuned")]
    xlim = _x_range(result, points)
    accuracies = [p.accuracy for p in points] + [ft.accuracy, result.base.accuracy]
    pad = max((max(accuracies) - min(accuracies)) * 0.06, 0.01)
    labels_whole = _draw_plane(whole, result, xlim, (min(accuracies) - pad, max(accuracies) + pad), zoom=False)

    least_accuracy = _decision_bounds(result)[0]
    bound = least_accuracy if least_accuracy is not None else ft.accuracy * 0.99
    depth = max(ft.accuracy - bound, 0.005)
    zoom_y = (bound - ZOOM_MARGIN * depth - 0.005, ft.accuracy + ZOOM_MARGIN * depth + 0.005)
    near = [p for p in points + [result.base]
            if zoom_y[0] <= p.accuracy <= zoom_y[1] and xlim[0] <= p.cf_pct <= xlim[1]]
    xs = [p.cf_pct for p in near] + [ft.cf_pct]
    xpad = max((max(xs) - min(xs)) * 0.08, 0.05)
    labels_zoom = _draw_plane(zoomed, result, (min(xs) - xpad, max(xs) + xpad), zoom_y, zoom=True)

    for ax in (whole, zoomed):
        ax.set_xlabel("forgetting: CF % on the general text (100 (PPL - PPL_base) / PPL_base)\n"
                      "error bars: 95% paired intervals of the difference to the fine-tune", fontsize=8)
        ax.set_ylabel("task accuracy")
    s = result.selected
    chosen = f"selected {s.label}" if s is not None else "nothing qualified"
    whole.set_title(title or f"forgetting / task trade-off, rule {result.rule.kind}: {chosen}", fontsize=10)
    zoomed.set_title("zoom: where the rule decides (around the fine-tune's accuracy "
                     "and the retention bound)", fontsize=9)
    whole.legend(fontsize=7, loc="best")
    fig.tight_layout()
    # marker sizes as drawn: variants 6, anchors 13, the selection ring 17
    obstacles = [(p.cf_pct, p.accuracy, 6) for p in points]
    obstacles += [(a.cf_pct, a.accuracy, 13) for a in (result.base, ft)]
    if s is not None:
        obstacles.append((s.cf_pct, s.accuracy, 17))
    place_labels(whole, labels_whole, obstacles)
    place_labels(zoomed, labels_zoom, obstacles)
    return fig


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
