"""Check a finished merge before trusting it: ``fapm-merge verify OUT [--recipe R]``.

Plain ``mergekit-yaml`` writes shards straight into the output folder, so a crash
can leave a folder that looks like a model (docs/reliability.md shows it). This
module reads an output folder back one tensor at a time and reports:

* structure: every file the index names exists and opens (not truncated), every
  tensor the index lists is in its shard, no shard holds tensors the index lacks;
* values: every floating tensor is finite (no NaN/Inf was written);
* with the recipe: every tensor of the base model is present with the base's
  shape, unknown or misplaced recipe parameters (which mergekit silently drops),
  and for one-model ``fapm`` recipes the FAPM invariants, recomputed by the core:
  every entry equals the base or the fine-tuned value, and the output equals
  ``where(mask, W_ft, W_pre)`` bit for bit with exactly ``k`` kept entries.

Only :mod:`fapm_merge.core` decides which entries are kept; this module calls it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch

from fapm_merge import summary
from fapm_merge.core import FapmInputError

_FAPM_METHODS = ("fapm",)


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


@dataclass
class VerifyReport:
    """Result of :func:`verify_output`.

    Attributes:
        out_dir (`Path`): the folder checked.
        tensors (`int`): tensors read back.
        invariants_checked (`int`): tensors whose FAPM invariants were recomputed.
        problems (`List[Problem]`): empty when the folder passed.
        notes (`List[str]`): checks skipped and why.
    """

    out_dir: Path
    tensors: int = 0
    invariants_checked: int = 0
    problems: List[Problem] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _problem(report: VerifyReport, where: str, message: str) -> None:
    report.problems.append(Problem(where, message))


# --------------------------------------------------------------------------- recipe


def load_recipe_documents(path: Path) -> List[Dict[str, Any]]:
    """Every document of a YAML recipe file: one for mergekit-yaml, one per stage for
    mergekit-multi (raises ValueError naming the file)."""
    import yaml

    try:
        documents = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"cannot read recipe {path}: {error}") from None
    if not documents or not all(isinstance(d, dict) for d in documents):
        raise ValueError(f"recipe {path} is not a YAML mapping")
    return documents


def load_recipe(path: Path) -> Dict[str, Any]:
    """Read a mergekit YAML recipe as a plain dict (raises ValueError naming the file)."""
    documents = load_recipe_documents(path)
    if len(documents) != 1:
        raise ValueError(f"recipe {path} holds {len(documents)} documents (a mergekit-multi "
                         "file); give the recipe of one merge")
    return documents[0]


def _method_spec(method: str):
    """The registered method's ``MergeMethodSpec`` (None: unknown method)."""
    try:
        from mergekit.merge_methods import registry

        import fapm_merge.methods  # noqa: F401  (registers ours)

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


def _named_models(recipe: Dict[str, Any]) -> List[tuple]:
    """``(where, reference)`` for every model a recipe names."""
    named = []
    if isinstance(recipe.get("base_model"), str):
        named.append(("base_model", recipe["base_model"]))
    for index, model in enumerate(recipe.get("models") or []):
        if isinstance(model, dict) and isinstance(model.get("model"), str):
            named.append((f"models[{index}].model", model["model"]))
    for s_index, slice_ in enumerate(recipe.get("slices") or []):
        for index, source in enumerate((slice_ if isinstance(slice_, dict) else {}).get("sources") or []):
            if isinstance(source, dict) and isinstance(source.get("model"), str):
                named.append((f"slices[{s_index}].sources[{index}].model", source["model"]))
    return named


def _looks_local(path: str) -> bool:
    # "namespace/name" is a hub id; mergekit reads a path only if it exists, so a
    # missing one would be looked up on the hub and fail there, obscurely.
    return path.startswith(("/", "./", "../", "~")) or path.count("/") >= 2


