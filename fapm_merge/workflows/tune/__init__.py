"""``fapm-merge tune``: sweep, evaluate, decide and write the chosen model, in one command.

For a recipe with ``merge_method: fapm`` (a full fine-tune) or ``fapm_lora`` (a PEFT
LoRA adapter), :func:`run_tune`:

1. checks everything it can before any merge: the recipe, local model folders, the
   task file, that the text gives at least two windows, the disk;
2. evaluates the base and the fine-tuned model (for ``fapm_lora`` the fine-tune is
   the ``fapm_lora`` merge at sparsity 0, i.e. exactly ``W_pre + scale * B @ A``);
3. merges the variants (FAPM at each sparsity plus the baselines) in batches of at
   most ``max_on_disk``, each batch in one ``sweep`` pass, evaluates each variant,
   records it, and deletes its weights: at 8B parameters a 20-variant sweep would
   otherwise need 320 GB;
   screening (default, ``screen``) evaluates each variant on a seeded share of the
   selection data first, and only the survivors on the rest, in rounds (each line
   screened mildest first as far as its line rule allows, its strongest survivor
   first to the rest, the likeliest leader before the others); their two
   records make the record on the whole data (:mod:`fapm_merge.workflows.tradeoff.screen`);
4. applies the selection rule to the paired results
   (:mod:`fapm_merge.workflows.tradeoff`);
5. rebuilds the chosen variant from its recipe with mergekit's own ``run_merge``
   (bit for bit what ``mergekit-yaml`` makes of that recipe) into OUT, atomically,
   with a model card that embeds the recipe, the rule, the trade-off table with
   its intervals and the plot.

Everything lives in a work folder (default ``OUT.tune`` beside OUT): the results
and their per-item values, the plan, the plot. Running the same command again
resumes: finished evaluations are reused, a variant merged but not yet evaluated
is evaluated, and a changed rule is re-decided without evaluating anything.

The task axis is the ``--task`` file's accuracy by default, or any per-sample metric
of lm-evaluation-harness (``task_metric="lm_eval:arc_easy/acc"``); the general axis
the ``--text`` loss, or a harness perplexity task (``text_metric="lm_eval:wikitext"``).
tune then runs those harness tasks on every model itself.

Where the variants run: one after another in this process (batches of
``max_on_disk`` merged in one ``sweep`` pass), or, with ``ray`` set, as Ray tasks
(:mod:`fapm_merge.workflows.executors`), one variant per task (merge, evaluate,
delete), at most ``max_on_disk`` at once. One loop drives both; they write the same
results, in the plan's order, and resume from each other's work folder.

Modules: :mod:`.plan` (settings, defaults, the models to evaluate), :mod:`.checks`
(everything checked before a merge), :mod:`.workdir` (the work folder and resuming),
:mod:`.screening` (the share's files, costs and report), :mod:`.runner` (the loop, the
decision, the rebuild), :mod:`.card` (the model card).
"""

from fapm_merge.workflows.tune.card import model_card
from fapm_merge.workflows.tune.plan import (
    DEFAULT_ALPHAS,
    DEFAULT_BASELINES,
    DEFAULT_BETAS,
    FAMILY_BETAS,
    DEFAULT_SPARSITIES,
    MAX_ON_DISK,
    TuneError,
    TunePlan,
    TuneSettings,
    plan_tune,
)
from fapm_merge.workflows.tune.runner import TuneResult, run_tune

__all__ = ["DEFAULT_ALPHAS", "DEFAULT_BASELINES", "DEFAULT_BETAS", "FAMILY_BETAS", "DEFAULT_SPARSITIES", "MAX_ON_DISK", "TuneError",
           "TunePlan", "TuneResult", "TuneSettings", "model_card", "plan_tune", "run_tune"]
