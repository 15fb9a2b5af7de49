"""Kernel scaling: the FAPM selection alone, 4M ... 525M elements, against torch.

For each size (Llama shapes: 2048x2048, 4096x4096, 4096x14336, 32000x4096,
128256x4096) a float32 score tensor with FAPM's real distribution (scores of a
bf16-like pair: ``W_pre ~ N(0, 0.02)``, ``dW ~ N(0, 3e-4)``) is built, and these are
timed (best of ``--reps``, interleaved) at keep share 0.1:

* ``fapm threshold``: ``core.find_threshold`` (exact k-th value and tie split);
* ``fapm select``: threshold plus the whole bool keep mask (``core.keep_mask``);
* ``fapm merge``: the whole kernel from bf16 ``W_pre``/``W_ft`` to the bf16 output
  (mean, scores, selection, where) as mergekit calls it;
* ``torch.kthvalue`` (value only), ``torch.topk(k)``, ``torch.argsort`` (what the
  authors' script and mergekit's ties do). argsort needs ~16+ bytes per element and
  is run only up to ``--argsort-max`` elements; beyond, its time is extrapolated as
  ``n log n`` from the largest measured size (marked "extrap." in the table).

Times are wall seconds and CPU seconds of this process (``process_time``). On a
shared machine the CPU time with ``--threads 1`` is the robust figure: it leaves
out the time other processes hold the cores; the table ranks by it.

Thread scaling: ``--threads 1 2 4 8`` repeats ``fapm merge`` (and the baseline)
at each torch thread count; beyond 1 thread the wall time is what counts (the CPU
time then also holds whatever the threads spend waiting). Counts above the
machine's cores oversubscribe it on purpose: that is what a busy machine does to
a kernel. ``--baseline benchmarks/kernel_baseline.py`` adds ``fapm merge (baseline)``:
the same call through another copy of the kernel module (here, the kernel before
issue 15), timed side by side.

Peak extra memory of each operation is measured on Linux by resetting the process's
peak RSS (``/proc/self/clear_refs``) before it and reading ``VmHWM`` after it, minus
the RSS before it: bytes per element beyond the inputs.

Usage::

    python benchmarks/bench_kernel.py                # CPU, all sizes
    python benchmarks/bench_kernel.py --threads 1 2 4 8 --baseline benchmarks/kernel_baseline.py
    python benchmarks/bench_kernel.py --device cuda  # GPU (times use synchronize)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from fapm_merge import core  # noqa: E402

SHAPES = [(2048, 2048), (4096, 4096), (4096, 14336), (32000, 4096), (128256, 4096)]
DENSITY = 0.1


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(fn: Callable[[], object], device: torch.device) -> Dict[str, float]:
    """Seconds and peak extra memory (bytes) of one call of ``fn``."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        before = _status_kb("VmRSS") * 1024
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _status_kb("VmHWM") * 1024 - before
    del result
    return {"s": seconds, "cpu_s": cpu, "extra_bytes": max(0, peak)}


def make_inputs(rows: int, cols: int, device: torch.device, seed: int = 0):
    """bf16 ``W_pre``/``W_ft`` and their float32 FAPM scores, built in chunks."""
    numel = rows * cols
    gen = torch.Generator(device=device).manual_seed(seed)
    pre = torch.empty(numel, dtype=torch.bfloat16, device=device)
    ft = torch.empty_like(pre)
    step = 1 << 24
    for start in range(0, numel, step):
        end = min(start + step, numel)
        p = torch.randn(end - start, generator=gen, device=device).mul_(0.02)
        d = torch.randn(end - start, generator=gen, device=device).mul_(3e-4)
        pre[start:end] = p
        ft[start:end] = p.add_(d)
    pre, ft = pre.view(rows, cols), ft.view(rows, cols)
    scores = core.fapm_scores(pre, ft).values
    return pre, ft, scores


