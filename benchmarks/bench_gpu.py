"""The GPU run, as one short script (`make bench-gpu`): correctness, kernel scaling, end to end.

0. ``tests/test_cuda.py``: the kernel and ``mergekit-yaml --cuda`` equal the CPU
   reference bit for bit (stops here if not).
1. ``bench_kernel.py --device cuda``: the selection and the whole kernel against
   torch.topk / torch.argsort on the GPU, 4M ... 525M elements.
2. A synthetic Llama-shaped pair of ``--params`` (default 0.5B, so the run stays
   within a few minutes) and ``bench_e2e.py --cuda``: task_arithmetic, ties,
   dare_linear and fapm through ``mergekit-yaml --cuda``, interleaved, ``--reps``.

Results (JSON, PNG) go to benchmarks/results/ with the GPU's name inside. Refuses to
run without a CUDA device rather than report CPU figures as GPU ones.

Usage::

    python benchmarks/bench_gpu.py [--params 5e8] [--reps 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def step(title: str, cmd: list) -> None:
    print(f"== {title}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"== {title} done in {time.perf_counter() - start:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=5e8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--data", type=Path, default=HERE / "data")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device; run benchmarks/bench_kernel.py for CPU figures")
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    py = sys.executable
    # Correctness first: CUDA results must equal the CPU reference bit for bit.
    step("cuda tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(HERE.parent / "tests" / "test_cuda.py")])
    step("kernel", [py, str(HERE / "bench_kernel.py"), "--device", "cuda", "--reps", "3",
                    "--argsort-max", "6e8", "--peers-max", "6e8"])
    pair = args.data / f"pair-{args.params / 1e9:g}b"
    if not (pair / "base" / "config.json").exists():
        step("pair", [py, str(HERE / "make_pair.py"), str(pair), "--params", str(args.params)])
    step("end to end", [py, str(HERE / "bench_e2e.py"), "--pair", str(pair), "--cuda",
                        "--reps", str(args.reps), "--no-authors"])


if __name__ == "__main__":
    main()
