"""What a tune sweeps: its settings, their defaults, and the plan of models it evaluates."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence

from fapm_merge.core.errors import FapmMergeError
from fapm_merge.core.rules import DEFAULT_LORA_SPARSITY, DEFAULT_SPARSITY, FAPM, FAPM_LORA
from fapm_merge.evaluation.errors import EvalInputError
from fapm_merge.evaluation.inputs import JSONL_SUFFIX
from fapm_merge.evaluation.lm_eval import DEFAULT_PERPLEXITY_METRIC, PERPLEXITY_METRICS, parse_metric, resolve_axes
from fapm_merge.evaluation.split import CONFIRM_SHARE
from fapm_merge.evaluation.settings import (
    LM_EVAL_LOADING_BACKENDS,
    LM_EVAL_SERVER_BACKEND,
    TASK_METRIC,
    TEXT_METRIC,
    EvalSettings,
)
from fapm_merge.io.model_paths import looks_local, missing_local_models
from fapm_merge.io.recipe import model_name, non_base_models
from fapm_merge.workflows.tradeoff import Rule
from fapm_merge.workflows.tradeoff.screen import SCREEN_SHARE

if TYPE_CHECKING:  # sweep imports mergekit: it loads on use, so the command line can
    # show these defaults without it
    from fapm_merge.workflows.variants import Variant

DEFAULT_SPARSITIES = {
    FAPM: (0.1, 0.3, 0.5, 0.7, DEFAULT_SPARSITY, 0.95),
    FAPM_LORA: (0.05, DEFAULT_LORA_SPARSITY, 0.2, 0.3, 0.5),
}
"""FAPM values swept by default. Full fine-tunes: the paper's default 0.9 and the
range around it down to light pruning, where most of the task survives. LoRA
updates: the paper's advice is to prune only ~10%, so the grid stays low."""

FAMILY_BETAS = (0.0, 0.25, 0.5, 1.0, 2.0)
"""FAPM balance factors of the repair family (``--beta 0,0.25,0.5,1,2``).

FAPM's score is ``|dW| - beta * mean(|W_pre|) * |dW| / |W_pre|``. On the replication
(docs/experiments.md) the best member differs by fine-tune, so tune looks along beta:

* 0: magnitude pruning of dW, the family's one end (it won the full fine-tune arm);
* 0.25 and 0.5: between the two, where nobody had looked;
* 1: the paper's score (it won the LoRA arm);
* 2: beyond the paper, penalising updates large relative to their base weight twice
  as hard.

Five betas make the FAPM grid five times larger, and evaluation is tune's cost: the
family is tune's default when it screens its candidates on a share of the data
(:func:`screening_off`, :mod:`fapm_merge.workflows.tradeoff.screen`), where most of it
is dropped after the share; without screening the default is :data:`DEFAULT_BETAS`."""

DEFAULT_BETAS = (1.0,)
"""FAPM balance factors tune sweeps by default when it does not screen (``--no-screen``,
or data screening cannot cut: :func:`screening_off`): the paper's score (beta 0,
magnitude pruning, is a default baseline). Screened, the default is :data:`FAMILY_BETAS`."""

DEFAULT_BASELINES = ("magnitude", "wiseft", "lines")
"""Magnitude pruning of dW (FAPM with beta 0: what FAPM improves on; the same models as
beta 0, made once), WiSE-FT (``W_pre + alpha * dW``: the strongest simple baseline in
the replication) and LiNeS (the strongest published data-free anti-forgetting edit, the
rival reviewers ask about; :data:`~fapm_merge.workflows.variants.LINES_ALPHAS`). FAPM
with a LiNeS-style depth schedule (``depth``,
:data:`~fapm_merge.workflows.variants.DEPTH_SCHEDULES`) and DARE are opt-in: DARE
rescales what it keeps and repairs no forgetting (docs/experiments.md)."""

DEFAULT_ALPHAS = {FAPM: (0.3, 0.5, 0.7, 0.9), FAPM_LORA: (0.5, 0.7, 0.9)}
"""WiSE-FT strengths swept by default."""

MAX_ON_DISK = 2
"""Variants on disk at once (each is a full checkpoint)."""


class TuneError(FapmMergeError, ValueError):
    """A tune that cannot run or continue; the message says what to change."""


