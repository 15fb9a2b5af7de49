"""``fapm-merge tune``: sweep, evaluate, decide and write the chosen model, in one command.

For a recipe with ``merge_method: fapm`` (a full fine-tune) or ``fapm_lora`` (a PEFT
LoRA adapter), :func:`run_tune`:

1. checks everything it can before any merge: the recipe, local model folders, the
   task file, that the text gives at least two windows, the disk;
2. evaluates the base and the fine-tuned model (for ``fapm_lora`` the fine-tune is
   the ``fapm_lora`` merge at sparsity 0, i.e. exactly ``W_pre + scale * B @ A``);
3. merges the variants (FAPM at each sparsity plus the baselines) in batches of at
   most ``max_on_disk``, each batch in one ``sweep`` pass, evaluates each variant,
   records it, and deletes its weights: at 8B parameters a 20-variant sweep would
   otherwise need 320 GB;
4. applies the selection rule to the paired results
   (:mod:`fapm_merge.workflows.tradeoff`);
5. rebuilds the chosen variant from its recipe with mergekit's own ``run_merge``
   (bit for bit what ``mergekit-yaml`` makes of that recipe) into OUT, atomically,
   with a model card that embeds the recipe, the rule, the trade-off table with
   its intervals and the plot.

Everything lives in a work folder (default ``OUT.tune`` beside OUT): the results
and their per-item values, the plan, the plot. Running the same command again
resumes: finished evaluations are reused, a variant merged but not yet evaluated
is evaluated, and a changed rule is re-decided without evaluating anything.

The task axis is the ``--task`` file's accuracy by default, or any per-sample metric
of lm-evaluation-harness (``task_metric="lm_eval:arc_easy/acc"``); the general axis
the ``--text`` loss, or a harness perplexity task (``text_metric="lm_eval:wikitext"``).
tune then runs those harness tasks on every model itself.

Where the variants run: one after another in this process (batches of
``max_on_disk`` merged in one ``sweep`` pass), or, with ``ray`` set, as Ray tasks
(:mod:`fapm_merge.workflows.executors`), one variant per task (merge, evaluate,
delete), at most ``max_on_disk`` at once. Both write the same results, in the
plan's order, and resume from each other's work folder.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple

from fapm_merge.core.errors import FapmMergeError
from fapm_merge.core.rules import DEFAULT_LORA_SPARSITY, DEFAULT_SPARSITY
from fapm_merge.evaluation.errors import EvalInputError
from fapm_merge.evaluation.lm_eval import explain_missing, parse_metric
from fapm_merge.evaluation.results import append_result, file_digest, read_results
from fapm_merge.evaluation.settings import EvalSettings
from fapm_merge.io.atomic import atomic_output_dir
from fapm_merge.io.recipe import RECIPE_FILE, looks_local, model_name, non_base_models
from fapm_merge.workflows.tradeoff import TASK_METRIC, TEXT_METRIC, Rule, Tradeoff, compute_tradeoff

if TYPE_CHECKING:  # sweep imports mergekit, evaluation.metrics torch: both load on use,
    # so the command line can show these defaults without them
    from fapm_merge.workflows.sweep import Variant

DEFAULT_SPARSITIES = {
    "fapm": (0.1, 0.3, 0.5, 0.7, DEFAULT_SPARSITY, 0.95),
    "fapm_lora": (0.05, DEFAULT_LORA_SPARSITY, 0.2, 0.3, 0.5),
}
"""FAPM values swept by default. Full fine-tunes: the paper's default 0.9 and the
range around it down to light pruning, where most of the task survives. LoRA
updates: the paper's advice is to prune only ~10%, so the grid stays low."""

DEFAULT_BASELINES = ("magnitude", "wiseft")
"""Magnitude pruning of dW (FAPM with beta 0: what FAPM improves on) and WiSE-FT
(``W_pre + alpha * dW``: the strongest simple baseline in the replication). DARE is
opt-in: it rescales what it keeps and repairs no forgetting (docs/experiments.md)."""

DEFAULT_ALPHAS = {"fapm": (0.3, 0.5, 0.7, 0.9), "fapm_lora": (0.5, 0.7, 0.9)}
"""WiSE-FT strengths swept by default."""

