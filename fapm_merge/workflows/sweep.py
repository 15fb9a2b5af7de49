"""One read of the inputs, many merges: a sparsity sweep and its baselines.

A sweep is a list of *variants*, each a complete mergekit recipe that differs from
the others only in its method and parameters (same base, same fine-tuned models,
same dtype). Every variant is planned by mergekit's own ``MergePlanner`` exactly as
``mergekit-yaml`` would plan it; all plans then run in one mergekit ``Executor``:

* the tensor-loading tasks of all plans are the same tasks, so the executor reads
  each input tensor once for all variants;
* per output tensor, one :class:`SweepTensorTask` computes every variant's output.
  FAPM variants (and magnitude pruning, which is FAPM with ``beta: 0``) score the
  task vector once per distinct ``beta`` with :func:`fapm_merge.core.fapm_scores`
  and select each keep count with :func:`~fapm_merge.core.find_threshold` and
  :func:`~fapm_merge.core.select_where`, the same calls the ``fapm`` kernel makes
  for one model at coefficient 1. Every other variant (``rescale``, several
  models, DARE, WiSE-FT) runs mergekit's own per-tensor task on the shared inputs.

So every output equals a ``mergekit-yaml`` run of the ``mergekit_config.yml``
written beside it, bit for bit (tests/test_sweep.py checks it against the real
command). DARE variants each get their own random stream seeded like
``mergekit-yaml --random-seed SEED`` and drawn in the same tensor order.

The whole OUT_DIR appears atomically when every variant is complete; it holds one
model folder per variant and ``sweep.json`` (variant name, method, strength, path).
"""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml

from fapm_merge.core.errors import FapmMergeError
from fapm_merge.core import (
    FapmInputError,
    complement,
    fapm_scores,
    find_threshold,
    is_exact_select,
    keep_count,
    merge_coefficients,
    select_where,
)
from fapm_merge.evaluation.results import SWEEP_MANIFEST
from fapm_merge.io.recipe import (
    RECIPE_FILE,
    RecipeError,
    load_recipe as read_recipe_file,
    model_path_problems,
    model_name,
    non_base_models,
    structure_problems,
)
from fapm_merge.methods import compat
from fapm_merge.methods.common import is_lora_reference
BASELINES = ("magnitude", "dare", "wiseft")
"""Baselines a sweep can add: magnitude pruning of dW (FAPM with beta 0), DARE
(mergekit ``dare_linear``: random drop, 1/density rescale) and WiSE-FT
(mergekit ``task_arithmetic`` with weight alpha: ``W_pre + alpha * dW``)."""


class SweepError(FapmMergeError, ValueError):
    """A recipe or option the sweep cannot run; the message says what to change."""


@dataclass
class Variant:
    """One output of a sweep.

    Attributes:
        name (`str`): folder name inside OUT_DIR, e.g. ``fapm-s0.9``.
        method (`str`): ``fapm``, ``magnitude``, ``dare``, ``wiseft``, or for a
            ``fapm_lora`` recipe ``fapm_lora``, ``magnitude_lora``, ``wiseft_lora``.
        strength (`dict`): the swept value, e.g. ``{"sparsity": 0.9}`` or ``{"alpha": 0.3}``.
        recipe (`dict`): the complete mergekit recipe this output equals.
        seed (`int`, *optional*): random seed (DARE only).
    """

    name: str
    method: str
    strength: Dict[str, float]
    recipe: dict
    seed: Optional[int] = None