@dataclass(frozen=True)
class TuneSettings:
    """What ``tune`` sweeps, how it evaluates and decides. Attributes mirror the options.

    :meth:`resolved` gives the settings a run applies (axes as record keys, the
    harness tasks and the files in ``eval``); this object is never changed.

    Attributes:
        text, task (`Path`, *optional*): general text (forgetting) and task file
            (accuracy); each is needed unless its axis comes from lm-eval.
        sparsities (`Sequence[float]`, *optional*): FAPM values; default `DEFAULT_SPARSITIES`.
        betas (`Sequence[float]`, *optional*): FAPM balance factors, each at every
            sparsity; default `DEFAULT_BETAS`.
        baselines (`Sequence[str]`): any of magnitude, wiseft, lines, depth, dare (dare:
            fapm only).
        alphas (`Sequence[float]`, *optional*): WiSE-FT strengths; default `DEFAULT_ALPHAS`.
        seed (`int`, defaults to 0): DARE's seed (``mergekit-yaml --random-seed``).
        rule (`Rule`): the selection rule (default: repair at retention 0.99).
        eval (`EvalSettings`): tokenizer, window, batch size, ... (text/task: :meth:`resolved`
            sets them from ``text`` and ``task``).
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
        confirm_task, confirm_text (`Path`, *optional*): held-out task and text on which
            the base, the fine-tune and the chosen variant are evaluated again after the
            decision (the card's headline numbers); each one not given is split off its
            selection file (:mod:`fapm_merge.evaluation.split`).
        confirm_share (`float`, defaults to 0.3): share of the prompts and documents held
            out when a file is split; 0: no held-out check (unless both files are given).
        screen (`bool`, defaults to True): screen the variants on a share of the selection
            data first and evaluate only the survivors on the rest
            (:mod:`fapm_merge.workflows.tradeoff.screen`); FAPM's default betas are then
            :data:`FAMILY_BETAS`. Skipped, with the reason, where the data cannot be cut
            (:func:`screening_off`).
        screen_share (`float`, defaults to 0.3): the share of the selection prompts (whole
            groups) and documents every variant is screened on.
    """

    text: Optional[Path] = None
    task: Optional[Path] = None
    sparsities: Optional[Sequence[float]] = None
    betas: Optional[Sequence[float]] = None
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
    confirm_task: Optional[Path] = None
    confirm_text: Optional[Path] = None
    confirm_share: float = CONFIRM_SHARE
    screen: bool = True
    screen_share: float = SCREEN_SHARE

    def resolved(self) -> "TuneSettings":
        """These settings as a run applies them, as a new object (raises TuneError).

        The axes become record keys (:func:`~fapm_merge.evaluation.lm_eval.resolve_axes`),
        and ``eval`` gets the harness tasks they need and the ``text`` and ``task``
        files: a file given beside a harness axis is measured too, so the records can
        be re-decided on either axis (``fapm-merge tradeoff --task-metric task``).
        Checked first, as it says which of ``--text`` and ``--task`` are needed.
        """
        for name, option, builtin, needs, default_metric in (
                (self.task_metric, "--task-metric", TASK_METRIC, "task", None),
                (self.text_metric, "--text-metric", TEXT_METRIC, "text", DEFAULT_PERPLEXITY_METRIC)):
            if name == builtin:
                if getattr(self, needs) is None:
                    raise TuneError(f"--{needs} is required unless {option} names an lm-eval metric "
                                    f"(lm_eval:TASK/METRIC)")
                continue
            # tune measures its axes itself: a name is the built-in metric or the harness's
            try:
                parsed = parse_metric(name, option=option, default_metric=default_metric)
            except EvalInputError as error:
                raise TuneError(f"{error} (or {builtin!r}: the --{needs} file)") from None
            if needs == "text" and parsed.metric not in PERPLEXITY_METRICS:
                raise TuneError(f"{option} {name}: the general axis is a perplexity task's "
                                f"{' or '.join(PERPLEXITY_METRICS)} (loss per word or byte), e.g. "
                                "lm_eval:wikitext")
        axes = resolve_axes(self.task_metric, self.text_metric)
        evaluation = replace(self.eval, text=self.text, task=self.task).resolved(axes.harness_tasks)
        if evaluation.lm_eval_tasks and evaluation.lm_eval_backend == LM_EVAL_SERVER_BACKEND:
            raise TuneError(f"--lm-eval-backend {LM_EVAL_SERVER_BACKEND} asks one server for one model, "
                            "but tune evaluates a new model per variant: use "
                            f"{' or '.join(LM_EVAL_LOADING_BACKENDS)} (which load each variant themselves)")
        return replace(self, task_metric=axes.task, text_metric=axes.text, eval=evaluation)


