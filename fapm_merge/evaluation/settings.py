"""What ``fapm-merge eval`` measures and how: the settings and their defaults, once.

Light on purpose (no torch): the command line reads its defaults from here before
anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_WINDOW = 256
"""Tokens per text window."""

DEFAULT_BATCH_SIZE = 8
"""Windows per forward pass."""

TASK_METRIC = "task"
"""The task axis by default: ``fapm-merge eval --task`` accuracy. Any metric of the
records with an ``accuracy`` works, e.g. ``lm_eval:arc_easy/acc``."""

TEXT_METRIC = "text"
"""The general axis by default: ``fapm-merge eval --text`` loss. Any metric with a
``loss`` works, e.g. ``lm_eval:wikitext/word_perplexity`` (loss per word)."""

LM_EVAL_LOADING_BACKENDS = ("hf", "vllm")
"""The backends that load the model folder themselves: transformers in this process
or vLLM (tensor and data parallel on GPUs). ``tune`` needs one, as it evaluates a new
folder per variant."""

LM_EVAL_SERVER_BACKEND = "local-completions"
"""The backend that asks an OpenAI-compatible completions server (``vllm serve``),
which serves one model."""

LM_EVAL_BACKENDS = LM_EVAL_LOADING_BACKENDS + (LM_EVAL_SERVER_BACKEND,)
"""``--lm-eval-backend`` values; the first is the default."""

EVAL_DTYPES = ("float32", "bfloat16", "float16")
"""Model dtypes ``eval`` accepts."""


def _absolute(path: Optional[Path]) -> Optional[Path]:
    return Path(path).absolute() if path is not None else None


@dataclass(frozen=True)
class EvalSettings:
    """What to measure. Attributes mirror the ``fapm-merge eval`` options. Frozen:
    :meth:`resolved` gives a changed copy.

    Attributes:
        text (`Path`, *optional*): general text: mean token loss and perplexity.
        task (`Path`, *optional*): task JSON lines: accuracy.
        tokenizer (`str`, *optional*): a tokenizer folder, ``"bytes"``, or None for
            each model's own.
        window (`int`, defaults to 256): tokens per text window.
        batch_size (`int`, defaults to 8): windows per forward pass.
        max_tokens (`int`, *optional*): only the first tokens of the text.
        use_bos (`bool`, defaults to True): BOS before each window and prompt.
        device (`str`, defaults to "cpu"), dtype (`str`, defaults to "float32").
        lm_eval_tasks (`str`, *optional*), lm_eval_limit (`int`, *optional*):
            lm-evaluation-harness tasks and their example limit.
        lm_eval_backend (`str`, defaults to "hf"): how the harness runs the model,
            one of `LM_EVAL_BACKENDS`.
        lm_eval_model_args (`str`, *optional*): passed to the harness's model_args.
        lm_eval_include (`Path`, *optional*): a folder of the user's own task YAMLs.
    """

    text: Optional[Path] = None
    task: Optional[Path] = None
    tokenizer: Optional[str] = None
    window: int = DEFAULT_WINDOW
    batch_size: int = DEFAULT_BATCH_SIZE
    max_tokens: Optional[int] = None
    use_bos: bool = True
    device: str = "cpu"
    dtype: str = EVAL_DTYPES[0]
    lm_eval_tasks: Optional[str] = None
    lm_eval_limit: Optional[int] = None
    lm_eval_backend: str = LM_EVAL_BACKENDS[0]
    lm_eval_model_args: Optional[str] = None
    lm_eval_include: Optional[Path] = None

    def resolved(self, harness_tasks: Sequence[str] = ()) -> "EvalSettings":
        """These settings as a run applies them, as a new object (this one is not changed).

        The files become absolute paths (a Ray task or a resumed run may start in
        another folder), and ``harness_tasks``, the lm-eval tasks an axis needs
        (:func:`fapm_merge.evaluation.lm_eval.resolve_axes`), join ``lm_eval_tasks``.

        Args:
            harness_tasks (`Sequence[str]`, *optional*): lm-eval task names to add.
        """
        changes = dict(text=_absolute(self.text), task=_absolute(self.task),
                       lm_eval_include=_absolute(self.lm_eval_include))
        if harness_tasks:
            tasks = [t.strip() for t in (self.lm_eval_tasks or "").split(",") if t.strip()]
            for task in harness_tasks:
                if task not in tasks:
                    tasks.append(task)
            changes["lm_eval_tasks"] = ",".join(tasks)
        return replace(self, **changes)


__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_WINDOW", "EVAL_DTYPES", "EvalSettings", "LM_EVAL_BACKENDS",
           "LM_EVAL_LOADING_BACKENDS", "LM_EVAL_SERVER_BACKEND", "TASK_METRIC", "TEXT_METRIC"]