def parse_values(text: str, option: str) -> List[float]:
    """``"0.5,0.7,0.9"`` -> ``[0.5, 0.7, 0.9]``; each in [0, 1], no duplicates."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SweepError(f"{option} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise SweepError(f"{option} needs at least one value")
    for value in values:
        if not 0.0 <= value <= 1.0:
            raise SweepError(f"{option} values must be in [0, 1], got {value}")
    if len(set(values)) != len(values):
        raise SweepError(f"{option} lists a value twice: {text!r}")
    return values


def _fmt(value: float) -> str:
    return repr(float(value))


SWEEPABLE = ("fapm", "fapm_lora")
"""Methods whose recipes a sweep varies: full fine-tunes and LoRA adapters."""


def _check_recipe(recipe: dict) -> None:
    wrong = structure_problems(recipe)  # mergekit's own recipe model first
    if wrong:
        raise SweepError("; ".join(str(problem) for problem in wrong))
    if recipe.get("merge_method") not in SWEEPABLE:
        raise SweepError(
            f"sweep needs a recipe with merge_method: fapm (or fapm_lora), got "
            f"{recipe.get('merge_method')!r}; baselines come from --baselines"
        )
    if not recipe.get("base_model"):
        raise SweepError("sweep needs base_model in the recipe (FAPM prunes W_ft - W_pre)")
    if recipe.get("slices") or recipe.get("modules"):
        raise SweepError(
            "sweep supports recipes with `models:` (no slices/modules); run "
            "mergekit-yaml once per value for slice recipes"
        )
    if recipe.get("tokenizer") or recipe.get("tokenizer_source"):
        raise SweepError(
            "sweep does not support tokenizer/tokenizer_source recipes; remove them "
            "(the base tokenizer is copied) or run mergekit-yaml once per value"
        )
    if recipe.get("merge_method") == "fapm_lora":
        if not isinstance((recipe.get("parameters") or {}).get("adapter"), str):
            raise SweepError("a fapm_lora recipe needs parameters: {adapter: /path/to/adapter}")
    elif not non_base_models(recipe):
        raise SweepError("the recipe lists no fine-tuned model besides base_model")
    # Before any work: a missing folder, or a relative path that mergekit's model
    # card would send to the hub after every variant was computed (offline: a crash).
    wrong = model_path_problems(recipe)
    if wrong:
        raise SweepError("; ".join(str(problem) for problem in wrong))


def _with_parameters(recipe: dict, **values) -> dict:
    """A copy of a fapm_lora recipe with these top-level parameters set (the
    strength keys sparsity/density replaced, never both)."""
    recipe = copy.deepcopy(recipe)
    top = dict(recipe.get("parameters") or {})
    if "sparsity" in values or "density" in values:
        top.pop("sparsity", None)
        top.pop("density", None)
    top.update(values)
    recipe["parameters"] = top
    return recipe


def _with_strength(recipe: dict, key: str, value: float) -> dict:
    """The recipe with ``key`` (sparsity or density) set: on every fine-tuned model
    (``fapm``: a per-model parameter) or at the top (``fapm_lora``: shared)."""
    if recipe.get("merge_method") == "fapm_lora":
        return _with_parameters(recipe, **{key: value})
    recipe = copy.deepcopy(recipe)
    top = recipe.get("parameters") or {}
    for name in ("sparsity", "density"):
        top.pop(name, None)
    if top:
        recipe["parameters"] = top
    else:
        recipe.pop("parameters", None)
    for model in non_base_models(recipe):
        params = model.get("parameters") or {}
        params.pop("sparsity", None)
        params.pop("density", None)
        params[key] = value
        model["parameters"] = params
    return recipe


def finetuned_variant(recipe: dict) -> "Variant":
    """For a ``fapm_lora`` recipe, the fine-tuned model itself as a variant:
    ``fapm_lora`` at sparsity 0 is ``W_pre + scale * B @ A`` for every adapted
    weight, computed as peft's merge computes it."""
    if recipe.get("merge_method") != "fapm_lora":
        raise SweepError("only a fapm_lora recipe's fine-tune is made by a merge")
    return Variant("finetuned", "finetuned", {}, _with_parameters(recipe, sparsity=0.0))


