"""Offline evaluation of merged models: general ability (text loss) and task accuracy.

Definitions (docs/choosing-sparsity.md repeats them):

* **Mean token loss / perplexity** on a text: a plain file (one document), a
  ``.jsonl`` file of ``{"text": ...}`` lines or a folder of ``.txt`` files (one
  document each; :mod:`fapm_merge.evaluation.inputs`). Each document is tokenized
  on its own (no special tokens), the documents together optionally cut to
  ``max_tokens`` (the last one taken is cut), and each is split into consecutive
  non-overlapping windows of ``window`` tokens (its last may be shorter; no window
  crosses documents). With a BOS token (default when the tokenizer has one) each
  window is fed as ``[BOS] + window`` and every token of the text is predicted
  exactly once; without one, the first token of each window is context only. The loss is the
  token-weighted mean negative log-likelihood (natural log) over all predicted
  tokens; perplexity is ``exp(loss)``.
* **Task accuracy** on a JSONL file, one object per line (an optional ``"group"``,
  a string or an int, names the source a prompt comes from; all lines or none):
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

import functools
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch

from fapm_merge.core.threads import map_chunks, worker_count
from fapm_merge.evaluation.errors import EvalInputError
from fapm_merge.evaluation.results import PER_ITEM
from fapm_merge.evaluation.settings import DEFAULT_BATCH_SIZE, DEFAULT_WINDOW, EVAL_DTYPES

T = TypeVar("T")


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


def save_byte_tokenizer(folder: Path, *, bos: bool = False) -> None:
    """Write a transformers tokenizer that tokenizes exactly like `ByteTokenizer`
    (``--tokenizer bytes``: token id = UTF-8 byte value) into ``folder``.

    Tools that need a tokenizer file see the same tokens ``eval --tokenizer bytes``
    scores: ``mergekit-yaml`` copies it into every output (the demo pair carries
    one, as real checkpoints do), lm-evaluation-harness and vLLM load it.

    Args:
        folder (`Path`): a model folder; its vocabulary needs >= 256 entries (258
            with ``bos``).
        bos (`bool`, defaults to False): add ``<s>`` = 256 as BOS before every text
            (as Llama's tokenizers do) and ``</s>`` = 257 as EOS; without, no
            special tokens at all, like `ByteTokenizer`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # GPT-2's reversible map from the 256 byte values to printable characters:
    # byte-level BPE vocabularies are written in these characters
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    characters = {b: chr(b) for b in printable}
    characters.update({b: chr(256 + n) for n, b in enumerate(others)})
    vocab = {characters[b]: b for b in range(256)}
    special = {}
    if bos:
        vocab.update({"<s>": 256, "</s>": 257})
        special = {"bos_token": "<s>", "eos_token": "</s>"}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    if bos:
        tokenizer.add_special_tokens(["<s>", "</s>"])
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 256)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special).save_pretrained(str(folder))


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
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # our own progress lines say what loads
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


def _each_on_one_thread(model, run: Callable[[int], T], count: int) -> List[T]:
    """``[run(i) for i in range(count)]``, the calls spread over single-threaded workers.

    Why: a forward pass is thousands of torch ops, each an OpenMP parallel region
    ending in a barrier; on a machine where another process holds a core every
    barrier waits for a descheduled thread (measured: one busy neighbour per core
    made the demo eval 5.5x slower while a merge lost 1.7x). Independent forward
    passes (text batches, task items) on workers of one torch thread each
    (:mod:`fapm_merge.core.threads`, the merge kernel's pool) never wait for each
    other, so a busy core delays one pass, not every op. Each pass computes the
    same ops on the same inputs as before, so every value is unchanged; results
    come back in order. The worker count is the caller's torch thread budget;
    GPU models, one thread, or a single call run here as before.
    """
    workers = worker_count(next(model.parameters()), count)
    return map_chunks(lambda _state, start, _end: run(start), [(i, i + 1) for i in range(count)],
                      workers)


def _logits_to_keep(model) -> Optional[str]:
    """The keyword that limits a causal LM's logits to its last positions
    (``logits_to_keep`` in transformers >= 4.50, ``num_logits_to_keep`` before), or None."""
    return _keep_keyword(type(model))


@functools.lru_cache(maxsize=None)
def _keep_keyword(model_class) -> Optional[str]:
    import inspect

    parameters = inspect.signature(model_class.forward).parameters
    return next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in parameters), None)


