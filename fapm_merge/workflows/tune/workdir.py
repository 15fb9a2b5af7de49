"""The work folder: the plan file a resumed tune must match, and what it already holds.

``tune.json`` records what the evaluations depend on (:func:`fingerprint`); the
results file collects one record per evaluated model, so a rerun evaluates only
what is missing.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from fapm_merge.evaluation.results import data_digest, file_digest, read_results
from fapm_merge.evaluation.settings import TASK_METRIC, TEXT_METRIC
from fapm_merge.workflows.tradeoff.screen import SCREEN_SEED
from fapm_merge.workflows.tune.plan import TuneError, TunePlan, TuneSettings, screening_off

PLAN_FILE = "tune.json"
RESULTS_FILE = "results.jsonl"
"""The records the decision reads: the anchors' and, screened, each survivor's record on
the whole selection data (combined from its two parts)."""

SCREENING_FILES = {("screen", TEXT_METRIC): "screening-text.jsonl", ("screen", TASK_METRIC): "screening-task.jsonl",
                   ("rest", TASK_METRIC): "rest-task.jsonl", ("rest", TEXT_METRIC): "rest-text.jsonl"}
"""Screened: the variants' records on the screening share and the survivors' on the rest,
one file per part and metric (by ``(part, metric)``): screening evaluates a part's text
and its prompts apart, and a results file keeps one record per model."""

SCREENING_REPORT = "screening.json"
"""Screened: the plan, each variant's verdict and the evaluation it cost, the stages."""


def work_folder(out_dir: Path, work_dir=None) -> Path:
    """Where tune keeps its results, plan and plot: ``--work``, or ``OUT_DIR.tune``."""
    out_dir = Path(out_dir).absolute()
    return Path(work_dir or out_dir.with_name(out_dir.name + ".tune")).absolute()


def fingerprint(recipe: dict, plan: TunePlan, settings: TuneSettings) -> dict:
    """What the evaluations depend on; a resumed tune must match it exactly.

    Screening (its share) is part of it when the tune screens: the survivors' records
    are built from two evaluations and the others are not evaluated on everything. A
    tune that does not screen writes no such key, so its earlier work folders still match.
    """
    evaluation = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings.eval).items()}
    if not settings.eval.lm_eval_tasks:  # a tune without the harness keeps its earlier plan
        evaluation = {k: v for k, v in evaluation.items() if not k.startswith("lm_eval_")}
    screened = screening_off(settings) is None
    return {
        **({"screening": {"share": settings.screen_share, "seed": SCREEN_SEED}} if screened else {}),
        "recipe": recipe,
        "variants": [{"name": v.name, "recipe": v.recipe, "seed": v.seed} for v in plan.variants],
        "evaluation": evaluation,
        "text_sha256": data_digest(settings.text) if settings.text else None,
        "task_sha256": file_digest(settings.task) if settings.task else None,
        "merge_device": settings.device,
        # what is held out decides what the selection sees
        "held_out": {"task_sha256": file_digest(settings.confirm_task) if settings.confirm_task else None,
                     "text_sha256": data_digest(settings.confirm_text) if settings.confirm_text else None,
                     "share": settings.confirm_share},
    }


def open_work(work: Path, fingerprint: dict, restart: bool) -> None:
    """Start the work folder, or check that it holds a tune of the same ``fingerprint``."""
    plan_file = work / PLAN_FILE
    if restart and work.exists():
        shutil.rmtree(work)
    if plan_file.exists():
        try:
            earlier = json.loads(plan_file.read_text())
        except ValueError:
            earlier = None
        if earlier != fingerprint:
            # a key either side lacks counts too (screening's is written only when screened)
            keys = set(fingerprint) | (set(earlier) if isinstance(earlier, dict) else set())
            changed = sorted(k for k in keys if not isinstance(earlier, dict)
                             or earlier.get(k) != fingerprint.get(k))
            raise TuneError(
                f"{work} holds a tune made with other settings (they differ in: "
                f"{', '.join(changed) or 'the plan file'}); its results would not be comparable. "
                "Pass --restart to discard it, or --work another folder")
        return
    if work.exists() and any(work.iterdir()):
        raise TuneError(f"work folder {work} exists and is not a tune's; choose another --work")
    work.mkdir(parents=True, exist_ok=True)
    temporary = plan_file.with_suffix(".tmp")
    temporary.write_text(json.dumps(fingerprint, indent=1) + "\n")
    os.replace(temporary, plan_file)


def evaluated_models(results: Path) -> set:
    """Models the work folder's results file already holds."""
    if not results.exists() or not results.read_text(encoding="utf-8").strip():
        return set()
    try:
        return {record["model"] for record in read_results(results, TuneError)}
    except TuneError as error:
        raise TuneError(f"{error}: an interrupted write? Delete that line (its model is "
                        "evaluated again) or pass --restart") from None


__all__ = ["PLAN_FILE", "RESULTS_FILE", "SCREENING_FILES", "SCREENING_REPORT", "evaluated_models", "fingerprint", "open_work"]
