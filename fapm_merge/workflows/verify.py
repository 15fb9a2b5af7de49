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
from typing import Any, Dict, List, Optional

import torch

from fapm_merge import core
from fapm_merge.core import FapmInputError
from fapm_merge.io import checkpoint
from fapm_merge.io.recipe import Problem, lint_recipe, non_base_models

_FAPM_METHODS = ("fapm",)


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
            (see :func:`fapm_merge.io.recipe.load_recipe`); enables the presence and FAPM checks.

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
        from fapm_merge.methods import register_methods

        register_methods()  # lint reads the methods' parameter specs
        report.problems.extend(lint_recipe(recipe))
        base_dir = _model_path(recipe.get("base_model"))
        try:
            if base_dir is None:
                report.notes.append("base model is not a local folder: presence not checked")
            else:
                base_index = checkpoint.safetensors_index(base_dir)
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
            out = checkpoint.read_tensor(shard, name)
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
        pre = checkpoint.read_tensor(base_index[name], name)
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
        "beta": top.get("beta", 1.0),
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
    """Plain text for the command line."""
    lines = [f"{report.out_dir}: {report.tensors} tensors read, "
             f"{report.invariants_checked} checked against the FAPM selection"]
    lines += [f"  note: {note}" for note in report.notes]
    lines += [f"  PROBLEM {problem}" for problem in report.problems]
    lines.append("OK" if report.ok else f"FAILED: {len(report.problems)} problem(s)")
    return "\n".join(lines)


__all__ = ["VerifyReport", "format_report", "verify_output"]