MAX_ON_DISK = 2
"""Variants on disk at once (each is a full checkpoint)."""

PLAN_FILE = "tune.json"
RESULTS_FILE = "results.jsonl"
EXIT_NOTHING_CHOSEN = 3
"""Exit status of ``fapm-merge tune`` when no variant is chosen (nothing is written)."""


class TuneError(FapmMergeError, ValueError):
    """A tune that cannot run or continue; the message says what to change."""


@dataclass
class TuneSettings:
    """What ``tune`` sweeps, how it evaluates and decides. Attributes mirror the options.

    Attributes:
        text, task (`Path`, *optional*): general text (forgetting) and task file
            (accuracy); each is needed unless its axis comes from lm-eval.
        sparsities (`Sequence[float]`, *optional*): FAPM values; default `DEFAULT_SPARSITIES`.
        baselines (`Sequence[str]`): any of magnitude, wiseft, dare (dare: fapm only).
        alphas (`Sequence[float]`, *optional*): WiSE-FT strengths; default `DEFAULT_ALPHAS`.
        seed (`int`, defaults to 0): DARE's seed (``mergekit-yaml --random-seed``).
        rule (`Rule`): the selection rule (default: repair at retention 0.99).
        eval (`EvalSettings`): tokenizer, window, batch size, ... (text/task set here).
        device (`str`, defaults to "cpu"): merge device (``cuda`` like ``--cuda``).
        copy_tokenizer (`bool`, *optional*): copy the base's tokenizer into outputs;
            default: when the base has one.
        max_on_disk (`int`, defaults to 2): variants on disk at once.
        keep_variants (`bool`, defaults to False): keep every variant's weights.
        work_dir (`Path`, *optional*): default ``OUT.tune`` beside OUT.
        overwrite (`bool`, defaults to False): replace an existing OUT.
        restart (`bool`, defaults to False): discard the work folder's earlier results.
        task_metric (`str`, defaults to "task"): the task axis: ``task`` (``--task``
            accuracy) or ``lm_eval:TASK/METRIC`` (a per-sample 0/1 harness metric).
        text_metric (`str`, defaults to "text"): the general axis: ``text`` (``--text``
            loss) or ``lm_eval:TASK[/word_perplexity|/byte_perplexity]``.
        ray (`str`, *optional*): run the variants as Ray tasks: ``"local"`` (start a
            Ray instance here) or the address of a running cluster (``auto``,
            ``HOST:6379``); None runs them in this process.
        ray_gpus (`int`, defaults to 1): GPUs per Ray task when ``device`` is not
            ``cpu`` (a model vLLM splits over N GPUs needs N).
    """

    text: Optional[Path] = None
    task: Optional[Path] = None
    sparsities: Optional[Sequence[float]] = None
    baselines: Sequence[str] = DEFAULT_BASELINES
    alphas: Optional[Sequence[float]] = None
    seed: int = 0
    rule: Rule = field(default_factory=Rule)
    eval: EvalSettings = field(default_factory=EvalSettings)
    device: str = "cpu"
    copy_tokenizer: Optional[bool] = None
    max_on_disk: int = MAX_ON_DISK
    keep_variants: bool = False
    work_dir: Optional[Path] = None
    overwrite: bool = False
    restart: bool = False
    task_metric: str = TASK_METRIC
    text_metric: str = TEXT_METRIC
    ray: Optional[str] = None
    ray_gpus: int = 1


@dataclass
class TunePlan:
    """The models a tune evaluates: the two anchors and the variants."""

    method: str  # fapm or fapm_lora
    base: Path
    finetuned: Path  # a folder: the user's, or work/variants/finetuned (fapm_lora)
    finetuned_variant: Optional[Variant]  # fapm_lora: the merge that makes it
    variants: List[Variant]


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


Progress = Callable[[str, int, int, str], None]
"""``progress(stage, done, total, detail)``: called as each step finishes."""


def _quiet(stage: str, done: int, total: int, detail: str) -> None:
    pass


# --------------------------------------------------------------------------- plan


