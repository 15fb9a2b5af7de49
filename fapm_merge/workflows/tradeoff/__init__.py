"""The forgetting / task trade-off of a sweep, and the point a stated rule selects.

Input: the results file of ``fapm-merge eval`` (one line per model with
``metrics.text`` (loss on a general text) and ``metrics.task`` (accuracy), the
recipe of every merged model, and, in the items file beside it, each model's
per-prompt outcomes and per-window losses). For every model:

* ``cf_pct = 100 * (PPL_model - PPL_base) / PPL_base`` on the text: the paper's
  forgetting measure (0 nothing forgotten, negative better than the base);
* ``repaired = (L_ft - L_model) / (L_ft - L_base)``: the share of the fine-tune's
  forgetting undone (1 all, 0 none, < 0 worse than not repairing; undefined when
  the fine-tune did not forget);
* ``retention = accuracy / accuracy(fine-tuned)``;
* 95% intervals of its accuracy difference to the fine-tune and of its loss
  differences to the base (-> CF%) and to the fine-tune (-> repaired), all
  *paired* (:mod:`fapm_merge.evaluation.stats`): every model saw the same prompts
  and windows.

Rules (:class:`Rule`; each one's behaviour is a class in :mod:`.rules`):

* ``repair`` (default): among the evaluated variants whose accuracy is not
  significantly below the fine-tune's (exact one-sided McNemar test, 5%) and whose
  retention is at least ``min_retention`` (0.99, the paper's headline operating
  point), and which forget less than the fine-tune, select the one that repairs
  the most forgetting. If none qualifies, nothing is selected and the closest
  candidates are named: never a silent fall-back.
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
rules), :mod:`.report` (the tables and sentences).
"""

from fapm_merge.workflows.tradeoff.points import Point, Tradeoff, compute_tradeoff, read_results
from fapm_merge.workflows.tradeoff.report import summary_lines, tradeoff_markdown, tradeoff_table
from fapm_merge.workflows.tradeoff.rules import (
    MIN_RETENTION,
    RULES,
    SELECTIONS,
    TASK_WEIGHT,
    Rule,
    SelectionRule,
    TradeoffError,
)

__all__ = [
    "MIN_RETENTION",
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
