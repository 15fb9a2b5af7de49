"""Shared fixtures: tiny real transformers model pairs, built once per session.

Nothing here downloads: HF_HUB_OFFLINE is set and every path is absolute. Plain
functions the tests share are in helpers.py.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from fapm_merge.workflows.demo import TINY_CONFIGS, save_pair  # noqa: E402


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

