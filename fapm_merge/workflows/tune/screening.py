"""Tune's screening, as files and facts: the share's data files, what each variant's
evaluation cost, and the report (``screening.json``, the summary line, the card's section).

The verdicts themselves are :mod:`fapm_merge.workflows.tradeoff.screen`'s (pure); the
runner (:mod:`.runner`) evaluates stage by stage on an executor and calls these.
Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from fapm_merge.evaluation.results import PER_ITEM
from fapm_merge.evaluation.settings import TASK_METRIC, TEXT_METRIC, EvalSettings
from fapm_merge.evaluation.split import write_screening_split
from fapm_merge.workflows.tradeoff.screen import (
    ACCURACY,
    LINE,
    OUT,
    REPAIR,
    SCREEN_SEED,
    Screening,
    ScreeningRun,
    ScreeningShare,
)
from fapm_merge.workflows.tune.plan import TuneError, TuneSettings

SCREEN_FOLDER = "screen-data"
"""Where in the work folder the share's and the rest's task and text files go (a folder
of their own: the held-out split replaces ``data/`` whole)."""


def cost(record: dict) -> Dict[str, int]:
    """What an evaluation forwarded: its prompts and its windows' predicted tokens, 0 for
    a metric it did not hold (screening evaluates them apart; the records hold no prompt
    or choice tokens; ``benchmarks/bench_screening.py`` counts with it too)."""
    metrics = record["metrics"]
    return {"prompts": len(metrics[TASK_METRIC][PER_ITEM]["correct"]) if TASK_METRIC in metrics else 0,
            "window_tokens": (sum(metrics[TEXT_METRIC][PER_ITEM]["window_tokens"])
                              if TEXT_METRIC in metrics else 0)}


def _total(costs: Sequence[Mapping[str, int]]) -> Dict[str, int]:
    return {key: sum(c.get(key, 0) for c in costs) for key in ("prompts", "window_tokens")}


@dataclass(frozen=True)
class ShareData:
    """The share's and the rest's evaluation settings (``settings.eval`` on their files)."""

    share: EvalSettings
    rest: EvalSettings


def write_share_data(work: Path, settings: TuneSettings, share: ScreeningShare) -> ShareData:
    """Write the share's and the rest's task lines and documents into the work folder
    (:func:`fapm_merge.evaluation.split.write_screening_split`) and the settings that
    evaluate each."""
    documents = [sorted({share.window_documents[i] for i in windows})
                 for windows in (share.part(True)[1], share.part(False)[1])]
    files = write_screening_split(settings.eval.task, settings.eval.text, work / SCREEN_FOLDER,
                                  share.prompts, documents)
    return ShareData(replace(settings.eval, task=files.selection_task, text=files.selection_text),
                     replace(settings.eval, task=files.confirmation_task, text=files.confirmation_text))


def too_small(share: ScreeningShare) -> Optional[str]:
    """Why the selection data cannot be shared (one prompt group or one document with
    windows: the rest would be empty), or None."""
    prompts, windows = share.part(False)
    if not prompts or not share.prompts:
        return "skipped: the selection task has one prompt (group), too few to share"
    if not windows or not share.windows:
        return "skipped: the selection text gives windows in one document only, too few to share"
    return None


def check_share_record(record: dict, expected: dict) -> None:
    """A variant's record on the share's files (its prompts, its text or both) must hold
    the prompts and windows the whole record's cut to the share holds
    (:func:`~fapm_merge.workflows.tradeoff.screen.restrict` of the fine-tune's), else its
    verdict would compare other data (raises TuneError)."""
    metrics, theirs = record["metrics"], expected["metrics"]
    same = True
    if TASK_METRIC in metrics:
        same = len(metrics[TASK_METRIC][PER_ITEM]["correct"]) == len(theirs[TASK_METRIC][PER_ITEM]["correct"])
    if TEXT_METRIC in metrics:
        mine, text = metrics[TEXT_METRIC][PER_ITEM], theirs[TEXT_METRIC][PER_ITEM]
        same = (same and list(mine["window_tokens"]) == list(text["window_tokens"])
                and list(mine.get("window_document") or []) == list(text.get("window_document") or []))
    if not same:
        raise TuneError(f"{record.get('model')}: evaluated on the screening share's files, it measured "
                        "other prompts or windows than the share of the whole selection data holds; "
                        "screening cannot pair them. Run with --no-screen (and report this)")


def summary_line(screening: Screening, share: float, survivors: int) -> str:
    """``screened 30 candidates on 30% of the data: 9 out on accuracy, 12 on repair,
    3 on line; 6 evaluated on the rest``."""
    rules = [v.rule for v in screening.verdicts if v.status == OUT]
    counts = [(rule, rules.count(rule)) for rule in (ACCURACY, REPAIR, LINE) if rules.count(rule)]
    outs = ", ".join(f"{n} {'out on ' if i == 0 else 'on '}{rule}" for i, (rule, n) in enumerate(counts))
    return (f"screened {len(screening.verdicts)} candidates on {share:.0%} of the selection data: "
            f"{outs or 'none out'}; {survivors} evaluated on the rest")


def skipped_line(reason: str) -> str:
    return f"screening {reason}; every candidate is evaluated on all the selection data"


def report(screening: Screening, settings: TuneSettings, data: ShareData, run: ScreeningRun,
           anchor_cost: Mapping[str, int], share_cost: Mapping[str, int], line: str) -> dict:
    """``screening.json``: the plan with each candidate's verdict and cost (its text and
    prompts on the share and on the rest, as far as they were evaluated), the stages, the
    level, and the evaluation screened against what every candidate on everything would
    have forwarded (the anchors, evaluated on everything either way, counted in both)."""
    share_records, rest_records = run.on_share, run.rest
    candidates = []
    for verdict in screening.verdicts:
        model = verdict.candidate.model
        spent = {"share": cost(share_records[model]) if model in share_records else None,
                 "rest": cost(rest_records[model]) if model in rest_records else None}
        candidates.append({**verdict.to_json(), "method": verdict.candidate.method,
                           "strength": verdict.candidate.strength, "cost": spent})
    spent = [c["cost"][part] for c in candidates for part in ("share", "rest") if c["cost"][part]]
    return {
        "screened": True, "summary": line, "share": settings.screen_share, "seed": SCREEN_SEED,
        "share_data": {**dict(share_cost), "files": {
            part: {"task": str(evaluation.task), "text": str(evaluation.text)}
            for part, evaluation in (("share", data.share), ("rest", data.rest))}},
        **screening.to_json(),
        "stages": run.stages,
        "prompt_stages": run.prompt_stages,
        "rest_rounds": run.rest_rounds,
        "text_rounds": run.text_rounds,
        "rejected_leaders": run.rejected_leaders,
        "kept": [c.name for c in screening.kept()],
        "candidates": candidates,
        "cost": {"units": "prompts and window tokens forwarded (base and fine-tune included)",
                 "screened": _total([*spent, anchor_cost, anchor_cost]),
                 "exhaustive": _total([anchor_cost] * (2 + len(candidates)))},
    }


def skipped_report(reason: str) -> dict:
    return {"screened": False, "reason": reason, "summary": skipped_line(reason)}


def card_lines(document: Optional[dict]) -> List[str]:
    """The model card's Screening section (none when the tune did not screen)."""
    if not document or not document.get("screened"):
        return []
    spent, whole = document["cost"]["screened"], document["cost"]["exhaustive"]
    return ["## Screening", "",
            f"{document['summary'][0].upper()}{document['summary'][1:]}. A candidate was dropped "
            f"only when the evidence already showed it out at one-sided {document['confidence']:.2%}: "
            "its accuracy clearly below the margin on the share, its repair clearly below the "
            "leader's there (the candidate with the most repair shown to keep the task, an out that "
            "held only once the leader qualified on all the selection data"
            + (f"; rejected as leader there: {', '.join(document['rejected_leaders'])}"
               if document.get("rejected_leaders") else "")
            + "), its accuracy not shown within the margin on all the selection prompts (then it "
            "cannot qualify, and the rest of the text was not spent on it), or beyond two points of "
            "its line not shown to keep the task (each line was screened mildest first as far as "
            "that rule allowed, and its strongest survivor went to the rest first, the likeliest "
            "leader before the others). On each part the text came first and the prompts only where "
            "the text did not show the candidate out. The survivors' records on the rest and on the "
            "share make their records on the whole selection data, on which the rule decided.", "",
            f"Evaluation forwarded: {spent['prompts']} prompts and {spent['window_tokens']} window "
            f"tokens, against {whole['prompts']} and {whole['window_tokens']} without screening "
            "(every verdict: `screening.json` in the work folder; `--no-screen` evaluates every "
            "candidate on everything).", ""]


__all__ = ["SCREEN_FOLDER", "ShareData", "card_lines", "check_share_record", "cost", "report",
           "skipped_line", "skipped_report", "summary_line", "too_small", "write_share_data"]
