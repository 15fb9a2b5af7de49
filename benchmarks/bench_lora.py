"""LoRA: the native ``fapm_lora`` path vs mergekit's ``BASE+ADAPTER`` path, end to end.

Both run the real ``mergekit-yaml`` on the same Llama-shaped base (bf16, default
~1.1B parameters, written by ``make_pair.py`` when missing) and the same rank-16
adapter on every linear layer (q/k/v/o/gate/up/down), generated here directly as
safetensors with peft's key names and a config written by peft's ``LoraConfig``
(instantiating a 1B model just to make random factors would dominate the run).
Measured per path, each in its own process: wall time, CPU time (user+sys), peak
RSS (``wait4``), and
bytes written (output folder + the merged copy in ``--lora-merge-cache``). Runs
alternate between the paths; medians are reported. Both outputs are compared
tensor by tensor at the end (they must be bit-identical).

Each ``base+adapter`` run is followed by the same command with the merged copy
left in the cache (``cached``): mergekit then skips transformers+peft and runs
FAPM on base + merged copy. That is the work both paths share (start-up, reading
the base, the FAPM kernel, writing the output) plus one read of the copy, so
``base+adapter - cached`` is all the native path can save. Since
``native <= 0.5 * base+adapter`` means ``native <= base+adapter - native``, the
report says whether the shared work alone already exceeds half of ``base+adapter``
(then no native path inside ``mergekit-yaml`` can reach 0.5x on this machine).

Usage::

    python benchmarks/bench_lora.py --base benchmarks/data/pair-1b/base --reps 1
    python benchmarks/bench_lora.py ... --mergekit-args "--out-shard-size 100M"
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
from pathlib import Path
from typing import Dict, List

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_e2e import BIN, machine, timed  # noqa: E402  (one timer for all benchmarks)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, rank: int = 16, alpha: int = 32, seed: int = 0) -> Path:
    """A rank-``rank`` LoRA on every linear layer of ``base``, bf16 safetensors."""
    from peft import LoraConfig

    from fapm_merge.io.lora_adapter import base_checkpoint_layout

    out.mkdir(parents=True, exist_ok=True)
    shapes, _ = base_checkpoint_layout(base)
    gen = torch.Generator().manual_seed(seed)
    tensors: Dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        module = name.rsplit(".", 1)[0]
        if not name.endswith(".weight") or module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        rows, cols = shape
        prefix = f"base_model.model.{module}"
        # A as peft initialises it (kaiming-uniform scale), B as after training: small.
        tensors[f"{prefix}.lora_A.weight"] = (
            (torch.rand(rank, cols, generator=gen) * 2 - 1) / cols**0.5
        ).bfloat16()
        tensors[f"{prefix}.lora_B.weight"] = (
            torch.randn(rows, rank, generator=gen) * 2e-3
        ).bfloat16()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS).save_pretrained(str(out))
    return out


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def recipes(base: Path, adapter: Path) -> Dict[str, Dict]:
    return {
        "native": {
            "merge_method": "fapm_lora",
            "base_model": str(base),
            "models": [{"model": str(base)}],
            "parameters": {"adapter": str(adapter), "sparsity": 0.1},
            "dtype": "bfloat16",
        },
        "base+adapter": {
            "merge_method": "fapm",
            "base_model": str(base),
            "models": [{"model": f"{base}+{adapter}", "parameters": {"sparsity": 0.1}}],
            "dtype": "bfloat16",
        },
    }


def same_outputs(a: Path, b: Path) -> bool:
    from fapm_merge.io.checkpoint import read_tensor, safetensors_index

    ia, ib = safetensors_index(a), safetensors_index(b)
    if set(ia) != set(ib):
        return False
    return all(torch.equal(read_tensor(ia[n], n), read_tensor(ib[n], n)) for n in ia)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=HERE / "data" / "pair-1b" / "base")
    parser.add_argument("--work", type=Path, default=HERE / "data" / "lora-work")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "lora.json")
    parser.add_argument("--mergekit-args", default="",
                        help="extra mergekit-yaml options for both paths, e.g. '--out-shard-size 100M'")
    args = parser.parse_args()

    base = args.base.resolve()
    if not (base / "config.json").exists():
        from make_pair import write_pair

        base, _ = write_pair(base.parent)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    adapter = make_adapter(base, work / "adapter", rank=args.rank)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    paths = ["native", "base+adapter"]
    results: Dict[str, List[Dict[str, float]]] = {"native": [], "base+adapter": [], "cached": []}

    def run(path: str, recipe: Path, out: Path, cache: Path, cache_before: int) -> None:
        cmd = [str(BIN / "mergekit-yaml"), str(recipe), str(out), "--no-copy-tokenizer",
               "--lora-merge-cache", str(cache), *args.mergekit_args.split()]
        # CPU seconds too: on a shared machine wall time mostly measures the
        # neighbours; user+sys of the child does not (RUSAGE_CHILDREN counts
        # children once they are waited for, as timed() does).
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        load_before = os.getloadavg()  # a shared machine: say how busy it was
        row = timed(cmd, env)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        row["load_before"], row["load_after"] = load_before[0], os.getloadavg()[0]
        row["cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        row["merged_copy_gb"] = (du(cache) - cache_before) / 1e9
        row["written_gb"] = du(out) / 1e9 + row["merged_copy_gb"]
        results[path].append(row)
        print(path, json.dumps(row), flush=True)

    for rep in range(args.reps):
        for path in paths if rep % 2 == 0 else paths[::-1]:
            out, cache = work / f"out-{path}", work / f"cache-{path}"
            for folder in (out, cache):
                shutil.rmtree(folder, ignore_errors=True)
            recipe = work / f"{path}.yml"
            recipe.write_text(yaml.safe_dump(recipes(base, adapter)[path], sort_keys=False))
            run(path, recipe, out, cache, 0)
            if path == "base+adapter":  # again, with the merged copy already cached
                cached_out = work / "out-cached"
                shutil.rmtree(cached_out, ignore_errors=True)
                run("cached", recipe, cached_out, cache, du(cache))
    identical = same_outputs(work / "out-native", work / "out-base+adapter")
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
        adapter_params = sum(handle.get_slice(k).get_shape()[0] * handle.get_slice(k).get_shape()[1]
                             for k in handle.keys())
    params = json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2
    medians = {
        path: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        for path, rows in results.items()
    }
    report = {
        "machine": machine(),
        "base_params": params,
        "adapter_params": adapter_params,
        "rank": args.rank,
        "reps": args.reps,
        "mergekit_args": args.mergekit_args,
        "medians": medians,
        "runs": results,
        "time_ratio": medians["native"]["wall_s"] / medians["base+adapter"]["wall_s"],
        "cpu_ratio": medians["native"]["cpu_s"] / medians["base+adapter"]["cpu_s"],
        "rss_ratio": medians["native"]["peak_rss_gb"] / medians["base+adapter"]["peak_rss_gb"],
        # What native can save at most, and whether the shared work leaves room for 0.5x.
        "avoidable_s": medians["base+adapter"]["wall_s"] - medians["cached"]["wall_s"],
        "shared_over_half_base_adapter": medians["cached"]["wall_s"] / (0.5 * medians["base+adapter"]["wall_s"]),
        "outputs_identical": identical,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
