"""The chosen model's README.md: what it is, why it was chosen, the evidence."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fapm_merge.evaluation.settings import TASK_METRIC, TEXT_METRIC
from fapm_merge.io.recipe import RECIPE_FILE
from fapm_merge.workflows.tradeoff import Tradeoff, tradeoff_markdown
from fapm_merge.workflows.tune.plan import TunePlan

if TYPE_CHECKING:  # sweep imports mergekit
    from fapm_merge.workflows.variants import Variant


def model_card(result: Tradeoff, variant: Variant, plan: TunePlan, command: str, name: str) -> str:
    """The chosen model's README.md: what it is, why it was chosen, the evidence."""
    import yaml

    chosen = result.selected
    recipe_yaml = yaml.safe_dump(variant.recipe, sort_keys=False).strip()
    front = {"base_model": str(plan.base), "library_name": "transformers",
             "tags": ["mergekit", "merge", "fapm", "fapm-merge"]}
    seed_note = f" --random-seed {variant.seed}" if variant.seed is not None else ""
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {name}", "",
        f"`{plan.finetuned}` with its forgetting repaired by FAPM (Forgetting-Aware Pruning, "
        "[arXiv 2509.08255](https://arxiv.org/abs/2509.08255)), chosen by "
        f"`fapm-merge tune` among {len(result.points) - 2} variants: **{chosen.label}**.", "",
        "## Why this model", "",
        f"Rule: {result.rule.text}.", "",
        f"Decision: {result.reason}.", "",
    ]
    if (result.task_metric, result.text_metric) == (TASK_METRIC, TEXT_METRIC):
        measured = (f"Task accuracy on the task file and forgetting on the general text, every model "
                    f"on the same {result.items.get('prompts', 0)} prompts and "
                    f"{result.items.get('windows', 0)} text windows; intervals are 95% and paired ")
    else:
        measured = (f"Accuracy is `{result.task_metric}` and forgetting `{result.text_metric}` "
                    f"(`lm_eval:` metrics come from lm-evaluation-harness's per-sample results), "
                    f"every model on the same {result.items.get('prompts', 0)} task items and "
                    f"{result.items.get('windows', 0)} text windows or documents; intervals are 95% "
                    "and paired ")
    if result.warnings:
        lines += ["Caveats the evidence leaves:", ""] + [f"- {w}." for w in result.warnings] + [""]
    lines += [
        "## The trade-off", "",
        measured +
        "(exact one-sided McNemar test for the accuracy criterion, paired bootstrap over "
        "prompts and windows for the intervals). CF % = 100 (PPL - PPL_base) / PPL_base; "
        "repaired = share of the fine-tune's extra loss undone.", "",
        tradeoff_markdown(result), "",
        "![trade-off](tradeoff.png)", "",
        "## Recipe", "",
        "```yaml", recipe_yaml, "```", "",
        f"`mergekit-yaml {RECIPE_FILE} OUT{seed_note}` writes these weights again, bit for bit. "
        "The whole decision:", "",
        "```sh", command, "```", "",
        "Made with fapm-merge (FAPM for [mergekit](https://github.com/arcee-ai/mergekit)).", "",
    ]
    return "\n".join(lines)


__all__ = ["model_card"]
