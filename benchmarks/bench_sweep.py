"""One-pass sweep vs one mergekit-yaml run per value: wall time, and bit-identity.

    python benchmarks/bench_sweep.py [--work DIR] [--values 0.5,0.7,0.9,0.95] [--size small|medium]

Builds a Llama-shaped base/fine-tune pair locally (cached in --work), then times
(a) `mergekit-yaml` once per value and (b) one `fapm-merge sweep` over all values,
both as fresh processes (so both pay interpreter and import start-up), checks
that every sweep output equals the matching mergekit-yaml output tensor for
tensor, and prints a Markdown row for docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

SIZES = {
    # ~57M parameters: 2 x 16M embeddings + 8 layers of 3.2M
    "medium": dict(model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1376,
                   num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False),
    "small": None,  # the demo pair (~4M)
}


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fapm-bench-sweep"))
    parser.add_argument("--values", default="0.5,0.7,0.9,0.95")
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    args = parser.parse_args()

    from fapm_merge.workflows.demo import DEMO_CONFIG, save_pair

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    pair_dir = args.work / f"pair-{args.size}"
    if not (pair_dir / "finetuned" / "config.json").exists():
        print(f"building the {args.size} pair in {pair_dir}", flush=True)
        save_pair(SIZES[args.size] or DEMO_CONFIG, pair_dir)
    base, finetuned = (pair_dir / "base").resolve(), (pair_dir / "finetuned").resolve()
    params = sum(t.numel() for t in _state(base).values())
    values = [float(v) for v in args.values.split(",")]

    runs = args.work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    recipe = {"merge_method": "fapm", "base_model": str(base),
              "models": [{"model": str(finetuned), "parameters": {"sparsity": 0.9}}], "dtype": "float32"}
    (runs / "recipe.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))

    separate = 0.0
    for value in values:
        single = {**recipe, "models": [{"model": str(finetuned), "parameters": {"sparsity": value}}]}
        path = runs / f"single-{value}.yml"
        path.write_text(yaml.safe_dump(single, sort_keys=False))
        started = time.perf_counter()
        subprocess.run([_bin("mergekit-yaml"), str(path), str(runs / f"single-{value}"), "--no-copy-tokenizer"],
                       check=True, env=env, capture_output=True)
        took = time.perf_counter() - started
        separate += took
        print(f"mergekit-yaml sparsity {value}: {took:.1f} s", flush=True)

    started = time.perf_counter()
    subprocess.run([_bin("fapm-merge"), "sweep", str(runs / "recipe.yml"), str(runs / "sweep"),
                    "--sparsity", args.values, "--no-copy-tokenizer"], check=True, env=env, capture_output=True)
    swept = time.perf_counter() - started
    print(f"fapm-merge sweep ({len(values)} values): {swept:.1f} s", flush=True)

    for value in values:
        a, b = _state(runs / f"single-{value}"), _state(runs / "sweep" / f"fapm-s{value!r}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"sweep differs at {value}"
    print("every sweep output is bit-identical to its mergekit-yaml run")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print()
    print("| model | values | 4 x mergekit-yaml | fapm-merge sweep | ratio | machine |")
    print("|---|---|---|---|---|---|")
    print(f"| Llama-shaped, {params / 1e6:.0f}M params, float32 | {args.values} | {separate:.1f} s | "
          f"{swept:.1f} s | {swept / separate:.2f} | {machine} |")


def _state(folder: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(path))
    return state


if __name__ == "__main__":
    main()