def load_baseline(path: Optional[Path]):
    """The kernel module at ``path`` (e.g. a frozen copy of an older kernel), or None."""
    if path is None:
        return None
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_kernel", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> Dict:
    device = torch.device(args.device)
    console = Console()
    baseline = load_baseline(args.baseline)
    rows_out: List[Dict] = []
    shapes = [s for s in SHAPES if s[0] * s[1] <= args.max_elements]
    thread_counts = args.threads or [torch.get_num_threads()]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("kernel sizes", total=len(shapes) * len(thread_counts))
        for rows, cols in shapes:
            numel = rows * cols
            progress.update(task, description=f"{rows}x{cols}")
            pre, ft, scores = make_inputs(rows, cols, device)
            k = core.keep_count(numel, density=DENSITY)
            ops: Dict[str, Callable[[], object]] = {
                "fapm threshold": lambda: core.find_threshold(scores, k),
                "fapm select": lambda: core.keep_mask(scores, core.find_threshold(scores, k)),
                "fapm merge": lambda: core.fapm_merge(pre, [ft], keep_counts=[k]),
                "torch.kthvalue": lambda: torch.kthvalue(scores, numel - k + 1)
                if device.type == "cpu" else torch.kthvalue(scores.cpu(), numel - k + 1),
                "torch.topk": lambda: torch.topk(scores, k, sorted=False),
                "torch.argsort": lambda: torch.argsort(scores, descending=True),
            }
            if baseline is not None:
                ops["fapm merge (baseline)"] = lambda: baseline.fapm_merge(pre, [ft], keep_counts=[k])
            if args.ops:
                ops = {name: fn for name, fn in ops.items() if name in args.ops}
            if device.type == "cuda":
                # kthvalue has no CUDA kernel in some builds; topk is the GPU peer
                ops.pop("torch.kthvalue")
            if numel > args.argsort_max:
                ops.pop("torch.argsort", None)
            if numel > args.peers_max:
                ops.pop("torch.topk", None)
                ops.pop("torch.kthvalue", None)
            for number, threads in enumerate(thread_counts):
                torch.set_num_threads(threads)
                # the whole table at the first count; the merges alone at the others
                now = ops if number == 0 else {n: f for n, f in ops.items() if "merge" in n}
                best: Dict[str, Dict[str, float]] = {}
                # cuda: GPU time; one CPU thread: CPU time; several: wall time
                key = "s" if device.type == "cuda" or threads > 1 else "cpu_s"
                for _ in range(args.reps if numel <= 1 << 27 else max(1, args.reps - 1)):
                    for name, fn in now.items():
                        got = measure(fn, device)
                        if name not in best or got[key] < best[name][key]:
                            best[name] = {**got, "extra_bytes": max(
                                got["extra_bytes"], best.get(name, {}).get("extra_bytes", 0))}
                for name, got in best.items():
                    rows_out.append({"shape": [rows, cols], "numel": numel, "op": name,
                                     "threads": threads, "wall_s": got["s"], "cpu_s": got["cpu_s"],
                                     "s": got[key], "ns_per_elem": got[key] / numel * 1e9,
                                     "extra_bytes_per_elem": got["extra_bytes"] / numel,
                                     "load_avg": os.getloadavg()})
                progress.advance(task)
            del pre, ft, scores
            gc.collect()
    # argsort beyond what was measured: n log n from the largest measured size
    measured = [r for r in rows_out if r["op"] == "torch.argsort"]
    if measured:
        ref = max(measured, key=lambda r: r["numel"])
        for rows, cols in shapes:
            numel = rows * cols
            if numel > ref["numel"]:
                s = ref["s"] * numel * math.log(numel) / (ref["numel"] * math.log(ref["numel"]))
                rows_out.append({"shape": [rows, cols], "numel": numel, "op": "torch.argsort",
                                 "threads": ref["threads"], "s": s, "ns_per_elem": s / numel * 1e9,
                                 "extra_bytes_per_elem": ref["extra_bytes_per_elem"],
                                 "extrapolated": True})
    return {"device": str(device), "device_name": device_name(device), "threads":
            thread_counts, "torch": torch.__version__, "density": DENSITY,
            "load_avg": os.getloadavg(), "rows": rows_out}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    return "cpu"


