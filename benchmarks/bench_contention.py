"""A busy machine: each method's ``mergekit-yaml`` time, and ``fapm-merge eval``'s, with and without CPU-bound neighbours.

Users merge and evaluate on workstations that are training something else. This
runs task_arithmetic, fapm and fapm_lora through the real ``mergekit-yaml`` on the
same pair, and ``fapm-merge eval`` on the demo pair's base model (the demo's text
and task) and on the pair's base model (a short text and task, byte tokens), each
quiet and then busy, interleaved (the order rotates every repetition), and prints
each slowdown (busy / quiet, medians) and fapm's and eval's slowdown relative to
task_arithmetic's. Targets: fapm's (issue 15) and eval's (issue 22) slowdown at
most 1.3x task_arithmetic's, and no run more than 4x its quiet time. Beside them, the
fair-share reference (:data:`PARALLEL_COMPUTE`, plain torch matmuls on every core):
eval's slowdown over that job's says whether eval loses more than its fair share
(``mergekit-yaml`` mostly runs one thread, so its slowdown is smaller by nature).

The neighbours: ``--neighbours`` processes (default: one per core) that busy-loop
in pure Python, started right before a busy run and killed right after it. Where
they run matters on Linux with autogroup scheduling (``/proc/sys/kernel/
sched_autogroup_enabled`` 1, as on most desktops and many servers): the CPU is
shared fairly between *sessions* first. ``busy`` starts them in this script's session
(a job started from the same shell: the issue's ``python -c 'while 1: pass' &``);
``busy-other-session`` in sessions of their own (``setsid``: another user's job, a
service), where each session gets an equal share whatever its thread count, so a
command that computes on every core when quiet (eval) loses more than one that
mostly runs one thread (``mergekit-yaml``). ``--sessions`` picks which are run
(both by default); the targets are judged on ``busy``, the other is printed beside. Each
stops by itself at a deadline (``--neighbour-limit`` seconds) or as soon as this
script is gone, and they are killed in ``finally`` (Ctrl-C included), so no
spinning process outlives the benchmark.

Every run records the load average before and after it: the machine may be
shared, and a high quiet-run load makes the quiet times (and so the slowdowns)
less telling.

Usage::

    python benchmarks/make_pair.py benchmarks/data/pair-034b --params 0.34e9
    python benchmarks/bench_contention.py --pair benchmarks/data/pair-034b --reps 2
    # (writes the demo pair and its eval data into benchmarks/data/demo first, ~3 min)
    # side by side with an older version's fapm:
    git archive b9aa636 | tar -x -C /tmp/before
    python benchmarks/bench_contention.py ... --baseline-src /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import yaml

HERE = Path(__file__).resolve().parent
OTHER = "busy-other-session"  # the neighbours' state when each has a session of its own
sys.path.insert(0, str(HERE))
from bench_e2e import BIN, machine, timed  # noqa: E402  (one timer for all benchmarks)
from bench_lora import make_adapter  # noqa: E402

# A neighbour: spin until the deadline, or until the parent (this script) is gone.
NEIGHBOUR = """
import os, sys, time
deadline, parent = float(sys.argv[1]), int(sys.argv[2])
x = 0
while True:
    for _ in range(200000):
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
    if time.time() > deadline or os.getppid() != parent:
        break
"""


class Neighbours:
    """``count`` busy processes, each in its own process group, for a ``with`` block."""

    def __init__(self, count: int, limit_s: float, own_session: bool = False):
        self.count, self.limit_s, self.own_session = count, limit_s, own_session
        self.procs: List[subprocess.Popen] = []

    def __enter__(self) -> "Neighbours":
        deadline = time.time() + self.limit_s
        for _ in range(self.count):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-c", NEIGHBOUR, str(deadline), str(os.getpid())],
                # a group of its own (killpg reaches it and only it), in a session of
                # its own only when asked (autogroup: see the module docstring)
                **({"start_new_session": True} if self.own_session else {"process_group": 0}),
            ))
        time.sleep(0.5)  # let them reach the busy loop
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # already stopped at its deadline
            proc.wait()
        self.procs.clear()


def recipes(base: Path, finetuned: Path, adapter: Path) -> Dict[str, Dict]:
    common = {"base_model": str(base), "dtype": "bfloat16"}
    return {
        "task_arithmetic": {**common, "merge_method": "task_arithmetic",
                            "models": [{"model": str(finetuned), "parameters": {"weight": 1.0}}]},
        "fapm": {**common, "merge_method": "fapm",
                 "models": [{"model": str(finetuned), "parameters": {"sparsity": 0.9}}]},
        "fapm_lora": {**common, "merge_method": "fapm_lora", "models": [{"model": str(base)}],
                      "parameters": {"adapter": str(adapter), "sparsity": 0.1}},
    }


PARALLEL_COMPUTE = "parallel_compute"
"""The fair-share reference: fixed torch work (float32 matmuls) on all torch's threads,
nothing else. Its busy slowdown is what fair scheduling gives any command that
computes on every core when quiet; a parallel evaluation cannot do better without
taking more than its share (more threads than cores)."""

PARALLEL_COMPUTE_CODE = """
import torch
a = torch.randn(1024, 1024)
for _ in range(400):
    a = torch.tanh(a @ a / 32)
