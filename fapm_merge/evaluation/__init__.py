"""Evaluation: what a model keeps of general ability and of the task, and how sure we are.

* :mod:`~fapm_merge.evaluation.metrics`: the metrics themselves (text loss and
  perplexity, task accuracy) and model/tokenizer loading; a new metric goes here;
* :mod:`~fapm_merge.evaluation.evaluate`: one model folder in, one record out;
* :mod:`~fapm_merge.evaluation.results`: results files (JSON lines) written and read;
* :mod:`~fapm_merge.evaluation.lm_eval`: lm-evaluation-harness as another source;
* :mod:`~fapm_merge.evaluation.errors`: ``EvalInputError``, without torch.
"""
