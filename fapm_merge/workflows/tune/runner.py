"""The run of a tune: every model merged (where needed) and evaluated on an executor,
the decision, and the chosen model rebuilt into OUT.

One loop (:func:`_evaluate_models`) drives either executor of
:mod:`fapm_merge.workflows.executors`: in this process, variants are merged in
chunks of ``max_on_disk`` (one ``sweep`` pass each, so the checkpoints are read
once per chunk); as Ray tasks, one variant per task, at most ``max_on_disk`` in
flight. Both append the records in the plan's order.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple, Union

from fapm_merge.evaluation.results import append_result, read_results
from fapm_merge.evaluation.settings import TASK_METRIC, TEXT_METRIC
from fapm_merge.io.atomic import atomic_output_dir
from fapm_merge.io.recipe import RECIPE_FILE
from fapm_merge.workflows.executors import Executor, ExecutorError, RayExecutor, SerialExecutor, TaskFailure
from fapm_merge.workflows.tradeoff import CONTRADICTED, Tradeoff, compute_tradeoff, confirm
from fapm_merge.workflows.tradeoff.screen import (
    SCREEN_SEED,
    Candidate,
    one_metric,
    restrict,
    run_screening,
    share_of,
    with_part,
)
from fapm_merge.workflows.tune.card import model_card
from fapm_merge.workflows.tune.checks import check_anchors, check_disk, check_eval_inputs
from fapm_merge.workflows.tune.heldout import CONFIRM_FILE, check_resolvable, split_data
from fapm_merge.workflows.tune.plan import (
    TuneError,
    TunePlan,
    TuneSettings,
    plan_tune,
    screening_off,
    variant_dir,
)
from fapm_merge.workflows.progress import Report, silent
from fapm_merge.workflows.tune.screening import (
    check_share_record,
    cost,
    report,
    skipped_report,
    summary_line,
    too_small,
    write_share_data,
)
from fapm_merge.workflows.tune.workdir import (
    RESULTS_FILE,
    SCREENING_FILES,
    SCREENING_REPORT,
    evaluated_models,
    fingerprint,
    open_work,
    work_folder,
)

if TYPE_CHECKING:  # sweep imports mergekit
    from fapm_merge.workflows.variants import Variant

@dataclass
class TuneResult:
    """What :func:`run_tune` did."""

    tradeoff: Tradeoff
    out_dir: Optional[Path]  # None: nothing was chosen, nothing written
    work_dir: Path
    evaluated: int  # models evaluated in this run
    reused: int  # evaluations reused from an earlier run
    seconds: float
    plot: Path
    message: str
    screening: Optional[str] = None  # the summary's line on screening; None: --no-screen


def _merge_batch(batch: List[Variant], work: Path, settings: TuneSettings, copy_tokenizer: bool,
                 staging_name: str) -> None:
    """Merge ``batch`` in one sweep pass; each output lands in work/variants/NAME
    (moved there whole: a folder in variants/ is always a finished merge)."""
    from fapm_merge.workflows.sweep import run_sweep

    staging = work / staging_name
    if staging.exists():
        shutil.rmtree(staging)
    run_sweep(batch, staging, overwrite=True, device=settings.device,
              copy_tokenizer=copy_tokenizer, write_model_card=False, progress=False)
    for variant in batch:
        target = variant_dir(work, variant)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging / variant.name, target)
    shutil.rmtree(staging)


@dataclass(frozen=True)
class Job:
    """One model to evaluate: merged first when ``variant`` is given and its folder is
    absent, its weights deleted after evaluation when ``delete``.

    ``merge_with``: the variants after it in its chunk, merged in the same sweep pass
    when their folders are absent too (empty for Ray tasks: they run side by side).
    """

    folder: Path
    variant: Optional[Variant]
    delete: bool
    merge_with: Tuple[Variant, ...] = ()

    def to_merge(self, work: Path) -> List[Variant]:
        """The variants this job merges before its evaluation (none if its folder exists)."""
        if self.variant is None or self.folder.exists():
            return []
        return [self.variant] + [v for v in self.merge_with if not variant_dir(work, v).exists()]


def run_job(job: Job, work: Path, settings: TuneSettings, copy_tokenizer: bool) -> dict:
    """Merge (if needed) and evaluate one model; its record (the work of one Ray task).

    The merge is a ``sweep`` into a staging folder of its own (Ray tasks run side by
    side in one work folder); a variant's weights are the same bits whichever chunk
    it was merged in.
    """
    from fapm_merge.evaluation.evaluate import evaluate_model

    batch = job.to_merge(work)
    if batch:
        _merge_batch(batch, work, settings, copy_tokenizer, staging_name=f"batch-{job.variant.name}")
    record = evaluate_model(job.folder, settings.eval)
    if job.delete:
        shutil.rmtree(job.folder)
    return record


def _run_jobs(executor: Executor, stage: str, jobs: List[Job], finished: int, total: int, work: Path,
              plan: TunePlan, settings: TuneSettings, copy_tokenizer: bool, recipe: dict, results: Path,
              progress: Report) -> List[dict]:
    """Run ``jobs`` (evaluating with ``settings.eval``), append their records to ``results``
    in the jobs' order as they are ready, and return them.

    A failed Ray task does not stop the others: its model is named with the cause, the
    other records are kept, its folder removed (a rerun merges it afresh instead of
    trusting a folder the failure may have left half-checked) and :class:`TuneError`
    is raised at the end of the stage (nothing is written to OUT); a rerun evaluates
    only what is missing. In this process an error stops the run where it happens.
    """
    failures: List[str] = []
    records: List[dict] = []
    progress(stage, finished, total, "")

    def before_submit(index: int) -> None:  # on the driver, as each job starts
        merging = jobs[index].to_merge(work)
        if merging:
            check_disk(work, plan, len(merging), recipe)
        # what runs now: a merge batch takes long, and an empty detail looks stuck
        doing = (f"merging {', '.join(v.name for v in merging)}, then evaluating"
                 if merging else "evaluating")
        progress(stage, finished, total, f"{doing} {jobs[index].folder.name}")

    for index, outcome in executor.ordered(run_job, jobs, (work, settings, copy_tokenizer),
                                           limit=settings.max_on_disk,
                                           before_submit=before_submit):
        job = jobs[index]
        if isinstance(outcome, TaskFailure):
            failures.append(f"{job.folder.name}: {outcome.message}")
            if job.variant is not None:
                shutil.rmtree(job.folder, ignore_errors=True)
        else:
            append_result(results, outcome)  # copies: the record keeps its per-item values
            records.append(outcome)
        finished += 1
        progress(stage, finished, total, f"evaluated {job.folder.name}")
    if failures:
        raise TuneError(_failed_message(failures, work, results))
    return records


def _variant_jobs(variants: List[Variant], executor: Executor, work: Path, settings: TuneSettings
                  ) -> List[Job]:
    """One job per variant; in this process a chunk of max_on_disk is merged in one sweep
    pass (the checkpoints read once per chunk), Ray tasks side by side merge one each."""
    chunk = 1 if executor.concurrent else settings.max_on_disk
    return [Job(variant_dir(work, v), v, delete=not settings.keep_variants,
                merge_with=tuple(variants[i + 1 : i - i % chunk + chunk]))
            for i, v in enumerate(variants)]


def _evaluate_models(executor: Executor, plan: TunePlan, work: Path,
                     settings: TuneSettings, copy_tokenizer: bool, recipe: dict, results: Path,
                     done: set, progress: Report, *, variants: bool = True) -> Tuple[int, int]:
    """Evaluate the anchors, check them, then (``variants``) the variants: every model not
    in ``done``, at most ``max_on_disk`` variants on disk at once; records are appended
    to ``results``, in the plan's order, as they are ready. Returns (evaluated, reused)."""
    stage = functools.partial(_run_jobs, executor, work=work, plan=plan, settings=settings,
                              copy_tokenizer=copy_tokenizer, recipe=recipe, results=results,
                              progress=progress)
    # 1. the anchors
    anchors = [Job(plan.base, None, delete=False),
               Job(plan.finetuned, plan.finetuned_variant, delete=False)]
    jobs = [job for job in anchors if str(job.folder) not in done]
    reused = len(anchors) - len(jobs)
    evaluated = len(stage("anchors", jobs, len(anchors) - len(jobs), len(anchors)))
    finetuned = check_anchors(results, plan, settings)
    check_resolvable(finetuned.get("examples", 0), finetuned["accuracy"], settings, measured=True)
    if not variants:
        return evaluated, reused

    # 2. the variants
    todo = [v for v in plan.variants if str(variant_dir(work, v)) not in done]
    reused += len(plan.variants) - len(todo)
    evaluated += len(stage("variants", _variant_jobs(todo, executor, work, settings),
                           len(plan.variants) - len(todo), len(plan.variants)))
    return evaluated, reused


