"""Offline evaluation of merged models: general ability (text loss) and task accuracy.

Definitions (docs/choosing-sparsity.md repeats them):

* **Mean token loss / perplexity** on a text file. The whole file is tokenized once
  (no special tokens), optionally cut to ``max_tokens``, and split into consecutive
  non-overlapping windows of ``window`` tokens (the last may be shorter). With a
  BOS token (default when the tokenizer has one) each window is fed as
  ``[BOS] + window`` and every token of the file is predicted exactly once;
  without one, the first token of each window is context only. The loss is the
  token-weighted mean negative log-likelihood (natural log) over all predicted
  tokens; perplexity is ``exp(loss)``.
* **Task accuracy** on a JSONL file, one object per line:
  ``{"prompt": ..., "answer": "..."}`` is scored by exact match: greedy decoding
  of as many tokens as the answer has, decoded, compared with the answer after
  stripping surrounding whitespace. ``{"prompt": ..., "choices": [...],
  "answer": index-or-choice-text}`` is scored by log-likelihood: the choice with
  the highest summed log-probability of its tokens after the prompt (the first
  on ties) must be the answer. Prompt and continuation are tokenized separately
  and concatenated (BOS before the prompt as above).

Everything runs under ``torch.inference_mode`` in batches; CPU by default.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from fapm_merge.jsonl import iter_jsonl

DEFAULT_WINDOW = 256
DEFAULT_BATCH_SIZE = 8
EVAL_DTYPES = ("float32", "bfloat16", "float16")  # model dtypes `eval` accepts


class EvalInputError(ValueError):
    """A model, tokenizer or data file that cannot be evaluated; the message says why."""


# ---------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (for tokenizer-less toy models, vocab >= 256)."""

    bos_token_id: Optional[int] = None
    name = "bytes"

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # ids >= 256 (a larger model vocabulary) are no byte: they decode to U+FFFD
        data = b"".join(bytes([int(i)]) if 0 <= int(i) < 256 else b"\xff" for i in ids)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer, used without automatic special tokens."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(path)
        except Exception as error:
            raise EvalInputError(
                f"no tokenizer could be loaded from {path} ({type(error).__name__}); "
                "pass --tokenizer PATH (e.g. the base model) or --tokenizer bytes for toy models"
            ) from None
        self.bos_token_id = self._tok.bos_token_id
        self.name = str(path)

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(spec: Optional[str], model_dir: Path):
    """``"bytes"``, a tokenizer path, or None for the model folder's own tokenizer."""
    if spec == "bytes":
        return ByteTokenizer()
    return HFTokenizer(str(spec or model_dir))


