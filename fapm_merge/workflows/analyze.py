"""What FAPM would do to a fine-tune, tensor by tensor, before merging anything.

Streams the two checkpoints (safetensors) one tensor at a time: at most one base
tensor, one fine-tuned tensor and their scores are in memory. Per tensor it
reports (all through :mod:`fapm_merge.core`, the same calls the merge makes):

* ``numel``, ``changed`` (entries with ``dW != 0``), ``mean |dW|``, ``max |dW|``,
  ``||dW||_2``, ``mean |W_pre|`` (the score's ``m``);
* ``positive``: share of entries with score ``S > 0`` (i.e. ``|W_pre| > m`` and
  ``dW != 0``): entries FAPM ranks like magnitude pruning would, not penalised;
* ``energy_kept``: ``sum(dW^2 over kept) / sum(dW^2)`` at the chosen sparsity,
  and the same for magnitude pruning of ``dW`` (``energy_kept_magnitude``);
* ``overlap``: share of FAPM's kept entries that magnitude pruning (FAPM with
  ``beta = 0``) also keeps at the same sparsity.

Per layer (tensors with a layer index in their name) the sums are pooled:
shares weighted by entries, energies by ``||dW||^2``, overlap by kept count.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from fapm_merge.core import (
    DEFAULT_SPARSITY,
    FapmInputError,
    default_sparsity,
    fapm_scores,
    find_threshold,
    keep_count,
    keep_mask,
)
from fapm_merge.core.rules import DEFAULT_BETA
from fapm_merge.io.checkpoint import model_type, read_tensor, safetensors_index

HIST_RANGE = 10.0
HIST_BINS = 80
_LAYER = re.compile(r"^(?P<prefix>.*?\.(?:layers|h|layer|blocks))\.(?P<index>\d+)\.(?P<module>.+)$")


@dataclass
class TensorStats:
    """Statistics of one tensor (see the module docstring for each field)."""

    name: str
    shape: Tuple[int, ...]
    layer: Optional[int]
    module: str
    numel: int
    changed: int
    mean_abs_delta: float
    max_abs_delta: float
    delta_l2: float
    mean_abs_pre: float
    positive: float
    kept: int
    energy_kept: float
    energy_kept_magnitude: float
    overlap: Optional[float]


def split_name(name: str) -> Tuple[Optional[int], str]:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``(3, "self_attn.q_proj")``."""
    match = _LAYER.match(name)
    stem = name[: -len(".weight")] if name.endswith(".weight") else name
    if not match:
        return None, stem
    module = match.group("module")
    return int(match.group("index")), module[: -len(".weight")] if module.endswith(".weight") else module


@torch.no_grad()
def tensor_stats(
    name: str,
    pre: torch.Tensor,
    finetuned: torch.Tensor,
    *,
    sparsity: float = DEFAULT_SPARSITY,
    beta: float = DEFAULT_BETA,
    histogram: Optional[torch.Tensor] = None,
) -> TensorStats:
    """Statistics of one base/fine-tuned tensor pair.

    Args:
        name (`str`): tensor name (for messages and the layer/module split).
        pre (`torch.Tensor`): ``W_pre``.
        finetuned (`torch.Tensor`): ``W_ft``.
        sparsity (`float`, defaults to 0.9): the share FAPM resets.
        beta (`float`, defaults to `DEFAULT_BETA`): the score's balance factor.
        histogram (`torch.Tensor`, *optional*): float64 counts of ``HIST_BINS`` bins of
            ``S / mean|dW|`` over ``[-HIST_RANGE, HIST_RANGE]`` (clipped), updated in place.
    """
    numel = pre.numel()
    scores = fapm_scores(pre, finetuned, beta=beta, name=name)
    cdtype = scores.values.dtype
    delta = (finetuned.to(cdtype) - pre.to(cdtype)).reshape(-1)
    energy = delta.double().square()
    total_energy = float(energy.sum())
    k = keep_count(numel, sparsity=sparsity)
    fapm_mask = keep_mask(scores.values, find_threshold(scores.values, k))
    magnitude = fapm_scores(pre, finetuned, beta=0.0, name=name)
    magnitude_mask = keep_mask(magnitude.values, find_threshold(magnitude.values, k))
    mean_abs_delta = scores.delta_l1 / numel if numel else 0.0
    if histogram is not None and numel and mean_abs_delta > 0:
        normalised = (scores.values.double() / mean_abs_delta).clamp_(-HIST_RANGE, HIST_RANGE)
        histogram += torch.histc(normalised, bins=HIST_BINS, min=-HIST_RANGE, max=HIST_RANGE)
    layer, module = split_name(name)

    def share(mask):
        return float(energy[mask].sum()) / total_energy if total_energy > 0 else 0.0

    return TensorStats(
        name=name,
        shape=tuple(pre.shape),
        layer=layer,
        module=module,
        numel=numel,
        changed=int((delta != 0).sum()),
        mean_abs_delta=mean_abs_delta,
        max_abs_delta=float(delta.abs().max()) if numel else 0.0,
        delta_l2=math.sqrt(total_energy),
        mean_abs_pre=scores.mean_abs_pre,
        positive=float((scores.values > 0).sum()) / numel if numel else 0.0,
        kept=k,
        energy_kept=share(fapm_mask),
        energy_kept_magnitude=share(magnitude_mask),
        # no change (a frozen tensor): every score is 0 and the overlap says nothing
        overlap=float((fapm_mask & magnitude_mask).sum()) / k if k and total_energy > 0 else None,
    )