@torch.inference_mode()
def sequence_logprobs(model, sequences: List[List[int]], starts: List[int]) -> List[List[float]]:
    """Per sequence, log p(token_j | tokens_<j) for j >= starts[i] (right-padded batch)."""
    device = _device_of(model)
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
    # only the positions that predict a scored token need the vocabulary projection and
    # the softmax: for a choice after a long prompt that is a few of many (each position
    # is computed as before, so every value is the same bit for bit)
    first = min(starts) - 1
    keep = _logits_to_keep(model)
    extra = {keep: width - first} if keep and first > 0 else {}
    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device), **extra).logits
    offset = first if extra else 0
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for row, (seq, start) in enumerate(zip(sequences, starts)):
        targets = torch.tensor(seq[start:], device=device)
        positions = torch.arange(start - 1 - offset, len(seq) - 1 - offset, device=device)
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


def tokenized_documents(tokenizer, documents: Sequence[str], max_tokens: Optional[int] = None
                        ) -> List[List[int]]:
    """Each document tokenized on its own (no special tokens), at most ``max_tokens``
    tokens in all: the documents in order, the last one taken cut (those after it left out).

    Args:
        tokenizer: ``ByteTokenizer`` or ``HFTokenizer``.
        documents (`Sequence[str]`): the texts of :func:`fapm_merge.evaluation.inputs.load_documents`.
        max_tokens (`int`, *optional*): the cap on the tokens of all documents together.
    """
    if isinstance(documents, str):  # a str is a sequence of one-character documents
        raise TypeError("documents must be a list of texts, not one str: pass [text]")
    taken: List[List[int]] = []
    left = max_tokens
    for document in documents:
        if left is not None and left <= 0:
            break
        ids = tokenizer.encode(document)
        if left is not None:
            ids = ids[:left]
            left -= len(ids)
        taken.append(ids)
    return taken


def document_windows(documents_ids: Sequence[Sequence[int]], window: int, bos: List[int]
                     ) -> Tuple[List[List[int]], List[int]]:
    """The windows of every document (:func:`text_windows`, never crossing a document)
    and the index of the document each window comes from."""
    windows: List[List[int]] = []
    owners: List[int] = []
    for index, ids in enumerate(documents_ids):
        these = text_windows(ids, window, bos)
        windows.extend(these)
        owners.extend([index] * len(these))
    return windows, owners


def mean_token_loss(
    model,
    tokenizer,
    documents: Sequence[str],
    *,
    window: int = DEFAULT_WINDOW,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_tokens: Optional[int] = None,
    use_bos: bool = True,
) -> Dict[str, Any]:
    """Token-weighted mean NLL and perplexity of ``documents`` (see the module docstring).

    ``documents`` counts the documents that gave at least one window; ``per_item``
    holds, per window, its summed NLL, its predicted tokens and the index (in
    ``documents``) of the document it comes from (``window_document``).

    Args:
        model: a transformers causal LM.
        tokenizer: ``ByteTokenizer`` or ``HFTokenizer``.
        documents (`Sequence[str]`): the evaluation text's documents
            (:func:`fapm_merge.evaluation.inputs.load_documents`); one for a plain file.
        window (`int`, defaults to 256): tokens per window (without BOS).
        batch_size (`int`, defaults to 8): windows per forward pass.
        max_tokens (`int`, *optional*): use only the first ``max_tokens`` tokens of
            all documents together (:func:`tokenized_documents`).
        use_bos (`bool`, defaults to True): prepend BOS to every window if the
            tokenizer has one.
    """
    documents_ids = tokenized_documents(tokenizer, documents, max_tokens)
    bos = _bos(tokenizer, use_bos)
    limit = _max_positions(model)
    longest = max((len(ids) for ids in documents_ids), default=0)
    if limit is not None and min(window, longest) + len(bos) > limit:
        raise EvalInputError(
            f"--window {window}{' + BOS' if bos else ''} exceeds the {limit} positions this model "
            f"was built for; use --window {limit - len(bos)} or less"
        )
    windows, window_document = document_windows(documents_ids, window, bos)
    if not windows:
        raise EvalInputError("the text file has fewer than 2 tokens"
                             f"{' in every document' if len(documents_ids) > 1 else ''}: nothing to predict")
    total, count = 0.0, 0
    window_losses: List[float] = []
    window_tokens: List[int] = []
    batches = [windows[start : start + batch_size] for start in range(0, len(windows), batch_size)]
    per_batch = _each_on_one_thread(
        model, lambda i: sequence_logprobs(model, batches[i], [1] * len(batches[i])), len(batches))
    for batch_values in per_batch:
        for values in batch_values:
            window_loss = math.fsum(values)
            total -= window_loss
            count += len(values)
            window_losses.append(-window_loss)
            window_tokens.append(len(values))
    loss = total / count
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": count,
        "windows": len(windows),
        "documents": len(set(window_document)),
        "window": window,
        "bos": bool(bos),
        # per window: summed NLL, predicted tokens and document, what paired
        # (document-clustered) intervals need
        PER_ITEM: {"window_loss": window_losses, "window_tokens": window_tokens,
                   "window_document": window_document},
    }


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


