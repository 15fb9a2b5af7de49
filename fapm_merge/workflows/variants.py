"""What a sweep makes: its variants, each a complete mergekit recipe, planned as data.

A sweep over a one-base ``fapm`` or ``fapm_lora`` recipe is a list of variants
(:class:`Variant`) that differ only in method and parameters (same base, same
fine-tuned models, same dtype): FAPM at each strength and the baselines
(:data:`BASELINES`). :func:`build_variants` plans them; :func:`finetuned_variant`
is a LoRA recipe's fine-tuned model made by a merge. Nothing here imports torch or
mergekit (tests/test_layout.py checks it), so ``tune`` can plan without loading
either; :mod:`fapm_merge.workflows.sweep` runs the plan.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from fapm_merge.core.errors import FapmMergeError
from fapm_merge.core.rules import DEFAULT_BETA, FAPM, FAPM_LORA, complement
from fapm_merge.io.lint import structure_problems
from fapm_merge.io.model_paths import model_path_problems
from fapm_merge.io.recipe import (RecipeError, describe_recipe, load_recipe as read_recipe_file, model_name,
                                  non_base_models, value_label)

BASELINES = ("magnitude", "dare", "wiseft", "lines", "depth")
"""Baselines a sweep can add: magnitude pruning of dW (FAPM with beta 0), DARE
(mergekit ``dare_linear``: random drop, 1/density rescale), WiSE-FT (mergekit
``task_arithmetic`` with weight alpha: ``W_pre + alpha * dW``), LiNeS (the same with
a per-layer weight, :data:`LINES_ALPHAS`) and FAPM with a LiNeS-style per-layer
sparsity (:data:`DEPTH_SCHEDULES`)."""

LINES_ALPHAS = (0.0, 0.25, 0.5, 0.75)
"""LiNeS strengths (Wang et al., ICLR 2025, https://arxiv.org/abs/2410.17146).

LiNeS scales layer ``l`` of ``L`` of the update by ``lambda(l) = alpha + beta_L *
(l - 1) / (L - 1)``. For one fine-tune the paper (and its code, ``single_task``) sets
``beta_L = 1 - alpha``, so the deepest layer keeps the whole update and only alpha is
swept (from 1 down to 0 in steps of 0.1). As a mergekit recipe that is
``task_arithmetic`` with the gradient ``weight: [alpha, 1.0]``: mergekit gives layer
index ``i`` the weight ``alpha + (1 - alpha) * i / (L - 1)``, LiNeS's schedule
exactly, and the embeddings, the final norm and ``lm_head`` (not layers) the first
value, alpha, which is what LiNeS's code gives every parameter outside the residual
blocks (docs/recipes.md). Four points cover the paper's range with four of its eleven
evaluations: alpha 0 leaves the shallowest layer and the embeddings at the base, 0.75
is close to the fine-tune; alpha 1 is the fine-tune itself and is left out."""

DEPTH_SCHEDULES = {
    FAPM: ((0.9, 0.0), (0.95, 0.5)),
    FAPM_LORA: ((0.3, 0.0), (0.5, 0.1)),
}
"""FAPM with a LiNeS-style depth schedule: ``(shallow, deep)`` sparsities, written as
the mergekit gradient ``sparsity: [shallow, deep]`` (linear over layer position; the
embeddings, final norm and ``lm_head`` take the shallow value, as in LiNeS).

Where LiNeS scales the shallow layers' update down, these prune it away, keeping the
deep layers' update (where the task sits) nearly whole. Full fine-tunes: ``(0.9, 0.0)``
is LiNeS's single-task shape with FAPM's paper default in the shallowest layer (kept
share 0.1 rising to the whole update); ``(0.95, 0.5)`` the heaviest default grid
point in the shallowest layer, half the update kept in the deepest. LoRA updates (the
paper prunes ~10% of them): ``(0.3, 0.0)`` and ``(0.5, 0.1)``, the top of the LoRA
grid in the shallowest layer. Both run at the recipe's own beta."""


class SweepError(FapmMergeError, ValueError):
    """A recipe or option the sweep cannot run; the message says what to change."""


@dataclass
class Variant:
    """One output of a sweep.

    Attributes:
        name (`str`): folder name inside OUT_DIR, e.g. ``fapm-s0.9``.
        method (`str`): what :func:`~fapm_merge.io.recipe.describe_recipe` calls its
            recipe: ``fapm``, ``fapm-b0.5``, ``fapm-depth``, ``magnitude``, ``dare``,
            ``wiseft``, ``lines``, or for a ``fapm_lora`` recipe ``fapm_lora``,
            ``magnitude_lora``, ``wiseft_lora``, ``lines_lora``, ...
        strength (`dict`): the swept values, e.g. ``{"sparsity": 0.9}``, ``{"sparsity":
            0.9, "beta": 0.5}``, ``{"alpha": 0.3}`` or ``{"sparsity": [0.9, 0.0]}``.
        recipe (`dict`): the complete mergekit recipe this output equals.
        seed (`int`, *optional*): random seed (DARE only).
    """

    name: str
    method: str
    strength: Dict[str, float]
    recipe: dict
    seed: Optional[int] = None


@dataclass(frozen=True)
class PlannedVariant:
    """One variant as mergekit planned it, ready for the sweep's executor.

    Attributes:
        variant (`Variant`): what is made.
        config: mergekit's ``MergeConfiguration`` of ``variant.recipe``.
        arch_info: mergekit's architecture info for it (tagalong files).
        out_config: the output model's ``config.json`` object, as mergekit builds it.
        saves (`list`): mergekit's ``SaveTensor`` tasks, one per output tensor, in
            plan order (every variant of a sweep plans the same tensors).
    """

    variant: Variant
    config: Any
    arch_info: Any
    out_config: Any
    saves: List[Any]


def parse_values(text: str, option: str, *, high: Optional[float] = 1.0) -> List[float]:
    """``"0.5,0.7,0.9"`` -> ``[0.5, 0.7, 0.9]``; each in [0, high] (``high=None``: any
    value >= 0, as FAPM's beta), no duplicates."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SweepError(f"{option} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise SweepError(f"{option} needs at least one value")
    for value in values:
        if not 0.0 <= value <= (float("inf") if high is None else high):
            bounds = ">= 0" if high is None else f"in [0, {high:g}]"
            raise SweepError(f"{option} values must be {bounds}, got {value}")
    if len(set(values)) != len(values):
        raise SweepError(f"{option} lists a value twice: {text!r}")
    return values


SWEEPABLE = (FAPM, FAPM_LORA)
"""Methods whose recipes a sweep varies: full fine-tunes and LoRA adapters."""


def _check_recipe(recipe: dict) -> None:
    wrong = structure_problems(recipe)  # mergekit's own recipe model first
    if wrong:
        raise SweepError("; ".join(str(problem) for problem in wrong))
    if recipe.get("merge_method") not in SWEEPABLE:
        raise SweepError(
            f"sweep needs a recipe with merge_method: {FAPM} (or {FAPM_LORA}), got "
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
    if recipe.get("merge_method") == FAPM_LORA:
        if not isinstance((recipe.get("parameters") or {}).get("adapter"), str):
            raise SweepError(f"a {FAPM_LORA} recipe needs parameters: {{adapter: /path/to/adapter}}")
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
    if recipe.get("merge_method") == FAPM_LORA:
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


def finetuned_variant(recipe: dict) -> Variant:
    """For a ``fapm_lora`` recipe, the fine-tuned model itself as a variant:
    ``fapm_lora`` at sparsity 0 is ``W_pre + scale * B @ A`` for every adapted
    weight, computed as peft's merge computes it."""
    if recipe.get("merge_method") != FAPM_LORA:
        raise SweepError(f"only a {FAPM_LORA} recipe's fine-tune is made by a merge")
    return Variant("finetuned", "finetuned", {}, _with_parameters(recipe, sparsity=0.0))


def _with_beta(recipe: dict, beta: float) -> dict:
    """The recipe with FAPM's balance factor ``beta`` (a shared parameter: top level);
    the default (1) is left unwritten, so beta 1 is the recipe as the sweep always wrote it."""
    recipe = copy.deepcopy(recipe)
    top = dict(recipe.get("parameters") or {})
    top.pop("beta", None)
    if float(beta) != DEFAULT_BETA:
        top["beta"] = float(beta)
    if top:
        recipe["parameters"] = top
    else:
        recipe.pop("parameters", None)
    return recipe


def _described(name_detail: str, recipe: dict, strength: Dict[str, Any], seed: Optional[int] = None) -> Variant:
    """A variant named and labelled by what its recipe expresses
    (:func:`~fapm_merge.io.recipe.describe_recipe`): ``<method>-<name_detail>``."""
    method = describe_recipe(recipe)[0]
    return Variant(f"{method}-{name_detail}", method, strength, recipe, seed=seed)


def build_variants(
    recipe: dict,
    *,
    sparsities: Optional[Sequence[float]] = None,
    densities: Optional[Sequence[float]] = None,
    betas: Optional[Sequence[float]] = None,
    baselines: Sequence[str] = (),
    alphas: Optional[Sequence[float]] = None,
    lines_alphas: Sequence[float] = LINES_ALPHAS,
    depth_schedules: Optional[Sequence[Sequence[float]]] = None,
    seed: int = 0,
) -> List[Variant]:
    """The variants of a sweep over ``recipe`` (a one-base ``fapm`` or ``fapm_lora`` recipe).

    FAPM runs at every (beta, strength): beta 0 is magnitude pruning (``magnitude-s0.9``),
    beta 1 the paper's score (``fapm-s0.9``), any other ``fapm-b0.5-s0.9``; a recipe
    asked for twice (``--beta 0`` and the magnitude baseline) is made once.

    For ``fapm_lora`` the baselines go through the same native adapter path on the
    same update ``dW = scale * B @ A``: magnitude is ``beta: 0``, WiSE-FT is
    ``sparsity: 0, lambda: alpha`` (``W_pre + alpha * dW``), LiNeS ``sparsity: 0,
    lambda: [alpha, 1.0]`` (``lambda`` is a per-tensor parameter, so mergekit's
    gradient applies); DARE has no ``fapm_lora`` form.

    Args:
        recipe (`dict`): the mergekit recipe; its own sparsity/density is replaced.
        sparsities (`Sequence[float]`, *optional*): values to sweep (share reset).
        densities (`Sequence[float]`, *optional*): or the kept shares; not both.
        betas (`Sequence[float]`, *optional*): FAPM balance factors (>= 0) to sweep at
            every strength; default: the recipe's own beta only, named as ``fapm``.
        baselines (`Sequence[str]`, defaults to ()): any of ``BASELINES``; magnitude
            and DARE use the same strengths as FAPM (DARE's density = 1 - sparsity).
        alphas (`Sequence[float]`, *optional*): WiSE-FT strengths; default: the
            densities, so each WiSE-FT point moves as far as the kept share.
        lines_alphas (`Sequence[float]`, defaults to `LINES_ALPHAS`): LiNeS's alpha, the
            scale of the shallowest layer (the deepest keeps the whole update).
        depth_schedules (`Sequence[Sequence[float]]`, *optional*): ``(shallow, deep)``
            sparsities of the depth baseline; default `DEPTH_SCHEDULES` of the method.
        seed (`int`, defaults to 0): DARE seed (``mergekit-yaml --random-seed``).
    """
    _check_recipe(recipe)
    if (sparsities is None) == (densities is None):
        raise SweepError("give exactly one of --sparsity or --density")
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise SweepError(f"unknown baseline(s) {sorted(unknown)}; choose from {BASELINES}")
    lora = recipe.get("merge_method") == FAPM_LORA
    if lora and "dare" in baselines:
        raise SweepError(f"the dare baseline has no {FAPM_LORA} form; use magnitude and wiseft, "
                         "or run dare_linear on a merged copy (model: BASE+ADAPTER)")
    if not lora and {"dare", "wiseft", "lines"} & set(baselines):
        if len(non_base_models(recipe)) != 1:
            raise SweepError("DARE, WiSE-FT and LiNeS baselines need exactly one fine-tuned model")
    key, values = ("sparsity", sparsities) if sparsities is not None else ("density", densities)
    tag = "s" if key == "sparsity" else "d"
    suffix = "_lora" if lora else ""
    method = FAPM_LORA if lora else FAPM
    variants = []
    for beta in betas if betas is not None else [None]:
        for v in values:
            r = _with_strength(recipe, key, v)
            if beta is None:  # the recipe's own beta, under the name a sweep always gave it
                variants.append(Variant(f"{method}-{tag}{value_label(v)}", describe_recipe(r)[0], {key: v}, r))
            else:
                variants.append(_described(f"{tag}{value_label(v)}", _with_beta(r, beta), {key: v, "beta": float(beta)}))
    if "magnitude" in baselines:
        for v in values:
            r = _with_strength(recipe, key, v)
            r.setdefault("parameters", {})["beta"] = 0.0
            variants.append(Variant(f"magnitude{suffix}-{tag}{value_label(v)}", f"magnitude{suffix}", {key: v}, r))
    def density_of(v: float) -> float:
        return complement(v) if key == "sparsity" else float(v)

    wiseft_alphas = alphas if alphas is not None else [density_of(v) for v in values]
    if "depth" in baselines:
        for shallow, deep in depth_schedules if depth_schedules is not None else DEPTH_SCHEDULES[method]:
            schedule = [float(shallow), float(deep)]
            variants.append(_described(f"s{value_label(shallow)}to{value_label(deep)}",
                                       _with_strength(recipe, "sparsity", schedule), {"sparsity": schedule}))
    if lora:
        if "wiseft" in baselines:
            for a in wiseft_alphas:
                r = _with_parameters(recipe, sparsity=0.0, **{"lambda": a})
                variants.append(Variant(f"wiseft_lora-a{value_label(a)}", "wiseft_lora", {"alpha": a}, r))
        if "lines" in baselines:
            for a in lines_alphas:
                r = _with_parameters(recipe, sparsity=0.0, **{"lambda": lines_weights(a)})
                variants.append(_described(f"a{value_label(a)}", r, {"alpha": a}))
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
            variants.append(Variant(f"dare-{tag}{value_label(v)}", "dare", {key: v}, r, seed=seed))
    if "wiseft" in baselines:
        for a in wiseft_alphas:
            r = {
                "merge_method": "task_arithmetic",
                **common,
                "models": [{"model": finetuned, "parameters": {"weight": a}}],
            }
            variants.append(Variant(f"wiseft-a{value_label(a)}", "wiseft", {"alpha": a}, r))
    if "lines" in baselines:
        for a in lines_alphas:
            r = {
                "merge_method": "task_arithmetic",
                **common,
                "models": [{"model": finetuned, "parameters": {"weight": lines_weights(a)}}],
            }
            variants.append(_described(f"a{value_label(a)}", r, {"alpha": a}))
    return _unique(variants)


def lines_weights(alpha: float) -> List[float]:
    """LiNeS's single-task schedule as a mergekit gradient: ``[alpha, 1.0]``.

    mergekit (0.1.5, ``MergePlanner.plan_slice``) evaluates a gradient at ``t = i / (L -
    1)`` for layer index ``i`` of ``L`` and interpolates linearly between the list's
    values, so layer ``i`` gets ``alpha + (1 - alpha) * i / (L - 1)``: LiNeS's
    ``lambda(l) = alpha + beta_L * (l - 1) / (L - 1)`` with ``beta_L = 1 - alpha``. The
    tensors outside the layers (embeddings before them, the final norm and ``lm_head``
    after) are planned at ``t = 0`` and take alpha, as LiNeS's own code scales every
    parameter outside the residual blocks (docs/recipes.md, "LiNeS").
    """
    return [float(alpha), 1.0]


def _unique(variants: List[Variant]) -> List[Variant]:
    """One variant per distinct recipe (the first asked for: ``--beta 0`` and the
    magnitude baseline are one model), and no two sharing a folder name."""
    distinct: List[Variant] = []
    for variant in variants:
        if not any(v.recipe == variant.recipe and v.seed == variant.seed for v in distinct):
            distinct.append(variant)
    variants = distinct
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise SweepError(f"two variants share a folder name: {names}")
    return variants


def load_recipe(path: Path) -> dict:
    """Read a mergekit YAML recipe; a :class:`SweepError` when it is not one."""
    try:
        return read_recipe_file(path)
    except RecipeError as error:
        raise SweepError(str(error)) from None


__all__ = [
    "BASELINES",
    "DEPTH_SCHEDULES",
    "LINES_ALPHAS",
    "PlannedVariant",
    "SWEEPABLE",
    "SweepError",
    "Variant",
    "build_variants",
    "finetuned_variant",
    "lines_weights",
    "load_recipe",
    "parse_values",
]
