"""The chosen model's README.md: what it is, why it was chosen, the evidence.

The front matter is built with ``huggingface_hub``'s :class:`~huggingface_hub.ModelCardData`
and the whole card parsed back with :class:`~huggingface_hub.ModelCard` before it is
returned, so what ``tune`` writes is a card the Hub reads: ``base_model`` only when the
base is a Hub id (:func:`hub_model_id`), tags naming the method actually selected, and
the held-out numbers (when ``tune`` confirmed the selection) as ``model-index`` results.
Nothing here talks to the network (``ModelCard.validate`` would: it posts to the Hub).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional

from fapm_merge.core.rules import DEFAULT_BETA, FAPM, FAPM_LORA
from fapm_merge.evaluation.settings import TASK_METRIC, TEXT_METRIC
from fapm_merge.io.model_paths import looks_local
from fapm_merge.io.recipe import RECIPE_FILE, merge_parameters, method_family, model_name, non_base_models
from fapm_merge.workflows.tradeoff import Point, Tradeoff, tradeoff_markdown
from fapm_merge.workflows.tradeoff.confirm import CONFIRMED, CONTRADICTED
from fapm_merge.workflows.tradeoff.report import evidence
from fapm_merge.workflows.tune.plan import TunePlan
from fapm_merge.workflows.tune.screening import card_lines

if TYPE_CHECKING:  # sweep imports mergekit
    from fapm_merge.workflows.variants import Variant

PAPER = "[arXiv 2509.08255](https://arxiv.org/abs/2509.08255)"


class Method(NamedTuple):
    """How the card names a method of :func:`~fapm_merge.io.recipe.describe_recipe`.

    Attributes:
        short (`str`): its name in a list of methods.
        name (`str`): the method in words, with its paper.
        edit (`str`): what it does to the update ``dW``, completing "the fine-tune's ...".
        tag (`str`): its Hub tag.
    """

    short: str
    name: str
    edit: str
    tag: str


METHODS: Dict[str, Method] = {
    "fapm": Method("FAPM", f"FAPM (Forgetting-Aware Pruning, {PAPER})",
                   "update dW = W_ft - W_pre pruned to the entries FAPM's score ranks highest "
                   "(|dW|, penalised by beta x its size relative to the base weight)", "fapm"),
    "magnitude": Method("magnitude pruning", "magnitude pruning (FAPM with beta 0)",
                        "update dW = W_ft - W_pre pruned to its largest entries", "magnitude-pruning"),
    "dare": Method("DARE", "DARE (random drop and rescale, [arXiv 2311.03099](https://arxiv.org/abs/2311.03099))",
                   "update dW = W_ft - W_pre with random entries dropped and the rest rescaled", "dare"),
    "wiseft": Method("WiSE-FT", "WiSE-FT (weight interpolation, "
                     "[arXiv 2109.01903](https://arxiv.org/abs/2109.01903))",
                     "weights interpolated towards the base: W_pre + alpha * dW", "wise-ft"),
    "fapm_lora": Method("FAPM on a LoRA update", f"FAPM on a LoRA update (Forgetting-Aware Pruning, {PAPER})",
                        "LoRA update dW = scale * B @ A pruned to the entries FAPM's score ranks "
                        "highest (|dW|, penalised by beta x its size relative to the base weight)",
                        "fapm"),
    "magnitude_lora": Method("magnitude pruning of a LoRA update", "magnitude pruning of a LoRA update (FAPM with beta 0)",
                             "LoRA update dW = scale * B @ A pruned to its largest entries",
                             "magnitude-pruning"),
    "wiseft_lora": Method("WiSE-FT on a LoRA update", "WiSE-FT on a LoRA update (weight interpolation, "
                          "[arXiv 2109.01903](https://arxiv.org/abs/2109.01903))",
                          "LoRA update scaled: W_pre + alpha * scale * B @ A", "wise-ft"),
    "lines": Method("LiNeS", "LiNeS (layer-increasing network scaling, "
                    "[arXiv 2410.17146](https://arxiv.org/abs/2410.17146))",
                    "update dW = W_ft - W_pre scaled per layer, alpha at the shallowest layer "
                    "rising linearly to 1 at the deepest", "lines"),
    "lines_lora": Method("LiNeS on a LoRA update", "LiNeS on a LoRA update (layer-increasing network "
                         "scaling, [arXiv 2410.17146](https://arxiv.org/abs/2410.17146))",
                         "LoRA update dW = scale * B @ A scaled per layer, alpha at the shallowest "
                         "layer rising linearly to 1 at the deepest", "lines"),
}
"""Every method a tune selects, by the family of the label :func:`describe_recipe`
gives it (:func:`method_family`: ``fapm-b0.5`` and ``fapm-depth`` are ``fapm``)."""

TAGS = ["mergekit", "merge", "fapm-merge"]
"""Tags of every tune card; the selected method's own tag follows."""