def show(report: Dict) -> None:
    console = Console(width=150)  # a readable table in logs and pipes too
    table = Table(title=f"selection kernel on {report['device_name']}, keep {DENSITY:.0%}, "
                        f"torch threads {report['threads']}, load average at the end "
                        f"{', '.join(f'{x:.1f}' for x in report['load_avg'])}")
    gpu = report["device"].startswith("cuda")
    for col in ("shape", "elements", "operation", "threads", "GPU s" if gpu else "CPU s",
                "wall s", "ns/elem", "extra B/elem", "vs fapm select"):
        table.add_column(col, justify="right")
    by_size: Dict[int, List[Dict]] = {}
    for row in report["rows"]:
        by_size.setdefault(row["numel"], []).append(row)
    for numel, rows in sorted(by_size.items()):
        ours = next((r for r in rows if r["op"] == "fapm select"), None)
        for row in sorted(rows, key=lambda r: (r.get("threads", 1), r["op"])):
            ratio = (f"{row['s'] / ours['s']:.1f}x" if ours and row["op"] != "fapm select"
                     and row.get("threads") == ours.get("threads") else "")
            table.add_row(
                "x".join(map(str, row["shape"])), f"{numel / 1e6:.1f}M", row["op"],
                str(row.get("threads", "")),
                f"{row.get('cpu_s', row['s']):.3f}" + (" extrap." if row.get("extrapolated") else ""),
                f"{row.get('wall_s', float('nan')):.3f}",
                f"{row['ns_per_elem']:.1f}" + (" wall" if row.get("threads", 1) > 1 and not gpu else ""),
                f"{row['extra_bytes_per_elem']:.2f}", ratio,
            )
        table.add_section()
    console.print(table)


def plot(report: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    first = report["rows"][0].get("threads", 1) if report["rows"] else 1
    series = sorted({(r["op"], r.get("threads", first)) for r in report["rows"]
                     if r.get("threads", first) == first or "merge" in r["op"]})
    for op, threads in series:
        rows = sorted((r for r in report["rows"] if r["op"] == op
                       and r.get("threads", first) == threads), key=lambda r: r["numel"])
        xs = [r["numel"] for r in rows]
        style = "-o" if op.startswith("fapm") else "--s"
        label = op if threads == first else f"{op}, {threads} threads (wall)"
        axes[0].plot(xs, [r["ns_per_elem"] for r in rows], style, label=label)
        axes[1].plot(xs, [r["extra_bytes_per_elem"] for r in rows], style, label=label)
        extrap = [r for r in rows if r.get("extrapolated")]
        if extrap:
            axes[0].plot([r["numel"] for r in extrap], [r["ns_per_elem"] for r in extrap],
                         "x", color="black", label="argsort (extrapolated)")
    for ax, label in ((axes[0], "ns per element"), (axes[1], "extra bytes per element")):
        ax.set_xscale("log")
        ax.set_xlabel("elements")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"FAPM selection vs torch, {report['device_name']}, keep {DENSITY:.0%}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch thread counts to run, e.g. 1 2 4 8 (default: torch's)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another kernel module file to time side by side, "
                             "e.g. benchmarks/kernel_baseline.py")
    parser.add_argument("--max-elements", type=float, default=6e8)
    parser.add_argument("--argsort-max", type=float, default=6e7,
                        help="largest size argsort runs at (it needs ~16+ B/elem)")
    parser.add_argument("--peers-max", type=float, default=1.4e8,
                        help="largest size topk/kthvalue run at (kthvalue: ~12 B/elem)")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--ops", nargs="+", default=None, help="only these operations")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args()
    report = run(args)
    show(report)
    args.results.mkdir(parents=True, exist_ok=True)
    tag = "kernel-" + torch.device(args.device).type + args.tag
    (args.results / f"{tag}.json").write_text(json.dumps(report, indent=2))
    plot(report, args.results / f"{tag}.png")
    print(f"wrote {args.results / (tag + '.json')} and .png")


if __name__ == "__main__":
    main()
