"""What a finished merge did, read back from the three checkpoints one tensor at a time."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch


def open_safetensors(path: Path):
    """``safe_open(path)``, or an error that names a truncated or corrupt file.

    safetensors' own message ("Error while deserializing header ...") names no file.
    """
    from safetensors import SafetensorError, safe_open

    from fapm_merge.core import FapmInputError

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise FapmInputError(
            f"{path}: cannot be opened ({error}); the file is truncated or corrupt: "
            f"re-download it (`fapm-merge verify {Path(path).parent}` checks the folder)"
        ) from None


def model_type(folder: Path) -> Optional[str]:
    """``model_type`` from a model folder's config.json (None when it cannot be read)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def safetensors_index(folder: Path) -> Dict[str, Path]:
    """Map every tensor name of a model folder to the .safetensors file holding it."""
    from fapm_merge.core import FapmInputError

    folder = Path(folder)
    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise FapmInputError(f"{index_file} is not a safetensors index ({error}); "
                                 "re-download the folder") from None
        return {name: folder / shard for name, shard in weight_map.items()}
    index = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open_safetensors(path) as handle:
            index.update({name: path for name in handle.keys()})
    if not index:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    return index


def read_tensor(path: Path, name: str) -> torch.Tensor:
    with open_safetensors(path) as handle:
        return handle.get_tensor(name)


@dataclass
class TensorSummary:
    name: str
    numel: int
    changed: int  # entries whose fine-tuned value differs from the base
    kept: int  # entries whose merged value differs from the base
    energy_kept: float  # ||W_out - W_pre||² / ||W_ft - W_pre||²


@dataclass
class MergeSummary:
    rows: List[TensorSummary] = field(default_factory=list)

    @property
    def tensors(self) -> int:
        return len(self.rows)

    @property
    def kept_share(self) -> float:
        total = sum(r.numel for r in self.rows)
        return sum(r.kept for r in self.rows) / max(total, 1)

    @property
    def energy_kept(self) -> float:
        kept = sum(r.energy_kept * r._full for r in self.rows)  # type: ignore[attr-defined]
        full = sum(r._full for r in self.rows)  # type: ignore[attr-defined]
        return kept / full if full else 0.0

    def table(self, title: str = "", limit: int = 12):
        from rich.table import Table

        table = Table(title=title)
        for column in ("tensor", "entries", "changed by fine-tune", "kept", "energy kept"):
            table.add_column(column, justify="left" if column == "tensor" else "right")
        rows = sorted(self.rows, key=lambda r: -r.numel)
        for row in rows[:limit]:
            table.add_row(
                row.name,
                f"{row.numel:,}",
                f"{row.changed / max(row.numel, 1):.1%}",
                f"{row.kept / max(row.numel, 1):.1%}",
                f"{row.energy_kept:.1%}",
            )
        if len(rows) > limit:
            table.add_row(f"... {len(rows) - limit} more", "", "", "", "")
        return table


def iter_triples(base: Path, finetuned: Path, merged: Path) -> Iterator[Tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(name, W_pre, W_ft, W_out)`` for tensors present in all three folders."""
    indexes = [safetensors_index(p) for p in (base, finetuned, merged)]
    for name in indexes[2]:
        if name in indexes[0] and name in indexes[1]:
            yield (name, *(read_tensor(index[name], name) for index in indexes))


@torch.no_grad()
def summarize_merge(base: Path, finetuned: Path, merged: Path) -> MergeSummary:
    """Per-tensor kept share and kept task-vector energy of a one-model merge."""
    summary = MergeSummary()
    for name, pre, ft, out in iter_triples(base, finetuned, merged):
        if not pre.is_floating_point():
            continue
        pre64, ft64, out64 = pre.double(), ft.double(), out.double()
        full = float(((ft64 - pre64) ** 2).sum())
        kept_energy = float(((out64 - pre64) ** 2).sum())
        row = TensorSummary(
            name=name,
            numel=pre.numel(),
            changed=int((ft != pre).sum()),
            kept=int((out != pre).sum()),
            energy_kept=kept_energy / full if full else 0.0,
        )
        row._full = full  # type: ignore[attr-defined]
        summary.rows.append(row)
    return summary
