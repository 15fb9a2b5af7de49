"""mergekit recipes: the one reader and what a recipe means.

Every command that reads a recipe (sweep, eval, tradeoff, verify, tune, lint) goes
through :func:`load_recipe` / :func:`load_recipe_documents`, so a broken file gives
the same clear message everywhere. Rules about what a recipe means live here once:
which models it names (:func:`named_models`), which are fine-tunes
(:func:`non_base_models`), which method and strength it expresses
(:func:`describe_recipe`).

How mergekit will read each model reference (a local folder or the hub) is
:mod:`fapm_merge.io.model_paths`; the mistakes plain ``mergekit-yaml`` accepts
silently are found by :mod:`fapm_merge.io.lint`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from fapm_merge.core.errors import FapmMergeError
from fapm_merge.core.rules import DEFAULT_BETA, FAPM, FAPM_LORA, complement, resolve_sparsity

RECIPE_FILE = "mergekit_config.yml"
"""The recipe mergekit (and ``fapm-merge sweep``) writes into every output folder."""


class RecipeError(FapmMergeError, ValueError):
    """A recipe file that cannot be read; the message names the file."""


@dataclass
class Problem:
    """One thing wrong with an output folder or recipe.

    Attributes:
        where (`str`): the tensor, file or recipe key concerned.
        message (`str`): what is wrong and what to do.
    """

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def load_recipe_documents(path: Path) -> List[Dict[str, Any]]:
    """Every document of a YAML recipe file: one for mergekit-yaml, one per stage for
    mergekit-multi (raises ValueError naming the file)."""
    import yaml

    if not Path(path).exists():
        raise RecipeError(f"recipe {path} not found")
    try:
        documents = [d for d in yaml.safe_load_all(Path(path).read_text(encoding="utf-8"))
                     if d is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise RecipeError(f"cannot read recipe {path}: {error}") from None
    if not documents or not all(isinstance(d, dict) for d in documents):
        raise RecipeError(f"recipe {path} is not a YAML mapping")
    return documents


def load_recipe(path: Path) -> Dict[str, Any]:
    """Read a mergekit YAML recipe as a plain dict (raises ValueError naming the file)."""
    documents = load_recipe_documents(path)
    if len(documents) != 1:
        raise RecipeError(f"recipe {path} holds {len(documents)} documents (a mergekit-multi "
                         "file); give the recipe of one merge")
    return documents[0]


def named_models(recipe: Dict[str, Any]) -> List[tuple]:
    """``(where, reference)`` for every model a recipe names (the models mergekit's
    ``referenced_models()`` returns: base, ``models``, slice and module sources)."""
    named = []

    def walk(part: Dict[str, Any], prefix: str) -> None:
        if isinstance(part.get("base_model"), str):
            named.append((f"{prefix}base_model", part["base_model"]))
        for index, model in enumerate(part.get("models") or []):
            if isinstance(model, dict) and isinstance(model.get("model"), str):
                named.append((f"{prefix}models[{index}].model", model["model"]))
        for s_index, slice_ in enumerate(part.get("slices") or []):
            for index, source in enumerate((slice_ if isinstance(slice_, dict) else {}).get("sources") or []):
                if isinstance(source, dict) and isinstance(source.get("model"), str):
                    named.append((f"{prefix}slices[{s_index}].sources[{index}].model", source["model"]))

    walk(recipe, "")
    modules = recipe.get("modules")
    if isinstance(modules, dict):
        for key, module in modules.items():
            if isinstance(module, dict):
                walk(module, f"modules.{key}.")
    return named


def model_name(entry: Any) -> Optional[str]:
    """The model reference of a ``models:`` entry (a mapping or a plain string)."""
    if isinstance(entry, dict):
        entry = entry.get("model")
    return entry if isinstance(entry, str) else None


def non_base_models(recipe: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The ``models:`` entries other than ``base_model``: the fine-tunes, as mappings."""
    base = recipe.get("base_model")
    entries = []
    for entry in recipe.get("models") or []:
        name = model_name(entry)
        if name is not None and name != base:
            entries.append(entry if isinstance(entry, dict) else {"model": entry})
    return entries


def read_model_recipe(model_dir: Path) -> Optional[Dict[str, Any]]:
    """The ``mergekit_config.yml`` inside a model folder, or None (a base or a
    fine-tune, which no merge wrote)."""
    path = Path(model_dir) / RECIPE_FILE
    if not path.exists():
        return None
    return load_recipe(path)


def merge_parameters(recipe: Dict[str, Any]) -> Dict[str, Any]:
    """The parameters that apply to the recipe's first fine-tune: the recipe's
    ``parameters`` overridden by that model's own (a ``fapm_lora`` recipe's, with its
    ``adapter``, are all in ``parameters``)."""
    params = dict(recipe.get("parameters") or {})
    models = non_base_models(recipe)
    if models:
        params.update(models[0].get("parameters") or {})
    return params


def _scalar_float(value: Any, default: Optional[float]) -> Optional[float]:
    return default if value is None else float(value)


