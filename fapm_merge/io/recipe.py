"""mergekit recipes: one reader, the shared rules about them, and ``lint``.

Every command that reads a recipe (sweep, eval, tradeoff, verify, tune, lint) goes
through :func:`load_recipe` / :func:`load_recipe_documents`, so a broken file gives
the same clear message everywhere. Rules about what a recipe means live here once:
which models are fine-tunes (:func:`non_base_models`), whether a reference is a
local path (:func:`looks_local`, mergekit's own rule), which method and strength a
recipe expresses (:func:`describe_recipe`).

:func:`lint_recipe` finds the mistakes plain ``mergekit-yaml`` accepts silently or
reports obscurely. It imports mergekit (its recipe model and the registered
methods' parameter specs); nothing else here does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from fapm_merge.core.errors import FapmMergeError
from fapm_merge.core.rules import complement, resolve_sparsity

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


def _method_spec(method: str):
    """The registered method's ``MergeMethodSpec`` (None: unknown method).

    Importing ``mergekit.merge_methods`` registers fapm-merge's methods through the
    start-up hook; callers that may run without it (``python -S``) register them
    first with ``fapm_merge.methods.register_methods()``.
    """
    try:
        from mergekit.merge_methods import registry

        return registry.get(method).spec
    except Exception:  # unknown method: mergekit itself reports it
        return None


def structure_problems(recipe: Dict[str, Any]) -> List[Problem]:
    """What mergekit's own recipe model rejects (a string where a list belongs, ...)."""
    import pydantic
    from mergekit.config import MergeConfiguration

    try:
        MergeConfiguration.model_validate(recipe)
    except pydantic.ValidationError as error:
        return [Problem(".".join(str(part) for part in e["loc"]) or "recipe", e["msg"])
                for e in error.errors()]
    except (RuntimeError, ValueError) as error:  # mergekit's model validators raise these
        return [Problem("recipe", str(error))]
    return []


def _leaf_values(value: Any) -> Iterator[Any]:
    """The plain values of a parameter: itself, a gradient's items, each filter's value."""
    if isinstance(value, list):
        for item in value:
            yield from _leaf_values(item["value"] if isinstance(item, dict) and "value" in item else item)
    else:
        yield value


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


def looks_local(reference: str) -> bool:
    """Whether a model or adapter reference names a local folder, not a hub id.

    mergekit reads a path from disk when it exists (``ModelReference.local_path``);
    otherwise it asks the hub. A reference that starts with ``/``, ``~`` or ``.``,
    or has more than one ``/`` (a hub id is ``namespace/name``), is meant as a path
    even when it is missing, so a missing one is reported as missing instead of
    being looked up on the hub and failing there, obscurely.

    Args:
        reference (`str`): a model path or hub id, without ``+adapter`` or ``@revision``.
    """
    return (
        reference.startswith(("/", "~", "."))
        or reference.count("/") > 1
        or os.path.exists(reference)
    )


