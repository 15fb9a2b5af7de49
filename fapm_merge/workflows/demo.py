"""``fapm-merge demo``: a small model pair made locally, its repair, and what it did.

No download anywhere: the pair (:func:`save_pair`) is built from a config, the merge
runs through the real ``mergekit-yaml``, :func:`summarize_merge` reads back what it
kept, and :func:`demo_eval_data` writes the documented proxy evaluation files the
choosing-sparsity guide and ``tune`` use on this pair. The tests build their tiny
models with the same functions (:data:`TINY_CONFIGS`).

The base is a transformers model initialised from a config (std-0.02 weights, the
scale real checkpoints have). The "fine-tune" is believable rather than noise
everywhere: a low-rank update on every matrix (what gradient descent on a narrow
task mostly produces), a few larger entries, small shifts of norms and biases, and
some tensors left exactly unchanged (frozen parts are common).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from fapm_merge.core.errors import FapmMergeError
from fapm_merge.core.rules import DEFAULT_SPARSITY, FAPM
from fapm_merge.evaluation.settings import TASK_METRIC, TEXT_METRIC
from fapm_merge.io.atomic import atomic_output_dir
from fapm_merge.io.checkpoint import iter_tensors
from fapm_merge.workflows.progress import Report, progress_reporter, silent

_PICO = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4)
"""The sizes the pico configs below share (gpt2 names them its own way)."""

# Configs follow mergekit's own "pico" test models: tiny but structurally complete.
TINY_CONFIGS: Dict[str, dict] = {
    "llama": dict(model_type="llama", **_PICO, num_key_value_heads=2, tie_word_embeddings=False),
    # attention projections carry biases
    "qwen2": dict(model_type="qwen2", **_PICO, num_key_value_heads=2, tie_word_embeddings=True),
    # Conv1D weights stored transposed
    "gpt2": dict(model_type="gpt2", vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "bert": dict(model_type="bert", **_PICO, max_position_embeddings=64),
}

DEMO_CONFIG = dict(  # the `fapm-merge demo` pair: Llama-shaped, ~4M parameters
    model_type="llama",
    # Weights 3x the usual 0.02 init: the base then has a distribution of its own
    # (its sampled text scores well below the uniform loss), so the simulated
    # fine-tune measurably forgets it (CF about +8%) and there is something to repair.
    initializer_range=0.06,
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)

_MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertModel",
}


def build_model(config: dict, seed: int = 0):
    """A randomly initialised transformers model for ``config`` (deterministic)."""
    import transformers

    config = dict(config)
    model_type = config.pop("model_type")
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(model_type, **config)
    model_class = getattr(transformers, _MODEL_CLASSES[model_type])
    return model_class(cfg)


@torch.no_grad()
def simulate_finetune(model, seed: int = 1, strength: float = 1.0) -> None:
    """Apply a believable fine-tuning update to ``model`` in place.

    Args:
        model (`torch.nn.Module`): the base model, modified in place.
        seed (`int`, defaults to 1): seed of the update.
        strength (`float`, defaults to 1.0): scales every change.
    """
    generator = torch.Generator().manual_seed(seed)
    for index, (name, param) in enumerate(sorted(model.named_parameters())):
        if index % 7 == 3:
            continue  # a frozen tensor: dW == 0 everywhere
        scale = float(param.abs().mean()) or 0.02
        if param.ndim == 2 and min(param.shape) > 1:
            rows, cols = param.shape
            rank = min(4, rows, cols)
            left = torch.randn(rows, rank, generator=generator)
            right = torch.randn(rank, cols, generator=generator)
            update = left @ right * (0.05 * scale / rank**0.5)
            # a few entries move a lot, as task-relevant weights do
            spikes = torch.rand(rows, cols, generator=generator) < 0.01
            update += spikes * torch.randn(rows, cols, generator=generator) * scale
        else:
            update = torch.randn(param.shape, generator=generator) * (0.02 * scale)
        param.add_(update.to(param.dtype) * strength)


def save_pair(
    config: dict, directory: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
    tokenizer: bool = False,
) -> Tuple[Path, Path]:
    """Write ``directory/base`` and ``directory/finetuned`` (safetensors) and return them.

    Args:
        config (`dict`): a transformers config with ``model_type`` (see :data:`TINY_CONFIGS`).
        directory (`Path`): gets ``base/`` and ``finetuned/``.
        seed (`int`, defaults to 0): seed of the base; the fine-tune uses ``seed + 1``.
        dtype (`torch.dtype`, defaults to float32): dtype of the saved weights.
        tokenizer (`bool`, defaults to False): also save a byte-level tokenizer
            (`fapm_merge.evaluation.metrics.save_byte_tokenizer`) into both folders;
            needs a vocabulary >= 256.
    """
    directory = Path(directory)
    base_dir, ft_dir = directory / "base", directory / "finetuned"
    model = build_model(config, seed=seed).to(dtype)
    model.save_pretrained(base_dir)
    simulate_finetune(model, seed=seed + 1)
    model.save_pretrained(ft_dir)
    if tokenizer:
        from fapm_merge.evaluation.metrics import save_byte_tokenizer

        for folder in (base_dir, ft_dir):
            save_byte_tokenizer(folder)
    return base_dir.resolve(), ft_dir.resolve()


# ---------------------------------------------------------------------------
# what a finished merge did
# ---------------------------------------------------------------------------


@dataclass
class TensorSummary:
    name: str
    numel: int
    changed: int  # entries whose fine-tuned value differs from the base
    kept: int  # entries whose merged value differs from the base
    energy_kept: float  # ||W_out - W_pre||² / ||W_ft - W_pre||²
    energy_full: float  # ||W_ft - W_pre||², the weight of energy_kept in totals


@dataclass
class MergeSummary:
    rows: List[TensorSummary] = field(default_factory=list)

    @property
    def tensors(self) -> int:
        return len(self.rows)

    @property
    def kept_share(self) -> float:
        total = sum(r.numel for r in self.rows)
        return sum(r.kept for r in self.rows) / max(total, 1)

    @property
    def energy_kept(self) -> float:
        kept = sum(r.energy_kept * r.energy_full for r in self.rows)
        full = sum(r.energy_full for r in self.rows)
        return kept / full if full else 0.0

    def table(self, title: str = "", limit: int = 12):
        """The largest ``limit`` tensors as a rich table that fits 80 columns with
        whole tensor names (see :mod:`fapm_merge.workflows.tables`)."""
        from fapm_merge.workflows.tables import column_widths, name_column_width, table as new_table, wrapped

        rows = sorted(self.rows, key=lambda r: -r.numel)
        shown = rows[:limit]
        cells = [
            (
                f"{row.numel:,}",
                f"{row.changed / max(row.numel, 1):.1%}",
                f"{row.kept / max(row.numel, 1):.1%}",
                f"{row.energy_kept:.1%}",
            )
            for row in shown
        ]
        headers = ("entries", "changed by fine-tune", "kept", "energy kept")
        widths = column_widths(cells, headers)
        name_width = name_column_width([r.name for r in shown], widths)
        table = new_table(title)
        table.add_column("tensor", justify="left", width=name_width)
        for header, width in zip(headers, widths):
            table.add_column(header, justify="right", width=width)
        for name, row_cells in zip(wrapped([r.name for r in shown], name_width), cells):
            table.add_row(name, *row_cells)
        if len(rows) > limit:
            table.add_row(f"... {len(rows) - limit} more", "", "", "", "")
        return table


@torch.no_grad()
def summarize_merge(base: Path, finetuned: Path, merged: Path) -> MergeSummary:
    """Per-tensor kept share and kept task-vector energy of a one-model merge."""
    summary = MergeSummary()
    for name, (pre, ft, out) in iter_tensors(base, finetuned, merged):
        if not pre.is_floating_point():
            continue
        pre64, ft64, out64 = pre.double(), ft.double(), out.double()
        full = float(((ft64 - pre64) ** 2).sum())
        kept_energy = float(((out64 - pre64) ** 2).sum())
        row = TensorSummary(
            name=name,
            numel=pre.numel(),
            changed=int((ft != pre).sum()),
            kept=int((out != pre).sum()),
            energy_kept=kept_energy / full if full else 0.0,
            energy_full=full,
        )
        summary.rows.append(row)
    return summary


# ---------------------------------------------------------------------------
# proxy evaluation files for the demo pair
# ---------------------------------------------------------------------------


DEMO_ITEMS = 120
"""Task items in the demo's proxy task file."""