def build_variants(
    recipe: dict,
    *,
    sparsities: Optional[Sequence[float]] = None,
    densities: Optional[Sequence[float]] = None,
    baselines: Sequence[str] = (),
    alphas: Optional[Sequence[float]] = None,
    seed: int = 0,
) -> List[Variant]:
    """The variants of a sweep over ``recipe`` (a one-base ``fapm`` or ``fapm_lora`` recipe).

    For ``fapm_lora`` the baselines go through the same native adapter path on the
    same update ``dW = scale * B @ A``: magnitude is ``beta: 0``, WiSE-FT is
    ``sparsity: 0, lambda: alpha`` (``W_pre + alpha * dW``); DARE has no
    ``fapm_lora`` form.

    Args:
        recipe (`dict`): the mergekit recipe; its own sparsity/density is replaced.
        sparsities (`Sequence[float]`, *optional*): values to sweep (share reset).
        densities (`Sequence[float]`, *optional*): or the kept shares; not both.
        baselines (`Sequence[str]`, defaults to ()): any of ``BASELINES``; magnitude
            and DARE use the same strengths as FAPM (DARE's density = 1 - sparsity).
        alphas (`Sequence[float]`, *optional*): WiSE-FT strengths; default: the
            densities, so each WiSE-FT point moves as far as the kept share.
        seed (`int`, defaults to 0): DARE seed (``mergekit-yaml --random-seed``).
    """
    _check_recipe(recipe)
    if (sparsities is None) == (densities is None):
        raise SweepError("give exactly one of --sparsity or --density")
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise SweepError(f"unknown baseline(s) {sorted(unknown)}; choose from {BASELINES}")
    lora = recipe.get("merge_method") == "fapm_lora"
    if lora and "dare" in baselines:
        raise SweepError("the dare baseline has no fapm_lora form; use magnitude and wiseft, "
                         "or run dare_linear on a merged copy (model: BASE+ADAPTER)")
    if not lora and ("dare" in baselines or "wiseft" in baselines):
        if len(non_base_models(recipe)) != 1:
            raise SweepError("DARE and WiSE-FT baselines need exactly one fine-tuned model")
    key, values = ("sparsity", sparsities) if sparsities is not None else ("density", densities)
    tag = "s" if key == "sparsity" else "d"
    suffix = "_lora" if lora else ""
    variants = [
        Variant(f"fapm{suffix}-{tag}{_fmt(v)}", f"fapm{suffix}", {key: v}, _with_strength(recipe, key, v))
        for v in values
    ]
    if "magnitude" in baselines:
        for v in values:
            r = _with_strength(recipe, key, v)
            r.setdefault("parameters", {})["beta"] = 0.0
            variants.append(Variant(f"magnitude{suffix}-{tag}{_fmt(v)}", f"magnitude{suffix}", {key: v}, r))
    def density_of(v: float) -> float:
        return complement(v) if key == "sparsity" else float(v)

    if lora:
        if "wiseft" in baselines:
            for a in alphas if alphas is not None else [density_of(v) for v in values]:
                r = _with_parameters(recipe, sparsity=0.0, **{"lambda": a})
                variants.append(Variant(f"wiseft_lora-a{_fmt(a)}", "wiseft_lora", {"alpha": a}, r))
        return _unique(variants)
    finetuned = model_name(non_base_models(recipe)[0])
    common = {k: recipe[k] for k in ("base_model", "dtype", "out_dtype") if k in recipe}
    if "dare" in baselines:
        for v in values:
            d = density_of(v)
            r = {
                "merge_method": "dare_linear",
                **common,
                "models": [{"model": finetuned, "parameters": {"weight": 1.0, "density": d}}],
            }
            variants.append(Variant(f"dare-{tag}{_fmt(v)}", "dare", {key: v}, r, seed=seed))
    if "wiseft" in baselines:
        for a in alphas if alphas is not None else [density_of(v) for v in values]:
            r = {
                "merge_method": "task_arithmetic",
                **common,
                "models": [{"model": finetuned, "parameters": {"weight": a}}],
            }
            variants.append(Variant(f"wiseft-a{_fmt(a)}", "wiseft", {"alpha": a}, r))
    return _unique(variants)


def _unique(variants: List[Variant]) -> List[Variant]:
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise SweepError(f"two variants share a folder name: {names}")
    return variants


# ---------------------------------------------------------------------------
# mergekit graph tasks
# ---------------------------------------------------------------------------