def task_inputs(tokenizer, items: List[dict], *, use_bos: bool = True) -> Tuple[List[List[int]], List[Any]]:
    """What :func:`task_accuracy` forwards for each example: its prompt's ids (BOS first
    when asked and the tokenizer has one) and its continuations, the choices' ids (each
    forwarded after the prompt) or, for an exact-match answer, the greedy steps (its
    length in tokens: the prompt once, then one token per step after the first)."""
    bos = _bos(tokenizer, use_bos)
    prompts = [bos + tokenizer.encode(item["prompt"]) for item in items]
    continuations = [[tokenizer.encode(choice) for choice in item["choices"]] if "choices" in item
                     else len(tokenizer.encode(item["answer"])) for item in items]
    return prompts, continuations


def forwarded_tokens(prompt: List[int], continuation: Any) -> int:
    """Tokens :func:`task_accuracy` forwards for one example of :func:`task_inputs`."""
    if isinstance(continuation, int):
        return len(prompt) + max(continuation - 1, 0)
    return sum(len(prompt) + len(choice) for choice in continuation)


def task_accuracy(model, tokenizer, items: List[dict], *, use_bos: bool = True) -> Dict[str, Any]:
    """Accuracy on the examples of :func:`fapm_merge.evaluation.inputs.load_task` (exact
    match or log-likelihood).

    When the items carry groups, ``groups`` counts the distinct ones and ``per_item``
    gains ``group``, each prompt's group (a string) in file order; without groups
    neither key is there.
    """
    correct = {"generate": 0, "choices": 0}
    seen = {"generate": 0, "choices": 0}
    # tokenize here, in this thread: a transformers fast tokenizer used from several
    # threads at once can fail ("Already borrowed")
    prompts, continuations = task_inputs(tokenizer, items, use_bos=use_bos)
    if not all(prompts):
        raise EvalInputError("an empty prompt without BOS cannot be scored; add BOS or text")

    def score(index: int):
        """The chosen choice's index, or the generated token ids."""
        prompt, choices = prompts[index], continuations[index]
        if isinstance(choices, int):
            return greedy_continuation(model, prompt, choices)
        sequences = [prompt + choice for choice in choices]
        scores = [math.fsum(v) for v in sequence_logprobs(model, sequences, [len(prompt)] * len(sequences))]
        return max(range(len(scores)), key=lambda i: (scores[i], -i))

    outcomes: List[str] = []
    for item, result in zip(items, _each_on_one_thread(model, score, len(items))):
        if "choices" in item:
            kind, ok = "choices", result == item["answer"]
        else:
            kind, ok = "generate", tokenizer.decode(result).strip() == item["answer"].strip()
        seen[kind] += 1
        correct[kind] += int(ok)
        outcomes.append("1" if ok else "0")
    total = sum(seen.values())
    # per prompt, in file order: "1" correct, "0" wrong (paired comparisons need it)
    per_item: Dict[str, Any] = {"correct": "".join(outcomes)}
    grouping: Dict[str, Any] = {}
    if any("group" in item for item in items):  # load_task: all or none
        per_item["group"] = [str(item["group"]) for item in items]
        grouping["groups"] = len(set(per_item["group"]))
    return {
        "accuracy": sum(correct.values()) / total,
        "examples": total,
        "correct": sum(correct.values()),
        "by_kind": {k: {"examples": seen[k], "correct": correct[k]} for k in seen if seen[k]},
        **grouping,
        PER_ITEM: per_item,
    }


__all__ = [
    "ByteTokenizer",
    "EvalInputError",
    "HFTokenizer",
    "PER_ITEM",
    "save_byte_tokenizer",
    "greedy_continuation",
    "load_model",
    "load_tokenizer",
    "mean_token_loss",
    "sequence_logprobs",
    "task_accuracy",
    "task_inputs",
    "forwarded_tokens",
    "document_windows",
    "text_windows",
    "tokenized_documents",
]