def plan_tune(recipe: dict, settings: TuneSettings, work: Path) -> TunePlan:
    """Every model the tune evaluates, from the recipe (raises TuneError)."""
    method = recipe.get("merge_method")
    if method not in DEFAULT_SPARSITIES:
        raise TuneError(f"tune needs a recipe with merge_method: fapm (a full fine-tune) or "
                        f"fapm_lora (a LoRA adapter), got {method!r}")
    if method == "fapm" and len(non_base_models(recipe)) != 1:
        raise TuneError("tune compares one fine-tune with its base: the recipe must list exactly "
                        "one fine-tuned model besides base_model")
    base = recipe.get("base_model")
    references = [("base_model", base)]
    if method == "fapm":
        references.append(("the fine-tuned model", model_name(non_base_models(recipe)[0])))
    for where, reference in references:
        if not isinstance(reference, str) or "+" in reference or not looks_local(reference) \
                or not Path(reference).is_dir():
            raise TuneError(
                f"{where} {reference!r}: tune evaluates models from local folders; give the "
                "absolute path of a downloaded model folder (huggingface-cli download ...)")
    from fapm_merge.workflows.sweep import SweepError, build_variants, finetuned_variant

    sparsities = list(settings.sparsities or DEFAULT_SPARSITIES[method])
    alphas = list(settings.alphas or DEFAULT_ALPHAS[method]) if "wiseft" in settings.baselines else None
    try:
        variants = build_variants(recipe, sparsities=sparsities, baselines=list(settings.baselines),
                                  alphas=alphas, seed=settings.seed)
    except SweepError as error:
        raise TuneError(str(error)) from None
    if method == "fapm_lora":
        ft_variant = finetuned_variant(recipe)
        finetuned = _variant_dir(work, ft_variant)
    else:
        ft_variant = None
        finetuned = Path(model_name(non_base_models(recipe)[0])).absolute()
    return TunePlan(method, Path(base).absolute(), finetuned, ft_variant, variants)


def _variant_dir(work: Path, variant: Variant) -> Path:
    return work / "variants" / variant.name


def _fingerprint(recipe: dict, plan: TunePlan, settings: TuneSettings) -> dict:
    """What the evaluations depend on; a resumed tune must match it exactly."""
    evaluation = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings.eval).items()}
    if not settings.eval.lm_eval_tasks:  # a tune without the harness keeps its earlier plan
        evaluation = {k: v for k, v in evaluation.items() if not k.startswith("lm_eval_")}
    return {
        "recipe": recipe,
        "variants": [{"name": v.name, "recipe": v.recipe, "seed": v.seed} for v in plan.variants],
        "evaluation": evaluation,
        "text_sha256": file_digest(settings.text) if settings.text else None,
        "task_sha256": file_digest(settings.task) if settings.task else None,
        "merge_device": settings.device,
    }


def _open_work(work: Path, fingerprint: dict, restart: bool) -> None:
    plan_file = work / PLAN_FILE
    if restart and work.exists():
        shutil.rmtree(work)
    if plan_file.exists():
        try:
            earlier = json.loads(plan_file.read_text())
        except ValueError:
            earlier = None
        if earlier != fingerprint:
            changed = sorted(k for k in fingerprint if not isinstance(earlier, dict)
                             or earlier.get(k) != fingerprint[k])
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


# --------------------------------------------------------------------------- checks


def _axes(settings: TuneSettings) -> None:
    """Check the two axes and set the harness tasks they need (raises TuneError)."""
    tasks = [t.strip() for t in (settings.eval.lm_eval_tasks or "").split(",") if t.strip()]
    for name, option, default, needs, default_metric in (
            (settings.task_metric, "--task-metric", TASK_METRIC, "task", None),
            (settings.text_metric, "--text-metric", TEXT_METRIC, "text", "word_perplexity")):
        if name == default:
            if getattr(settings, needs) is None:
                raise TuneError(f"--{needs} is required unless {option} names an lm-eval metric "
                                f"(lm_eval:TASK/METRIC)")
            continue
        try:
            parsed = parse_metric(name, option=option, default_metric=default_metric)
        except EvalInputError as error:
            raise TuneError(f"{error} (or {default!r}: the --{needs} file)") from None
        if needs == "text" and parsed.metric not in ("word_perplexity", "byte_perplexity"):
            raise TuneError(f"{option} {name}: the general axis is a perplexity task's "
                            "word_perplexity or byte_perplexity (loss per word or byte), e.g. "
                            "lm_eval:wikitext")
        if parsed.task not in tasks:
            tasks.append(parsed.task)
        if needs == "task":
            settings.task_metric = parsed.key
        else:
            settings.text_metric = parsed.key
    if tasks and settings.eval.lm_eval_backend == "local-completions":
        raise TuneError("--lm-eval-backend local-completions asks one server for one model, but "
                        "tune evaluates a new model per variant: use hf or vllm (which load each "
                        "variant themselves)")
    settings.eval.lm_eval_tasks = ",".join(tasks) or None