@dataclass
class _Screened:
    """What :func:`_screen_variants` did: evaluations run and reused, and its report."""

    evaluated: int
    reused: int
    report: dict


def _screen_variants(executor: Executor, plan: TunePlan, work: Path, settings: TuneSettings,
                     copy_tokenizer: bool, recipe: dict, results: Path, progress: Report
                     ) -> Union[_Screened, str]:
    """Screen the variants on a share of the selection data and evaluate the survivors on
    the rest, round by round, and append their records on the whole selection data
    (:func:`~fapm_merge.workflows.tradeoff.screen.combine`) to ``results``, where the
    anchors' are (:mod:`fapm_merge.workflows.tradeoff.screen`). Nothing is evaluated
    when the selection data are too small to share: then the reason is returned.

    The anchors are not evaluated again: their whole records cut to the share
    (:func:`~fapm_merge.workflows.tradeoff.screen.restrict`) are what eval gives on the
    share's files, which the first variant's record checks. Each part's text and prompts
    are evaluated apart (a record each, holding one metric), as the screening asks for
    them (:data:`~fapm_merge.workflows.tune.workdir.SCREENING_FILES`). A rerun replays the
    stages from those files and evaluates only what is missing.
    """
    anchors = {r["model"]: r for r in read_results(results, with_items=True)}
    base, finetuned = anchors[str(plan.base)], anchors[str(plan.finetuned)]
    share = share_of(finetuned, share=settings.screen_share, seed=SCREEN_SEED)
    reason = too_small(share)
    if reason is not None:
        return reason
    data = write_share_data(work, settings, share)
    # one metric per evaluation: screening asks for a part's text and its prompts apart
    part_settings = {(part, metric): replace(settings, eval=replace(
                         evaluation, **{"task" if metric == TEXT_METRIC else "text": None}))
                     for part, evaluation in (("screen", data.share), ("rest", data.rest))
                     for metric in (TASK_METRIC, TEXT_METRIC)}
    ft_share = restrict(finetuned, share, screened=True)
    by_model = {str(variant_dir(work, v)): v for v in plan.variants}
    candidates = [Candidate.of(model, v.name, v.recipe) for model, v in by_model.items()]
    stage = functools.partial(_run_jobs, executor, work=work, plan=plan, copy_tokenizer=copy_tokenizer,
                              recipe=recipe, progress=progress)

    def stored(part: str) -> dict:
        """The records on ``part`` a rerun finds, by model: its text's and its prompts', as one."""
        known: dict = {}
        for metric in (TEXT_METRIC, TASK_METRIC):
            file = work / SCREENING_FILES[part, metric]
            for record in read_results(file, TuneError, with_items=True) if file.exists() else []:
                if record["model"] in by_model:
                    known[record["model"]] = with_part(known.get(record["model"]), record)
        return known

    on_file, rest_on_file = stored("screen"), stored("rest")
    found = {part: {model: set(record["metrics"]) for model, record in known.items()}  # what a rerun finds done
             for part, known in (("screen", on_file), ("rest", rest_on_file))}
    counts = {"evaluated": 0, "screen": 0, "rest": 0}

    def evaluate(part: str, known: dict, wanted: List[Candidate], metric: str) -> dict:
        """Evaluate ``metric`` on ``part`` for what a rerun does not find (the runs replay
        the same stages)."""
        missing = [by_model[c.model] for c in wanted
                   if metric not in (known.get(c.model) or {}).get("metrics", {})]
        total = counts[part] + len(wanted)
        for record in stage(part, _variant_jobs(missing, executor, work, settings),
                            total - len(missing), total, settings=part_settings[part, metric],
                            results=work / SCREENING_FILES[part, metric]):
            if part == "screen":
                check_share_record(record, ft_share)
            known[record["model"]] = with_part(known.get(record["model"]), record)
            counts["evaluated"] += 1
        counts[part] += len(wanted)
        return {c.model: one_metric(known[c.model], metric) for c in wanted}

    run = run_screening(candidates, base, finetuned, share, rule=settings.rule,
                        evaluate_share=functools.partial(evaluate, "screen", on_file),
                        evaluate_rest=functools.partial(evaluate, "rest", rest_on_file))
    screening = run.screening
    progress("screen", len(candidates), len(candidates),
             f"{len(run.rest)} of {len(candidates)} went on to the rest")
    combined = evaluated_models(results)
    for model, record in run.whole.items():  # the record the decision reads, once (a rerun finds it)
        if model not in combined:
            append_result(results, record)
    line = summary_line(screening, settings.screen_share, len(run.rest))
    document = report(screening, settings, data, run, cost(finetuned), cost(ft_share), line)
    reused = sum(len(found[part].get(model, set()) & set(record["metrics"]))  # evaluations, as counted
                 for part, records in (("screen", run.on_share), ("rest", run.rest))
                 for model, record in records.items())
    return _Screened(counts["evaluated"], reused, document)


