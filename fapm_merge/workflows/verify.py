"""Check a finished merge before trusting it: ``fapm-merge verify OUT [--recipe R]``.

Plain ``mergekit-yaml`` writes shards straight into the output folder, so a crash
can leave a folder that looks like a model (docs/reliability.md shows it). This
module reads an output folder back one tensor at a time and reports:

* structure: every file the index names exists and opens (not truncated), every
  tensor the index lists is in its shard, no shard holds tensors the index lacks;
* values: every floating tensor is finite (no NaN/Inf was written);
* the config: ``config.json`` exists and describes these tensors (the model
  transformers would build from it has every stored tensor's shape and lacks
  none of its own);
* with the recipe (``--recipe``, or the ``mergekit_config.yml`` mergekit wrote
  into the folder): the model card and ``mergekit_config.yml`` that mergekit
  writes last are there, every tensor of the input models is present with the
  input's shape, unknown or misplaced recipe parameters (which mergekit silently
  drops), and for one-model ``fapm`` recipes the FAPM invariants, recomputed by
  the core: every entry equals the base or the fine-tuned value, and the output
  equals ``where(mask, W_ft, W_pre)`` bit for bit with exactly ``k`` kept entries.

The report says what was checked and what was not, and why: "OK" alone means the
folder was verified as the merge of a recipe.

Only :mod:`fapm_merge.core` decides which entries are kept; this module calls it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from fapm_merge import core
from fapm_merge.core import FapmInputError
from fapm_merge.core.rules import DEFAULT_BETA, FAPM
from fapm_merge.io import checkpoint
from fapm_merge.io.lint import lint_recipe
from fapm_merge.io.model_paths import card_asks_hub, reference_parts
from fapm_merge.io.recipe import (
    RECIPE_FILE,
    Problem,
    RecipeError,
    load_recipe,
    named_models,
    non_base_models,
)

_FAPM_METHODS = (FAPM,)


@dataclass
class VerifyReport:
    """Result of :func:`verify_output`.

    Attributes:
        out_dir (`Path`): the folder checked.
        tensors (`int`): tensors read back.
        invariants_checked (`int`): tensors whose FAPM invariants were recomputed.
        present_checked (`int`): input-model tensors whose presence and shape were checked.
        problems (`List[Problem]`): empty when the folder passed.
        notes (`List[str]`): checks skipped and why.
        checked (`List[str]`): the checks that ran, in words.
        recipe_source (`str`, *optional*): where the recipe came from (``--recipe``
            or the folder's ``mergekit_config.yml``); None: no recipe, so the folder
            was checked as a checkpoint only.
    """

    out_dir: Path
    tensors: int = 0
    invariants_checked: int = 0
    present_checked: int = 0
    problems: List[Problem] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    checked: List[str] = field(default_factory=list)
    recipe_source: Optional[str] = None

    @property
    def ok(self) -> bool:
        """No problem found (see :attr:`recipe_source` for how much was checked)."""
        return not self.problems


def _problem(report: VerifyReport, where: str, message: str) -> None:
    report.problems.append(Problem(where, message))


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


def _config_problems(out_dir: Path, shapes: Dict[str, tuple], report: VerifyReport) -> None:
    """Does ``config.json`` describe these tensors? Compare with the model transformers
    builds from it (on the meta device: no memory, no weights)."""
    try:
        raw = json.loads((out_dir / "config.json").read_text())
    except (OSError, ValueError):
        raw = {}
    if isinstance(raw, dict) and raw.get("auto_map"):  # custom code: never run it here
        report.notes.append("config.json not compared with the tensors: the architecture is "
                            "defined by code in the model repository")
        return
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(out_dir))
    except Exception as error:  # transformers raises ValueError/OSError/KeyError here
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        _problem(report, "config.json", f"transformers cannot read it ({reason}); the folder is "
                 "not a loadable model: copy the base model's config.json or merge again")
        return
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    if model_class is None:
        report.notes.append(f"config.json not compared with the tensors: transformers does not "
                            f"know the architecture {architecture!r}")
        return
    try:
        with torch.device("meta"):
            model = model_class(config)
    except Exception as error:
        report.notes.append(f"config.json not compared with the tensors: transformers could not "
                            f"build {architecture} from it ({type(error).__name__})")
        return
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied: Dict[int, List[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(parameter), []).append(name)
    known = [name for name in shapes if name in expected]
    if len(known) * 2 < len(shapes):
        # e.g. architectures whose checkpoints use converted names (fused experts)
        report.notes.append(f"config.json not compared with the tensors: most stored names are "
                            f"not {architecture}'s module names")
        return
    for name in known:
        if expected[name] != shapes[name]:
            _problem(report, name, f"shape {shapes[name]} but config.json describes "
                     f"{expected[name]}: config.json belongs to another model (or a merge of "
                     "other inputs); copy the right one or merge again")
    for names in tied.values():
        if not any(name in shapes for name in names) and all(name in expected for name in names):
            _problem(report, names[0], f"config.json describes a {architecture} with this tensor "
                     "but the output lacks it: the merge did not finish, or config.json "
                     "belongs to another model")
    unknown = [name for name in shapes if name not in expected]
    if unknown:
        report.notes.append(f"{len(unknown)} stored tensor(s) are not part of the {architecture} "
                            f"config.json describes (transformers ignores them): "
                            + ", ".join(unknown[:3]) + (" ..." if len(unknown) > 3 else ""))
    report.checked.append(f"config.json describes the stored tensors ({architecture})")


def _card_problems(out_dir: Path, recipe: Dict[str, Any], report: VerifyReport) -> None:
    """mergekit writes README.md (the model card) and mergekit_config.yml last, after
    config.json; missing ones mean the run stopped there."""
    lookups = [path for _where, reference in named_models(recipe)
               for path, _marker in reference_parts(reference) if card_asks_hub(path)]
    if lookups:
        why = (f"the recipe's relative path(s) {', '.join(lookups)} are what mergekit's card step "
               "sends to the Hugging Face hub (offline it stops there): write absolute paths "
               "(`fapm-merge lint RECIPE` names them) and merge again")
    else:
        why = ("merge again into an empty folder; if it ran with --no-write-model-card, pass "
               "--no-model-card")
    missing = [name for name in ("README.md", RECIPE_FILE) if not (out_dir / name).is_file()]
    for name in missing:
        _problem(report, name, "missing: mergekit writes the model card and the recipe last, "
                 f"after the weights and config.json, so the run stopped before; {why}")
    if not missing:
        report.checked.append(f"model card (README.md) and {RECIPE_FILE} present")


def _input_index(recipe: Dict[str, Any], report: VerifyReport):
    """``(label, tensor -> shard)`` of the recipe's first local input model (the base
    when it is local), against which the output's tensors are checked for presence."""
    candidates = [("base model", recipe.get("base_model"))]
    candidates += [(f"model {model.get('model')}", model) for model in non_base_models(recipe)]
    for label, reference in candidates:
        folder = _model_path(reference)
        if folder is not None:
            return label, checkpoint.safetensors_index(folder)
    report.notes.append("presence not checked: no input model of the recipe is a local folder")
    return None, {}