def _check_eval_inputs(plan: TunePlan, settings: TuneSettings) -> None:
    """The task has items and the text gives at least two windows (intervals are
    over windows), before any merge: for the built-in axes (the harness checks its own)."""
    from fapm_merge.evaluation.metrics import EvalInputError, load_task, load_tokenizer, text_windows

    try:
        items = load_task(settings.task) if settings.task is not None else None
        text = Path(settings.text).read_text(encoding="utf-8") if settings.text is not None else None
        tokenizer = load_tokenizer(settings.eval.tokenizer, plan.base) if text is not None else None
    except UnicodeDecodeError as error:
        raise TuneError(f"--text {settings.text} is not UTF-8 text ({error.reason}); "
                        "convert it to UTF-8") from None
    except EvalInputError as error:
        raise TuneError(str(error)) from None
    if items is not None and len(items) < 2:
        raise TuneError(f"--task {settings.task} has {len(items)} item: a paired accuracy "
                        "comparison needs many (a few hundred resolve a few points of accuracy)")
    if text is None:
        return
    ids = tokenizer.encode(text)
    if settings.eval.max_tokens is not None:
        ids = ids[: settings.eval.max_tokens]
    windows = text_windows(ids, settings.eval.window, [])
    full = sum(1 for w in windows if len(w) == settings.eval.window)
    if full < 2:
        raise TuneError(
            f"--text {settings.text} gives {len(ids)} tokens, {full} full window(s) of "
            f"{settings.eval.window}: the forgetting intervals are computed over windows and "
            "need at least 2 (a few dozen for useful ones); give a longer text or a smaller --window")


def _checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def _variant_bytes(plan: TunePlan, recipe: dict) -> int:
    """About one variant's size on disk: the base's tensors in the recipe's dtype."""
    from fapm_merge.io.checkpoint import tensor_shapes

    dtype = recipe.get("out_dtype") or recipe.get("dtype")
    itemsize = {"float32": 4, "fp32": 4, "float64": 8, "bfloat16": 2, "bf16": 2,
                "float16": 2, "fp16": 2}.get(str(dtype))
    if itemsize is None:
        return sum(p.stat().st_size for p in plan.base.glob("*.safetensors"))
    return sum(math.prod(shape) for shape in tensor_shapes(plan.base).values()) * itemsize


def _check_disk(work: Path, plan: TunePlan, count: int, recipe: dict) -> None:
    """Enough free space in the work folder for ``count`` variants, or a clear error."""
    needed = count * _variant_bytes(plan, recipe)
    free = shutil.disk_usage(work).free
    if needed > free:
        raise TuneError(
            f"the next {count} variant(s) need about {needed / 1e9:.1f} GB in {work}, but only "
            f"{free / 1e9:.1f} GB are free: lower --max-on-disk, free space, or give --work on a "
            "bigger disk")


# --------------------------------------------------------------------------- merge + evaluate


def _merge_batch(batch: List[Variant], work: Path, settings: TuneSettings, copy_tokenizer: bool,
                 staging_name: str = "batch") -> None:
    """Merge ``batch`` in one sweep pass; each output lands in work/variants/NAME
    (moved there whole: a folder in variants/ is always a finished merge)."""
    from fapm_merge.workflows.sweep import run_sweep

    staging = work / staging_name
    if staging.exists():
        shutil.rmtree(staging)
    run_sweep(batch, staging, overwrite=True, device=settings.device,
              copy_tokenizer=copy_tokenizer, write_model_card=False, progress=False)
    for variant in batch:
        target = _variant_dir(work, variant)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging / variant.name, target)
    shutil.rmtree(staging)


