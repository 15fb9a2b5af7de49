"""What ``fapm-merge eval`` measures and how: the settings and their defaults, once.

Light on purpose (no torch): the command line reads its defaults from here before
anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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

LM_EVAL_BACKENDS = ("hf", "vllm", "local-completions")
"""``--lm-eval-backend`` values: transformers in this process, vLLM (tensor and data
parallel on GPUs), or an OpenAI-compatible completions server (``vllm serve``)."""

EVAL_DTYPES = ("float32", "bfloat16", "float16")
"""Model dtypes ``eval`` accepts."""


@dataclass
class EvalSettings:
    """What to measure. Attributes mirror the ``fapm-merge eval`` options.

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
        lm_eval_backend (`str`, defaults to "hf"): how the harness runs the model
            (``hf``, ``vllm``, ``local-completions``).
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
    lm_eval_backend: str = "hf"
    lm_eval_model_args: Optional[str] = None
    lm_eval_include: Optional[Path] = None


__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_WINDOW", "EVAL_DTYPES", "EvalSettings", "LM_EVAL_BACKENDS",
           "TASK_METRIC", "TEXT_METRIC"]