def _is_gradient(value: Any) -> bool:
    """A mergekit gradient: a list of numbers, interpolated over layer position."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def value_label(value: float) -> str:
    """How a number appears in variant and method names: the shortest decimal that
    reads back as the value (``0.5``, ``2.0``), as the user would write it."""
    return repr(float(value))


def method_family(method: str) -> str:
    """The method a :func:`describe_recipe` label belongs to: ``fapm-b0.5`` and
    ``fapm-depth`` are ``fapm``, ``lines_lora`` stays ``lines_lora``. Labels add their
    detail after the first ``-``; what names a method in words (the card) looks it up
    by its family."""
    return method.split("-", 1)[0]


def _lines_label(weights: List[float], family: str) -> Tuple[str, float, str]:
    """A two-value gradient ``[alpha, alpha + beta_L]`` is LiNeS (arXiv 2410.17146):
    ``lines`` in the paper's single-task form, where the last layer gets the whole
    update (``alpha + beta_L = 1``), else ``lines-top<alpha + beta_L>``."""
    alpha, top = float(weights[0]), float(weights[1])
    return (family if top == 1.0 else f"{family}-top{value_label(top)}"), alpha, "alpha"


def describe_recipe(recipe: Optional[Dict[str, Any]]) -> Tuple[str, Optional[float], Optional[str]]:
    """``(method, strength, strength name)`` that a merged model's recipe expresses.

    * ``fapm`` -> ``fapm`` (``beta: 0`` -> ``magnitude``; another beta than the
      default 1 -> ``fapm-b<beta>``, e.g. ``fapm-b0.5``), strength = sparsity;
    * ``fapm_lora`` -> ``fapm_lora`` (``magnitude_lora``, ``fapm_lora-b<beta>``),
      strength = sparsity; with ``sparsity: 0`` and a ``lambda`` other than 1 it is
      WiSE-FT on the LoRA update, ``wiseft_lora`` with ``alpha = lambda``, and with a
      ``lambda`` gradient ``[alpha, 1]`` LiNeS on it, ``lines_lora`` with that alpha;
    * either with a sparsity (or density) gradient over layers -> the same label with
      ``-depth`` (``fapm-depth``, ``magnitude-depth``, ``fapm-b0.5-depth``): one
      schedule, no single strength (None);
    * ``dare_linear`` -> ``dare``, sparsity = 1 - density;
    * ``task_arithmetic`` with one fine-tune -> ``wiseft``, ``alpha = weight``; with a
      ``weight`` gradient ``[alpha, 1]`` -> ``lines`` (LiNeS), strength alpha (a
      two-value gradient ending elsewhere: ``lines-top<last>``).

    The method is a label: :func:`method_family` gives the method it refines. Sparsity
    defaults, and density as the other spelling, follow :mod:`fapm_merge.core.rules`.
    Anything else (another gradient, a method not listed) is ``(merge_method, None, None)``.
    """
    if not recipe:
        return "model", None, None
    method = recipe.get("merge_method")
    params = merge_parameters(recipe)
    if method in (FAPM, FAPM_LORA):
        lora = method == FAPM_LORA
        suffix = "_lora" if lora else ""
        sparsity, density, lambda_ = params.get("sparsity"), params.get("density"), params.get("lambda")
        if lora and _is_gradient(lambda_) and len(lambda_) == 2 and sparsity == 0.0:
            return _lines_label(lambda_, "lines_lora")
        beta = params.get("beta")
        if any(isinstance(v, list) for v in (beta, lambda_)):
            return str(method), None, None
        beta = _scalar_float(beta, DEFAULT_BETA)
        label = ("magnitude" if beta == 0.0 else FAPM) + suffix
        if beta not in (0.0, DEFAULT_BETA):
            label += f"-b{value_label(beta)}"
        if _is_gradient(sparsity) or _is_gradient(density):
            return f"{label}-depth", None, None
        sparsity = resolve_sparsity(_scalar_float(sparsity, None), _scalar_float(density, None), lora=lora)
        lambda_ = _scalar_float(lambda_, 1.0)
        if lora and sparsity == 0.0 and lambda_ != 1.0:
            return "wiseft_lora", lambda_, "alpha"
        return label, sparsity, "sparsity"
    if method == "dare_linear" and isinstance(params.get("density"), (int, float)):
        return "dare", complement(params["density"]), "sparsity"
    if method == "task_arithmetic" and len(non_base_models(recipe)) == 1:
        weight = params.get("weight")
        if _is_gradient(weight) and len(weight) == 2:
            return _lines_label(weight, "lines")
        if not isinstance(weight, list):
            return "wiseft", _scalar_float(weight, 1.0), "alpha"
    return str(method), None, None


def recipe_inputs(recipe: Dict[str, Any]) -> Tuple[Optional[str], List[str]]:
    """``(base_model, [fine-tuned models])`` of a recipe; for ``fapm_lora`` the
    fine-tune is ``BASE+ADAPTER``, mergekit's name for the same model."""
    base = recipe.get("base_model") if isinstance(recipe.get("base_model"), str) else None
    if recipe.get("merge_method") == FAPM_LORA:
        adapter = (recipe.get("parameters") or {}).get("adapter")
        return base, [f"{base}+{adapter}"] if base and isinstance(adapter, str) else []
    return base, [str(model_name(m)) for m in non_base_models(recipe)]


__all__ = [
    "Problem",
    "RECIPE_FILE",
    "RecipeError",
    "describe_recipe",
    "load_recipe",
    "load_recipe_documents",
    "merge_parameters",
    "method_family",
    "model_name",
    "named_models",
    "non_base_models",
    "read_model_recipe",
    "recipe_inputs",
    "value_label",
]
