"""Evaluation throughput against the standard: ``fapm-merge eval`` vs lm-evaluation-harness's ``hf``.

Scores one model on the same prompts (log-likelihood of each choice after its
prompt) and the same text (rolling loss in windows of ``--window`` tokens) with
fapm-merge's metrics (:mod:`fapm_merge.evaluation.metrics`) and with the harness's
``HFLM`` (the ``hf`` backend ``fapm-merge eval --lm-eval`` drives), in one process,
interleaved (the order alternates every repetition), and prints seconds, tokens/s
and the ratio (medians). Tokens/s counts the same tokens for both: every token of
every prompt + choice sequence, and every text token predicted.

The two score slightly different inputs, as each defines its metric: ours feeds
``[BOS] + prompt + choice`` and each text window as ``[BOS] + window``; the harness
(``add_bos_token=True``, ``max_length=--window``) feeds ``[BOS] + prompt + choice``
and each text window after the previous window's last token. Both tokenize with the
same tokenizer, so the work per token is the same; the agreement of per-prompt
picks is printed as a check that both scored the same task. The tokenizer is the
byte tokenizer with BOS (``save_byte_tokenizer(bos=True)``) in a view of the model
folder (its other files linked): the harness needs a BOS/EOS token, which the demo's
tokenizer lacks, and the synthetic pairs of ``make_pair.py`` have no tokenizer.

Usage::

    fapm-merge demo /tmp/demo && python -m fapm_merge.workflows.demo demo-data /tmp/demo
    python benchmarks/bench_eval.py --model /tmp/demo/models/base \\
        --text /tmp/demo/eval/general.txt --task /tmp/demo/eval/task.jsonl --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_e2e import machine  # noqa: E402  (one machine description for all benchmarks)


def ours(model_dir: Path, items: List[dict], text: str, window: int, batch_size: int):
    """fapm-merge eval's metrics: ``(run_task, run_text)``, each returning per-item values."""
    from fapm_merge.evaluation.metrics import load_model, load_tokenizer, mean_token_loss, task_accuracy

    model, tokenizer = load_model(model_dir), load_tokenizer(None, model_dir)  # as `eval` does

    def run_task():
        return task_accuracy(model, tokenizer, items)["per_item"]["correct"]

    def run_text():
        return mean_token_loss(model, tokenizer, [text], window=window, batch_size=batch_size)

    return run_task, run_text


def harness(model_dir: Path, items: List[dict], text: str, window: int, batch_size: int):
    """lm-evaluation-harness's ``hf`` backend on the same requests."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=batch_size,
              max_length=window, add_bos_token=True)
    choice_requests = [
        Instance("loglikelihood", {}, (item["prompt"], choice), index)
        for index, item in enumerate(items) for choice in item["choices"]
    ]
    text_request = [Instance("loglikelihood_rolling", {}, (text,), 0)]

    def run_task():
        scores = [score for score, _greedy in lm.loglikelihood(choice_requests, disable_tqdm=True)]
        picks, at = [], 0
        for item in items:
            these = scores[at: at + len(item["choices"])]
            at += len(these)
            best = max(range(len(these)), key=lambda i: (these[i], -i))
            picks.append("1" if best == item["answer"] else "0")
        return "".join(picks)

    def run_text():
        return lm.loglikelihood_rolling(text_request, disable_tqdm=True)

    return run_task, run_text


def byte_tokenizer_view(model_dir: Path, folder: Path) -> Path:
    """``folder``: links to ``model_dir``'s config and weights, plus a byte tokenizer with BOS."""
    from fapm_merge.evaluation.metrics import save_byte_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    for path in model_dir.resolve().iterdir():
        if path.is_file() and not path.name.startswith(("tokenizer", "special_tokens")):
            (folder / path.name).unlink(missing_ok=True)
            (folder / path.name).symlink_to(path)
    save_byte_tokenizer(folder, bos=True)
    return folder


def timed(run: Callable) -> tuple:
    start = time.perf_counter()
    value = run()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model folder with its tokenizer")
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--task", type=Path, required=True,
                        help="task JSONL; only items with 'choices' are used")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=None, help="only the text's first tokens")
    parser.add_argument("--items", type=int, default=None, help="only the first task items")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "eval.json")
    args = parser.parse_args()

    from fapm_merge.evaluation.inputs import load_task
    from fapm_merge.evaluation.metrics import load_tokenizer

    items = [item for item in load_task(args.task) if "choices" in item][: args.items]
    args.model = byte_tokenizer_view(args.model, args.json.parent / "bench-eval-model")
    tokenizer = load_tokenizer(None, args.model)
    ids = tokenizer.encode(args.text.read_text(encoding="utf-8"))
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    text = tokenizer.decode(ids)  # the same text for both
    run_task, run_text = ours(args.model, items, text, args.window, args.batch_size)
    harness_task, harness_text = harness(args.model, items, text, args.window, args.batch_size)
    bos = 1 if tokenizer.bos_token_id is not None else 0
    tokens = {
        "task": sum(bos + len(tokenizer.encode(item["prompt"])) + len(tokenizer.encode(choice))
                    for item in items for choice in item["choices"]),
        "text": len(tokenizer.encode(text)),
    }
    jobs = {("fapm-merge", "task"): run_task, ("fapm-merge", "text"): run_text,
            ("harness", "task"): harness_task, ("harness", "text"): harness_text}
    seconds: Dict[str, List[float]] = {f"{who} {what}": [] for who, what in jobs}
    values: Dict[str, object] = {}
    for who, what in jobs:  # warm-up: first-call costs (allocations, lazy imports) out of the timings
        values[f"{who} {what}"] = jobs[(who, what)]()
    loads = []
    for rep in range(args.reps):
        order = list(jobs) if rep % 2 == 0 else list(jobs)[::-1]
        loads.append(os.getloadavg()[0])
        for key in order:
            wall, _ = timed(jobs[key])
            seconds[" ".join(key)].append(wall)
            print(f"rep {rep + 1}/{args.reps} {' '.join(key):18s} {wall:7.2f} s  "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    summary = {}
    print(f"\n{'':18s} {'tokens':>7s} {'median s':>9s} {'tokens/s':>9s}")
    for key, walls in seconds.items():
        what = key.split()[-1]
        median = statistics.median(walls)
        summary[key] = {"tokens": tokens[what], "median_s": median, "tokens_per_s": tokens[what] / median}
        print(f"{key:18s} {tokens[what]:7d} {median:9.2f} {tokens[what] / median:9.0f}")
    for what in ("task", "text"):
        ratio = summary[f"fapm-merge {what}"]["tokens_per_s"] / summary[f"harness {what}"]["tokens_per_s"]
        summary[f"ratio {what}"] = ratio
        print(f"{what}: fapm-merge / harness tokens/s = {ratio:.2f}")
    ours_picks, harness_picks = values["fapm-merge task"], values["harness task"]
    agree = sum(a == b for a, b in zip(ours_picks, harness_picks))
    print(f"per-prompt correctness agrees on {agree}/{len(items)} prompts; "
          f"text loss/token: fapm-merge {values['fapm-merge text']['loss']:.4f}, harness "
          f"{-sum(values['harness text']) / tokens['text']:.4f}")
    report = {"machine": machine(), "model": str(args.model), "items": len(items),
              "window": args.window, "batch_size": args.batch_size, "load_1min": loads,
              "summary": summary, "seconds": seconds, "agree": agree}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
