"""Small base / fine-tuned model pairs made locally (no download) for demo and tests.

The base is a transformers model initialised from a config (std-0.02 weights, the
scale real checkpoints have). The "fine-tune" is believable rather than noise
everywhere: a low-rank update on every matrix (what gradient descent on a narrow
task mostly produces), a few larger entries, small shifts of norms and biases, and
some tensors left exactly unchanged (frozen parts are common).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import torch

# Configs follow mergekit's own "pico" test models: tiny but structurally complete.
TINY_CONFIGS: Dict[str, dict] = {
    "llama": dict(
        model_type="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
    "qwen2": dict(  # attention projections carry biases
        model_type="qwen2",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "gpt2": dict(  # Conv1D weights stored transposed
        model_type="gpt2",
        vocab_size=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
    ),
    "bert": dict(
        model_type="bert",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    ),
}

DEMO_CONFIG = dict(  # the `fapm-merge demo` pair: Llama-shaped, ~4M parameters
    model_type="llama",
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)

_MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertModel",
}


def build_model(config: dict, seed: int = 0):
    """A randomly initialised transformers model for ``config`` (deterministic)."""
    import transformers

    config = dict(config)
    model_type = config.pop("model_type")
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(model_type, **config)
    model_class = getattr(transformers, _MODEL_CLASSES[model_type])
    return model_class(cfg)


@torch.no_grad()
def simulate_finetune(model, seed: int = 1, strength: float = 1.0) -> None:
    """Apply a believable fine-tuning update to ``model`` in place.

    Args:
        model (`torch.nn.Module`): the base model, modified in place.
        seed (`int`, defaults to 1): seed of the update.
        strength (`float`, defaults to 1.0): scales every change.
    """
    generator = torch.Generator().manual_seed(seed)
    for index, (name, param) in enumerate(sorted(model.named_parameters())):
        if index % 7 == 3:
            continue  # a frozen tensor: dW == 0 everywhere
        scale = float(param.abs().mean()) or 0.02
        if param.ndim == 2 and min(param.shape) > 1:
            rows, cols = param.shape
            rank = min(4, rows, cols)
            left = torch.randn(rows, rank, generator=generator)
            right = torch.randn(rank, cols, generator=generator)
            update = left @ right * (0.05 * scale / rank**0.5)
            # a few entries move a lot, as task-relevant weights do
            spikes = torch.rand(rows, cols, generator=generator) < 0.01
            update += spikes * torch.randn(rows, cols, generator=generator) * scale
        else:
            update = torch.randn(param.shape, generator=generator) * (0.02 * scale)
        param.add_(update.to(param.dtype) * strength)


def save_pair(
    config: dict, directory: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Tuple[Path, Path]:
    """Write ``directory/base`` and ``directory/finetuned`` (safetensors) and return them."""
    directory = Path(directory)
    base_dir, ft_dir = directory / "base", directory / "finetuned"
    model = build_model(config, seed=seed).to(dtype)
    model.save_pretrained(base_dir)
    simulate_finetune(model, seed=seed + 1)
    model.save_pretrained(ft_dir)
    return base_dir.resolve(), ft_dir.resolve()
