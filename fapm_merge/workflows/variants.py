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
from fapm_merge.core.rules import FAPM, FAPM_LORA, complement
from fapm_merge.io.lint import structure_problems
from fapm_merge.io.model_paths import model_path_problems
from fapm_merge.io.recipe import RecipeError, load_recipe as read_recipe_file, model_name, non_base_models

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
    lora = recipe.get("merge_method") == FAPM_LORA
    if lora and "dare" in baselines:
        raise SweepError(f"the dare baseline has no {FAPM_LORA} form; use magnitude and wiseft, "
                         "or run dare_linear on a merged copy (model: BASE+ADAPTER)")
    if not lora and ("dare" in baselines or "wiseft" in baselines):
        if len(non_base_models(recipe)) != 1:
            raise SweepError("DARE and WiSE-FT baselines need exactly one fine-tuned model")
    key, values = ("sparsity", sparsities) if sparsities is not None else ("density", densities)
    tag = "s" if key == "sparsity" else "d"
    suffix = "_lora" if lora else ""
    method = FAPM_LORA if lora else FAPM
    variants = [
        Variant(f"{method}-{tag}{_fmt(v)}", method, {key: v}, _with_strength(recipe, key, v))
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


def load_recipe(path: Path) -> dict:
    """Read a mergekit YAML recipe; a :class:`SweepError` when it is not one."""
    try:
        return read_recipe_file(path)
    except RecipeError as error:
        raise SweepError(str(error)) from None


__all__ = [
    "BASELINES",
    "PlannedVariant",
    "SWEEPABLE",
    "SweepError",
    "Variant",
    "build_variants",
    "finetuned_variant",
    "load_recipe",
    "parse_values",
]
