"""The authors' approach to FAPM, as a baseline: both models whole in memory, argsort.

This follows what the reference script of the paper (secretflow/ACoLab,
PaperCode/FAPM) does, as we read it: load every tensor of
both checkpoints, compute in bfloat16 ``dW``, ``m = mean(|W_pre|)``,
``S = |dW| - m*|dW|/|W_pre|``, ``argsort`` the whole flattened score descending,
keep the first ``int(numel * (1 - sparsity))`` entries, write ``W_pre + mask*dW``
as a pickled state dict. The loader here is plain ``safetensors.load_file`` (the
script loads through transformers, which is slower, so this baseline is, if
anything, flattering). It is a benchmark baseline only; it has the reference
script's known defects (NaN for 0/0, arbitrary ties, float keep count).

Usage::

    python benchmarks/authors_fapm.py BASE_DIR FT_DIR OUT_FILE [--sparsity 0.9]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_all(folder: Path) -> dict:
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state


@torch.no_grad()
def authors_fapm(base: dict, finetuned: dict, sparsity: float = 0.9) -> dict:
    """Prune every tensor's task vector as the reference script does (in place)."""
    for name, pre in base.items():
        delta = finetuned[name] - pre
        m = pre.abs().mean()
        score = delta.abs() - m * delta.abs() / pre.abs()
        order = torch.argsort(score.flatten(), descending=True)
        keep = int(pre.numel() * (1 - sparsity))
        mask = torch.zeros(pre.numel(), dtype=pre.dtype)
        mask[order[:keep]] = 1
        base[name] = pre + mask.view(pre.shape) * delta
        del order, mask, score, delta
        finetuned[name] = None
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("finetuned", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    base, finetuned = load_all(args.base), load_all(args.finetuned)
    merged = authors_fapm(base, finetuned, args.sparsity)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(merged, args.out)


if __name__ == "__main__":
    main()