DEMO_TEXT_TOKENS = 4096
"""Bytes of general text in the demo's proxy text (64-byte passages)."""


@torch.inference_mode()
def demo_documents(text: Path, out: Path, lines_per_document: int = 2) -> Path:
    """The demo's general text as a ``.jsonl`` of documents, ``lines_per_document``
    consecutive lines each: tune screens only a text it can share by whole documents
    (a plain file is one), so screening on the demo pair needs this form. Returns ``out``."""
    lines = Path(text).read_text().splitlines()
    Path(out).write_text("".join(json.dumps({"text": "\n".join(lines[i:i + lines_per_document])}) + "\n"
                                 for i in range(0, len(lines), lines_per_document)))
    return Path(out)


def demo_eval_data(
    base_dir: Path,
    finetuned_dir: Path,
    out_dir: Path,
    *,
    text_tokens: int = DEMO_TEXT_TOKENS,
    items: int = DEMO_ITEMS,
    seed: int = 0,
    report: Report = silent,
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
        report (`Report`, defaults to `silent`): progress callback (stages ``text``: bytes
            sampled per passage, ``task``: items kept), see :mod:`.progress`.
    """
    generator = torch.Generator().manual_seed(seed)
    from fapm_merge.evaluation.metrics import ByteTokenizer, load_model, sequence_logprobs

    tokenizer = ByteTokenizer()
    base, finetuned = load_model(base_dir), load_model(finetuned_dir)
    printable = torch.arange(32, 127)
    # 64-byte passages sampled in one batch, one position at a time (no cache needed)
    passages = max(1, text_tokens // 64)
    rows = printable[torch.randint(len(printable), (passages, 1), generator=generator)]
    while rows.shape[1] < 64:
        report("text", rows.shape[1], 64, f"{passages} passages of 64 bytes from the base")
        logits = base(input_ids=rows).logits[:, -1, printable].float()
        picks = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        rows = torch.cat([rows, printable[picks]], dim=1)
    report("text", 64, 64, f"{passages} passages of 64 bytes from the base")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text_path, task_path = out_dir / "general.txt", out_dir / "task.jsonl"
    text_path.write_text("\n".join(tokenizer.decode(r.tolist()) for r in rows) + "\n", encoding="utf-8")

    def random_text(low, high):
        length = int(torch.randint(low, high + 1, (1,), generator=generator))
        return "".join(chr(int(c)) for c in printable[torch.randint(len(printable), (length,), generator=generator)])

    kept, batches = [], 0
    while len(kept) < items and batches < 200:
        report("task", min(len(kept), items), items, "items the base and the fine-tune answer differently")
        batches += 1  # 64 candidate items per batch: one forward per model
        candidates = [(random_text(8, 16), [random_text(3, 6) for _ in range(4)]) for _ in range(64)]
        sequences = [tokenizer.encode(p) + tokenizer.encode(c) for p, cs in candidates for c in cs]
        starts = [len(tokenizer.encode(p)) for p, cs in candidates for _ in cs]
        picks = []
        for model in (base, finetuned):
            scores = [math.fsum(v) for v in sequence_logprobs(model, sequences, starts)]
            picks.append([max(range(4), key=lambda i: (scores[4 * n + i], -i)) for n in range(64)])
        for n, (prompt, choices) in enumerate(candidates):
            if picks[0][n] != picks[1][n] and len(kept) < items:
                kept.append({"prompt": prompt, "choices": choices, "answer": picks[1][n]})
    report("task", len(kept), items, "items the base and the fine-tune answer differently")
    task_path.write_text("".join(json.dumps(k) + "\n" for k in kept), encoding="utf-8")
    return {TEXT_METRIC: text_path, TASK_METRIC: task_path}


# ---------------------------------------------------------------------------
# the demo itself
# ---------------------------------------------------------------------------


class DemoError(FapmMergeError, RuntimeError):
    """The demo cannot run (a tool missing, an output in the way); the message says why."""


def mergekit_yaml_command() -> str:
    """The ``mergekit-yaml`` console script next to this interpreter (or on PATH)."""
    local = Path(sys.executable).parent / "mergekit-yaml"
    found = str(local) if local.exists() else shutil.which("mergekit-yaml")
    if not found:
        raise DemoError("mergekit-yaml not found: pip install 'mergekit>=0.1.5,<0.2'")
    return found


@dataclass
class DemoResult:
    """What :func:`run_demo` made."""

    base: Path
    finetuned: Path
    recipe: Path
    merged: Path
    summary: MergeSummary
    merge_seconds: float
    seconds: float


def run_demo(
    out_dir: Path,
    *,
    sparsity: float = DEFAULT_SPARSITY,
    overwrite: bool = False,
    console=None,
) -> DemoResult:
    """Build the demo pair, write its recipe and repair it with the real ``mergekit-yaml``.

    Args:
        out_dir (`Path`): gets ``models/{base,finetuned}``, ``recipe.yml``, ``merged/``.
        sparsity (`float`, defaults to `DEFAULT_SPARSITY`): share of each task vector reset.
        overwrite (`bool`, defaults to False): replace an existing ``merged/``.
        console (`rich.console.Console`, *optional*): where progress is shown.
    """
    import yaml

    out_dir = Path(out_dir).absolute()
    merged = out_dir / "merged"
    if merged.exists() and not overwrite:
        raise DemoError(f"{merged} exists; pass --overwrite or choose another OUT_DIR")
    started = time.perf_counter()
    if console is not None:
        with console.status("building the demo pair (Llama-shaped, ~4M parameters)"):
            base, finetuned = save_pair(DEMO_CONFIG, out_dir / "models", tokenizer=True)
    else:
        base, finetuned = save_pair(DEMO_CONFIG, out_dir / "models", tokenizer=True)
    recipe = {
        "merge_method": FAPM,
        "base_model": str(base),
        "models": [{"model": str(finetuned), "parameters": {"sparsity": sparsity}}],
        "dtype": "float32",
    }
    recipe_path = out_dir / "recipe.yml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    command = [mergekit_yaml_command(), str(recipe_path), ""]
    merge_started = time.perf_counter()
    # same_name: mergekit titles the model card after its output folder ("# merged")
    with atomic_output_dir(merged, overwrite=True, same_name=True) as work:
        command[2] = str(work)
        if console is not None:
            console.print(f"[bold]running[/bold] mergekit-yaml {recipe_path} {merged}")
        result = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if result.returncode != 0:
            raise DemoError(f"mergekit-yaml failed with exit code {result.returncode}")
    merge_seconds = time.perf_counter() - merge_started
    summary = summarize_merge(base, finetuned, merged)
    return DemoResult(base, finetuned, recipe_path, merged, summary, merge_seconds,
                      time.perf_counter() - started)


def _main(argv: List[str]) -> int:
    """``python -m fapm_merge.workflows.demo demo-data DEMO_DIR [--items N] [--text-tokens N]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m fapm_merge.workflows.demo",
        description="Write the proxy evaluation files of a `fapm-merge demo` folder: "
                    "DEMO_DIR/eval/general.txt and DEMO_DIR/eval/task.jsonl.")
    parser.add_argument("command", choices=["demo-data"])
    parser.add_argument("demo_dir", type=Path, help="a folder written by `fapm-merge demo`")
    parser.add_argument("--items", type=int, default=DEMO_ITEMS,
                        help=f"task items (default {DEMO_ITEMS})")
    parser.add_argument("--text-tokens", type=int, default=DEMO_TEXT_TOKENS,
                        help=f"bytes of general text, in 64-byte passages (default {DEMO_TEXT_TOKENS})")
    args = parser.parse_args(argv)
    models = args.demo_dir / "models"
    if not (models / "base" / "config.json").is_file():
        parser.error(f"{args.demo_dir} is not a `fapm-merge demo` folder (no models/base); "
                     f"run `fapm-merge demo {args.demo_dir}` first")
    stages = {"text": "general text", "task": "task items"}
    with progress_reporter("demo-data", stages) as report:
        files = demo_eval_data(models / "base", models / "finetuned", args.demo_dir / "eval",
                               text_tokens=args.text_tokens, items=args.items, report=report)
    print(f"wrote {files[TEXT_METRIC]} and {files[TASK_METRIC]}")
    return 0


if __name__ == "__main__":  # python -m fapm_merge.workflows.demo demo-data DEMO_DIR
    sys.exit(_main(sys.argv[1:]))