def _evaluate(folder: Path, settings: TuneSettings, results: Path) -> None:
    from fapm_merge.evaluation.evaluate import evaluate_model

    record = evaluate_model(folder, settings.eval)
    append_result(results, record)


@dataclass(frozen=True)
class Job:
    """One model to evaluate on a Ray worker: merged first when ``variant`` is given
    and its folder is absent, its weights deleted after evaluation when ``delete``."""

    folder: Path
    variant: Optional[Variant]
    delete: bool


def run_job(job: Job, work: Path, settings: TuneSettings, copy_tokenizer: bool) -> dict:
    """Merge (if needed) and evaluate one model; its record (the work of one Ray task).

    The merge is a one-variant ``sweep`` into its own staging folder (tasks run side
    by side in one work folder), bit for bit what the serial batches write. A task
    that fails removes the variant's folder, so a rerun merges it afresh instead of
    trusting a folder the failure may have left half-checked.
    """
    from fapm_merge.evaluation.evaluate import evaluate_model

    try:
        if job.variant is not None and not job.folder.exists():
            _merge_batch([job.variant], work, settings, copy_tokenizer,
                         staging_name=f"batch-{job.variant.name}")
        record = evaluate_model(job.folder, settings.eval)
    except BaseException:
        if job.variant is not None and job.folder.exists():
            shutil.rmtree(job.folder, ignore_errors=True)
        raise
    if job.delete:
        shutil.rmtree(job.folder)
    return record


def _evaluated(results: Path) -> set:
    """Models the work folder's results file already holds."""
    if not results.exists() or not results.read_text(encoding="utf-8").strip():
        return set()
    try:
        return {record["model"] for record in read_results(results, TuneError)}
    except TuneError as error:
        raise TuneError(f"{error}: an interrupted write? Delete that line (its model is "
                        "evaluated again) or pass --restart") from None


def _check_anchors(results: Path, plan: TunePlan, settings: TuneSettings) -> None:
    """Stop before the variants when the decision could never be made."""
    records = {r["model"]: r for r in read_results(results, TuneError)}
    ft = records[str(plan.finetuned)]["metrics"]
    for name, kind, option in ((settings.task_metric, "accuracy", "--task-metric"),
                               (settings.text_metric, "loss", "--text-metric")):
        if not isinstance(ft.get(name), dict) or kind not in ft[name]:
            raise TuneError(f"{plan.finetuned}: " + explain_missing(name, ft, option=option, kind=kind))
    task = ft[settings.task_metric]
    what = "--task" if settings.task_metric == TASK_METRIC else settings.task_metric
    if task["accuracy"] <= 0:
        raise TuneError(
            f"the fine-tuned model scores 0 on {what} ({task['examples']} items): there is "
            "no task accuracy to keep, so no variant can be chosen. Check the task file (answers, "
            "prompt format, --bos/--no-bos as in training) before sweeping")


# --------------------------------------------------------------------------- output


def _table_markdown(result: Tradeoff) -> str:
    def cell(value, interval, digits):
        if value is None or not math.isfinite(value):
            return "-"
        text = f"{value:+.{digits}f}"
        return text + (f" [{interval.low:+.{digits}f}, {interval.high:+.{digits}f}]" if interval else "")

    rows = ["| model | method | strength | accuracy | Δ accuracy vs fine-tune [95%] | CF % [95%] "
            "| repaired [95%] | rule |", "|---|---|---|---:|---:|---:|---:|---|"]
    rank = {"base": 0, "finetuned": 1}
    for p in sorted(result.points, key=lambda p: (rank.get(p.method, 2), p.method, p.strength or 0)):
        delta = p.accuracy_vs_ft.estimate if p.accuracy_vs_ft else p.accuracy - result.finetuned.accuracy
        strength = "" if p.strength is None else f"{p.strength_name} {p.strength:g}"
        name = f"**{p.name}**" if p is result.selected else p.name
        rows.append(f"| {name} | {p.method} | {strength} | {p.accuracy:.3f} | "
                    f"{cell(delta, p.accuracy_vs_ft, 3)} | {cell(p.cf_pct, p.cf_interval, 2)} | "
                    f"{cell(p.repaired, p.repaired_interval, 2)} | {p.verdict} |")
    return "\n".join(rows)


