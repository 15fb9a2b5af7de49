"""Screened vs exhaustive decisions, replayed from stored per-item results: cost and agreement.

    python benchmarks/bench_screening.py RESULTS [--base PATH] [--finetuned PATH]
        [--min-retention 0.99] [--min-repair 0.1] [--share 0.3] [--seed 0] [--json FILE]
        [--task FILE --tokenizer DIR]

RESULTS is a results file of ``fapm-merge eval`` with its items file beside it (e.g. the
replication's ``experiments/work/results/main.jsonl`` or a tune work folder's
``results.jsonl``): every model evaluated on the whole selection data. No forward pass
is run; the two decisions are replayed from the per-item values:

(a) **exhaustive**: every candidate evaluated on everything, the repair rule decides
    (:func:`fapm_merge.workflows.tradeoff.compute_tradeoff`);
(b) **screened**: tune's own screening run
    (:func:`~fapm_merge.workflows.tradeoff.screen.run_screening`: stage by stage on the
    share, the survivors on the rest, the leader checked on everything), where
    "evaluating" a candidate on a part is cutting its whole record to that part
    (:func:`~fapm_merge.workflows.tradeoff.screen.restrict`); the same rule decides on
    the anchors and the survivors' combined records.

It prints, side by side, what each forwards and what each picks, and whether the picks
agree. **Units**: the records do not hold the tokens of prompts and answer choices, so
the task's cost is counted in *prompts* (each forwards its prompt with every choice, or
decodes its answer) and the text's in *window tokens* (the predicted tokens of the
windows, from the records). The base and the fine-tune are evaluated on everything in
both (on the share, then on the rest, when screened). Given the task file the records
were measured on (checked by its SHA-256) and the tokenizer, ``--task`` and
``--tokenizer`` count the task's forwarded tokens too, exactly as eval forwards them
(:func:`prompt_tokens`), and print the tokens forwarded in all, prompts and windows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

from fapm_merge.evaluation.results import PER_ITEM, file_digest
from fapm_merge.evaluation.settings import TASK_METRIC, TEXT_METRIC
from fapm_merge.workflows.tradeoff import Rule, compute_tradeoff, read_results
from fapm_merge.workflows.tradeoff.rules import MIN_REPAIR, MIN_RETENTION
from fapm_merge.workflows.tradeoff.screen import (
    SCREEN_SEED,
    SCREEN_SHARE,
    Candidate,
    one_metric,
    restrict,
    run_screening,
    share_of,
)
from fapm_merge.workflows.tune.screening import cost


def _add(total: Dict[str, int], cost: Dict[str, int], times: int = 1) -> None:
    for key, value in cost.items():
        total[key] = total.get(key, 0) + times * value


def _pick(result) -> Optional[str]:
    return result.selected.name if result.selected is not None else None


def prompt_tokens(task: Path, tokenizer: str, bos: bool) -> List[int]:
    """The tokens eval forwards for each prompt of ``task``, in file order
    (:func:`fapm_merge.evaluation.metrics.task_inputs`, BOS where the records applied it)."""
    from fapm_merge.evaluation.inputs import load_task
    from fapm_merge.evaluation.metrics import forwarded_tokens, load_tokenizer, task_inputs

    prompts, continuations = task_inputs(load_tokenizer(tokenizer, Path(tokenizer)), load_task(task),
                                         use_bos=bos)
    return [forwarded_tokens(p, c) for p, c in zip(prompts, continuations)]


def replay(results: Path, *, base: Optional[str] = None, finetuned: Optional[str] = None,
           min_retention: float = MIN_RETENTION, min_repair: float = MIN_REPAIR,
           share: float = SCREEN_SHARE, seed: int = SCREEN_SEED,
           task: Optional[Path] = None, tokenizer: Optional[str] = None) -> dict:
    """Both decisions and their cost (module docstring); a JSON-ready dict."""
    records = read_results(results)
    rule = Rule(min_retention=min_retention, min_repair=min_repair)
    exhaustive = compute_tradeoff(records, base=base, finetuned=finetuned, rule=rule)
    used = {point.model for point in exhaustive.points}
    records = [r for r in records if r["model"] in used]  # those the decision could place
    anchors = {exhaustive.base.model, exhaustive.finetuned.model}
    by_model = {r["model"]: r for r in records}
    base_record, ft_record = by_model[exhaustive.base.model], by_model[exhaustive.finetuned.model]
    cut = share_of(ft_record, share=share, seed=seed)
    plan = [Candidate.of(r["model"], r.get("name", r["model"]), r.get("recipe"))
            for r in records if r["model"] not in anchors]
    # "evaluating" a candidate on a part is cutting its whole record to that part
    run = run_screening(
        plan, base_record, ft_record, cut, rule=rule,
        evaluate_share=lambda stage, metric: {
            c.model: one_metric(restrict(by_model[c.model], cut, screened=True), metric) for c in stage},
        evaluate_rest=lambda stage, metric: {
            c.model: one_metric(restrict(by_model[c.model], cut, screened=False), metric) for c in stage})
    for model, whole in run.whole.items():  # the replay must rebuild what was measured
        for metric in (TASK_METRIC, TEXT_METRIC):
            if whole["metrics"][metric][PER_ITEM] != by_model[model]["metrics"][metric][PER_ITEM]:
                raise AssertionError(f"{model}: {metric} not rebuilt from its two parts")
    screened = compute_tradeoff([base_record, ft_record, *run.whole.values()], base=exhaustive.base.model,
                                finetuned=exhaustive.finetuned.model, rule=rule)

    whole_cost = cost(ft_record)
    share_cost = cost(restrict(ft_record, cut, screened=True))
    exhaustive_cost: Dict[str, int] = {}
    _add(exhaustive_cost, whole_cost, len(records))
    screened_cost: Dict[str, int] = {}
    _add(screened_cost, whole_cost, 2)  # the anchors, on everything either way
    for record in [*run.on_share.values(), *run.rest.values()]:  # each holds what was forwarded
        _add(screened_cost, cost(record))
    if task is not None:  # the task's tokens: a part's prompts, each as often as it was evaluated
        digest = ft_record["metrics"][TASK_METRIC].get("sha256")
        if file_digest(task) != digest:
            raise SystemExit(f"{task} is not the task file these records were measured on "
                             f"(its SHA-256 differs from the records' {digest})")
        per_prompt = prompt_tokens(task, tokenizer, bool((ft_record.get("settings") or {}).get("bos")))
        if len(per_prompt) != cut.prompt_count:
            raise SystemExit(f"{task} holds {len(per_prompt)} prompts, the records {cut.prompt_count}")
        on_share_prompts = sum(per_prompt[i] for i in cut.part(True)[0])
        evaluations = {"share": sum(TASK_METRIC in r["metrics"] for r in run.on_share.values()),
                       "rest": sum(TASK_METRIC in r["metrics"] for r in run.rest.values())}
        exhaustive_cost["task_tokens"] = len(records) * sum(per_prompt)
        screened_cost["task_tokens"] = (2 * sum(per_prompt) + evaluations["share"] * on_share_prompts
                                        + evaluations["rest"] * (sum(per_prompt) - on_share_prompts))
        for side in (exhaustive_cost, screened_cost):
            side["tokens"] = side["task_tokens"] + side["window_tokens"]
    return {
        "results": str(results),
        "units": "prompts (prompt and choice tokens are not in the records) and window tokens",
        "candidates": len(plan),
        "share": {"share": share, "prompts": share_cost["prompts"],
                  "window_tokens": share_cost["window_tokens"], "confidence": run.screening.confidence},
        "stages": run.stages,
        "prompt_stages": run.prompt_stages,
        "rest_rounds": run.rest_rounds,
        "text_rounds": run.text_rounds,
        "rejected_leaders": run.rejected_leaders,
        "exhaustive": {"pick": _pick(exhaustive), "outcome": exhaustive.outcome,
                       "evaluated": len(plan), **exhaustive_cost},
        "screened": {"pick": _pick(screened), "outcome": screened.outcome,
                     "evaluated_on_share": len(run.on_share),
                     "prompts_on_share": sum(len(stage) for stage in run.prompt_stages),
                     "survivors": len(run.rest), "text_on_rest": sum(len(r) for r in run.text_rounds),
                     **screened_cost},
        "agree": _pick(exhaustive) == _pick(screened),
        "screening": run.screening.to_json(),
    }


def table(summary: dict) -> str:
    """The side-by-side table the benchmark prints."""
    a, b = summary["exhaustive"], summary["screened"]
    rows = [("", "exhaustive", "screened"),
            ("candidates evaluated", f"{a['evaluated']} on all",
             f"{b['evaluated_on_share']} on the share ({b['prompts_on_share']} on its prompts), "
             f"{b['survivors']} on the rest ({b['text_on_rest']} on its text)"),
            ("prompts forwarded", f"{a['prompts']}", f"{b['prompts']} ({b['prompts'] / a['prompts']:.0%})"),
            ("window tokens forwarded", f"{a['window_tokens']}",
             f"{b['window_tokens']} ({b['window_tokens'] / a['window_tokens']:.0%})"),
            *([("task tokens forwarded", f"{a['task_tokens']}",
                f"{b['task_tokens']} ({b['task_tokens'] / a['task_tokens']:.0%})"),
               ("tokens forwarded in all", f"{a['tokens']}", f"{b['tokens']} ({b['tokens'] / a['tokens']:.0%})")]
              if "tokens" in a else []),
            ("pick", str(a["pick"]), str(b["pick"])),
            ("outcome", a["outcome"], b["outcome"])]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"agree: {'yes' if summary['agree'] else 'NO'}  (screening share: "
                 f"{summary['share']['prompts']} prompts, {summary['share']['window_tokens']} window "
                 f"tokens; one-sided {summary['share']['confidence']:.2%}; units: {summary['units']})")
    for verdict in summary["screening"]["verdicts"]:
        lines.append(f"  {verdict['name']}: {verdict['status']}"
                     + (f" ({verdict['rule']})" if verdict["rule"] else "") + f": {verdict['reason']}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a results file with its items file beside it")
    parser.add_argument("--base", help="the base model's record (default: the recipes')")
    parser.add_argument("--finetuned", help="the fine-tune's record (default: the recipes')")
    parser.add_argument("--min-retention", type=float, default=MIN_RETENTION)
    parser.add_argument("--min-repair", type=float, default=MIN_REPAIR)
    parser.add_argument("--share", type=float, default=SCREEN_SHARE, help="the screening share")
    parser.add_argument("--seed", type=int, default=SCREEN_SEED, help="the screening share's seed")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--task", type=Path, help="the task file the records were measured on: "
                        "count its forwarded tokens too (with --tokenizer)")
    parser.add_argument("--tokenizer", help="the tokenizer eval used (a folder), for --task")
    args = parser.parse_args(argv)
    if (args.task is None) != (args.tokenizer is None):
        parser.error("--task and --tokenizer go together")
    summary = replay(args.results, base=args.base, finetuned=args.finetuned,
                     min_retention=args.min_retention, min_repair=args.min_repair,
                     share=args.share, seed=args.seed, task=args.task, tokenizer=args.tokenizer)
    print(table(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
