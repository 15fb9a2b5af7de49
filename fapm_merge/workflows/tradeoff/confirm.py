"""The selection, checked on data that did not choose it.

A variant chosen as the best of K noisy candidates looks better on the data that chose
it than it is (the winner's curse: with five variants that all truly repair 30%, the
reported winner averaged 37%). So the numbers a card publishes come from held-out
prompts and text: only the base, the fine-tune and the selected variant are evaluated
there, and :func:`confirm` compares them with the same paired statistics as the
selection (Tango's interval for accuracy, the paired bootstrap over windows or documents
for forgetting), at the same retention margin.

Verdicts (:attr:`Confirmation.status`):

* ``confirmed``: on the held-out data the variant is shown non-inferior in accuracy and
  to forget significantly less than the fine-tune;
* ``contradicted``: the held-out data show it clearly below the margin, or forgetting
  at least as much as the fine-tune (point estimate);
* ``not shown``: neither; the held-out data are too few to tell (the card says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from fapm_merge.evaluation import noninferiority as ni
from fapm_merge.evaluation import stats
from fapm_merge.evaluation.results import PER_ITEM
from fapm_merge.workflows.tradeoff.points import Tradeoff, data_files
from fapm_merge.workflows.tradeoff.rules import TradeoffError

CONFIRMED, NOT_SHOWN, CONTRADICTED = "confirmed", "not shown", "contradicted"
"""The verdicts of a confirmation."""


@dataclass(frozen=True)
class Confirmation:
    """The held-out evaluation of the base, the fine-tune and the selected variant.

    Attributes:
        selected (`str`): the selected variant's name.
        accuracy (`Dict[str, float]`): held-out accuracy of ``base``, ``finetuned``, ``selected``.
        cf (`Dict[str, stats.Interval]`): CF% against the base of ``finetuned`` and ``selected``.
        noninferiority (`NonInferiority`): the selected variant's accuracy against the
            fine-tune's at the selection's retention (margin from the held-out accuracy).
        repair (`stats.Repair`): its CF reduction and whether it is significant.
        prompts, windows (`int`): held-out items; ``documents``/``groups``: their clusters.
        files (`Dict[str, dict]`): the held-out task and text files with their sha256.
    """

    selected: str
    accuracy: Dict[str, float]
    cf: Dict[str, stats.Interval]
    noninferiority: ni.NonInferiority
    repair: stats.Repair
    prompts: int
    windows: int
    documents: Optional[int]
    groups: Optional[int]
    files: Dict[str, dict]

    @property
    def status(self) -> str:
        if self.noninferiority.verdict == ni.FAILS or not self.repair.cf_reduction.estimate > 0:
            return CONTRADICTED
        if self.noninferiority.verdict == ni.QUALIFIES and self.repair.significant:
            return CONFIRMED
        return NOT_SHOWN

    @property
    def retention(self) -> float:
        return self.accuracy["selected"] / self.accuracy["finetuned"]

    def sentence(self) -> str:
        """The held-out numbers in one sentence, as the summary and the card state them."""
        difference, reduction = self.noninferiority.difference, self.repair.cf_reduction
        where = (f"{self.prompts} held-out prompts"
                 + (f" ({self.groups} groups)" if self.groups else "")
                 + f" and {self.windows} held-out text windows"
                 + (f" ({self.documents} documents)" if self.documents else ""))
        return (
            f"{self.status} on {where}: {self.selected} has accuracy {self.accuracy['selected']:.3f} "
            f"against the fine-tune's {self.accuracy['finetuned']:.3f} (difference {difference.text(3)}, "
            f"one-sided lower bound {self.noninferiority.lower_bound:+.3f} vs margin "
            f"-{self.noninferiority.margin:.3f}), CF {_percent(self.cf['selected'])} against the "
            f"fine-tune's {_percent(self.cf['finetuned'])}: a cut of {reduction.text(2)} CF points")

    def to_json(self) -> dict:
        return {"selected": self.selected, "status": self.status, "accuracy": self.accuracy,
                "retention": self.retention, "cf": {k: v.to_json() for k, v in self.cf.items()},
                "noninferiority": self.noninferiority.to_json(), "repair": self.repair.to_json(),
                "prompts": self.prompts, "windows": self.windows, "documents": self.documents,
                "groups": self.groups, "files": self.files}


def _percent(cf: stats.Interval) -> str:
    return f"{cf.estimate:+.2f}% [{cf.low:+.2f}, {cf.high:+.2f}]"


def _items(record: dict, metric: str, model: str) -> dict:
    values = (record.get("metrics") or {}).get(metric)
    if not isinstance(values, dict) or not isinstance(values.get(PER_ITEM), dict):
        raise TradeoffError(f"the confirmation record of {model} has no per-item {metric!r} values: "
                            "evaluate it with fapm-merge eval --text ... --task ... (which keeps them)")
    return values


def confirm(result: Tradeoff, records: List[dict], *, selected_model: Optional[str] = None) -> Confirmation:
    """Evaluate the selection on held-out records.

    Args:
        result (`Tradeoff`): the decision, with a selected variant.
        records (`List[dict]`): records (with per-item values, :func:`read_results`) of the
            base, the fine-tune and the selected variant on held-out data, the same model
            paths as in the decision's records.
        selected_model (`str`, *optional*): the path of the selected variant's held-out
            record when it differs (tune evaluates the rebuilt copy).

    Raises:
        TradeoffError: nothing was selected, or a record is missing or lacks per-item values.
    """
    if result.selected is None:
        raise TradeoffError("nothing was selected, so there is nothing to confirm")
    paths = {"base": result.base.model, "finetuned": result.finetuned.model,
             "selected": selected_model or result.selected.model}
    by_model = {r["model"]: r for r in records}
    missing = [f"{role} ({path})" for role, path in paths.items() if path not in by_model]
    if missing:
        raise TradeoffError(
            f"the confirmation results lack {', '.join(missing)}: evaluate the base, the fine-tune "
            "and the selected model on the held-out --task and --text into one results file")
    task = {role: _items(by_model[path], result.task_metric, path) for role, path in paths.items()}
    text = {role: _items(by_model[path], result.text_metric, path) for role, path in paths.items()}
    keys = {(v.get("sha256"), v.get("examples")) for v in task.values()}
    keys |= {("text",) + (v.get("sha256"), v.get("windows")) for v in text.values()}
    if len(keys) != 2:
        raise TradeoffError("the confirmation records were not all measured on the same held-out "
                            "task and text: evaluate the three models with the same files and settings")
    correct = {role: [int(c) for c in v[PER_ITEM]["correct"]] for role, v in task.items()}
    losses = {role: v[PER_ITEM]["window_loss"] for role, v in text.items()}
    tokens = text["finetuned"][PER_ITEM]["window_tokens"]
    documents = text["finetuned"][PER_ITEM].get("window_document")
    window_groups = documents if documents and len(set(documents)) > 1 else None
    prompt_groups = task["finetuned"][PER_ITEM].get("group") or None
    accuracy = {role: v["accuracy"] for role, v in task.items()}
    margin = ni.margin_for(result.rule.min_retention, accuracy["finetuned"])
    cf = {role: stats.loss_difference(losses[role], losses["base"], tokens, groups=window_groups)
          .map(stats.cf_percent) for role in ("finetuned", "selected")}
    return Confirmation(
        selected=result.selected.name,
        accuracy=accuracy,
        cf=cf,
        noninferiority=ni.noninferior(correct["selected"], correct["finetuned"], margin,
                                      groups=prompt_groups),
        repair=stats.repair(losses["selected"], losses["finetuned"], losses["base"], tokens,
                            groups=window_groups),
        prompts=len(correct["finetuned"]),
        windows=len(tokens),
        documents=len(set(documents)) if window_groups else None,
        groups=len(set(prompt_groups)) if prompt_groups else None,
        files=data_files(task["finetuned"], text["finetuned"]),
    )


__all__ = ["CONFIRMED", "CONTRADICTED", "NOT_SHOWN", "Confirmation", "confirm"]