def screening_off(settings: TuneSettings) -> Optional[str]:
    """Why a tune with these (resolved) settings does not screen, or None when it does.

    Screening cuts the ``--task`` and ``--text`` files into a share and the rest, by whole
    prompts (groups) and documents, so that the two parts' records rebuild the whole
    record exactly (:func:`fapm_merge.workflows.tradeoff.screen.combine`). It cannot when
    an axis or an extra metric comes from lm-eval (the harness's data is not ours to cut),
    when ``--max-tokens`` caps the text as a whole (a share's documents would be cut
    elsewhere) or when the text is one document (a plain file: no whole documents to
    choose). The runner says too when the selection data have fewer than two prompts
    (groups) or documents to share.
    """
    if not settings.screen:
        return "off (--no-screen)"
    if settings.eval.lm_eval_tasks or (settings.task_metric, settings.text_metric) != (TASK_METRIC, TEXT_METRIC):
        return "skipped: lm-eval metrics are measured on the harness's data, which screening cannot cut"
    if settings.eval.max_tokens is not None:
        return "skipped: --max-tokens caps the text as a whole, so a share of its documents would be cut elsewhere"
    text = Path(settings.text) if settings.text is not None else None
    if text is not None and text.is_file() and text.suffix != JSONL_SUFFIX:
        return (f"skipped: --text {text.name} is one document (a plain file), and screening shares whole "
                "documents; give a .jsonl of documents or a folder of .txt files to screen")
    return None


@dataclass
class TunePlan:
    """The models a tune evaluates: the two anchors and the variants."""

    method: str  # fapm or fapm_lora
    base: Path
    finetuned: Path  # a folder: the user's, or work/variants/finetuned (fapm_lora)
    finetuned_variant: Optional[Variant]  # fapm_lora: the merge that makes it
    variants: List[Variant]


def plan_tune(recipe: dict, settings: TuneSettings, work: Path) -> TunePlan:
    """Every model the tune evaluates, from the recipe (raises TuneError)."""
    method = recipe.get("merge_method")
    if method not in DEFAULT_SPARSITIES:
        raise TuneError(f"tune needs a recipe with merge_method: {FAPM} (a full fine-tune) or "
                        f"{FAPM_LORA} (a LoRA adapter), got {method!r}")
    if method == FAPM and len(non_base_models(recipe)) != 1:
        raise TuneError("tune compares one fine-tune with its base: the recipe must list exactly "
                        "one fine-tuned model besides base_model")
    base = recipe.get("base_model")
    references = [("base_model", base)]
    if method == FAPM:
        references.append(("the fine-tuned model", model_name(non_base_models(recipe)[0])))
    missing = missing_local_models(recipe)  # a misspelt folder: said as lint and sweep say it
    if missing:
        raise TuneError("; ".join(str(problem) for problem in missing))
    for where, reference in references:
        if not isinstance(reference, str) or "+" in reference or not looks_local(reference) \
                or not Path(reference).is_dir():
            raise TuneError(
                f"{where} {reference!r}: tune evaluates models from local folders; give the "
                "absolute path of a downloaded model folder (huggingface-cli download ...)")
    from fapm_merge.workflows.variants import SweepError, build_variants, finetuned_variant

    sparsities = list(settings.sparsities or DEFAULT_SPARSITIES[method])
    alphas = list(settings.alphas or DEFAULT_ALPHAS[method]) if "wiseft" in settings.baselines else None
    try:
        betas = settings.betas or (FAMILY_BETAS if screening_off(settings) is None else DEFAULT_BETAS)
        variants = build_variants(recipe, sparsities=sparsities, betas=list(betas),
                                  baselines=list(settings.baselines), alphas=alphas, seed=settings.seed)
    except SweepError as error:
        raise TuneError(str(error)) from None
    if method == FAPM_LORA:
        ft_variant = finetuned_variant(recipe)
        finetuned = variant_dir(work, ft_variant)
    else:
        ft_variant = None
        finetuned = Path(model_name(non_base_models(recipe)[0])).absolute()
    return TunePlan(method, Path(base).absolute(), finetuned, ft_variant, variants)


def variant_dir(work: Path, variant: Variant) -> Path:
    return work / "variants" / variant.name


__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_BASELINES",
    "DEFAULT_BETAS",
    "FAMILY_BETAS",
    "DEFAULT_SPARSITIES",
    "MAX_ON_DISK",
    "TuneError",
    "TunePlan",
    "TuneSettings",
    "plan_tune",
    "screening_off",
    "variant_dir",
]