_rng_lock = threading.Lock()
_rng_states: Dict[Tuple[str, int], torch.Tensor] = {}
"""Per (sweep id, variant index): the CPU random state of that DARE variant's stream."""


_FAST_SHARED = {"beta", "lambda", "normalize", "rescale", "density_rescale"}
_FAST_INPUT = {"sparsity", "density", "weight"}


@dataclass(frozen=True)
class _SelectPlan:
    """A variant's tensor that is the core's exact select: one model, coefficient 1."""

    beta: float
    base_model: Any
    model: Any
    k: int


def _exact_select_plan(plan: "compat.PlannedMerge", tensors: Dict[Any, torch.Tensor]) -> Optional[_SelectPlan]:
    """The select this ``fapm`` merge reduces to (see `core.rules.is_exact_select`),
    or None: then mergekit's own kernel computes it."""
    if plan.method_name != "fapm" or plan.base_model is None or plan.dtype is not None:
        return None
    non_base = [m for m in plan.models if m != plan.base_model]
    if len(non_base) != 1:
        return None
    model = non_base[0]
    pre, ft = tensors.get(plan.base_model), tensors.get(model)
    if pre is None or ft is None or not (pre.is_floating_point() and ft.is_floating_point()):
        return None
    params, inputs = plan.parameters, plan.input_parameters[model]
    # A parameter this path does not know (a later kernel option) may change the
    # output: let mergekit's kernel compute it instead of guessing.
    if set(params) - _FAST_SHARED or set(inputs) - _FAST_INPUT:
        return None
    coefficients = merge_coefficients([inputs["weight"]], params["lambda"], params["normalize"])
    if not is_exact_select(coefficients, rescale=params["rescale"],
                           density_rescale=bool(params.get("density_rescale"))):
        return None
    try:
        k = keep_count(pre.numel(), sparsity=inputs["sparsity"], density=inputs["density"],
                       lora=is_lora_reference(model))
    except FapmInputError as error:
        raise FapmInputError(f"fapm: model {model}, tensor {plan.tensor_name!r}: {error}") from None
    return _SelectPlan(params["beta"], plan.base_model, model, k)


from mergekit.graph import Task  # noqa: E402  (mergekit import kept below the pure helpers)
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask  # noqa: E402


class SweepTensorTask(Task[Tuple[Optional[torch.Tensor], ...]]):
    """Every variant's value of one output tensor, from one gathered input."""

    tasks: Tuple[ExecuteMergeMethodTask, ...]
    seeded: Tuple[bool, ...]
    sweep_id: str

    def arguments(self) -> Dict[str, Task]:
        return {"tensors": compat.gather_task(self.tasks[0])}

    def group_label(self) -> Optional[str]:
        return compat.group_label(self.tasks[0])

    def uses_accelerator(self) -> bool:
        return True

    @torch.no_grad()
    def execute(self, tensors: Dict[Any, torch.Tensor], **_kwargs) -> Tuple[Optional[torch.Tensor], ...]:
        results: List[Optional[torch.Tensor]] = [None] * len(self.tasks)
        scores_by_beta: Dict[float, Any] = {}
        for index, task in enumerate(self.tasks):
            plan = compat.planned_merge(task)
            select = _exact_select_plan(plan, tensors)
            if select is None:
                results[index] = self._delegate(index, task, tensors)
                continue
            pre, ft = tensors[select.base_model], tensors[select.model]
            if pre.shape != ft.shape:  # mergekit's own message, as the kernel would give
                results[index] = self._delegate(index, task, tensors)
                continue
            dtype = torch.promote_types(pre.dtype, ft.dtype)  # GroupMergeMethod's alignment
            pre, ft = pre.to(dtype), ft.to(dtype)
            if select.beta not in scores_by_beta:
                scores_by_beta[select.beta] = fapm_scores(pre, ft, beta=select.beta,
                                                          name=plan.tensor_name)
            scores = scores_by_beta[select.beta]
            threshold = find_threshold(scores.values, select.k)
            out = select_where(pre, ft, scores.values, threshold).to(pre.dtype)
            if plan.out_dtype is not None:
                from mergekit.common import dtype_from_name

                out = out.to(dtype_from_name(plan.out_dtype))
            results[index] = out
        return tuple(results)

    def _delegate(self, index: int, task: ExecuteMergeMethodTask, tensors) -> Optional[torch.Tensor]:
        if not self.seeded[index]:
            return task.execute(tensors=tensors)
        # This variant's own random stream, as if it were the only merge running.
        key = (self.sweep_id, index)
        with _rng_lock:
            outer = torch.get_rng_state()
            torch.set_rng_state(_rng_states[key])
            try:
                return task.execute(tensors=tensors)
            finally:
                _rng_states[key] = torch.get_rng_state()
                torch.set_rng_state(outer)