def model_card(result: Tradeoff, variant: Variant, plan: TunePlan, command: str, name: str) -> str:
    """The chosen model's README.md: what it is, why it was chosen, the evidence."""
    import yaml

    chosen = result.selected
    recipe_yaml = yaml.safe_dump(variant.recipe, sort_keys=False).strip()
    front = {"base_model": str(plan.base), "library_name": "transformers",
             "tags": ["mergekit", "merge", "fapm", "fapm-merge"]}
    seed_note = f" --random-seed {variant.seed}" if variant.seed is not None else ""
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {name}", "",
        f"`{plan.finetuned}` with its forgetting repaired by FAPM (Forgetting-Aware Pruning, "
        "[arXiv 2509.08255](https://arxiv.org/abs/2509.08255)), chosen by "
        f"`fapm-merge tune` among {len(result.points) - 2} variants: **{chosen.label}**.", "",
        "## Why this model", "",
        f"Rule: {result.rule.text}.", "",
        f"Decision: {result.reason}.", "",
    ]
    if (result.task_metric, result.text_metric) == (TASK_METRIC, TEXT_METRIC):
        measured = (f"Task accuracy on the task file and forgetting on the general text, every model "
                    f"on the same {result.items.get('prompts', 0)} prompts and "
                    f"{result.items.get('windows', 0)} text windows; intervals are 95% and paired ")
    else:
        measured = (f"Accuracy is `{result.task_metric}` and forgetting `{result.text_metric}` "
                    f"(`lm_eval:` metrics come from lm-evaluation-harness's per-sample results), "
                    f"every model on the same {result.items.get('prompts', 0)} task items and "
                    f"{result.items.get('windows', 0)} text windows or documents; intervals are 95% "
                    "and paired ")
    if result.warnings:
        lines += ["Caveats the evidence leaves:", ""] + [f"- {w}." for w in result.warnings] + [""]
    lines += [
        "## The trade-off", "",
        measured +
        "(exact one-sided McNemar test for the accuracy criterion, paired bootstrap over "
        "prompts and windows for the intervals). CF % = 100 (PPL - PPL_base) / PPL_base; "
        "repaired = share of the fine-tune's extra loss undone.", "",
        _table_markdown(result), "",
        "![trade-off](tradeoff.png)", "",
        "## Recipe", "",
        "```yaml", recipe_yaml, "```", "",
        f"`mergekit-yaml {RECIPE_FILE} OUT{seed_note}` writes these weights again, bit for bit. "
        "The whole decision:", "",
        "```sh", command, "```", "",
        "Made with fapm-merge (FAPM for [mergekit](https://github.com/arcee-ai/mergekit)).", "",
    ]
    return "\n".join(lines)


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


# --------------------------------------------------------------------------- the loop


def _serial(plan: TunePlan, work: Path, settings: TuneSettings, copy_tokenizer: bool, recipe: dict,
            results: Path, done: set, progress: Progress) -> Tuple[int, int]:
    """Anchors, then the variants in batches of ``max_on_disk`` (one sweep pass per
    batch), in this process; returns (evaluated, reused)."""
    reused = evaluated = 0
    # 1. the anchors
    anchors = [plan.base, plan.finetuned]
    for index, folder in enumerate(anchors, 1):
        if str(folder) in done:
            reused += 1
        else:
            if folder == plan.finetuned and plan.finetuned_variant is not None and not folder.exists():
                _check_disk(work, plan, 1, recipe)
                _merge_batch([plan.finetuned_variant], work, settings, copy_tokenizer)
            _evaluate(folder, settings, results)
            evaluated += 1
        progress("anchors", index, len(anchors), folder.name)

    _check_anchors(results, plan, settings)

    # 2. the variants, at most max_on_disk on disk at once
    todo = [v for v in plan.variants if str(_variant_dir(work, v)) not in done]
    reused += len(plan.variants) - len(todo)
    finished = len(plan.variants) - len(todo)
    progress("variants", finished, len(plan.variants), "")
    for start in range(0, len(todo), settings.max_on_disk):
        batch = todo[start : start + settings.max_on_disk]
        to_merge = [v for v in batch if not _variant_dir(work, v).exists()]
        if to_merge:
            _check_disk(work, plan, len(to_merge), recipe)
            _merge_batch(to_merge, work, settings, copy_tokenizer)
        for variant in batch:
            folder = _variant_dir(work, variant)
            _evaluate(folder, settings, results)
            evaluated += 1
            finished += 1
            if not settings.keep_variants:
                shutil.rmtree(folder)
            progress("variants", finished, len(plan.variants), variant.name)
    return evaluated, reused


