"""Model checkpoints on disk: safetensors folders read one tensor at a time.

Every reader of weights in fapm-merge (analyze, verify, the LoRA adapter path, the
demo summary) opens files through :func:`open_safetensors`, so a truncated or
corrupt file is always reported by name instead of by safetensors' own message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch

from fapm_merge.core.errors import FapmInputError


def open_safetensors(path: Path):
    """``safe_open(path)``, or an error that names a truncated or corrupt file.

    safetensors' own message ("Error while deserializing header ...") names no file.
    """
    from safetensors import SafetensorError, safe_open

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
    """One tensor from one .safetensors file."""
    with open_safetensors(path) as handle:
        return handle.get_tensor(name)


def tensor_shapes(folder: Path) -> Dict[str, Tuple[int, ...]]:
    """Every tensor's shape, read from the shard headers (no tensor data)."""
    by_file: Dict[Path, list] = {}
    for tensor_name, path in safetensors_index(Path(folder)).items():
        by_file.setdefault(path, []).append(tensor_name)
    shapes: Dict[str, Tuple[int, ...]] = {}
    for path, tensor_names in by_file.items():
        with open_safetensors(path) as handle:
            for tensor_name in tensor_names:
                shapes[tensor_name] = tuple(handle.get_slice(tensor_name).get_shape())
    return shapes


def iter_tensors(*folders: Path) -> Iterator[Tuple[str, Tuple[torch.Tensor, ...]]]:
    """``(name, (tensor of each folder))`` for the names present in every folder,
    in the last folder's order, one name at a time."""
    indexes = [safetensors_index(folder) for folder in folders]
    for name in indexes[-1]:
        if all(name in index for index in indexes):
            yield name, tuple(read_tensor(index[name], name) for index in indexes)


__all__ = ["iter_tensors", "model_type", "open_safetensors", "read_tensor",
           "safetensors_index", "tensor_shapes"]