def _failed_message(failures: List[str], work: Path, results: Path) -> str:
    return (f"{len(failures)} evaluation(s) failed on Ray: " + "; ".join(failures)
            + f". The other results are kept in {results}; nothing was written to the "
            "output. Run the same command again to retry only the failed ones")


def _rebuild(variant: Variant, out_dir: Path, settings: TuneSettings, copy_tokenizer: bool,
             write_extras: Callable[[Path], None]) -> None:
    """``variant``'s recipe through mergekit's ``run_merge`` into OUT, atomically."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import fapm_merge.methods  # noqa: F401  (registers the methods with mergekit)

    with atomic_output_dir(out_dir, overwrite=settings.overwrite) as work:
        run_merge(
            MergeConfiguration.model_validate(copy.deepcopy(variant.recipe)),
            str(work),
            MergeOptions(device=settings.device, copy_tokenizer=copy_tokenizer,
                         write_model_card=False, lazy_unpickle=False, quiet=True,
                         random_seed=variant.seed),
        )
        (work / RECIPE_FILE).write_text(yaml.safe_dump(variant.recipe, sort_keys=False),
                                        encoding="utf-8")
        write_extras(work)


def run_tune(
    recipe: dict,
    out_dir: Path,
    settings: TuneSettings,
    *,
    command: str = "fapm-merge tune ...",
    progress: Report = silent,
) -> TuneResult:
    """Sweep, evaluate, decide, and write the chosen model to ``out_dir``.

    Args:
        recipe (`dict`): a ``fapm`` or ``fapm_lora`` mergekit recipe (absolute paths).
        out_dir (`Path`): where the chosen model goes (atomically; only if one is chosen).
        settings (`TuneSettings`): what to sweep and how to evaluate and decide.
        command (`str`): the command line, quoted in the model card.
        progress (`Report`): told what starts and what finished, see
            :mod:`fapm_merge.workflows.progress`.

    Raises:
        TuneError: bad input, a work folder of another tune, too little disk.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()) and not settings.overwrite:
        raise TuneError(f"output folder {out_dir} exists and is not empty; choose another path "
                        "or pass --overwrite")
    work = work_folder(out_dir, settings.work_dir)
    if settings.max_on_disk < 1:
        raise TuneError(f"--max-on-disk must be at least 1, got {settings.max_on_disk}")
    if settings.screen and not 0 < settings.screen_share < 1:  # before anything is evaluated
        raise TuneError(f"--screen-share must be between 0 and 1 (both excluded), got "
                        f"{settings.screen_share}; or pass --no-screen")
    settings = settings.resolved()  # first: it says which of --text and --task are needed
    plan = plan_tune(recipe, settings, work)
    check_eval_inputs(plan, settings.eval)
    copy_tokenizer = settings.copy_tokenizer
    if copy_tokenizer is None:  # a base without tokenizer files would log a traceback
        copy_tokenizer = any((plan.base / name).exists()
                             for name in ("tokenizer_config.json", "tokenizer.json"))
    executor = SerialExecutor()
    if settings.ray is not None:  # before the work folder: a missing Ray changes nothing
        try:
            executor = RayExecutor(settings.ray,
                                   gpus=settings.ray_gpus if settings.device != "cpu" else 0)
        except ExecutorError as error:
            raise TuneError(str(error)) from None
    open_work(work, fingerprint(recipe, plan, settings), settings.restart)
    # the held-out part first: the selection never sees it
    settings, held_out = split_data(work, settings)
    split_from = {role: getattr(settings, role) for role in ("task", "text")  # for the card
                  if held_out is not None and settings.confirm_share > 0
                  and getattr(settings, f"confirm_{role}") is None} or None
    check_eval_inputs(plan, settings.eval)  # the parts, as they will be evaluated
    if held_out is not None:
        check_eval_inputs(plan, held_out, held_out=True)
    if settings.eval.task is not None:  # before anything is evaluated: accuracy at most 1
        from fapm_merge.evaluation.inputs import load_task

        check_resolvable(len(load_task(settings.eval.task)), 1.0, settings, measured=False)
    results = work / RESULTS_FILE
    done = evaluated_models(results)
    skipped = screening_off(settings)
    if skipped is None and settings.rule.kind != "repair":
        skipped = (f"skipped: its verdicts are the repair rule's, and --rule {settings.rule.kind} "
                   "decides on every candidate")
    evaluated, reused = _evaluate_models(executor, plan, work, settings, copy_tokenizer, recipe,
                                         results, done, progress, variants=skipped is not None)
    screened = None
    if skipped is None:
        screened = _screen_variants(executor, plan, work, settings, copy_tokenizer, recipe, results,
                                    progress)
        if isinstance(screened, str):  # the selection data are too small to share
            skipped, screened = screened, None
            more, again = _evaluate_models(executor, plan, work, settings, copy_tokenizer, recipe,
                                           results, evaluated_models(results), progress)
            evaluated, reused = evaluated + more, again - 2  # the anchors were counted once
        else:
            evaluated, reused = evaluated + screened.evaluated, reused + screened.reused
    document = screened.report if screened is not None else skipped_report(skipped)
    if settings.screen:
        (work / SCREENING_REPORT).write_text(json.dumps(document, indent=1) + "\n")
        progress("screen", len(plan.variants), len(plan.variants), document["summary"])
    screening_line = document["summary"] if settings.screen else None

    # 3. the decision
    # in plan order, whatever order the records were written in (executor, screening rounds,
    # a resumed run): the rule's last tie-break is that order
    wanted = [str(plan.base), str(plan.finetuned), *(str(variant_dir(work, v)) for v in plan.variants)]
    known = set(wanted)
    by_model = {r["model"]: r for r in read_results(results, with_items=True) if r["model"] in known}
    records = [by_model[m] for m in wanted if m in by_model]
    result = compute_tradeoff(records, base=str(plan.base), finetuned=str(plan.finetuned),
                              rule=settings.rule, task_metric=settings.task_metric,
                              text_metric=settings.text_metric)
    from fapm_merge.workflows.plots import plot_tradeoff

    plot = plot_tradeoff(result, work / "tradeoff.png")
    (work / "tradeoff.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    progress("decision", 1, 1, result.selected.name if result.selected else "nothing chosen")

    # 4. the chosen model, rebuilt from its recipe
    by_folder = {str(variant_dir(work, v)): v for v in plan.variants}
    chosen = by_folder.get(result.selected.model) if result.selected else None
    held_out_records = []
    if chosen is not None and held_out is not None:
        held_out_records = _held_out_anchors(plan, work, settings, held_out, copy_tokenizer, progress)
    if plan.finetuned_variant is not None and not settings.keep_variants and plan.finetuned.exists():
        shutil.rmtree(plan.finetuned)
    if chosen is None:
        if result.selected is not None:  # max-cf / weighted may pick an anchor
            message = (f"the rule selects {result.selected.name}, one of the two models you already "
                       f"have ({result.selected.model}); nothing is written to {out_dir}")
        else:  # the reason is the summary's (summary_lines): said once, not twice
            message = (f"nothing written to {out_dir}: no variant is selected (why: the summary "
                       f"above, or 'reason' in {work / 'tradeoff.json'})")
        return TuneResult(result, None, work, evaluated, reused,
                          time.perf_counter() - started, plot, message, screening_line)

    def extras(folder: Path) -> None:
        if held_out is not None:  # the rebuilt copy itself, on the held-out data
            progress("confirm", 2, 3, f"evaluating {chosen.name} on the held-out data")
            from fapm_merge.evaluation.evaluate import evaluate_model

            record = {**evaluate_model(folder, held_out), "model": str(out_dir), "name": out_dir.name}
            append_result(work / CONFIRM_FILE, record)
            result.confirmation = confirm(result, held_out_records + [record],
                                          selected_model=str(out_dir))
            (work / "tradeoff.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
            progress("confirm", 3, 3, result.confirmation.status)
            if result.confirmation.status == CONTRADICTED:
                raise _Contradicted()
        shutil.copyfile(plot, folder / "tradeoff.png")
        (folder / "tradeoff.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
        (folder / "README.md").write_text(
            model_card(result, chosen, plan, command, out_dir.name, split_from=split_from,
                       screening=screened.report if screened is not None else None),
            encoding="utf-8")

    try:
        _rebuild(chosen, out_dir, settings, copy_tokenizer, extras)
    except _Contradicted:
        return TuneResult(result, None, work, evaluated, reused, time.perf_counter() - started, plot,
                          f"nothing written to {out_dir}: the held-out data contradict the choice of "
                          f"{chosen.name} (the held-out check above); keep the fine-tuned model",
                          screening_line)
    progress("rebuild", 1, 1, out_dir.name)
    return TuneResult(result, out_dir, work, evaluated, reused, time.perf_counter() - started,
                      plot, f"wrote {chosen.name} ({result.selected.label}) to {out_dir}", screening_line)


class _Contradicted(Exception):
    """The held-out data contradict the choice: nothing is written to OUT."""


def _held_out_anchors(plan: TunePlan, work: Path, settings: TuneSettings, held_out, copy_tokenizer: bool,
                      progress: Report) -> List[dict]:
    """The base's and the fine-tune's records on the held-out data (reused on a rerun);
    a LoRA fine-tune's merged stand-in is merged again if it was removed."""
    from fapm_merge.evaluation.evaluate import evaluate_model

    file = work / CONFIRM_FILE
    earlier = {r["model"]: r for r in read_results(file, with_items=True)} if file.exists() else {}
    records = []
    for folder in (plan.base, plan.finetuned):
        if str(folder) not in earlier:
            progress("confirm", len(records), 3, f"evaluating {folder.name} on the held-out data")
            if not folder.exists() and plan.finetuned_variant is not None:
                _merge_batch([plan.finetuned_variant], work, settings, copy_tokenizer, "batch-confirm")
            earlier[str(folder)] = evaluate_model(folder, held_out)
            append_result(file, earlier[str(folder)])  # copies: the record keeps its per-item values
        records.append(earlier[str(folder)])
    return records

__all__ = ["Job", "TuneResult", "run_job", "run_tune"]