def load_model(path: Path, *, device: str = "cpu", dtype: str = "float32"):
    """A causal LM from a local folder, in eval mode on ``device``."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").exists():
        raise EvalInputError(f"{path} is not a model folder (no config.json)")
    if dtype not in EVAL_DTYPES:
        raise EvalInputError(f"unknown --dtype {dtype!r}; use {', '.join(EVAL_DTYPES)}")
    torch_dtype = getattr(torch, dtype)
    if not any(path.glob("*.safetensors")):
        # weights load through safetensors only: a pickled .bin can run code
        raise EvalInputError(
            f"{path} has no .safetensors weights; fapm-merge loads weights only through "
            "safetensors (convert the folder with save_pretrained(safe_serialization=True))"
        )
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch_dtype, use_safetensors=True, output_loading_info=True
        )
    except torch.OutOfMemoryError:
        raise
    except (OSError, RuntimeError, ValueError, SafetensorError) as error:  # truncated, misshapen
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise EvalInputError(
            f"transformers cannot load it ({type(error).__name__}: {reason}); check the "
            f"folder with `fapm-merge verify {path}`"
        ) from None
    # transformers fills missing weights with random values and only logs it: the
    # scores would then describe a partly random model.
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise EvalInputError(
            f"the checkpoint lacks {len(missing)} weight(s) the model needs ({shown}); "
            f"transformers would fill them with random values. Check the folder with "
            f"`fapm-merge verify {path}` or re-run the merge that wrote it"
        )
    for name, parameter in model.named_parameters():
        if not bool(torch.isfinite(parameter).all()):
            raise EvalInputError(
                f"weight {name!r} holds NaN or Inf; its scores would be meaningless. "
                f"Check the folder with `fapm-merge verify {path}`"
            )
    return model.to(device).eval()


# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------


def _bos(tokenizer, use_bos: bool) -> List[int]:
    return [tokenizer.bos_token_id] if use_bos and tokenizer.bos_token_id is not None else []


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def _sequence_logprobs(model, sequences: List[List[int]], starts: List[int]) -> List[List[float]]:
    """Per sequence, log p(token_j | tokens_<j) for j >= starts[i] (right-padded batch)."""
    device = _device_of(model)
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for row, (seq, start) in enumerate(zip(sequences, starts)):
        targets = torch.tensor(seq[start:], device=device)
        positions = torch.arange(start - 1, len(seq) - 1, device=device)
        values = logprobs[row, positions, targets].double()
        if not bool(torch.isfinite(values).all()):  # e.g. float16 activations overflowing
            raise EvalInputError(
                "the model gives NaN or Inf log-probabilities although its weights are "
                "finite (activations overflow in this --dtype?); evaluate in --dtype float32"
            )
        out.append(values.tolist())
    return out


def _max_positions(model) -> Optional[int]:
    """The hard position limit of models with learned absolute positions (GPT-2, OPT,
    BERT); None for rotary models, which run past max_position_embeddings."""
    config = getattr(model, "config", None)
    if getattr(config, "rope_theta", None) is not None or getattr(config, "rope_scaling", None) \
            or getattr(config, "rope_parameters", None):
        return None
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def text_windows(ids: Sequence[int], window: int, bos: List[int]) -> List[List[int]]:
    """The model inputs of the loss: consecutive windows, each ``bos + chunk``.

    Windows with nothing to predict (a single token and no BOS) are dropped.
    """
    if window < 1:
        raise EvalInputError(f"--window must be >= 1, got {window}")
    chunks = [list(ids[i : i + window]) for i in range(0, len(ids), window)]
    return [bos + c for c in chunks if len(bos) + len(c) >= 2]


def mean_token_loss(
    model,
    tokenizer,
    text: str,
    *,
    window: int = DEFAULT_WINDOW,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_tokens: Optional[int] = None,
    use_bos: bool = True,
) -> Dict[str, Any]:
    """Token-weighted mean NLL and perplexity of ``text`` (see the module docstring).

    Args:
        model: a transformers causal LM.
        tokenizer: ``ByteTokenizer`` or ``HFTokenizer``.
        text (`str`): the evaluation text.
        window (`int`, defaults to 256): tokens per window (without BOS).
        batch_size (`int`, defaults to 8): windows per forward pass.
        max_tokens (`int`, *optional*): use only the first ``max_tokens`` tokens.
        use_bos (`bool`, defaults to True): prepend BOS to every window if the
            tokenizer has one.
    """
    ids = tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    bos = _bos(tokenizer, use_bos)
    limit = _max_positions(model)
    if limit is not None and min(window, len(ids)) + len(bos) > limit:
        raise EvalInputError(
            f"--window {window}{' + BOS' if bos else ''} exceeds the {limit} positions this model "
            f"was built for; use --window {limit - len(bos)} or less"
        )
    windows = text_windows(ids, window, bos)
    if not windows:
        raise EvalInputError("the text file has fewer than 2 tokens: nothing to predict")
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        for values in _sequence_logprobs(model, batch, [1] * len(batch)):
            total -= math.fsum(values)
            count += len(values)
    loss = total / count
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": count,
        "windows": len(windows),
        "window": window,
        "bos": bool(bos),
    }


def load_task(path: Path) -> List[dict]:
    """Read and check a task JSONL file (see the module docstring for the format)."""
    items = []
    path = Path(path)
    if not path.exists():
        raise EvalInputError(f"task file {path} not found")
    for number, item in iter_jsonl(path, EvalInputError):
        where = f"{path}:{number}"
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or "answer" not in item:
            raise EvalInputError(f"{where}: each line needs a string 'prompt' and an 'answer'")
        if "choices" in item:
            choices = item["choices"]
            if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
                raise EvalInputError(f"{where}: 'choices' must be a list of at least two strings")
            if len(set(choices)) != len(choices):  # equal scores: the pick would be arbitrary
                raise EvalInputError(f"{where}: 'choices' lists the same text twice")
            answer = item["answer"]
            if isinstance(answer, str):
                if answer not in choices:
                    raise EvalInputError(f"{where}: answer {answer!r} is not one of the choices")
                answer = choices.index(answer)
            # bool is an int in Python: `"answer": true` must not mean choice 1
            if isinstance(answer, bool) or not (isinstance(answer, int) and 0 <= answer < len(choices)):
                raise EvalInputError(
                    f"{where}: answer must be a choice index (0 to {len(choices) - 1}) or a "
                    f"choice's text, got {answer!r}"
                )
            items.append({"prompt": item["prompt"], "choices": choices, "answer": answer})
        elif isinstance(item["answer"], str) and item["answer"].strip():
            items.append({"prompt": item["prompt"], "answer": item["answer"]})
        else:
            raise EvalInputError(f"{where}: 'answer' must be a non-empty string (or add 'choices')")
    if not items:
        raise EvalInputError(f"task file {path} has no examples")
    return items


def _cache_argument(model, output) -> Dict[str, Any]:
    """The KV cache of ``output`` as the keyword this transformers version takes
    (``cache`` since transformers 5.2x, ``past_key_values`` before)."""
    import inspect

    if "cache" in inspect.signature(model.forward).parameters:
        return {"cache": output.cache}
    return {"past_key_values": output.past_key_values}


@torch.inference_mode()
def greedy_continuation(model, prompt_ids: List[int], steps: int) -> List[int]:
    """``steps`` tokens of greedy decoding after ``prompt_ids`` (KV cache, batch 1)."""
    device = _device_of(model)
    ids = torch.tensor([prompt_ids], device=device)
    output = model(input_ids=ids, use_cache=True)
    generated: List[int] = []
    for step in range(steps):
        token = int(output.logits[0, -1].float().argmax())
        generated.append(token)
        if step + 1 < steps:
            output = model(
                input_ids=torch.tensor([[token]], device=device),
                use_cache=True,
                **_cache_argument(model, output),
            )
    return generated


def task_accuracy(model, tokenizer, items: List[dict], *, use_bos: bool = True) -> Dict[str, Any]:
    """Accuracy on the examples of :func:`load_task` (exact match or log-likelihood)."""
    bos = _bos(tokenizer, use_bos)
    correct = {"generate": 0, "choices": 0}
    seen = {"generate": 0, "choices": 0}
    for item in items:
        prompt = bos + tokenizer.encode(item["prompt"])
        if not prompt:
            raise EvalInputError("an empty prompt without BOS cannot be scored; add BOS or text")
        if "choices" in item:
            sequences = [prompt + tokenizer.encode(choice) for choice in item["choices"]]
            scores = [math.fsum(v) for v in _sequence_logprobs(model, sequences, [len(prompt)] * len(sequences))]
            best = max(range(len(scores)), key=lambda i: (scores[i], -i))
            kind, ok = "choices", best == item["answer"]
        else:
            answer_ids = tokenizer.encode(item["answer"])
            generated = greedy_continuation(model, prompt, len(answer_ids))
            kind, ok = "generate", tokenizer.decode(generated).strip() == item["answer"].strip()
        seen[kind] += 1
        correct[kind] += int(ok)
    total = sum(seen.values())
    return {
        "accuracy": sum(correct.values()) / total,
        "examples": total,
        "correct": sum(correct.values()),
        "by_kind": {k: {"examples": seen[k], "correct": correct[k]} for k in seen if seen[k]},
    }


def run_lm_eval(model_path: Path, tasks: str, *, device: str, dtype: str, batch_size: int, limit: Optional[int]) -> dict:
    """lm-evaluation-harness tasks on a local model (optional extra ``eval``)."""
    try:
        import lm_eval
    except ImportError:
        raise EvalInputError(
            "--lm-eval needs lm-evaluation-harness: pip install 'fapm-merge[eval]' "
            "(its tasks usually download datasets; run them where the hub is reachable "
            "or with a local HF_DATASETS cache)"
        ) from None
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_path},dtype={dtype}",
        tasks=[t.strip() for t in tasks.split(",") if t.strip()],
        device=device,
        batch_size=batch_size,
        limit=limit,
    )
    return json.loads(json.dumps(results.get("results", {}), default=str))


# ---------------------------------------------------------------------------
# one model, one JSON line
# ---------------------------------------------------------------------------


def read_recipe(model_dir: Path) -> Optional[dict]:
    """The model folder's mergekit_config.yml as a dict, or None (base, fine-tune)."""
    import yaml

    path = Path(model_dir) / "mergekit_config.yml"
    if not path.exists():
        return None
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@dataclass
class EvalSettings:
    """What to measure. Attributes mirror the ``fapm-merge eval`` options."""

    text: Optional[Path] = None
    task: Optional[Path] = None
    tokenizer: Optional[str] = None
    window: int = DEFAULT_WINDOW
    batch_size: int = DEFAULT_BATCH_SIZE
    max_tokens: Optional[int] = None
    use_bos: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    lm_eval_tasks: Optional[str] = None
    lm_eval_limit: Optional[int] = None