def _distributed(executor, plan: TunePlan, work: Path, settings: TuneSettings, copy_tokenizer: bool,
                 recipe: dict, results: Path, done: set, progress: Progress) -> Tuple[int, int]:
    """The same work as :func:`_serial`, one model per Ray task, at most ``max_on_disk``
    in flight; records are appended here, in the plan's order, as they are ready.

    A failed task does not stop the others: its variant is named with the cause, the
    other records are kept, and :class:`TuneError` is raised at the end (nothing is
    written to OUT); a rerun evaluates only what is missing.
    """
    from fapm_merge.workflows.executors import TaskFailure

    evaluated = reused = 0
    failures: List[str] = []

    def run(stage: str, jobs: List[Job], names: List[str], total: int, finished: int) -> int:
        nonlocal evaluated
        progress(stage, finished, total, "")

        def before_submit(index: int) -> None:  # on the driver, as each task is submitted
            if jobs[index].variant is not None and not jobs[index].folder.exists():
                _check_disk(work, plan, 1, recipe)

        for index, outcome in executor.ordered(run_job, jobs, (work, settings, copy_tokenizer),
                                               limit=settings.max_on_disk,
                                               before_submit=before_submit):
            if isinstance(outcome, TaskFailure):
                failures.append(f"{names[index]}: {outcome.message}")
            else:
                append_result(results, outcome)
                evaluated += 1
            finished += 1
            progress(stage, finished, total, names[index])
        return finished

    # 1. the anchors
    anchors = [(plan.base, None), (plan.finetuned, plan.finetuned_variant)]
    jobs = [Job(folder, variant, delete=False) for folder, variant in anchors if str(folder) not in done]
    reused += len(anchors) - len(jobs)
    run("anchors", jobs, [j.folder.name for j in jobs], len(anchors), len(anchors) - len(jobs))
    if failures:
        raise TuneError(_failed_message(failures, work))
    _check_anchors(results, plan, settings)

    # 2. the variants
    todo = [v for v in plan.variants if str(_variant_dir(work, v)) not in done]
    reused += len(plan.variants) - len(todo)
    jobs = [Job(_variant_dir(work, v), v, delete=not settings.keep_variants) for v in todo]
    run("variants", jobs, [v.name for v in todo], len(plan.variants), len(plan.variants) - len(todo))
    if failures:
        raise TuneError(_failed_message(failures, work))
    return evaluated, reused


def _failed_message(failures: List[str], work: Path) -> str:
    return (f"{len(failures)} evaluation(s) failed on Ray: " + "; ".join(failures)
            + f". The other results are kept in {work / RESULTS_FILE}; nothing was written to the "
            "output. Run the same command again to retry only the failed ones")