_HUB_CACHE_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<repo>[^/]+)/snapshots/[^/]+/?$")


def hub_model_id(reference: str) -> Optional[str]:
    """The Hugging Face Hub id a model reference stands for, or None (a local folder).

    A reference is a Hub id when it does not look local (:func:`looks_local`: not
    absolute, not ``~`` or ``.``, at most one ``/``, no such path here) and is a valid
    repo id (``org/name``); a folder of the Hub cache that ``huggingface-cli download
    org/name`` fills (``.../models--org--name/snapshots/REVISION``) stands for
    ``org/name``. Anything else is a local folder, which the Hub cannot link to: the
    card names it in the text instead (mergekit writes ``base_model: []`` for it).

    Args:
        reference (`str`): a model path or Hub id, without ``+adapter`` or ``@revision``.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    cached = _HUB_CACHE_SNAPSHOT.search(reference)
    candidate = cached["repo"].replace("--", "/", 1) if cached else reference
    if not cached and looks_local(reference):
        return None
    try:
        validate_repo_id(candidate)
    except HFValidationError:
        return None
    return candidate


def _number(value: float) -> str:
    return f"{value:g}"


def method_text(point: Point, recipe: dict) -> str:
    """The selected method and its parameters, e.g. ``FAPM (...) at sparsity 0.9, beta 1``."""
    family = method_family(point.method)
    method = METHODS.get(family)
    if method is None:  # a recipe tune did not make: mergekit's method by its name
        return f"mergekit's `{point.method}`"
    parameters = merge_parameters(recipe)
    settings = [f"{point.strength_name} {_number(point.strength)}"] if point.strength is not None else []
    if isinstance(parameters.get("sparsity"), list):  # a depth schedule: shallow to deep
        settings.append("sparsity per layer " + " to ".join(map(_number, parameters["sparsity"])))
    if family in (FAPM, FAPM_LORA):
        settings.append(f"beta {_number(float(parameters.get('beta', DEFAULT_BETA)))}")
    if point.method == "dare":
        settings.append(f"density {_number(float(parameters['density']))}")
    return method.name + (" at " + ", ".join(settings) if settings else "")


def _fine_tune_text(plan: TunePlan, recipe: dict) -> str:
    """The fine-tune as the user gave it: the model folder, or the adapter and its base."""
    base = f"`{plan.base}`" + (f" (Hub: `{hub_model_id(str(plan.base))}`)"
                               if hub_model_id(str(plan.base)) else "")
    if recipe.get("merge_method") == FAPM_LORA:
        return (f"The LoRA adapter `{merge_parameters(recipe)['adapter']}` applied to the base "
                f"model {base}")
    return f"The fine-tuned model `{model_name(non_base_models(recipe)[0])}` of the base model {base}"


def _grid(points: List[Point]) -> str:
    """The variants compared, by method: ``FAPM at sparsity 0.1, 0.5; WiSE-FT at alpha 0.5``."""
    by_method: Dict[str, List[Point]] = {}
    for point in points:
        by_method.setdefault(point.method, []).append(point)
    parts = []
    for method, group in by_method.items():
        family = method_family(method)
        detail = method[len(family):].lstrip("-")  # the label's own part: b0.5, depth, top0.8
        name = (METHODS[family].short + (f" ({detail})" if detail else "")) if family in METHODS else method
        strengths = sorted(p.strength for p in group if p.strength is not None)
        parts.append(name + (f" at {group[0].strength_name} " + ", ".join(map(_number, strengths))
                             if strengths else ""))
    return "; ".join(parts)


def _file_rows(files: Dict[str, dict], used_for: str) -> List[str]:
    rows = []
    for role, entry in files.items():
        what = f"`{entry['file']}`" if entry.get("file") else f"lm-evaluation-harness task `{entry.get('task')}`"
        rows.append(f"| {role} ({used_for}) | {what} | `{entry.get('sha256') or '-'}` |")
    return rows


def _dataset(entry: dict) -> Dict[str, str]:
    """An eval result's dataset fields for one file of :func:`data_files`: a local JSON or
    text file is no Hub dataset, so its type is the loader's (``json``, ``text``) and its
    revision the file's sha256."""
    if entry.get("file"):
        name = Path(entry["file"]).name
        kind = "json" if name.endswith((".json", ".jsonl")) else "text"
        return {"dataset_type": kind, "dataset_name": f"{name} (held out)",
                "dataset_revision": entry.get("sha256")}
    return {"dataset_type": str(entry.get("task")), "dataset_name": f"{entry.get('task')} (held out)",
            "dataset_revision": entry.get("sha256")}


