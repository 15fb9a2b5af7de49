"""End-to-end: wall time and peak RSS of the real ``mergekit-yaml`` per merge method.

Runs task_arithmetic (the floor: read two checkpoints, write one), ties at density
0.1, dare_linear at density 0.1 and fapm at sparsity 0.9 on the same pair,
interleaved (the order rotates every repetition so no method always runs on a cold
or warm page cache), plus the authors' approach (``authors_fapm.py``: both models
in memory, argsort per tensor) as a baseline. Each run is a separate process; wall
time is measured around it and peak RSS comes from ``wait4`` (the process's own
maximum resident set). Prints medians and ratios with rich, writes JSON and a PNG.

Usage::

    python benchmarks/bench_e2e.py --pair benchmarks/data/pair-1b --reps 3
    python benchmarks/bench_e2e.py --cuda ...     # adds --cuda to mergekit-yaml
    python benchmarks/bench_e2e.py ... --baseline-src /tmp/before   # + an older fapm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import yaml
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

METHODS: Dict[str, Dict] = {
    "task_arithmetic": {"weight": 1.0},
    "ties": {"weight": 1.0, "density": 0.1},
    "dare_linear": {"weight": 1.0, "density": 0.1},
    "fapm": {"sparsity": 0.9},
}


def recipe(method: str, base: Path, finetuned: Path) -> Dict:
    return {
        "merge_method": method,
        "base_model": str(base.resolve()),
        "models": [{"model": str(finetuned.resolve()), "parameters": METHODS[method]}],
        "dtype": "bfloat16",
    }


def timed(cmd: List[str], env: Dict[str, str]) -> Dict[str, float]:
    """Wall seconds and peak RSS (GB) of one child process; raises on failure."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # wait4 gives this child's own rusage (ru_maxrss in KiB on Linux).
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    # CPU seconds (user + sys) of the child too: on a shared machine they move far
    # less with the load than wall time does
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9}


def machine() -> Dict[str, str]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        ram = f"{int(mem) / 1024 ** 2:.1f} GiB"
    except OSError:
        ram = "?"
    info = {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "ram": ram,
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(args: argparse.Namespace) -> Dict:
    console = Console()
    base, finetuned = args.pair / "base", args.pair / "finetuned"
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    extra = ["--cuda"] if args.cuda else []
    methods = [m for m in args.methods if m in METHODS]
    jobs: Dict[str, List[str]] = {}
    for method in methods:
        path = work / f"{method}.yml"
        path.write_text(yaml.safe_dump(recipe(method, base, finetuned), sort_keys=False))
        jobs[method] = [
            str(BIN / "mergekit-yaml"), str(path), str(work / "out"),
            "--no-copy-tokenizer", "--random-seed", "0", *extra,
        ]
    if args.authors:
        jobs["authors_argsort"] = [
            sys.executable, str(HERE / "authors_fapm.py"), str(base), str(finetuned),
            str(work / "out" / "authors.pt"),
        ]
    envs = {name: env for name in jobs}
    if args.baseline_src and "fapm" in jobs:
        # the same fapm recipe, with another fapm-merge source tree first on the path
        jobs["fapm (baseline)"] = jobs["fapm"]
        envs["fapm (baseline)"] = {**env, "PYTHONPATH": str(args.baseline_src.resolve())}
    # Start-up alone: what every mergekit-yaml run pays before reading a tensor.
    jobs["startup_only"] = [sys.executable, "-c", "import mergekit.merge, mergekit.merge_methods"]

    results: Dict[str, List[Dict[str, float]]] = {name: [] for name in jobs}
    names = list(jobs)
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            shutil.rmtree(work / "out", ignore_errors=True)
            load_before = os.getloadavg()
            outcome = timed(jobs[name], envs.get(name, env))
            outcome.update(load_before=load_before, load_after=os.getloadavg())
            results[name].append(outcome)
            console.print(
                f"rep {rep + 1}/{args.reps} {name:16s} {outcome['wall_s']:7.1f} s "
                f"(CPU {outcome['cpu_s']:6.1f} s) {outcome['peak_rss_gb']:6.2f} GB  "
                f"load {load_before[0]:.1f} -> "
                f"{outcome['load_after'][0]:.1f}"
            )
    shutil.rmtree(work / "out", ignore_errors=True)

    summary = {
        name: {
            "wall_s": statistics.median(r["wall_s"] for r in runs),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in runs),
            "runs": runs,
        }
        for name, runs in results.items()
    }
    floor = summary.get("task_arithmetic")
    table = Table(title=f"mergekit-yaml on {args.pair.name}, median of {args.reps}")
    console.width = max(console.width, 120)
    for col in ("method", "wall s", "CPU s", "peak RSS GB", "wall / task_arith",
                "CPU / task_arith", "RSS / task_arith"):
        table.add_column(col, justify="right")
    for name, row in summary.items():
        ratios = ("", "", "")
        if floor:
            ratios = (
                f"{row['wall_s'] / floor['wall_s']:.2f}",
                f"{row['cpu_s'] / floor['cpu_s']:.2f}",
                f"{row['peak_rss_gb'] / floor['peak_rss_gb']:.2f}",
            )
        table.add_row(name, f"{row['wall_s']:.1f}", f"{row['cpu_s']:.1f}",
                      f"{row['peak_rss_gb']:.2f}", ratios[0], ratios[1], ratios[2])
    console.print(table)
    if "fapm" in summary and "ties" in summary:
        console.print(f"fapm / ties wall: {summary['fapm']['wall_s'] / summary['ties']['wall_s']:.2f}")
    return {"machine": machine(), "pair": str(args.pair), "cuda": args.cuda,
            "reps": args.reps, "summary": summary}


def plot(report: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {k: v for k, v in report["summary"].items() if k != "startup_only"}
    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "wall_s", "wall time (s)"),
                           (axes[1], "peak_rss_gb", "peak RSS (GB)")):
        values = [rows[n][key] for n in names]
        colors = ["tab:green" if n == "fapm" else "tab:gray" for n in names]
        ax.barh(names, values, color=colors)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.1f}", va="center")
        ax.set_xlabel(label)
        ax.invert_yaxis()
    startup = report["summary"].get("startup_only")
    if startup:
        axes[0].axvline(startup["wall_s"], color="tab:red", ls="--", label="start-up only")
        axes[0].legend(loc="lower right")
    fig.suptitle(f"mergekit-yaml end to end, {Path(report['pair']).name}, "
                 f"median of {report['reps']}" + (" (--cuda)" if report["cuda"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", type=Path, default=HERE / "data" / "pair-1b")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--no-authors", dest="authors", action="store_false")
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="another fapm-merge source tree (e.g. from `git archive`): "
                             "adds 'fapm (baseline)', the fapm recipe run with it first "
                             "on PYTHONPATH")
    parser.add_argument("--work", type=Path, default=HERE / "data" / "work")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    report = run(args)
    args.results.mkdir(parents=True, exist_ok=True)
    tag = "e2e-cuda" if args.cuda else "e2e"
    (args.results / f"{tag}.json").write_text(json.dumps(report, indent=2))
    plot(report, args.results / f"{tag}.png")
    print(f"wrote {args.results / (tag + '.json')} and .png")


if __name__ == "__main__":
    main()