@torch.no_grad()
def verify_output(out_dir: Path, recipe: Optional[Dict[str, Any]] = None, *,
                  model_card: bool = True, checkpoint_only: bool = False) -> VerifyReport:
    """Check a merged model folder; with a recipe, check it against the inputs too.

    Args:
        out_dir (`Path`): the merge output folder.
        recipe (`Dict[str, Any]`, *optional*): the parsed recipe it was made from
            (see :func:`fapm_merge.io.recipe.load_recipe`); default: the folder's own
            ``mergekit_config.yml``, which a finished mergekit output always has
            (mergekit writes it last): a folder without one is refused unless
            ``checkpoint_only``. Enables the model-card, presence and FAPM checks.
        model_card (`bool`, defaults to True): expect ``README.md`` and
            ``mergekit_config.yml`` (mergekit writes them unless run with
            ``--no-write-model-card``).
        checkpoint_only (`bool`, defaults to False): the folder is not a merge (an
            input model, a download): check its files only, with no recipe.

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
    if recipe is not None:
        report.recipe_source = "--recipe"
    elif (out_dir / RECIPE_FILE).is_file():
        try:
            recipe = load_recipe(out_dir / RECIPE_FILE)
            report.recipe_source = f"{RECIPE_FILE} in the folder"
        except RecipeError as error:
            _problem(report, RECIPE_FILE, f"{error}; give the recipe with --recipe")
    out_index = _open_index(out_dir, report)
    structure_ok = not report.problems
    if not (out_dir / "config.json").exists():
        # mergekit saves config.json only after every shard and the index.
        _problem(report, "config.json", "missing: the merge did not finish (mergekit "
                 "writes config.json after all weights); run it again")
    elif out_index:
        shapes = {}
        for name, shard in out_index.items():
            try:
                with checkpoint.open_safetensors(shard) as handle:
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
            except Exception:  # reported by the tensor loop below
                pass
        _config_problems(out_dir, shapes, report)
    if structure_ok and out_index:
        report.checked.insert(0, f"{len(out_index)} tensors: every shard opens and the index "
                              "matches the shards")

    base_index: Dict[str, Path] = {}
    present_label = None
    fapm_inputs = None
    if recipe is not None:
        from fapm_merge.methods import register_methods

        register_methods()  # lint reads the methods' parameter specs
        if model_card:
            _card_problems(out_dir, recipe, report)
        else:
            report.notes.append("model card not checked (--no-model-card)")
        report.problems.extend(lint_recipe(recipe, check_paths=False))
        try:
            present_label, base_index = _input_index(recipe, report)
            if _model_path(recipe.get("base_model")) is not None:
                fapm_inputs = _fapm_setup(recipe, base_index, report)
            elif recipe.get("merge_method") in _FAPM_METHODS:
                report.notes.append("FAPM invariants not checked: the base model is not a "
                                    "local folder")
        except (FapmInputError, FileNotFoundError) as error:
            _problem(report, "recipe inputs", f"{error}; inputs not compared")
            base_index, fapm_inputs = {}, None
    elif not checkpoint_only:
        _problem(report, RECIPE_FILE, "missing: mergekit writes the recipe last, after the "
                 "weights, config.json and the model card, so this merge did not finish; merge "
                 "again into an empty folder (a merge run with --no-write-model-card: give "
                 "--recipe RECIPE; an input model, not a merge: --checkpoint-only)")
    else:
        report.notes.append(f"no recipe (no --recipe, and the folder has no {RECIPE_FILE}): "
                            "checked as a checkpoint only; model card, input tensors and the "
                            "FAPM selection not checked")

    tokenizer_changes_vocab = bool(recipe and (recipe.get("tokenizer") or recipe.get("tokenizer_source")))
    for name in base_index:
        if name not in out_index:
            _problem(report, name, f"in the {present_label} but missing from the output")

    finite = 0
    for name, shard in out_index.items():
        try:
            out = checkpoint.read_tensor(shard, name)
        except Exception as error:
            _problem(report, name, f"cannot be read from {shard.name} ({error})")
            continue
        report.tensors += 1
        if out.is_floating_point() and out.numel() and not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).sum())
            _problem(report, name, f"{bad} NaN/Inf entries: do not use this output")
            continue
        finite += 1
        if name not in base_index:
            continue
        pre = checkpoint.read_tensor(base_index[name], name)
        if pre.shape != out.shape:
            if not tokenizer_changes_vocab:
                _problem(report, name, f"shape {tuple(out.shape)} differs from the "
                         f"{present_label}'s {tuple(pre.shape)}")
            continue
        report.present_checked += 1
        if fapm_inputs is not None:
            _check_fapm(name, pre, out, fapm_inputs, report)
    if report.tensors:
        report.checked.append(f"{finite} of {report.tensors} tensors finite (no NaN/Inf)")
    if base_index:
        report.checked.append(f"{report.present_checked} of {len(base_index)} tensors of the "
                              f"{present_label} present with its shapes")
    if report.invariants_checked:
        report.checked.append(f"{report.invariants_checked} tensors recomputed: the FAPM "
                              "selection, bit for bit")
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
    models = non_base_models(recipe)
    if recipe.get("tokenizer") or recipe.get("tokenizer_source"):
        # mergekit permutes/pads vocabulary rows first: entries no longer line up.
        report.notes.append("FAPM invariants not checked: the recipe re-aligns tokenizers")
        return None
    if not base_index or len(models) != 1 or recipe.get("slices"):
        report.notes.append("FAPM invariants are checked for one-model recipes with local "
                            "base and fine-tuned folders only")
        return None
    model = models[0]
    ft_dir = _model_path(model)
    top = recipe.get("parameters") or {}
    own = model.get("parameters") or {}
    if not (isinstance(top, dict) and isinstance(own, dict)):
        _problem(report, "parameters", "must be a mapping of parameter names to values")
        return None
    values = {
        "sparsity": own.get("sparsity", top.get("sparsity")),
        "density": own.get("density", top.get("density")),
        "beta": top.get("beta", DEFAULT_BETA),
        "weight": own.get("weight", top.get("weight", 1.0)),
        "lambda": top.get("lambda", 1.0),
    }
    # Each entry is W_pre or W_ft only when the output is the core's exact select.
    exact = all(_scalar(v) for v in values.values()) and core.is_exact_select(
        core.merge_coefficients([values["weight"]], values["lambda"], bool(top.get("normalize"))),
        rescale=bool(top.get("rescale")), density_rescale=bool(top.get("density_rescale")),
    )
    if ft_dir is None or not exact:
        report.notes.append("FAPM invariants not checked: fine-tuned model is not a local "
                            "folder, a parameter varies by tensor, or the delta is scaled")
        return None
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
        ft_index=checkpoint.safetensors_index(ft_dir),
        sparsity=values["sparsity"],
        density=values["density"],
        beta=float(values["beta"]),
        dtype=dtype if isinstance(dtype, torch.dtype) else None,
    )


def _check_fapm(name: str, pre: torch.Tensor, out: torch.Tensor,
                inputs: _FapmInputs, report: VerifyReport) -> None:
    if name not in inputs.ft_index or not out.is_floating_point():
        return
    ft = checkpoint.read_tensor(inputs.ft_index[name], name)
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
    k = core.keep_count(pre.numel(), sparsity=sparsity, density=density)
    if sparsity is None and density is None:
        sparsity = core.default_sparsity()  # named in the message below
    expected = core.fapm_merge(pre, [ft], keep_counts=[k], beta=inputs.beta, name=name)
    report.invariants_checked += 1
    if not torch.equal(expected.to(out.dtype), out):
        differ = int((expected.to(out.dtype) != out).sum())
        _problem(report, name, f"{differ} entries differ from the FAPM selection of "
                 f"k={k} entries (sparsity {sparsity}, density {density}, beta "
                 f"{inputs.beta}); was it made from this recipe?")


def format_report(report: VerifyReport) -> str:
    """Plain text for the command line: what was checked, what was not, the problems,
    and a verdict that says how far it goes."""
    source = report.recipe_source or "none"
    lines = [f"{report.out_dir}: {report.tensors} tensors read (recipe: {source})"]
    lines += [f"  checked: {line}" for line in report.checked]
    lines += [f"  not checked: {note}" for note in report.notes]
    lines += [f"  PROBLEM {problem}" for problem in report.problems]
    if not report.ok:
        lines.append(f"FAILED: {len(report.problems)} problem(s)")
    elif report.recipe_source is None:
        lines.append("OK as a checkpoint; not verified as a merge (give --recipe RECIPE)")
    else:
        lines.append("OK")
    return "\n".join(lines)


__all__ = ["VerifyReport", "format_report", "verify_output"]
