"""Plain functions the test modules share (fixtures live in conftest.py).

Nothing here downloads: conftest.py sets HF_HUB_OFFLINE before any test module is
imported, and every path handed to mergekit is absolute.
"""

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from fapm_merge.workflows.demo import TINY_CONFIGS

ARCHITECTURES = tuple(TINY_CONFIGS)


def console_script(name: str) -> str:
    """The real console script ``name`` installed next to this interpreter, else the one
    on PATH, else the bare name (so a missing tool fails with its name in the error)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else shutil.which(name) or name


def run_mergekit_yaml(config: dict, out_dir: Path, *extra: str, check: bool = True):
    """Run the unmodified ``mergekit-yaml`` in a subprocess on ``config``."""
    out_dir = Path(out_dir)
    recipe = out_dir.parent / f"{out_dir.name}.yml"
    recipe.write_text(yaml.safe_dump(config, sort_keys=False))
    result = subprocess.run(
        [console_script("mergekit-yaml"), str(recipe), str(out_dir), "--no-copy-tokenizer", *extra],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"mergekit-yaml failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def run_merge_in_process(config: dict, out_dir: Path, **options):
    """mergekit's Python API (a fresh MergeConfiguration per call: run_merge mutates it)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(
        MergeConfiguration.model_validate(config),
        str(out_dir),
        MergeOptions(copy_tokenizer=False, lazy_unpickle=False, **options),
    )
    return Path(out_dir)


def load_state(directory: Path) -> dict:
    """Every tensor of a safetensors model folder."""
    from safetensors.torch import load_file

    state = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(path))
    return state


def fapm_recipe(base: Path, finetuned: Path, **parameters) -> dict:
    """A one-model FAPM recipe with absolute paths."""
    model = {"model": str(finetuned)}
    if parameters:
        model["parameters"] = parameters
    return {
        "merge_method": "fapm",
        "base_model": str(base),
        "models": [model],
        "dtype": "float32",
    }


def variant(source: Path, target: Path, edit=None, dtype=None) -> Path:
    """A copy of a model folder with its state dict edited (real safetensors file)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    path = target / "model.safetensors"
    state = load_file(path)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    if edit is not None:
        edit(state)
    save_file(state, path, metadata={"format": "pt"})
    return target


def truncated_copy(source: Path, target: Path, keep_bytes: int) -> Path:
    """A copy of a model folder whose model.safetensors keeps only its first bytes."""
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep_bytes])
    return weights


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count set to ``count`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Raw bit pattern as integers, so -0.0 vs 0.0, NaN payloads and every last bit count."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return tensor.contiguous().view(ints[tensor.dtype.itemsize])