def run_tune(
    recipe: dict,
    out_dir: Path,
    settings: TuneSettings,
    *,
    command: str = "fapm-merge tune ...",
    progress: Progress = _quiet,
) -> TuneResult:
    """Sweep, evaluate, decide, and write the chosen model to ``out_dir``.

    Args:
        recipe (`dict`): a ``fapm`` or ``fapm_lora`` mergekit recipe (absolute paths).
        out_dir (`Path`): where the chosen model goes (atomically; only if one is chosen).
        settings (`TuneSettings`): what to sweep and how to evaluate and decide.
        command (`str`): the command line, quoted in the model card.
        progress (`Progress`): called after each step.

    Raises:
        TuneError: bad input, a work folder of another tune, too little disk.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()) and not settings.overwrite:
        raise TuneError(f"output folder {out_dir} exists and is not empty; choose another path "
                        "or pass --overwrite")
    work = Path(settings.work_dir or out_dir.with_name(out_dir.name + ".tune")).absolute()
    if settings.max_on_disk < 1:
        raise TuneError(f"--max-on-disk must be at least 1, got {settings.max_on_disk}")
    _axes(settings)  # first: it says which of --text and --task are needed
    # a --text or --task given beside a harness axis is measured too: the records can
    # then be re-decided on either axis (fapm-merge tradeoff --task-metric task)
    settings.eval = EvalSettings(**{
        **asdict(settings.eval),
        "text": Path(settings.text).absolute() if settings.text is not None else None,
        "task": Path(settings.task).absolute() if settings.task is not None else None})
    plan = plan_tune(recipe, settings, work)
    _check_eval_inputs(plan, settings)
    copy_tokenizer = settings.copy_tokenizer
    if copy_tokenizer is None:  # a base without tokenizer files would log a traceback
        copy_tokenizer = any((plan.base / name).exists()
                             for name in ("tokenizer_config.json", "tokenizer.json"))
    executor = None
    if settings.ray is not None:  # before the work folder: a missing Ray changes nothing
        from fapm_merge.workflows.executors import ExecutorError, RayExecutor

        try:
            executor = RayExecutor(settings.ray,
                                   gpus=settings.ray_gpus if settings.device != "cpu" else 0)
        except ExecutorError as error:
            raise TuneError(str(error)) from None
    _open_work(work, _fingerprint(recipe, plan, settings), settings.restart)
    results = work / RESULTS_FILE
    done = _evaluated(results)
    if executor is None:
        evaluated, reused = _serial(plan, work, settings, copy_tokenizer, recipe, results, done, progress)
    else:
        evaluated, reused = _distributed(executor, plan, work, settings, copy_tokenizer, recipe,
                                         results, done, progress)
    if plan.finetuned_variant is not None and not settings.keep_variants and plan.finetuned.exists():
        shutil.rmtree(plan.finetuned)

    # 3. the decision
    wanted = {str(plan.base), str(plan.finetuned)} | {str(_variant_dir(work, v)) for v in plan.variants}
    records = [r for r in read_results(results, with_items=True) if r["model"] in wanted]
    result = compute_tradeoff(records, base=str(plan.base), finetuned=str(plan.finetuned),
                              rule=settings.rule, task_metric=settings.task_metric,
                              text_metric=settings.text_metric)
    from fapm_merge.workflows.plots import plot_tradeoff

    plot = plot_tradeoff(result, work / "tradeoff.png")
    (work / "tradeoff.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    progress("decision", 1, 1, result.selected.name if result.selected else "nothing chosen")

    # 4. the chosen model, rebuilt from its recipe
    by_folder = {str(_variant_dir(work, v)): v for v in plan.variants}
    chosen = by_folder.get(result.selected.model) if result.selected else None
    if chosen is None:
        if result.selected is not None:  # max-cf / weighted may pick an anchor
            message = (f"the rule selects {result.selected.name}, one of the two models you already "
                       f"have ({result.selected.model}); nothing is written to {out_dir}")
        else:
            message = f"nothing written to {out_dir}: {result.reason}"
        return TuneResult(result, None, work, evaluated, reused,
                          time.perf_counter() - started, plot, message)

    def extras(folder: Path) -> None:
        shutil.copyfile(plot, folder / "tradeoff.png")
        (folder / "tradeoff.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
        (folder / "README.md").write_text(
            model_card(result, chosen, plan, command, out_dir.name), encoding="utf-8")

    _rebuild(chosen, out_dir, settings, copy_tokenizer, extras)
    progress("rebuild", 1, 1, out_dir.name)
    return TuneResult(result, out_dir, work, evaluated, reused, time.perf_counter() - started,
                      plot, f"wrote {chosen.name} ({result.selected.label}) to {out_dir}")


__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_BASELINES",
    "DEFAULT_SPARSITIES",
    "EXIT_NOTHING_CHOSEN",
    "MAX_ON_DISK",
    "TuneError",
    "TunePlan",
    "TuneResult",
    "TuneSettings",
    "model_card",
    "plan_tune",
    "run_tune",
]