def iter_pairs(
    base: Path,
    finetuned: Optional[Path] = None,
    *,
    adapter: Optional[str] = None,
    skipped: Optional[List[str]] = None,
) -> Iterator[Tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield ``(name, W_pre, W_ft)`` one tensor at a time, in the base's order.

    With ``adapter`` (a PEFT LoRA folder), ``W_ft`` is rebuilt from the adapter by
    :mod:`fapm_merge.io.lora_adapter` and only the weights it changes are yielded.
    Tensors that are not floating are left out; tensors present on one side only
    are left out and, when ``skipped`` is given, named there. A shape mismatch or
    a different ``model_type`` in config.json is an error.
    """
    base_index = safetensors_index(base)
    if adapter is not None:
        from fapm_merge.io.lora_adapter import load_bound_adapter

        bound = load_bound_adapter(adapter, base)
        for name in bound.touched:
            if name not in base_index:
                continue
            pre = read_tensor(base_index[name], name)
            ft = bound.finetuned(name, pre)
            if ft is not None and pre.is_floating_point():
                yield name, pre, ft
        return
    if finetuned is None:
        raise FapmInputError("analyze needs FINETUNED or --adapter")
    types = (model_type(base), model_type(finetuned))
    if None not in types and types[0] != types[1]:
        raise FapmInputError(
            f"{base} is a {types[0]!r} model and {finetuned} a {types[1]!r} one: FAPM "
            "compares a fine-tune with the model it was trained from"
        )
    ft_index = safetensors_index(finetuned)
    if skipped is not None:
        skipped += [f"{name}: only in the fine-tune" for name in ft_index if name not in base_index]
    for name, path in base_index.items():
        if name not in ft_index:
            if skipped is not None:
                skipped.append(f"{name}: missing from the fine-tune")
            continue
        pre = read_tensor(path, name)
        if not pre.is_floating_point():
            continue
        ft = read_tensor(ft_index[name], name)
        if ft.shape != pre.shape:
            raise FapmInputError(
                f"tensor {name!r} has shape {tuple(pre.shape)} in the base and {tuple(ft.shape)} "
                "in the fine-tune: are these the same architecture? (resized vocabularies need "
                "mergekit's tokenizer options)"
            )
        yield name, pre, ft


@dataclass
class Analysis:
    """Per-tensor and per-layer statistics, the score histogram and the settings."""

    tensors: List[TensorStats]
    histogram: Dict[str, list]
    settings: dict
    skipped: List[str] = field(default_factory=list)  # tensors on one side only

    def layers(self) -> List[dict]:
        """Pooled statistics per layer index (tensors without one are left out)."""
        pooled: Dict[int, dict] = {}
        for t in self.tensors:
            if t.layer is None:
                continue
            p = pooled.setdefault(t.layer, dict(numel=0, changed=0, positive=0.0, energy=0.0,
                                                kept_energy=0.0, kept_energy_mag=0.0, kept=0, overlap=0.0, compared=0))
            e = t.delta_l2**2
            p["numel"] += t.numel
            p["changed"] += t.changed
            p["positive"] += t.positive * t.numel
            p["energy"] += e
            p["kept_energy"] += t.energy_kept * e
            p["kept_energy_mag"] += t.energy_kept_magnitude * e
            p["kept"] += t.kept
            if t.overlap is not None:
                p["overlap"] += t.overlap * t.kept
                p["compared"] += t.kept
        return [
            {
                "layer": layer,
                "numel": p["numel"],
                "changed": p["changed"],
                "positive": p["positive"] / p["numel"],
                "delta_l2": math.sqrt(p["energy"]),
                "energy_kept": p["kept_energy"] / p["energy"] if p["energy"] else 0.0,
                "energy_kept_magnitude": p["kept_energy_mag"] / p["energy"] if p["energy"] else 0.0,
                "overlap": p["overlap"] / p["compared"] if p["compared"] else None,
            }
            for layer, p in sorted(pooled.items())
        ]

    def totals(self) -> dict:
        energy = sum(t.delta_l2**2 for t in self.tensors)
        compared = [t for t in self.tensors if t.overlap is not None]
        numel = sum(t.numel for t in self.tensors)
        return {
            "tensors": len(self.tensors),
            "numel": numel,
            "changed": sum(t.changed for t in self.tensors),
            "positive": sum(t.positive * t.numel for t in self.tensors) / numel if numel else 0.0,
            "energy_kept": sum(t.energy_kept * t.delta_l2**2 for t in self.tensors) / energy if energy else 0.0,
            "energy_kept_magnitude": sum(t.energy_kept_magnitude * t.delta_l2**2 for t in self.tensors) / energy
            if energy else 0.0,
            "overlap": sum(t.overlap * t.kept for t in compared) / sum(t.kept for t in compared)
            if sum(t.kept for t in compared) else None,
        }

    def heatmaps(self) -> Dict[str, Dict[str, List[float]]]:
        """``{statistic: {module: [value per layer]}}`` for the layer x module plot."""
        modules: Dict[str, Dict[int, TensorStats]] = {}
        for t in self.tensors:
            if t.layer is not None and len(t.shape) >= 2:  # matrices; norms are too small to read
                modules.setdefault(t.module, {})[t.layer] = t
        layers = sorted({layer for by_layer in modules.values() for layer in by_layer})
        maps: Dict[str, Dict[str, List[float]]] = {
            "task-vector energy kept by FAPM": {},
            "share of positive scores": {},
            "overlap with magnitude mask": {},
        }
        for module, by_layer in modules.items():
            def column(get):
                # frozen tensors (dW == 0) are blank: nothing to keep or compare
                return [get(by_layer[l]) if l in by_layer and by_layer[l].changed else math.nan for l in layers]

            maps["task-vector energy kept by FAPM"][module] = column(lambda t: t.energy_kept)
            maps["share of positive scores"][module] = column(lambda t: t.positive)
            maps["overlap with magnitude mask"][module] = column(
                lambda t: math.nan if t.overlap is None else t.overlap
            )
        return maps

    def to_json(self) -> dict:
        return {
            "settings": self.settings,
            "totals": self.totals(),
            "layers": self.layers(),
            "tensors": [asdict(t) for t in self.tensors],
            "histogram": self.histogram,
            "skipped": self.skipped,
        }


def analyze(
    base: Path,
    finetuned: Optional[Path] = None,
    *,
    adapter: Optional[str] = None,
    sparsity: Optional[float] = None,
    beta: float = DEFAULT_BETA,
    progress: bool = False,
) -> Analysis:
    """Stream the pair and compute :class:`TensorStats` for every floating tensor.

    Args:
        base (`Path`): base model folder (safetensors).
        finetuned (`Path`, *optional*): fine-tuned model folder; or
        adapter (`str`, *optional*): a PEFT LoRA adapter folder on ``base``.
        sparsity (`float`, *optional*): default 0.9, or 0.1 with ``adapter`` (the
            paper's advice for already low-rank LoRA updates).
        beta (`float`, defaults to `DEFAULT_BETA`): the score's balance factor.
        progress (`bool`, defaults to False): rich progress bar on stderr.
    """
    if sparsity is None:
        sparsity = default_sparsity(lora=adapter is not None)
    keep_count(1, sparsity=sparsity)  # validates the value with the core's message
    histogram = torch.zeros(HIST_BINS, dtype=torch.float64)
    stats: List[TensorStats] = []
    skipped: List[str] = []
    pairs = iter_pairs(Path(base), Path(finetuned) if finetuned else None, adapter=adapter,
                       skipped=skipped)
    if progress:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            job = bar.add_task("analyzing tensors", total=None)
            for name, pre, ft in pairs:
                stats.append(tensor_stats(name, pre, ft, sparsity=sparsity, beta=beta, histogram=histogram))
                bar.advance(job)
    else:
        for name, pre, ft in pairs:
            stats.append(tensor_stats(name, pre, ft, sparsity=sparsity, beta=beta, histogram=histogram))
    if not stats:
        raise FapmInputError(f"no floating tensor is shared by {base} and {finetuned or adapter}")
    edges = torch.linspace(-HIST_RANGE, HIST_RANGE, HIST_BINS + 1).tolist()
    return Analysis(
        tensors=stats,
        histogram={"edges": edges, "counts": histogram.tolist(),
                   "xlabel": f"FAPM score / mean|dW| of its tensor (clipped to ±{HIST_RANGE:g})"},
        settings={"base": str(Path(base).absolute()),
                  "finetuned": str(Path(finetuned).absolute()) if finetuned else None,
                  "adapter": adapter, "sparsity": sparsity, "beta": beta},
        skipped=skipped,
    )


def analysis_table(result: Analysis, limit: int = 20):
    """A rich table: one row per layer, then the tensors outside layers, then totals.

    Fits 80 columns with whole names (see :mod:`fapm_merge.workflows.tables`).
    """
    from fapm_merge.workflows.tables import column_widths, name_column_width, short_count, table as new_table, wrapped

    def pct(value):
        return "-" if value is None else f"{value:.1%}"

    names: List[str] = []
    cells: List[Tuple[str, ...]] = []
    for row in result.layers()[:limit]:
        names.append(f"layer {row['layer']}")
        cells.append((short_count(row['numel']), pct(row["changed"] / row["numel"]), pct(row["positive"]),
                      pct(row["energy_kept"]), pct(row["energy_kept_magnitude"]), pct(row["overlap"])))
    for t in [t for t in result.tensors if t.layer is None][:limit]:
        names.append(t.name)
        cells.append((short_count(t.numel), pct(t.changed / t.numel if t.numel else 0), pct(t.positive),
                      pct(t.energy_kept), pct(t.energy_kept_magnitude), pct(t.overlap)))
    tot = result.totals()
    names.append("all")
    cells.append((short_count(tot['numel']), pct(tot["changed"] / tot["numel"]), pct(tot["positive"]),
                  pct(tot["energy_kept"]), pct(tot["energy_kept_magnitude"]), pct(tot["overlap"])))

    # energy = share of ||dW||² kept; overlap = share of FAPM's kept entries magnitude also keeps
    headers = ("entries", "changed", "S > 0", "energy FAPM", "energy magn.", "overlap")
    widths = column_widths(cells, headers)
    name_width = name_column_width(names, widths)
    table = new_table(f"FAPM analysis at sparsity {result.settings['sparsity']:g} (beta {result.settings['beta']:g})")
    table.add_column("layer / tensor", justify="left", width=name_width)
    for header, width in zip(headers, widths):
        table.add_column(header, justify="right", width=width)
    for index, (name, row_cells) in enumerate(zip(wrapped(names, name_width), cells)):
        table.add_row("[bold]all[/bold]" if index == len(names) - 1 else name, *row_cells)
    return table


__all__ = ["Analysis", "TensorStats", "analysis_table", "analyze", "iter_pairs", "split_name", "tensor_stats"]