def missing_local_models(recipe: Dict[str, Any]) -> List[Problem]:
    """Models a recipe names by a local path that is missing or is not a model folder.

    mergekit takes a missing path for a hub id and fails deep inside transformers
    ("Repo id must be in the form ...") after its start-up; this names the recipe
    key and the path first. ``BASE+ADAPTER`` references check both folders.

    Args:
        recipe (`Dict[str, Any]`): the parsed YAML recipe.
    """
    problems: List[Problem] = []
    for where, reference in _named_models(recipe):
        model, _, adapter = reference.partition("+")
        for part, marker in ((model, "config.json"), (adapter, "adapter_config.json")):
            path = part.split("@", 1)[0]  # "@revision" belongs to hub ids
            if not path or not _looks_local(path):
                continue
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


def lint_recipe(recipe: Dict[str, Any]) -> List[Problem]:
    """Recipe mistakes that plain mergekit-yaml accepts silently or reports obscurely.

    mergekit 0.1.5 drops unknown keys under ``parameters`` without a word (a typo
    such as ``spasity: 0.5`` quietly merges at the default 0.9) and ignores shared
    parameters written per model; a missing local model folder fails deep inside
    transformers. All are reported here.

    Args:
        recipe (`Dict[str, Any]`): the parsed YAML recipe.
    """
    import pydantic
    from mergekit.merge_methods.base import BasePolicy

    problems = structure_problems(recipe)
    if problems:  # the checks below assume mergekit's shapes
        return problems
    problems = missing_local_models(recipe)
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


# --------------------------------------------------------------------------- files


def _open_index(folder: Path, report: VerifyReport) -> Dict[str, Path]:
    """Tensor name -> shard, checking the index against the shards' own headers."""
    from safetensors import safe_open

    index_file = folder / "model.safetensors.index.json"
    shards = sorted(folder.glob("*.safetensors"))
    listed: Dict[str, Path] = {}
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as error:
            _problem(report, index_file.name, f"unreadable index ({error}); the merge "
                     "did not finish writing: run it again")
            weight_map = {}
        listed = {name: folder / shard for name, shard in weight_map.items()}
        for shard in sorted(set(listed.values())):
            if not shard.exists():
                _problem(report, shard.name, "listed in the index but missing: the merge "
                         "did not finish; run it again into an empty folder")
    elif len(shards) > 1:
        _problem(report, str(folder), f"{len(shards)} shards but no "
                 "model.safetensors.index.json: the merge did not finish")
    if not shards:
        _problem(report, str(folder), "no .safetensors files: not a finished merge, or a pickle-only "
                 "checkpoint (convert it with save_pretrained(safe_serialization=True))")

    found: Dict[str, Path] = {}
    for shard in shards:
        try:
            with safe_open(shard, framework="pt") as handle:
                for name in handle.keys():
                    found[name] = shard
        except Exception as error:  # safetensors raises its own error types
            _problem(report, shard.name, f"cannot be opened ({error}); the file is "
                     "truncated or corrupt: re-download it, or re-run the merge that wrote it")
    if listed:
        for name, shard in listed.items():
            if shard.exists() and found.get(name) != shard and shard.name not in {
                p.where for p in report.problems
            }:
                _problem(report, name, f"listed in the index under {shard.name} but not "
                         "stored there")
        for name, shard in found.items():
            if name not in listed:
                _problem(report, name, f"stored in {shard.name} but not in the index "
                         "(a leftover from another run?)")
    return found


def _model_path(value: Any) -> Optional[Path]:
    """A local model folder from a recipe's model reference, or None if it is not one."""
    if isinstance(value, dict):
        value = value.get("model")
    if not isinstance(value, str) or "+" in value:
        return None
    path = Path(value)
    return path if path.is_dir() else None


