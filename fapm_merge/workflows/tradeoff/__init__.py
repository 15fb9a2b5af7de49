"""The forgetting / task trade-off of a sweep, and the point a stated rule selects.

Input: the results file of ``fapm-merge eval`` (one line per model with
``metrics.text`` (loss on a general text) and ``metrics.task`` (accuracy), the
recipe of every merged model, and, in the items file beside it, each model's
per-prompt outcomes and per-window losses). For every model:

* ``cf_pct = 100 * (PPL_model - PPL_base) / PPL_base`` on the text: the paper's
  forgetting measure (0 nothing forgotten, negative better than the base);
* ``CF cut = CF_ft - CF_model`` (CF points taken away, with a finite paired
  interval) and ``repaired = CF cut / CF_ft``, the share of the fine-tune's
  forgetting undone (1 all, 0 none, < 0 worse; undefined when it did not forget);
* ``retention = accuracy / accuracy(fine-tuned)``;
* 95% intervals of its accuracy difference to the fine-tune (Tango's paired score
  interval, :mod:`fapm_merge.evaluation.noninferiority`) and of its loss differences
  to the base (-> CF%) and to the fine-tune (-> CF cut), all *paired*
  (:mod:`fapm_merge.evaluation.stats`): every model saw the same prompts and windows.
  Windows of several documents are resampled by document, prompts that carry a
  ``group`` count through their design effect.

Rules (:class:`Rule`; each one's behaviour is a class in :mod:`.rules`):

* ``repair`` (default, :class:`.rules.Repair`): a variant qualifies when the data
  *show* that it keeps ``min_retention`` (0.99, the paper's headline operating point)
  of the fine-tune's accuracy (non-inferiority: the one-sided 95% lower bound of the
  paired difference, Tango's score interval, above ``-(1 - min_retention) * acc_ft``)
  and that it forgets significantly less than the fine-tune, by at least
  ``min_repair`` of its CF; the fine-tune's own forgetting must be significant. The
  qualified variant with the largest CF cut wins (ties: higher accuracy, then the
  milder edit). Otherwise nothing is selected, as *undecided* (too few prompts to
  show the accuracy is kept, with how many would) or *no variant qualifies*, and the
  closest candidates are named: never a silent fall-back.
* ``max-cf``: the highest accuracy among the points with CF% <= ``max_cf``.
* ``weighted``: maximise ``task_weight * task_norm + general_norm`` with
  ``task_norm = accuracy / accuracy(fine-tuned)`` and ``general_norm =
  exp(L_base - L_model)`` (LiNeS, Wang et al., ICLR
  2025, https://arxiv.org/abs/2410.17146, sums normalised target and control
  accuracies). On small forgetting its general axis spans a few hundredths while
  one accuracy carries several points of noise: the task axis decides, and it can
  select a model that forgets more than the fine-tune (the replication showed it).

The axes are selectable (``task_metric``, ``text_metric``): any metric of the
records with an ``accuracy`` and per-item ``correct`` values can be the task axis,
and any with a ``loss`` and per-item window losses the general one; the harness's
per-sample metrics (:mod:`fapm_merge.evaluation.lm_eval`, e.g.
``lm_eval:arc_easy/acc`` and ``lm_eval:wikitext/word_perplexity``) have that shape.

The result also carries warnings where the intervals are wider than the
differences the rule decides between, with about how many more prompts or windows
would resolve them. The method and strength of a point come from its recipe
(:func:`fapm_merge.io.recipe.describe_recipe`). The anchors are the recipes'
``base_model`` and fine-tuned model (``--base`` / ``--finetuned`` override); for
``fapm_lora`` results the fine-tuned model is the ``fapm_lora`` point at sparsity 0.
When a model was evaluated twice, its last line counts.

Modules: :mod:`.points` (the data and :func:`compute_tradeoff`), :mod:`.rules` (the
rules), :mod:`.confirm` (the held-out check of a selection), :mod:`.report` (the
tables and sentences).
"""

from fapm_merge.workflows.tradeoff.confirm import CONFIRMED, CONTRADICTED, NOT_SHOWN, Confirmation, confirm
from fapm_merge.workflows.tradeoff.points import Point, Tradeoff, compute_tradeoff, read_results
from fapm_merge.workflows.tradeoff.report import summary_lines, tradeoff_markdown, tradeoff_table
from fapm_merge.workflows.tradeoff.rules import (
    MIN_REPAIR,
    MIN_RETENTION,
    RULES,
    SELECTIONS,
    TASK_WEIGHT,
    Rule,
    SelectionRule,
    TradeoffError,
)

__all__ = [
    "CONFIRMED",
    "CONTRADICTED",
    "NOT_SHOWN",
    "MIN_REPAIR",
    "MIN_RETENTION",
    "Confirmation",
    "confirm",
    "RULES",
    "SELECTIONS",
    "TASK_WEIGHT",
    "Point",
    "Rule",
    "SelectionRule",
    "Tradeoff",
    "TradeoffError",
    "compute_tradeoff",
    "read_results",
    "summary_lines",
    "tradeoff_markdown",
    "tradeoff_table",
]