"""

EVALS = ("eval_demo", "eval_pair")
"""The ``fapm-merge eval`` runs: the demo pair's base model on the demo's text and
task, and the pair's base model on the demo's first text tokens and task items."""

PAIR_TEXT_TOKENS, PAIR_BATCH, PAIR_ITEMS = 1024, 2, 16
"""The pair's eval: 4 batches of 2 windows of 256 byte tokens and 16 task items,
~20 s quiet on 2 cores (several batches, so the forward passes can be shared out)."""


def demo_eval_inputs(folder: Path) -> Dict[str, Path]:
    """The demo pair and its text and task in ``folder``, written once (~3 min)."""
    text, task = folder / "eval" / "general.txt", folder / "eval" / "task.jsonl"
    if not task.exists():
        subprocess.run([str(BIN / "fapm-merge"), "demo", str(folder)], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "fapm_merge.workflows.demo", "demo-data", str(folder)],
                       check=True, stdout=subprocess.DEVNULL)
    return {"model": folder / "models" / "base", "text": text, "task": task}


def eval_commands(demo: Dict[str, Path], pair_base: Path, work: Path) -> Dict[str, List[str]]:
    """``fapm-merge eval`` command lines; each writes into ``work/out`` (cleared before a run)."""
    eval_bin = str(BIN / "fapm-merge")
    pair_task = work / "pair-task.jsonl"
    pair_task.write_text("".join(demo["task"].read_text().splitlines(keepends=True)[:PAIR_ITEMS]))
    return {
        "eval_demo": [eval_bin, "eval", str(demo["model"]), "--text", str(demo["text"]),
                      "--task", str(demo["task"]), "--out", str(work / "out" / "demo.jsonl")],
        "eval_pair": [eval_bin, "eval", str(pair_base), "--tokenizer", "bytes",
                      "--text", str(demo["text"]), "--max-tokens", str(PAIR_TEXT_TOKENS),
                      "--batch-size", str(PAIR_BATCH), "--task", str(pair_task),
                      "--out", str(work / "out" / "pair.jsonl")],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", type=Path, default=HERE / "data" / "pair-034b")
    parser.add_argument("--params", type=float, default=0.34e9,
                        help="size of the pair written when --pair is missing")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--methods", nargs="+",
                        default=["task_arithmetic", "fapm", "fapm_lora", *EVALS, PARALLEL_COMPUTE])
    parser.add_argument("--demo", type=Path, default=HERE / "data" / "demo",
                        help="the demo pair and its eval data (written when missing)")
    parser.add_argument("--neighbours", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--sessions", choices=("same", "other", "both"), default="both",
                        help="where the neighbours run: this session (busy), sessions of "
                             "their own (busy-other-session), or both")
    parser.add_argument("--neighbour-limit", type=float, default=300.0,
                        help="seconds after which a neighbour stops by itself")
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="a source tree of another fapm-merge version (e.g. from "
                             "`git archive`): adds 'fapm (baseline)' and 'eval_... (baseline)', "
                             "the same commands run with that tree first on PYTHONPATH")
    parser.add_argument("--work", type=Path, default=HERE / "data" / "contention-work")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "contention.json")
    args = parser.parse_args()

    pair = args.pair.resolve()
    if not (pair / "base" / "config.json").exists():
        from make_pair import write_pair

        write_pair(pair, params=args.params)
    base, finetuned = pair / "base", pair / "finetuned"
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    adapter = make_adapter(base, work / "adapter")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    commands = {}
    for method, recipe in recipes(base, finetuned, adapter).items():
        if method in args.methods:
            path = work / f"{method}.yml"
            path.write_text(yaml.safe_dump(recipe, sort_keys=False))
            commands[method] = [str(BIN / "mergekit-yaml"), str(path), str(work / "out"),
                                "--no-copy-tokenizer"]
    wanted_evals = [name for name in EVALS if name in args.methods]
    if wanted_evals:
        evals = eval_commands(demo_eval_inputs(args.demo.resolve()), base, work)
        commands.update({name: evals[name] for name in wanted_evals})
    if PARALLEL_COMPUTE in args.methods:
        commands[PARALLEL_COMPUTE] = [sys.executable, "-c", PARALLEL_COMPUTE_CODE]
    envs = {method: env for method in commands}
    if args.baseline_src:
        for name in ("fapm", *EVALS):
            if name in commands:
                commands[f"{name} (baseline)"] = commands[name]
                envs[f"{name} (baseline)"] = {**env, "PYTHONPATH": str(args.baseline_src.resolve())}
    states = ["quiet"] + {"same": ["busy"], "other": [OTHER], "both": ["busy", OTHER]}[args.sessions]
    runs: Dict[str, Dict[str, List[Dict]]] = {m: {state: [] for state in states} for m in commands}
    started = time.perf_counter()
    names = list(commands)
    for rep in range(args.reps):
        for method in names[rep % len(names):] + names[: rep % len(names)]:
            for state in states:
                shutil.rmtree(work / "out", ignore_errors=True)
                (work / "out").mkdir()
                load_before = os.getloadavg()
                if state != "quiet":
                    with Neighbours(args.neighbours, args.neighbour_limit, own_session=state == OTHER):
                        row = timed(commands[method], envs[method])
                else:
                    row = timed(commands[method], envs[method])
                row.update(load_before=load_before, load_after=os.getloadavg())
                runs[method][state].append(row)
                print(f"rep {rep + 1}/{args.reps} {method:21s} {state:18s} {row['wall_s']:7.1f} s"
                      f"  load {load_before[0]:.1f} -> {row['load_after'][0]:.1f}", flush=True)
    shutil.rmtree(work / "out", ignore_errors=True)

    summary = {}
    for method, by_state in runs.items():
        quiet = statistics.median(r["wall_s"] for r in by_state["quiet"])
        summary[method] = {"quiet_s": quiet,
                           "quiet_load_1min": [r["load_before"][0] for r in by_state["quiet"]]}
        for state in states[1:]:
            busy = statistics.median(r["wall_s"] for r in by_state[state])
            summary[method][state] = {
                "busy_s": busy, "slowdown": busy / quiet,
                "worst_run_over_quiet": max(r["wall_s"] for r in by_state[state]) / quiet}
    verdict: Dict[str, Dict[str, float]] = {}
    worst = 0.0
    for state in states[1:]:
        print(f"\nneighbours: {state}\n{'method':21s} {'quiet s':>8s} {'busy s':>8s} {'slowdown':>9s} "
              f"{'worst/quiet':>12s} {'/ task_arithmetic':>18s}")
        floor = summary.get("task_arithmetic", {}).get(state, {}).get("slowdown")
        for method, row in summary.items():
            busy = row[state]
            relative = busy["slowdown"] / floor if floor else float("nan")
            if method != "task_arithmetic" and floor:
                verdict.setdefault(state, {})[method] = relative
            print(f"{method:21s} {row['quiet_s']:8.1f} {busy['busy_s']:8.1f} {busy['slowdown']:8.2f}x "
                  f"{busy['worst_run_over_quiet']:11.2f}x {relative:17.2f}")
        worst = max(worst, *(row[state]["worst_run_over_quiet"] for row in summary.values()))
    if "busy" in verdict:
        print("\ntargets, neighbours in this session: slowdown / task_arithmetic's <= 1.3: "
              + ", ".join(f"{m} {v:.2f}" for m, v in verdict["busy"].items() if m != PARALLEL_COMPUTE))
    fair: Dict[str, Dict[str, float]] = {}
    for state in states[1:]:
        reference = summary.get(PARALLEL_COMPUTE, {}).get(state, {}).get("slowdown")
        if reference:
            fair[state] = {m: summary[m][state]["slowdown"] / reference for m in summary
                           if m.startswith("eval")}
            print(f"{state}: eval's slowdown / a parallel compute job's ({reference:.2f}x, its fair "
                  "share; <= 1: no worse than fair): "
                  + ", ".join(f"{m} {v:.2f}" for m, v in fair[state].items()))
    print(f"worst busy run / its quiet median: {worst:.2f}x (target <= 4)")
    print(f"total {time.perf_counter() - started:.0f} s, {args.neighbours} neighbours")
    report = {"machine": machine(), "pair": str(pair), "neighbours": args.neighbours,
              "reps": args.reps, "summary": summary, "relative_slowdown": verdict,
              "relative_to_parallel_compute": fair,
              "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
