"""The forgetting / task trade-off of a sweep, and the point a stated rule selects.

Input: the JSONL written by ``fapm-merge eval`` (one line per model, each with
``metrics.text`` (loss) and ``metrics.task`` (accuracy) and, for merged models,
the recipe). For every model:

* ``task_norm = accuracy / accuracy(fine-tuned)``: 1.0 is the fine-tuned model's
  task accuracy.
* ``general_norm = perplexity(base) / perplexity(model) = exp(loss(base) - loss(model))``
  on the general text: 1.0 is the base model's general ability; below 1 the model
  predicts general text worse than the base did (forgetting).
* ``score = task_weight * task_norm + general_norm`` with ``task_weight = 2`` by
  default. The selected point maximises it over all evaluated models (the
  fine-tuned model included, so "do not prune" can win); the first in file order
  wins a tie. Summing normalised target and control accuracies is how LiNeS
  (Wang et al., ICLR 2025, https://arxiv.org/abs/2410.17146) compares its edits;
  counting the task twice is this package's stated default (we could not confirm
  the exact weighting LiNeS used), so it is an option: ``--task-weight``.

The method and strength of a point come from its recipe: ``fapm`` (``beta: 0`` is
``magnitude``) with its sparsity, ``dare_linear`` (``dare``) with sparsity
``1 - density``, ``task_arithmetic`` (``wiseft``) with ``alpha = weight``. The base
and fine-tuned anchors are the recipes' ``base_model`` and fine-tuned model
(or ``--base`` / ``--finetuned``). When a model was evaluated twice, its last line
counts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from fapm_merge.evaluation.results import read_results as _read_records
from fapm_merge.io.recipe import describe_recipe, recipe_inputs

TASK_WEIGHT = 2.0
"""Default weight of ``task_norm`` in the selection score."""


class TradeoffError(ValueError):
    """Results that cannot be placed on the trade-off plot; the message says why."""


@dataclass
class Point:
    """One evaluated model on the trade-off plane."""

    name: str
    model: str
    method: str  # base, finetuned, fapm, magnitude, dare, wiseft, or a mergekit method
    strength: Optional[float]  # sparsity (fapm, magnitude, dare) or alpha (wiseft)
    strength_name: Optional[str]
    accuracy: float
    loss: float
    task_norm: float = math.nan
    general_norm: float = math.nan
    score: float = math.nan

    @property
    def label(self) -> str:
        if self.strength is None:
            return self.method
        return f"{self.method} {self.strength_name}={self.strength:g}"


def read_results(path: Path) -> List[dict]:
    """The records of a results file, the last line per model winning."""
    return _read_records(path, TradeoffError)


def _anchor_paths(records: List[dict]) -> Tuple[Optional[str], Optional[str]]:
    bases, finetuned = set(), set()
    for record in records:
        base, models = recipe_inputs(record.get("recipe") or {})
        if base:
            bases.add(str(base))
            finetuned.update(models)
    if len(bases) > 1 or len(finetuned) > 1:
        raise TradeoffError(
            f"the results mix merges of different models (bases {sorted(bases)}, fine-tuned "
            f"{sorted(finetuned)}); pass --base and --finetuned or split the file"
        )
    return next(iter(bases), None), next(iter(finetuned), None)


@dataclass
class Tradeoff:
    """All points, the anchors and the selected point."""

    points: List[Point]
    base: Point
    finetuned: Point
    selected: Point
    skipped: List[str]
    task_weight: float = TASK_WEIGHT

    @property
    def rule(self) -> str:
        return f"maximise {self.task_weight:g} * task_norm + general_norm"

    def to_json(self) -> dict:
        return {
            "rule": self.rule,
            "selected": asdict(self.selected),
            "base": asdict(self.base),
            "finetuned": asdict(self.finetuned),
            "points": [asdict(p) for p in self.points],
            "skipped": self.skipped,
        }


def compute_tradeoff(
    records: List[dict],
    *,
    base: Optional[str] = None,
    finetuned: Optional[str] = None,
    task_weight: float = TASK_WEIGHT,
) -> Tradeoff:
    """Normalise every record against the anchors and apply the selection rule.

    Args:
        records (`List[dict]`): from :func:`read_results`.
        base (`str`, *optional*): path of the base model's record (default: the
            recipes' ``base_model``).
        finetuned (`str`, *optional*): path of the fine-tuned model's record
            (default: the recipes' fine-tuned model).
    """
    if not (math.isfinite(task_weight) and task_weight >= 0):
        raise TradeoffError(f"--task-weight must be a finite number >= 0, got {task_weight}")
    auto_base, auto_ft = _anchor_paths(records)
    base_path = str(Path(base).absolute()) if base else auto_base
    ft_path = str(Path(finetuned).absolute()) if finetuned else auto_ft
    if base_path is None or ft_path is None:
        raise TradeoffError(
            "no merged model's recipe names the base and fine-tuned models; pass --base and --finetuned"
        )
    points: List[Point] = []
    skipped: List[str] = []
    for record in records:
        metrics = record["metrics"] if isinstance(record["metrics"], dict) else {}
        if "text" not in metrics or "task" not in metrics:
            skipped.append(f"{record['model']}: needs both --text and --task metrics")
            continue
        try:  # hand-edited or foreign lines: skip them with the reason, never crash
            accuracy = float(metrics["task"]["accuracy"])
            loss = float(metrics["text"]["loss"])
            if record["model"] == base_path:
                method, strength, strength_name = "base", None, None
            elif record["model"] == ft_path:
                method, strength, strength_name = "finetuned", None, None
            else:
                method, strength, strength_name = describe_recipe(record.get("recipe"))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            skipped.append(f"{record['model']}: malformed record ({type(error).__name__}: {error})")
            continue
        if not (math.isfinite(accuracy) and math.isfinite(loss)):
            skipped.append(
                f"{record['model']}: accuracy {accuracy} / loss {loss} is not finite (the model "
                "gives NaN or Inf): check it with fapm-merge verify"
            )
            continue
        points.append(
            Point(
                name=record.get("name", Path(record["model"]).name),
                model=record["model"],
                method=method,
                strength=strength,
                strength_name=strength_name,
                accuracy=accuracy,
                loss=loss,
            )
        )
    anchors = {}
    for role, path in (("base", base_path), ("finetuned", ft_path)):
        found = [p for p in points if p.model == path]
        if not found:
            why = [reason for reason in skipped if reason.startswith(f"{path}: ")]
            raise TradeoffError(
                f"the results have no usable line for the {role} model {path}"
                + (f" ({why[-1][len(path) + 2:]})" if why else "")
                + f"; run fapm-merge eval {path} --text ... --task ... --out RESULTS"
            )
        anchors[role] = found[0]
    if anchors["finetuned"].accuracy <= 0:
        raise TradeoffError(
            "the fine-tuned model scores 0 on the task: task_norm = accuracy / accuracy(fine-tuned) "
            "is undefined; check the task file"
        )
    for point in points:
        point.task_norm = point.accuracy / anchors["finetuned"].accuracy
        point.general_norm = math.exp(anchors["base"].loss - point.loss)
        point.score = task_weight * point.task_norm + point.general_norm
    selected = max(points, key=lambda p: p.score)  # max keeps the first of equal scores
    return Tradeoff(points, anchors["base"], anchors["finetuned"], selected, skipped, task_weight)


def tradeoff_table(result: Tradeoff):
    """A rich table of every point, sorted by method and strength; selected marked."""
    from rich.table import Table

    table = Table(title=f"trade-off (selected: {result.rule})")
    for column in ("model", "method", "strength", "task acc", "task_norm", "loss", "general_norm", "score", ""):
        table.add_column(column, justify="left" if column in ("model", "method") else "right")
    order = {"base": 0, "finetuned": 1}
    for p in sorted(result.points, key=lambda p: (order.get(p.method, 2), p.method, p.strength or 0)):
        table.add_row(
            p.name,
            p.method,
            "" if p.strength is None else f"{p.strength_name} {p.strength:g}",
            f"{p.accuracy:.2%}",
            f"{p.task_norm:.3f}",
            f"{p.loss:.4f}",
            f"{p.general_norm:.3f}",
            f"{p.score:.3f}",
            "◀ selected" if p is result.selected else "",
        )
    return table


__all__ = [
    "TASK_WEIGHT",
    "Point",
    "Tradeoff",
    "TradeoffError",
    "compute_tradeoff",
    "read_results",
    "tradeoff_table",
]