def _eval_results(result: Tradeoff) -> list:
    """The held-out numbers of the selected model as ``model-index`` results (none unconfirmed)."""
    from huggingface_hub import EvalResult

    confirmation = result.confirmation
    if confirmation is None:
        return []
    cf = confirmation.cf["selected"]
    return [
        EvalResult(task_type="text-generation", task_name="task accuracy (held out)",
                   metric_type="accuracy", metric_name="accuracy",
                   metric_value=round(confirmation.accuracy["selected"], 6),
                   **_dataset(confirmation.files["task"])),
        EvalResult(task_type="text-generation", task_name="forgetting on general text (held out)",
                   metric_type="cf_pct", metric_name="CF % (perplexity increase over the base)",
                   metric_value=round(cf.estimate, 4),
                   metric_args={"low_95": round(cf.low, 4), "high_95": round(cf.high, 4)},
                   **_dataset(confirmation.files["text"])),
    ]


def model_card(result: Tradeoff, variant: Variant, plan: TunePlan, command: str, name: str, *,
               split_from: Optional[Dict[str, Path]] = None, screening: Optional[dict] = None) -> str:
    """The chosen model's README.md: what it is, why it was chosen, the evidence.

    Args:
        result (`Tradeoff`): the decision, with a selected variant; its ``files`` name the
            selection data and its ``confirmation`` (when set) the held-out numbers the
            card leads with and publishes as ``model-index`` results.
        variant (`Variant`): the selected variant (its recipe and seed).
        plan (`TunePlan`): the tune's plan (the base model folder).
        command (`str`): the command line that made the decision.
        name (`str`): the model's name (the output folder's).
        split_from (`Dict[str, Path]`, *optional*): ``{"task": ..., "text": ...}``, the
            user's files when tune split the selection and held-out parts off them (the
            records name the parts, in the work folder); None when the files measured are
            the user's own.
        screening (`dict`, *optional*): the tune's ``screening.json`` when it screened
            (:func:`fapm_merge.workflows.tune.screening.report`): the card says which
            candidates it dropped and what that saved.

    Returns:
        the card's text, parsed back by ``huggingface_hub.ModelCard`` (front matter and all).
    """
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    chosen, confirmation = result.selected, result.confirmation
    method = METHODS.get(method_family(chosen.method))
    results = _eval_results(result)
    data = ModelCardData(  # model_name names the model-index; without results it is no Hub field
        base_model=hub_model_id(str(plan.base)), library_name="transformers",
        tags=TAGS + ([method.tag] if method else []),
        model_name=name if results else None, eval_results=results or None)
    variants = [p for p in result.points if p.method not in ("base", "finetuned")]
    edit = f"the fine-tune's {method.edit}" if method else "a merge of the fine-tune and its base"
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {name}", "",
        f"{_fine_tune_text(plan, variant.recipe)}, edited by {method_text(chosen, variant.recipe)} "
        f"to undo part of its forgetting: {edit}.", "",
        (f"`fapm-merge tune` screened {len(screening['candidates'])} candidates on a share of the "
         f"selection data, then compared the {len(variants)} that survived "
         if screening and screening.get("screened") else
         f"`fapm-merge tune` compared {len(variants)} variants ")
        + f"({_grid(variants)}) with the base and the "
        f"fine-tune on the same task prompts and general text, and its rule chose **{chosen.name}**.",
        "",
    ]
    if confirmation is not None:
        lines += [
            "## Held-out check", "",
            f"Checked on data that did not choose it: {confirmation.sentence()}.", "",
            *([] if confirmation.status == CONFIRMED else [
                f"**The held-out data do not confirm the selection ({confirmation.status})**: "
                + ("they show it losing the task or forgetting as much as the fine-tune; "
                   if confirmation.status == CONTRADICTED else "they are too few to show it; ")
                + "do not rely on the selection data's numbers below.", ""]),
            "These held-out numbers are the ones in this card's metadata (`model-index`). The table "
            f"further down comes from the selection data: the best of {len(variants)} noisy candidates "
            "looks better on the data that chose it than it is.", "",
        ]
    else:
        lines += [
            "Every number in this card comes from the data that chose the model: the best of "
            f"{len(variants)} noisy candidates looks better there than it is, and no held-out check "
            "was run.", "",
        ]
    lines += ["## Why this model", "",
              f"Rule: {result.rule.text}.", "",
              f"Decision: {result.reason}.", ""]
    if result.warnings:
        lines += ["Caveats the evidence leaves:", ""] + [f"- {w}." for w in result.warnings] + [""]
    lines += card_lines(screening)
    rows = _file_rows(result.files, "selection")
    if confirmation is not None:
        rows += _file_rows(confirmation.files, "held-out check")
    if rows:
        lines += ["## Data", ""]
        if split_from:
            lines += ["The selection and held-out parts were split off (seeded, whole documents and "
                      "prompt groups) " + " and ".join(f"the {role} file `{path}`"
                                                       for role, path in split_from.items())
                      + "; the digests are of the parts measured.", ""]
        lines += ["| used for | file | sha256 |", "|---|---|---|"] + rows + [""]
    if (result.task_metric, result.text_metric) == (TASK_METRIC, TEXT_METRIC):
        measured = "Task accuracy on the task file and forgetting (CF %) on the general text"
    else:
        measured = (f"Accuracy is `{result.task_metric}` and forgetting `{result.text_metric}` "
                    "(`lm_eval:` metrics come from lm-evaluation-harness's per-sample results)")
    lines += [
        "## The trade-off", "",
        f"{measured}, every model on the same {evidence(result)}, from the selection data. Intervals "
        "are 95% and paired: accuracy differences by Tango's score interval (the rule reads its "
        "one-sided lower bound), losses by the paired bootstrap over windows (whole documents when "
        "the text has several). CF % = 100 (PPL - PPL_base) / PPL_base; CF cut = the fine-tune's CF "
        "minus the model's; repaired = the share of the fine-tune's CF taken away.", "",
        tradeoff_markdown(result), "",
        result.rule.selection.legend + ".", "",
        "![trade-off](tradeoff.png)", "",
        "## Recipe", "",
        "```yaml", yaml.safe_dump(variant.recipe, sort_keys=False).strip(), "```", "",
        f"`mergekit-yaml {RECIPE_FILE} OUT"
        + (f" --random-seed {variant.seed}" if variant.seed is not None else "")
        + "` writes these weights again, bit for bit. The whole decision:", "",
        "```sh", command, "```", "",
        "Made with fapm-merge (FAPM for [mergekit](https://github.com/arcee-ai/mergekit)).", "",
    ]
    return str(ModelCard("\n".join(lines)))


__all__ = ["METHODS", "hub_model_id", "method_text", "model_card"]
