"""``lint``: the recipe mistakes plain ``mergekit-yaml`` accepts silently or reports obscurely.

The only part of :mod:`fapm_merge.io` that imports mergekit (its recipe model and the
registered methods' parameter specs), inside the functions, so importing this
module stays cheap.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from fapm_merge.io.model_paths import model_path_notes, model_path_problems, stage_reference_findings
from fapm_merge.io.recipe import Problem


def _method_spec(method: str):
    """The registered method's ``MergeMethodSpec`` (None: unknown method).

    Importing ``mergekit.merge_methods`` registers fapm-merge's methods through the
    start-up hook; callers that may run without it (``python -S``) register them
    first with ``fapm_merge.methods.register_methods()``.
    """
    from mergekit.merge_methods import registry  # a broken install reports its own ImportError

    try:
        return registry.get(method).spec
    except RuntimeError:  # mergekit's "Unimplemented merge method": it reports that itself
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


def lint_recipe(recipe: Dict[str, Any], *, stages: Sequence[str] = (),
                check_paths: bool = True) -> List[Problem]:
    """Recipe mistakes that plain mergekit-yaml accepts silently or reports obscurely.

    mergekit 0.1.5 drops unknown keys under ``parameters`` without a word (a typo
    such as ``spasity: 0.5`` quietly merges at the default 0.9) and ignores shared
    parameters written per model; a missing local model folder fails deep inside
    transformers, and a relative one can stop the run at the model card
    (:func:`~fapm_merge.io.model_paths.model_path_problems`). All are reported here.

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
    resolved as mergekit-multi resolves them (:func:`~fapm_merge.io.model_paths.stage_reference_findings`).

    Args:
        documents (`Sequence[Dict[str, Any]]`): from :func:`~fapm_merge.io.recipe.load_recipe_documents`.
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


__all__ = ["lint_documents", "lint_recipe", "structure_problems"]
