"""Shared fixtures: tiny real transformers model pairs, built once per session.

Nothing here downloads: HF_HUB_OFFLINE is set and every path is absolute.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from fapm_merge.workflows.demo import TINY_CONFIGS, save_pair  # noqa: E402

ARCHITECTURES = tuple(TINY_CONFIGS)


@pytest.fixture(scope="session")
def model_pairs(tmp_path_factory):
    """``{arch: (base_dir, finetuned_dir)}`` for llama, qwen2, gpt2 and bert."""
    root = tmp_path_factory.mktemp("pairs")
    return {arch: save_pair(cfg, root / arch) for arch, cfg in TINY_CONFIGS.items()}


@pytest.fixture(scope="session")
def llama_pair(model_pairs):
    return model_pairs["llama"]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A ``fapm-merge demo`` folder (models/{base,finetuned} with their byte
    tokenizer, recipe.yml, merged/), built once per test session and worker.
    Tests read it; a test that changes files copies what it changes."""
    from fapm_merge.workflows.demo import run_demo

    return run_demo(tmp_path_factory.mktemp("shared-demo") / "demo").recipe.parent


@pytest.fixture(scope="session")
def demo_adapter(demo_dir, tmp_path_factory):
    """A peft LoRA adapter (rank 4, q/v/up projections, random A and B) on the demo base."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM.from_pretrained(demo_dir / "models" / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj", "up_proj"]))
    folder = tmp_path_factory.mktemp("shared-adapter") / "my-lora"
    model.save_pretrained(folder)
    return folder.resolve()


def mergekit_yaml_command() -> str:
    """The real console script installed next to this interpreter."""
    candidate = Path(sys.executable).parent / "mergekit-yaml"
    return str(candidate) if candidate.exists() else shutil.which("mergekit-yaml")


def run_mergekit_yaml(config: dict, out_dir: Path, *extra: str, check: bool = True):
    """Run the unmodified ``mergekit-yaml`` in a subprocess on ``config``."""
    out_dir = Path(out_dir)
    recipe = out_dir.parent / f"{out_dir.name}.yml"
    recipe.write_text(yaml.safe_dump(config, sort_keys=False))
    result = subprocess.run(
        [mergekit_yaml_command(), str(recipe), str(out_dir), "--no-copy-tokenizer", *extra],
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


@pytest.fixture
def tensors_of():
    return load_state


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


__all__ = [
    "ARCHITECTURES",
    "fapm_recipe",
    "load_state",
    "run_merge_in_process",
    "run_mergekit_yaml",
    "torch",
    "truncated_copy",
    "variant",
]