def _scalar(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


# --------------------------------------------------------------------------- verify


@torch.no_grad()
def verify_output(out_dir: Path, recipe: Optional[Dict[str, Any]] = None) -> VerifyReport:
    """Check a merged model folder; with ``recipe``, check it against the inputs too.

    Args:
        out_dir (`Path`): the merge output folder.
        recipe (`Dict[str, Any]`, *optional*): the parsed recipe it was made from
            (see :func:`load_recipe`); enables the presence and FAPM checks.

    Returns:
        VerifyReport: ``report.ok`` is True when nothing is wrong.
    """

    out_dir = Path(out_dir)
    report = VerifyReport(out_dir)
    if not out_dir.is_dir():
        _problem(report, str(out_dir), "no such folder")
        return report
    if out_dir.name.startswith(".") and ".partial-" in out_dir.name:
        _problem(report, str(out_dir), "a temporary folder of an unfinished fapm-merge run")
    out_index = _open_index(out_dir, report)
    if not (out_dir / "config.json").exists():
        # mergekit saves config.json only after every shard and the index.
        _problem(report, "config.json", "missing: the merge did not finish (mergekit "
                 "writes config.json after all weights); run it again")

    base_index: Dict[str, Path] = {}
    fapm_inputs = None
    if recipe is not None:
        report.problems.extend(lint_recipe(recipe))
        base_dir = _model_path(recipe.get("base_model"))
        try:
            if base_dir is None:
                report.notes.append("base model is not a local folder: presence not checked")
            else:
                base_index = summary.safetensors_index(base_dir)
            fapm_inputs = _fapm_setup(recipe, base_index, report)
        except (FapmInputError, FileNotFoundError) as error:
            _problem(report, "recipe inputs", f"{error}; inputs not compared")
            base_index, fapm_inputs = {}, None

    tokenizer_changes_vocab = bool(recipe and (recipe.get("tokenizer") or recipe.get("tokenizer_source")))
    for name in base_index:
        if name not in out_index:
            _problem(report, name, "in the base model but missing from the output")

    for name, shard in out_index.items():
        try:
            out = summary.read_tensor(shard, name)
        except Exception as error:
            _problem(report, name, f"cannot be read from {shard.name} ({error})")
            continue
        report.tensors += 1
        if out.is_floating_point() and out.numel() and not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).sum())
            _problem(report, name, f"{bad} NaN/Inf entries: do not use this output")
            continue
        if name not in base_index:
            continue
        pre = summary.read_tensor(base_index[name], name)
        if pre.shape != out.shape:
            if not tokenizer_changes_vocab:
                _problem(report, name, f"shape {tuple(out.shape)} differs from the base's "
                         f"{tuple(pre.shape)}")
            continue
        if fapm_inputs is not None:
            _check_fapm(name, pre, out, fapm_inputs, report)
    return report


@dataclass
class _FapmInputs:
    ft_index: Dict[str, Path]
    sparsity: Optional[float]
    density: Optional[float]
    beta: float
    dtype: Optional[torch.dtype]