def card_asks_hub(path: str, *, exists: Optional[bool] = None) -> bool:
    """Whether mergekit's model card asks the Hugging Face hub about ``path``.

    A mirror of ``mergekit.card.is_hf`` (mergekit 0.1.5), minus the network:
    a path that starts with ``/`` or ``~`` or has more than one ``/`` is local;
    a path that does not exist is a hub id (no question asked); an existing path
    that is a valid repo id (``models/base``, ``base``) is sent to
    ``huggingface_hub.repo_exists``, after the weights and ``config.json`` were
    written. Offline that raises ``OfflineModeIsEnabled`` and the run stops
    without ``README.md`` and ``mergekit_config.yml``; online it queries the hub
    about a local folder. tests/test_fresh_clone.py checks this mirror against
    mergekit's own function and the real ``mergekit-yaml``.

    Args:
        path (`str`): the model or adapter path, without ``+adapter`` or ``@revision``.
        exists (`bool`, *optional*): whether the path will exist when the card is
            written (a mergekit-multi stage does not exist yet at lint time);
            default: whether it exists now, relative to the current directory.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not path or path[0] in "/~" or path.count("/") > 1:
        return False
    if not (os.path.exists(path) if exists is None else exists):
        return False
    try:
        validate_repo_id(path)  # repo_exists validates before it connects
    except HFValidationError:
        return False
    return True


def reference_parts(reference: str) -> List[Tuple[str, str]]:
    """``(path, marker file)`` of a reference: the model, and the adapter of
    ``BASE+ADAPTER`` (mergekit splits ``+`` first, then ``@revision``)."""
    model, _, adapter = reference.partition("+")
    return [(part.split("@", 1)[0], marker)
            for part, marker in ((model, "config.json"), (adapter, "adapter_config.json")) if part]


def _hub_lookup_problem(where: str, path: str) -> Problem:
    absolute = os.path.abspath(path)
    return Problem(where, (
        f"{path} is a relative path with at most one '/': mergekit reads the folder, "
        f"then its model card asks the Hugging Face hub whether '{path}' is a repo "
        "(offline: OfflineModeIsEnabled after the weights are written, and no README.md "
        f"or mergekit_config.yml); write the absolute path {absolute}"))


def missing_local_models(recipe: Dict[str, Any], stages: Sequence[str] = ()) -> List[Problem]:
    """Models a recipe names by a local path that is missing or is not a model folder.

    mergekit takes a missing path for a hub id and fails deep inside transformers
    ("Repo id must be in the form ...") after its start-up; this names the recipe
    key and the path first. ``BASE+ADAPTER`` references check both folders.

    Args:
        recipe (`Dict[str, Any]`): the parsed YAML recipe.
        stages (`Sequence[str]`, defaults to ()): mergekit-multi stage names (skipped).
    """
    problems: List[Problem] = []
    for where, reference in named_models(recipe):
        if reference.split("+", 1)[0].split("@", 1)[0] in stages:
            continue
        for path, marker in reference_parts(reference):
            if not looks_local(path):
                continue
            part = path
            if path.startswith("~"):
                problems.append(Problem(where, f"{part}: mergekit does not expand ~; write the "
                                        "absolute path"))
                continue
            folder = Path(path)
            if not folder.is_dir():
                problems.append(Problem(where, f"{part}: no such folder; give the path of a "
                                        "local model folder, or a hub id (namespace/name)"))
            elif not (folder / marker).is_file():
                problems.append(Problem(where, f"{part} has no {marker}; point at the "
                                        "folder that holds the checkpoint"))
    return problems


def model_path_problems(recipe: Dict[str, Any], stages: Sequence[str] = ()) -> List[Problem]:
    """Every model reference mergekit would mishandle, each with its fix.

    * a missing local folder, a folder without ``config.json`` (or
      ``adapter_config.json`` for the ``+adapter`` part), a ``~`` path
      (:func:`missing_local_models`);
    * a relative path that mergekit's model card sends to the Hugging Face hub
      (:func:`card_asks_hub`), for the model and the ``+adapter`` part alike.

    Args:
        recipe (`Dict[str, Any]`): the parsed YAML recipe (one document).
        stages (`Sequence[str]`, defaults to ()): names of the mergekit-multi stages of
            the same file; references to them are resolved by mergekit-multi, not here.
    """
    problems = missing_local_models(recipe, stages)
    for where, reference in named_models(recipe):
        if reference.split("+", 1)[0].split("@", 1)[0] in stages:
            continue
        for path, _marker in reference_parts(reference):
            if card_asks_hub(path):
                problems.append(_hub_lookup_problem(where, path))
    return problems


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _in_hub_cache(repo_id: str, revision: Optional[str], marker: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, marker, revision=revision), str)
    except Exception:  # an id the cache layout cannot hold: not cached
        return False


def model_path_notes(recipe: Dict[str, Any], stages: Sequence[str] = ()) -> List[str]:
    """What mergekit will fetch from the Hugging Face hub, said before it happens.

    A reference that is no folder here and does not look like a path is a hub id
    to mergekit: right for ``meta-llama/Meta-Llama-3-8B-Instruct``, wrong for a
    local ``models/base`` run from another directory. Neither can be told apart
    offline, so these are notes, not problems; with ``HF_HUB_OFFLINE`` set the
    note says whether the local hub cache has it.

    Args:
        recipe (`Dict[str, Any]`): the parsed YAML recipe (one document).
        stages (`Sequence[str]`, defaults to ()): mergekit-multi stage names (skipped).
    """
    notes: List[str] = []
    for where, reference in named_models(recipe):
        if reference.split("+", 1)[0].split("@", 1)[0] in stages:
            continue
        model, _, adapter = reference.partition("+")
        for part, marker in ((model, "config.json"), (adapter, "adapter_config.json")):
            if not part:
                continue
            path, _, revision = part.partition("@")
            if not path or looks_local(path):
                continue
            text = (f"{where}: {part} is no folder under {os.getcwd()}, so mergekit will fetch "
                    "it from the Hugging Face hub")
            if _hub_offline():
                text += (" (HF_HUB_OFFLINE is set: " + (
                    "found in the local hub cache)" if _in_hub_cache(path, revision or None, marker)
                    else "it is not in the local hub cache, so the merge will fail)"))
            notes.append(text + "; if it is a local folder, give its absolute path")
    return notes


def stage_reference_findings(
    documents: Sequence[Dict[str, Any]], intermediate_dir: Optional[str] = None
) -> Tuple[List[Problem], List[str]]:
    """What mergekit-multi does with references to earlier stages.

    mergekit-multi replaces a model reference equal to a stage's ``name`` by
    ``os.path.join(--intermediate-dir, name)``. With a one-word relative folder
    (``--intermediate-dir stages``) that is ``stages/first``, which mergekit's model
    card sends to the Hugging Face hub (:func:`card_asks_hub`) once the stage
    exists: offline, the stage that reads it stops after writing its weights.

    Args:
        documents (`Sequence[Dict[str, Any]]`): the file's documents, in order.
        intermediate_dir (`str`, *optional*): the ``--intermediate-dir`` to check;
            without it, a note says which value is safe.

    Returns:
        ``(problems, notes)``; each problem's ``where`` starts with ``stage '<name>'``.
    """
    names = [d["name"] for d in documents if isinstance(d.get("name"), str)]
    problems: List[Problem] = []
    notes: List[str] = []
    for document in documents:
        label = f"stage {document.get('name', 'final')!r}"
        for where, reference in named_models(document):
            stage = reference.split("+", 1)[0].split("@", 1)[0]
            if stage not in names:
                continue
            if intermediate_dir is None:
                notes.append(
                    f"{label}: {where}: reads stage {stage!r} from <intermediate-dir>/{stage}; run "
                    "mergekit-multi with an absolute --intermediate-dir (a one-word relative one, "
                    f"such as `stages`, makes mergekit's model card ask the Hugging Face hub about "
                    f"`stages/{stage}`, which fails offline)")
            elif card_asks_hub(os.path.join(intermediate_dir, stage), exists=True):
                problems.append(Problem(f"{label}: {where}", (
                    f"mergekit-multi reads stage {stage!r} from "
                    f"{os.path.join(intermediate_dir, stage)}, which mergekit's model card sends to "
                    "the Hugging Face hub (offline: OfflineModeIsEnabled after the weights are "
                    f"written); pass --intermediate-dir {os.path.abspath(intermediate_dir)}")))
    return problems, notes


def lint_recipe(recipe: Dict[str, Any], *, stages: Sequence[str] = (),
                check_paths: bool = True) -> List[Problem]:
    """Recipe mistakes that plain mergekit-yaml accepts silently or reports obscurely.

    mergekit 0.1.5 drops unknown keys under ``parameters`` without a word (a typo
    such as ``spasity: 0.5`` quietly merges at the default 0.9) and ignores shared
    parameters written per model; a missing local model folder fails deep inside
    transformers, and a relative one can stop the run at the model card
    (:func:`model_path_problems`). All are reported here.

    Args:
        recipe (`Dict[str, Any]`): the parsed YAML recipe.
        stages (`Sequence[str]`, defaults to ()): mergekit-multi stage names of the
            same file (references to them are not paths).
        check_paths (`bool`, defaults to True): check the model references;
            ``verify`` turns this off and reports what the paths did to the output.
    """
    import pydantic
    from mergekit.merge_methods.base import BasePolicy

    problems = structure_problems(recipe)
    if problems:  # the checks below assume mergekit's shapes
        return problems
    problems = model_path_problems(recipe, stages) if check_paths else []
    method = str(recipe.get("merge_method", ""))
    spec = _method_spec(method)
    if spec is None:
        return problems
    specs = {parameter.name: parameter for parameter in spec.parameters}
    known = set(specs)
    if spec.contract.base == BasePolicy.REQUIRED and not recipe.get("base_model") \
            and not recipe.get("slices") and not recipe.get("modules"):
        problems.append(Problem("base_model", f"{method} needs base_model (the model the "
                                "fine-tunes started from); mergekit refuses the plan"))
    given: set = set()

    def check(params: Any, where: str, per_model: bool) -> None:
        if not isinstance(params, dict):
            return
        given.update(params)
        for key in params:
            if key not in known:
                problems.append(Problem(
                    f"{where}.{key}",
                    f"unknown parameter for {method} (mergekit ignores it silently); "
                    f"known: {', '.join(sorted(known))}",
                ))
                continue
            for value in _leaf_values(params[key]):
                try:  # the method's own validator: the message mergekit would print
                    specs[key].validate(value)
                except pydantic.ValidationError as error:
                    message = error.errors()[0]["msg"].removeprefix("Value error, ")
                    problems.append(Problem(f"{where}.{key}", message))
                    break
            if per_model and specs[key].scope.value == "shared":
                problems.append(Problem(
                    f"{where}.{key}",
                    f"{key!r} is one value per tensor for {method}: mergekit ignores it "
                    "under models[i].parameters; move it to the top-level parameters",
                ))
        if "sparsity" in params and "density" in params:
            problems.append(Problem(
                where, "give either sparsity or density, not both (density = 1 - sparsity)"
            ))
        # mergekit only finds this clash at the first tensor, mid-run.
        if params.get("rescale") and params.get("density_rescale") and "density_rescale" in known:
            problems.append(Problem(
                where, "choose one of rescale (L1 norm of the full delta) and "
                "density_rescale (1/density, DARE-style), not both"
            ))

    check(recipe.get("parameters"), "parameters", per_model=False)
    for index, model in enumerate(recipe.get("models") or []):
        if isinstance(model, dict):
            check(model.get("parameters"), f"models[{index}].parameters", per_model=True)
    for s_index, slice_ in enumerate(recipe.get("slices") or []):
        if not isinstance(slice_, dict):
            continue
        check(slice_.get("parameters"), f"slices[{s_index}].parameters", per_model=False)
        for index, source in enumerate(slice_.get("sources") or []):
            if isinstance(source, dict):
                check(source.get("parameters"),
                      f"slices[{s_index}].sources[{index}].parameters", per_model=True)
    if recipe.get("modules"):  # per-module recipes: their parameters are not read here
        return problems
    for parameter in spec.parameters:
        if parameter.required and parameter.name not in given:
            what = f": {parameter.description}" if parameter.description else ""
            problems.append(Problem("parameters", f"{method} needs parameter "
                                    f"{parameter.name!r}{what}"))
    return problems




def lint_documents(
    documents: Sequence[Dict[str, Any]], *, intermediate_dir: Optional[str] = None
) -> Tuple[List[Problem], List[str]]:
    """:func:`lint_recipe` for every document of a recipe file, plus the path notes.

    A mergekit-multi file (several documents) is checked stage by stage: each
    problem's ``where`` starts with ``stage '<name>': ``, references to stages are
    resolved as mergekit-multi resolves them (:func:`stage_reference_findings`).

    Args:
        documents (`Sequence[Dict[str, Any]]`): from :func:`load_recipe_documents`.
        intermediate_dir (`str`, *optional*): mergekit-multi's ``--intermediate-dir``.

    Returns:
        ``(problems, notes)``: problems make ``fapm-merge lint`` exit 1; notes do not.
    """
    multi = len(documents) > 1
    stages = [d["name"] for d in documents if multi and isinstance(d.get("name"), str)]
    problems: List[Problem] = []
    notes: List[str] = []
    for document in documents:
        prefix = f"stage {document['name']!r}: " if multi and "name" in document else ""
        problems += [Problem(prefix + p.where, p.message)
                     for p in lint_recipe(document, stages=stages)]
        notes += [prefix + note for note in model_path_notes(document, stages)]
    if multi:
        stage_problems, stage_notes = stage_reference_findings(documents, intermediate_dir)
        problems += stage_problems
        notes += stage_notes
    return problems, notes


# --------------------------------------------------------------------------- meaning


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


def _parameters_of_first_model(recipe: Dict[str, Any]) -> Dict[str, Any]:
    params = dict(recipe.get("parameters") or {})
    models = non_base_models(recipe)
    if models:
        params.update(models[0].get("parameters") or {})
    return params


def _scalar_float(value: Any, default: Optional[float]) -> Optional[float]:
    return default if value is None else float(value)


def describe_recipe(recipe: Optional[Dict[str, Any]]) -> Tuple[str, Optional[float], Optional[str]]:
    """``(method, strength, strength name)`` that a merged model's recipe expresses.

    * ``fapm`` -> ``fapm`` (``beta: 0`` -> ``magnitude``), strength = sparsity;
    * ``fapm_lora`` -> ``fapm_lora`` (``beta: 0`` -> ``magnitude_lora``), strength =
      sparsity; with ``sparsity: 0`` and a ``lambda`` other than 1 it is WiSE-FT on
      the LoRA update, ``wiseft_lora`` with ``alpha = lambda``;
    * ``dare_linear`` -> ``dare``, sparsity = 1 - density;
    * ``task_arithmetic`` with one fine-tune -> ``wiseft``, ``alpha = weight``.

    Sparsity defaults, and density as the other spelling, follow
    :mod:`fapm_merge.core.rules`. Anything else is ``(merge_method, None, None)``.
    """
    if not recipe:
        return "model", None, None
    method = recipe.get("merge_method")
    params = _parameters_of_first_model(recipe)
    if method in ("fapm", "fapm_lora"):
        lora = method == "fapm_lora"
        sparsity = resolve_sparsity(_scalar_float(params.get("sparsity"), None),
                                    _scalar_float(params.get("density"), None), lora=lora)
        lambda_ = _scalar_float(params.get("lambda"), 1.0)
        if lora and sparsity == 0.0 and lambda_ != 1.0:
            return "wiseft_lora", lambda_, "alpha"
        magnitude = _scalar_float(params.get("beta"), 1.0) == 0.0
        name = ("magnitude" if magnitude else "fapm") + ("_lora" if lora else "")
        return name, sparsity, "sparsity"
    if method == "dare_linear" and params.get("density") is not None:
        return "dare", complement(params["density"]), "sparsity"
    if method == "task_arithmetic" and len(non_base_models(recipe)) == 1:
        return "wiseft", _scalar_float(params.get("weight"), 1.0), "alpha"
    return str(method), None, None


def recipe_inputs(recipe: Dict[str, Any]) -> Tuple[Optional[str], List[str]]:
    """``(base_model, [fine-tuned models])`` of a recipe; for ``fapm_lora`` the
    fine-tune is ``BASE+ADAPTER``, mergekit's name for the same model."""
    base = recipe.get("base_model") if isinstance(recipe.get("base_model"), str) else None
    if recipe.get("merge_method") == "fapm_lora":
        adapter = (recipe.get("parameters") or {}).get("adapter")
        return base, [f"{base}+{adapter}"] if base and isinstance(adapter, str) else []
    return base, [str(model_name(m)) for m in non_base_models(recipe)]


__all__ = [
    "Problem",
    "RECIPE_FILE",
    "RecipeError",
    "describe_recipe",
    "lint_documents",
    "lint_recipe",
    "load_recipe",
    "load_recipe_documents",
    "card_asks_hub",
    "looks_local",
    "missing_local_models",
    "model_path_notes",
    "model_path_problems",
    "model_name",
    "named_models",
    "non_base_models",
    "read_model_recipe",
    "recipe_inputs",
    "reference_parts",
    "stage_reference_findings",
    "structure_problems",
]
