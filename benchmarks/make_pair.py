"""Write a synthetic Llama-shaped (base, fine-tuned) pair of safetensors checkpoints.

Shapes follow TinyLlama-1.1B (hidden 2048, MLP 5632, 32 heads, 4 KV heads, vocab
32000); the layer count is chosen to reach ``--params``. Nothing instantiates a
transformers model: every tensor is generated one at a time in float32, rounded to
bf16 and written to shards of about ``--shard-gb``, so a 1B pair needs well under
2 GB of RAM.

Weights: normal with std 0.02 (Llama's init scale, also the typical scale of trained
Llama matrices) times a log-normal per-row scale (trained weights have uneven rows),
norms near 1. Fine-tune update, per matrix: a rank-16 product (what full
fine-tuning updates mostly look like), plus a sparse component on 0.5% of entries
(outlier updates), plus small dense noise; after rounding to bf16 a realistic share
of entries is unchanged (dW == 0), as in real bf16 fine-tunes.

Usage::

    python benchmarks/make_pair.py benchmarks/data/pair-1b --params 1e9
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch
from rich.progress import Progress
from safetensors.torch import save_file

HIDDEN = 2048
INTERMEDIATE = 5632
HEADS = 32
KV_HEADS = 4
VOCAB = 32000
HEAD_DIM = HIDDEN // HEADS


def layer_shapes(layer: int) -> List[Tuple[str, Tuple[int, ...]]]:
    p = f"model.layers.{layer}."
    kv = KV_HEADS * HEAD_DIM
    return [
        (p + "input_layernorm.weight", (HIDDEN,)),
        (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
        (p + "self_attn.k_proj.weight", (kv, HIDDEN)),
        (p + "self_attn.v_proj.weight", (kv, HIDDEN)),
        (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
        (p + "post_attention_layernorm.weight", (HIDDEN,)),
        (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
        (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
        (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
    ]


def per_layer_params() -> int:
    return sum(math.prod(s) for _, s in layer_shapes(0))


def layers_for(params: float) -> int:
    """Layer count whose total parameter count is closest to ``params`` (>= 1)."""
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    return max(1, round((params - fixed) / per_layer_params()))


def all_shapes(layers: int) -> List[Tuple[str, Tuple[int, ...]]]:
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for layer in range(layers):
        shapes += layer_shapes(layer)
    shapes += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return shapes


def make_tensors(
    name: str, shape: Tuple[int, ...], seed: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(W_pre, W_ft)`` in bf16 for one tensor, deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    if len(shape) == 1:  # RMSNorm weights: near 1, fine-tune nudges them a little
        pre = 1.0 + 0.05 * torch.randn(shape, generator=gen)
        ft = pre + 2e-3 * torch.randn(shape, generator=gen)
        return pre.bfloat16(), ft.bfloat16()
    rows, cols = shape
    row_scale = torch.exp(0.3 * torch.randn(rows, 1, generator=gen))
    pre = torch.randn(shape, generator=gen).mul_(0.02).mul_(row_scale)
    rank = 16
    update = (torch.randn(rows, rank, generator=gen) * 3e-3) @ (
        torch.randn(rank, cols, generator=gen) * (0.1 / math.sqrt(rank))
    )
    update.add_(torch.randn(shape, generator=gen), alpha=1e-4)
    sparse = torch.rand(shape, generator=gen) < 0.005
    update.add_(sparse * torch.randn(shape, generator=gen) * 2e-3)
    ft = pre + update
    return pre.bfloat16(), ft.bfloat16()


def config_json(layers: int) -> Dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": layers,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def _shards(
    shapes: List[Tuple[str, Tuple[int, ...]]], shard_bytes: int
) -> Iterator[List[Tuple[int, str, Tuple[int, ...]]]]:
    current: List[Tuple[int, str, Tuple[int, ...]]] = []
    size = 0
    for index, (name, shape) in enumerate(shapes):
        nbytes = 2 * math.prod(shape)
        if current and size + nbytes > shard_bytes:
            yield current
            current, size = [], 0
        current.append((index, name, shape))
        size += nbytes
    if current:
        yield current


def write_pair(
    out: Path, params: float = 1e9, shard_gb: float = 1.0, seed: int = 0
) -> Tuple[Path, Path]:
    """Write ``out/base`` and ``out/finetuned``; return both folders.

    Args:
        out (`Path`): destination folder (created).
        params (`float`, defaults to 1e9): target parameter count.
        shard_gb (`float`, defaults to 1.0): shard size in GB.
        seed (`int`, defaults to 0): base seed; tensor i uses ``seed * 100003 + i``.
    """
    layers = layers_for(params)
    shapes = all_shapes(layers)
    base_dir, ft_dir = out / "base", out / "finetuned"
    groups = list(_shards(shapes, int(shard_gb * 1e9)))
    total = sum(math.prod(s) for _, s in shapes)
    maps: Dict[Path, Dict[str, str]] = {base_dir: {}, ft_dir: {}}
    for folder in (base_dir, ft_dir):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config_json(layers), indent=2))
    with Progress() as progress:
        task = progress.add_task(f"{total / 1e9:.2f}B params, {layers} layers", total=total)
        for number, group in enumerate(groups, 1):
            fname = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
            base_part, ft_part = {}, {}
            for index, name, shape in group:
                pre, ft = make_tensors(name, shape, seed * 100003 + index)
                base_part[name], ft_part[name] = pre, ft
                maps[base_dir][name] = maps[ft_dir][name] = fname
                progress.advance(task, math.prod(shape))
            save_file(base_part, str(base_dir / fname), metadata={"format": "pt"})
            save_file(ft_part, str(ft_dir / fname), metadata={"format": "pt"})
            del base_part, ft_part
    for folder in (base_dir, ft_dir):
        index = {"metadata": {"total_size": 2 * total}, "weight_map": maps[folder]}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return base_dir, ft_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--params", type=float, default=1e9)
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base, ft = write_pair(args.out, args.params, args.shard_gb, args.seed)
    print(f"wrote {base} and {ft}")


if __name__ == "__main__":
    main()