def _fapm_setup(recipe: Dict[str, Any], base_index: Dict[str, Path],
                report: VerifyReport) -> Optional[_FapmInputs]:
    """Inputs of the invariant check, or None (with a note saying why not)."""

    method = recipe.get("merge_method")
    if method not in _FAPM_METHODS:
        report.notes.append(f"merge_method {method!r}: FAPM invariants not checked")
        return None
    base_path = _model_path(recipe.get("base_model"))
    models = [m for m in recipe.get("models") or []
              if _model_path(m) is None or _model_path(m) != base_path]
    if recipe.get("tokenizer") or recipe.get("tokenizer_source"):
        # mergekit permutes/pads vocabulary rows first: entries no longer line up.
        report.notes.append("FAPM invariants not checked: the recipe re-aligns tokenizers")
        return None
    if not base_index or len(models) != 1 or recipe.get("slices"):
        report.notes.append("FAPM invariants are checked for one-model recipes with local "
                            "base and fine-tuned folders only")
        return None
    model = models[0] if isinstance(models[0], dict) else {"model": models[0]}
    ft_dir = _model_path(model)
    top = recipe.get("parameters") or {}
    own = model.get("parameters") or {}
    if not (isinstance(top, dict) and isinstance(own, dict)):
        _problem(report, "parameters", "must be a mapping of parameter names to values")
        return None
    values = {
        "sparsity": own.get("sparsity", top.get("sparsity")),
        "density": own.get("density", top.get("density")),
        "beta": top.get("beta", 1.0),
        "weight": own.get("weight", top.get("weight", 1.0)),
        "lambda": top.get("lambda", 1.0),
    }
    # Each entry is W_pre or W_ft only when the single pruned delta is added at
    # coefficient 1 (normalize with one model divides weight by itself).
    weight, lambda_ = values["weight"], values["lambda"]
    coefficient = None
    if _scalar(weight) and _scalar(lambda_):
        coefficient = lambda_ * (1.0 if top.get("normalize") else weight)
    if ft_dir is None or not all(_scalar(v) for v in values.values()) \
            or coefficient != 1.0 or top.get("rescale") or top.get("density_rescale"):
        report.notes.append("FAPM invariants not checked: fine-tuned model is not a local "
                            "folder, a parameter varies by tensor, or the delta is scaled")
        return None
    from fapm_merge import core

    try:  # the values mergekit would refuse at plan time or at the first tensor
        core.resolve_density(values["sparsity"], values["density"])
        core.check_beta(values["beta"])
    except (core.FapmInputError, TypeError, ValueError) as error:
        # lint_recipe (run first) reports the value itself as a problem
        report.notes.append(f"FAPM invariants not checked: {error}")
        return None
    dtype_name = recipe.get("dtype")
    dtype = getattr(torch, str(dtype_name), None) if dtype_name else None
    return _FapmInputs(
        ft_index=summary.safetensors_index(ft_dir),
        sparsity=values["sparsity"],
        density=values["density"],
        beta=float(values["beta"]),
        dtype=dtype if isinstance(dtype, torch.dtype) else None,
    )


def _check_fapm(name: str, pre: torch.Tensor, out: torch.Tensor,
                inputs: _FapmInputs, report: VerifyReport) -> None:
    from fapm_merge import core

    if name not in inputs.ft_index or not out.is_floating_point():
        return
    ft = summary.read_tensor(inputs.ft_index[name], name)
    if ft.shape != pre.shape:
        return
    if inputs.dtype is not None:  # mergekit casts the inputs to `dtype:` first
        pre, ft = pre.to(inputs.dtype), ft.to(inputs.dtype)
    pre_o, ft_o = pre.to(out.dtype), ft.to(out.dtype)
    neither = int(((out != pre_o) & (out != ft_o)).sum())
    if neither:
        _problem(report, name, f"{neither} entries equal neither the base nor the "
                 "fine-tuned value: this is not a one-model FAPM output")
        return
    sparsity, density = inputs.sparsity, inputs.density
    if sparsity is None and density is None:
        sparsity = core.DEFAULT_SPARSITY
    k = core.keep_count(pre.numel(), sparsity=sparsity, density=density)
    expected = core.fapm_merge(pre, [ft], keep_counts=[k], beta=inputs.beta, name=name)
    report.invariants_checked += 1
    if not torch.equal(expected.to(out.dtype), out):
        differ = int((expected.to(out.dtype) != out).sum())
        _problem(report, name, f"{differ} entries differ from the FAPM selection of "
                 f"k={k} entries (sparsity {sparsity}, density {density}, beta "
                 f"{inputs.beta}); was it made from this recipe?")


def format_report(report: VerifyReport) -> str:
    """Plain text for the command line."""
    lines = [f"{report.out_dir}: {report.tensors} tensors read, "
             f"{report.invariants_checked} checked against the FAPM selection"]
    lines += [f"  note: {note}" for note in report.notes]
    lines += [f"  PROBLEM {problem}" for problem in report.problems]
    lines.append("OK" if report.ok else f"FAILED: {len(report.problems)} problem(s)")
    return "\n".join(lines)


__all__ = ["Problem", "VerifyReport", "format_report", "lint_recipe", "load_recipe",
           "load_recipe_documents", "missing_local_models", "structure_problems",
           "verify_output"]