def evaluate_model(model_dir: Path, settings: EvalSettings) -> Dict[str, Any]:
    """Evaluate one model folder; the result is one JSON-serialisable record."""
    model_dir = Path(model_dir).absolute()
    if settings.text is None and settings.task is None and not settings.lm_eval_tasks:
        raise EvalInputError("nothing to measure: give --text, --task and/or --lm-eval")
    started = time.perf_counter()
    record: Dict[str, Any] = {
        "model": str(model_dir),
        "name": model_dir.name,
        "recipe": read_recipe(model_dir),
        "metrics": {},
    }
    if settings.text is not None or settings.task is not None:
        model = load_model(model_dir, device=settings.device, dtype=settings.dtype)
        tokenizer = load_tokenizer(settings.tokenizer, model_dir)
        vocab = model.get_input_embeddings().num_embeddings
        if isinstance(tokenizer, ByteTokenizer) and vocab < 256:
            raise EvalInputError(
                f"--tokenizer bytes needs a vocabulary of at least 256 tokens; this model has {vocab}"
            )
        if settings.text is not None:
            try:
                text = Path(settings.text).read_text(encoding="utf-8")
            except UnicodeDecodeError as error:
                raise EvalInputError(
                    f"--text {settings.text} is not UTF-8 text ({error.reason} at byte "
                    f"{error.start}); convert it to UTF-8"
                ) from None
            record["metrics"]["text"] = {
                "file": str(Path(settings.text).absolute()),
                **mean_token_loss(
                    model,
                    tokenizer,
                    text,
                    window=settings.window,
                    batch_size=settings.batch_size,
                    max_tokens=settings.max_tokens,
                    use_bos=settings.use_bos,
                ),
            }
        if settings.task is not None:
            record["metrics"]["task"] = {
                "file": str(Path(settings.task).absolute()),
                **task_accuracy(model, tokenizer, load_task(settings.task), use_bos=settings.use_bos),
            }
        del model
    if settings.lm_eval_tasks:
        record["metrics"]["lm_eval"] = run_lm_eval(
            model_dir,
            settings.lm_eval_tasks,
            device=settings.device,
            dtype=settings.dtype,
            batch_size=settings.batch_size,
            limit=settings.lm_eval_limit,
        )
    record["settings"] = {
        "tokenizer": settings.tokenizer or "model",
        "window": settings.window,
        "max_tokens": settings.max_tokens,
        "bos": settings.use_bos,
        "device": settings.device,
        "dtype": settings.dtype,
    }
    record["seconds"] = round(time.perf_counter() - started, 3)
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return record


