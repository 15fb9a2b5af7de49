"""What the repair family costs tune, and what screening saves: three tunes on the demo pair.

    python benchmarks/bench_tune_family.py [--work DIR] [--items 120] [--text-tokens 4096]
        [--min-retention 0.8] [--min-repair 0.05] [--json FILE]

Runs ``fapm-merge tune``'s own code (:func:`fapm_merge.workflows.tune.run_tune`) three
times on the same demo pair, data and rule, and prints side by side what each forwarded
and what each picked:

(a) **today's grid**: the plan before the family (FAPM at beta 1 only, the default
    baselines: magnitude pruning, WiSE-FT, LiNeS), every candidate on everything
    (``--beta 1 --no-screen``);
(b) **the family, exhaustive**: FAPM at every beta of ``FAMILY_BETAS`` and the same
    baselines, every candidate on everything (``--beta 0,0.25,0.5,1,2 --no-screen``);
(c) **the family, screened**: tune's default (screening on a share, the survivors on the
    rest).

The demo's text is cut into documents (two 64-byte lines each), because tune screens only
a text it can share by documents. The rule is looser than the default (these 120 proxy
prompts cannot resolve a 1% margin, and tune would say so and stop); the same rule for
all three. **Units**: prompts (the records hold no prompt or choice tokens) and window
tokens, of every evaluation the tune ran (anchors included; the held-out part is off).
Wall seconds are printed too, but the demo model is tiny: its evaluations are cheap
next to merging, so the seconds say little about a real model, where evaluation is the
cost. ``benchmarks/bench_screening.py`` replays (b)'s records screened, as a check that
(c) made the same decision the replay makes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_e2e import machine  # noqa: E402  (one machine description for all benchmarks)
from bench_screening import replay  # noqa: E402

from fapm_merge.evaluation.evaluate import EvalSettings  # noqa: E402
from fapm_merge.evaluation.results import read_results  # noqa: E402
from fapm_merge.workflows.demo import DEMO_CONFIG, demo_documents, demo_eval_data, save_pair  # noqa: E402
from fapm_merge.workflows.tradeoff import Rule  # noqa: E402
from fapm_merge.workflows.tune import TuneSettings, run_tune  # noqa: E402
from fapm_merge.workflows.tune.plan import FAMILY_BETAS  # noqa: E402
from fapm_merge.workflows.tune.screening import cost  # noqa: E402
from fapm_merge.workflows.tune.workdir import RESULTS_FILE, SCREENING_FILES  # noqa: E402

PLANS = {
    "today's grid (beta 1, no screening)": {"betas": [1.0], "screen": False},
    "the family, exhaustive": {"betas": list(FAMILY_BETAS), "screen": False},
    "the family, screened": {},
}


def forwarded(work: Path) -> Dict[str, int]:
    """Prompts and window tokens of every evaluation a tune's work folder records.

    results.jsonl holds the anchors and (no screening) every variant, or (screening) the
    survivors' records COMBINED from their parts' records, which are counted in the
    screening files instead (a part's text and prompts, each a record of its own)."""
    total = {"prompts": 0, "window_tokens": 0, "evaluations": 0}
    candidates = set()
    screened = any((work / name).exists() for name in SCREENING_FILES.values())
    for name in (RESULTS_FILE, *SCREENING_FILES.values()):
        file = work / name
        if not file.exists():
            continue
        for record in read_results(file, with_items=True):
            if Path(record["model"]).parent.name == "variants":
                candidates.add(record["model"])
            if screened and name == RESULTS_FILE and Path(record["model"]).parent.name == "variants":
                continue  # a combined record: its two evaluations are in the other files
            for key, value in cost(record).items():
                total[key] += value
            total["evaluations"] += 1
    return {"candidates": len(candidates), **total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=HERE / "data" / "tune-family")
    parser.add_argument("--items", type=int, default=120)
    parser.add_argument("--text-tokens", type=int, default=4096)
    parser.add_argument("--min-retention", type=float, default=0.8)
    parser.add_argument("--min-repair", type=float, default=0.05)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "tune-family.json")
    args = parser.parse_args()

    work = args.work.resolve()
    if not (work / "models" / "base" / "config.json").exists():
        save_pair(DEMO_CONFIG, work / "models")
    base, finetuned = work / "models" / "base", work / "models" / "finetuned"
    files = demo_eval_data(base, finetuned, work / "eval", text_tokens=args.text_tokens, items=args.items)
    documents = demo_documents(files["text"], work / "eval" / "documents.jsonl")
    recipe = {"merge_method": "fapm", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(finetuned), "parameters": {"sparsity": 0.9}}]}
    rule = Rule(min_retention=args.min_retention, min_repair=args.min_repair)

    rows = {}
    for index, (name, extra) in enumerate(PLANS.items()):
        out = work / f"out-{index}"
        settings = TuneSettings(text=documents, task=files["task"],
                                eval=EvalSettings(tokenizer="bytes", window=64), rule=rule,
                                confirm_share=0, restart=True, overwrite=True, **extra)
        started = time.perf_counter()
        result = run_tune(recipe, out, settings)
        seconds = time.perf_counter() - started
        rows[name] = {"pick": result.tradeoff.selected.name if result.tradeoff.selected else None,
                      "outcome": result.tradeoff.outcome, "seconds": round(seconds, 1),
                      "screening": result.screening, **forwarded(result.work_dir)}
        print(f"{name}: {rows[name]}", flush=True)
    exhaustive_results = work / "out-1.tune" / RESULTS_FILE
    check = replay(exhaustive_results, min_retention=args.min_retention, min_repair=args.min_repair)
    grid = rows[next(iter(PLANS))]
    print(f"\n{'plan':38s} {'cands':>6s} {'evals':>6s} {'prompts':>8s} {'window tok':>11s} {'/ grid':>7s} "
          f"{'seconds':>8s}  pick")
    for name, row in rows.items():
        print(f"{name:38s} {row['candidates']:6d} {row['evaluations']:6d} {row['prompts']:8d} {row['window_tokens']:11d} "
              f"{row['prompts'] / grid['prompts']:7.2f} {row['seconds']:8.1f}  {row['pick'] or row['outcome']}")
    print(f"replayed from (b)'s records, screened: pick {check['screened']['pick']}, "
          f"{check['screened']['prompts']} prompts (tune's screened run: "
          f"{rows['the family, screened']['pick']})")
    report = {"machine": machine(), "rule": {"min_retention": args.min_retention,
                                             "min_repair": args.min_repair},
              "items": args.items, "text_tokens": args.text_tokens, "plans": rows,
              "replay": {k: check[k] for k in ("exhaustive", "screened", "agree", "candidates")}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