class PickVariant(Task[Optional[torch.Tensor]]):
    """One variant's tensor out of a :class:`SweepTensorTask`."""

    sweep_task: SweepTensorTask
    index: int

    def arguments(self) -> Dict[str, Task]:
        return {"values": self.sweep_task}

    def group_label(self) -> Optional[str]:
        return self.sweep_task.group_label()

    def execute(self, values, **_kwargs) -> Optional[torch.Tensor]:
        return values[self.index]


# ---------------------------------------------------------------------------
# running a sweep
# ---------------------------------------------------------------------------


@dataclass
class SweepResult:
    out_dir: Path
    variants: List[Variant]
    seconds: float
    tensors: int
    manifest: dict = field(default_factory=dict)


def _shared_inputs(variants: Sequence[Variant]) -> None:
    def key(recipe):
        models = sorted(m["model"] for m in recipe.get("models") or [])
        return recipe.get("base_model"), tuple(models), recipe.get("dtype")

    first = key(variants[0].recipe)
    for variant in variants[1:]:
        if key(variant.recipe) != first:
            raise SweepError(
                f"variant {variant.name} reads other inputs ({key(variant.recipe)}) than "
                f"{variants[0].name} ({first}); a sweep shares one base, models and dtype"
            )


def run_sweep(
    variants: Sequence[Variant],
    out_dir: Path,
    *,
    overwrite: bool = False,
    device: str = "cpu",
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
    progress: bool = True,
) -> SweepResult:
    """Write one model folder per variant into ``out_dir``, reading inputs once.

    Args:
        variants (`Sequence[Variant]`): from :func:`build_variants`.
        out_dir (`Path`): the sweep folder; appears only when complete.
        overwrite (`bool`, defaults to False): replace an existing ``out_dir``.
        device (`str`, defaults to "cpu"): math device (``cuda`` like ``--cuda``).
        copy_tokenizer (`bool`, defaults to True): copy the base's tokenizer files.
        write_model_card (`bool`, defaults to True): README.md per variant, as mergekit.
        progress (`bool`, defaults to True): a rich progress bar on stderr.
    """
    from mergekit.architecture import get_architecture_info
    from mergekit.card import generate_card
    from mergekit.config import MergeConfiguration
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    from fapm_merge.io.atomic import atomic_output_dir
    if not variants:
        raise SweepError("nothing to sweep")
    _shared_inputs(variants)
    if device != "cpu" and any(v.seed is not None for v in variants):
        raise SweepError(
            "the DARE baseline's random stream is reproduced on the CPU only; "
            "run the sweep without --device or without the dare baseline"
        )
    started = time.perf_counter()
    options = MergeOptions(
        device=device,
        copy_tokenizer=copy_tokenizer,
        write_model_card=write_model_card,
        quiet=True,
        lazy_unpickle=False,
    )
    sweep_id = uuid.uuid4().hex
    out_dir = Path(out_dir).absolute()
    with atomic_output_dir(out_dir, overwrite=overwrite) as work:
        loader_cache = LoaderCache()
        loader_cache.setup(options=options)
        plans = []
        for variant in variants:
            config = MergeConfiguration.model_validate(copy.deepcopy(variant.recipe))
            arch_info = get_architecture_info(config, options)
            cfg_out = compat.model_out_config(config, arch_info)
            for model in config.referenced_models():
                loader_cache.get(model)
            targets = MergePlanner(config, arch_info, options=options, out_model_config=cfg_out).plan_to_disk(
                out_path=str(work / variant.name)
            )
            saves = compat.save_tasks(targets)
            if len(saves) != len(targets) - 1:
                raise SweepError(f"unexpected extra tasks in the plan of {variant.name}")
            plans.append((variant, config, arch_info, cfg_out, saves))

        names = [s.tensor_name for s in plans[0][4]]
        for variant, *_rest, saves in plans[1:]:
            if [s.tensor_name for s in saves] != names:
                raise SweepError(f"{variant.name} plans other output tensors than {plans[0][0].name}")
        for index, variant in enumerate(variants):
            if variant.seed is not None:
                generator_state = torch.Generator().manual_seed(variant.seed).get_state()
                with _rng_lock:
                    _rng_states[(sweep_id, index)] = generator_state
        seeded = tuple(v.seed is not None for v in variants)

        new_targets = []
        per_variant_saves: List[List[Any]] = [[] for _ in variants]
        for position in range(len(names)):
            merge_tasks = tuple(plan[4][position].tensor_task for plan in plans)
            sweep_task = SweepTensorTask(tasks=merge_tasks, seeded=seeded, sweep_id=sweep_id)
            for index, plan in enumerate(plans):
                old = plan[4][position]
                per_variant_saves[index].append(
                    compat.with_tensor_task(old, PickVariant(sweep_task=sweep_task, index=index))
                )
        for index, saves in enumerate(per_variant_saves):
            new_targets.extend(saves)
            new_targets.append(compat.finalize_task(saves))

        executor = Executor(
            targets=new_targets,
            math_device=torch.device(device),
            storage_device=torch.device("cpu"),
        )
        try:
            _execute(executor, len(new_targets), len(variants), progress)
        finally:
            with _rng_lock:
                for index in range(len(variants)):
                    _rng_states.pop((sweep_id, index), None)

        manifest = {"variants": []}
        for variant, config, arch_info, cfg_out, _saves in plans:
            folder = work / variant.name
            cfg_out.save_pretrained(str(folder))
            config_yaml = yaml.safe_dump(variant.recipe, sort_keys=False)
            if write_model_card:
                card = generate_card(config=config, config_yaml=config_yaml, name=variant.name)
                (folder / "README.md").write_text(card, encoding="utf-8")
            # Always written: eval and tradeoff read the recipe from here.
            (folder / RECIPE_FILE).write_text(config_yaml, encoding="utf-8")
            if copy_tokenizer:
                try:
                    compat.copy_tokenizer(config, str(folder), options)
                except Exception as error:  # as mergekit: the weights are still fine
                    print(f"warning: no tokenizer copied into {variant.name}: {error}")
            compat.copy_tagalong_files(config, str(folder), arch_info.tagalong_files or [], options)
            manifest["variants"].append(
                {
                    "name": variant.name,
                    "method": variant.method,
                    **variant.strength,
                    "seed": variant.seed,
                    "path": str(out_dir / variant.name),
                }
            )
        seconds = time.perf_counter() - started
        manifest["seconds"] = round(seconds, 3)
        manifest["tensors"] = len(names)
        (work / SWEEP_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return SweepResult(out_dir, list(variants), seconds, len(names), manifest)


def _execute(executor, total: int, variants: int, progress: bool) -> None:
    if not progress:
        for _ in executor.run(quiet=True):
            pass
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
    ) as bar:
        job = bar.add_task(f"sweep: {variants} outputs", total=total)
        for _ in executor.run(quiet=True):
            bar.advance(job)


def load_recipe(path: Path) -> dict:
    """Read a mergekit YAML recipe; a :class:`SweepError` when it is not one."""
    try:
        return read_recipe_file(path)
    except RecipeError as error:
        raise SweepError(str(error)) from None


__all__ = [
    "BASELINES",
    "FapmInputError",
    "SweepError",
    "SweepResult",
    "Variant",
    "build_variants",
    "load_recipe",
    "parse_values",
    "run_sweep",
]