@torch.inference_mode()
def demo_eval_data(
    base_dir: Path,
    finetuned_dir: Path,
    out_dir: Path,
    *,
    text_tokens: int = 4096,
    items: int = 120,
    seed: int = 0,
) -> Dict[str, Path]:
    """Evaluation files for the ``fapm-merge demo`` pair, whose "fine-tune" is a
    simulated weight change rather than training on data (a documented proxy).

    * ``general.txt``: about ``text_tokens`` printable-ASCII bytes sampled from the
      *base* model (temperature 1), as 64-byte passages one per line: the base's
      own distribution, the general ability a merge should keep.
    * ``task.jsonl``: prompt/choices items (4 random printable-ASCII choices of
      3-6 bytes) on which the base and the fine-tuned model prefer different
      choices; the answer is the fine-tuned model's choice. So accuracy measures
      how much of what the fine-tune changed a merge keeps: the fine-tuned model
      scores 1.0 and the base 0.0 by construction.

    Args:
        base_dir, finetuned_dir (`Path`): the pair (byte tokens: vocabulary >= 256).
        out_dir (`Path`): where the two files go.
        text_tokens (`int`, defaults to 4096): length of the general text.
        items (`int`, defaults to 120): task items to keep.
        seed (`int`, defaults to 0): sampling seed.
    """
    generator = torch.Generator().manual_seed(seed)
    tokenizer = ByteTokenizer()
    base, finetuned = load_model(base_dir), load_model(finetuned_dir)
    printable = torch.arange(32, 127)
    # 64-byte passages sampled in one batch, one position at a time (no cache needed)
    passages = max(1, text_tokens // 64)
    rows = printable[torch.randint(len(printable), (passages, 1), generator=generator)]
    while rows.shape[1] < 64:
        logits = base(input_ids=rows).logits[:, -1, printable].float()
        picks = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        rows = torch.cat([rows, printable[picks]], dim=1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text_path, task_path = out_dir / "general.txt", out_dir / "task.jsonl"
    text_path.write_text("\n".join(tokenizer.decode(r.tolist()) for r in rows) + "\n", encoding="utf-8")

    def random_text(low, high):
        length = int(torch.randint(low, high + 1, (1,), generator=generator))
        return "".join(chr(int(c)) for c in printable[torch.randint(len(printable), (length,), generator=generator)])

    kept, batches = [], 0
    while len(kept) < items and batches < 200:
        batches += 1  # 64 candidate items per batch: one forward per model
        candidates = [(random_text(8, 16), [random_text(3, 6) for _ in range(4)]) for _ in range(64)]
        sequences = [tokenizer.encode(p) + tokenizer.encode(c) for p, cs in candidates for c in cs]
        starts = [len(tokenizer.encode(p)) for p, cs in candidates for _ in cs]
        picks = []
        for model in (base, finetuned):
            scores = [math.fsum(v) for v in _sequence_logprobs(model, sequences, starts)]
            picks.append([max(range(4), key=lambda i: (scores[4 * n + i], -i)) for n in range(64)])
        for n, (prompt, choices) in enumerate(candidates):
            if picks[0][n] != picks[1][n] and len(kept) < items:
                kept.append({"prompt": prompt, "choices": choices, "answer": picks[1][n]})
    task_path.write_text("".join(json.dumps(k) + "\n" for k in kept), encoding="utf-8")
    return {"text": text_path, "task": task_path}


def expand_models(paths: Sequence[Path]) -> List[Path]:
    """Model folders; a sweep folder (with sweep.json) stands for its outputs."""
    from fapm_merge.sweep import SWEEP_MANIFEST

    folders: List[Path] = []
    for path in paths:
        path = Path(path).absolute()
        manifest = path / SWEEP_MANIFEST
        if manifest.exists():
            try:
                names = [v["name"] for v in json.loads(manifest.read_text())["variants"]]
            except (ValueError, KeyError, TypeError) as error:
                raise EvalInputError(
                    f"{manifest} is not a sweep manifest ({type(error).__name__}: {error}); "
                    "re-run the sweep, or pass the model folders themselves"
                ) from None
            folders.extend(path / name for name in names)
        else:
            folders.append(path)
    return folders


def append_result(path: Path, record: Dict[str, Any]) -> None:
    """Append one JSON line (results files collect runs over time)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=False) + "\n")


__all__ = [
    "ByteTokenizer",
    "EvalInputError",
    "EvalSettings",
    "append_result",
    "evaluate_model",
    "expand_models",
    "greedy_continuation",
    "load_task",
    "mean_token_loss",
    "task_accuracy",
    "text_windows",
]


if __name__ == "__main__":  # python -m fapm_merge.evaluate demo-data DEMO_DIR
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "demo-data":
        sys.exit("usage: python -m fapm_merge.evaluate demo-data DEMO_DIR (a `fapm-merge demo` folder)")
    demo = Path(sys.argv[2])
    files = demo_eval_data(demo / "models" / "base", demo / "models" / "finetuned", demo / "eval")
    print(f"wrote {files['text']} and {files['task']}")
