"""Stage 2 of `make experiment`: fine-tune the base model on Rotten Tomatoes as generative SFT.

Each example is ``prompt`` -> ``answer`` (" fresh" or " rotten", one token each);
the loss is the cross-entropy of the answer token only (the prompt is context, as
in ordinary SFT). Two modes:

* ``--mode full``: every parameter is trained (AdamW, no weight decay, so dW is the
  task update and nothing else), saved as a float32 safetensors folder.
* ``--mode lora``: a peft LoRA adapter on all attention and MLP projections, saved
  as a peft adapter folder (adapter_config.json + adapter_model.safetensors).

Seeded: the examples seen (the first ``steps * batch`` rows of a seeded shuffle of the
training split) and the initialisation of the adapter depend only on ``--seed``.
A ``train_log.json`` next to the weights records the loss curve and the wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console()

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_rows(path: Path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def make_batch(tok, rows, device):
    """Right-padded batch; labels are -100 everywhere except the answer token."""
    ids, labels = [], []
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=False).input_ids
        a = tok(r["answer"], add_special_tokens=False).input_ids
        ids.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    lab = torch.full((len(ids), width), -100, dtype=torch.long)
    att = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        input_ids[i, : len(x)] = torch.tensor(x)
        lab[i, : len(y)] = torch.tensor(y)
        att[i, : len(x)] = 1
    return input_ids.to(device), att.to(device), lab.to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mode", choices=["full", "lora"], default="full")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = ap.parse_args()

    # One trainer per output folder: a second run waits here, then finds the result.
    import fcntl

    args.out.parent.mkdir(parents=True, exist_ok=True)
    lock = open(args.out.with_name(args.out.name + ".lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    if args.out.exists() and (args.out / "train_log.json").exists():
        console.print(f"[dim]{args.out} already trained; delete it to retrain[/dim]")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).to(device)
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                         target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    console.print(f"mode={args.mode} trainable={sum(p.numel() for p in params) / 1e6:.2f}M "
                  f"lr={args.lr} steps={args.steps} batch={args.batch} seed={args.seed}")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:  # linear warm-up, then linear decay to 10%
        if step < args.warmup:
            return (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 1.0 - 0.9 * frac

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rows = load_rows(args.train)
    random.Random(args.seed).shuffle(rows)
    need = args.steps * args.batch
    rows = (rows * math.ceil(need / len(rows)))[:need]

    losses = []
    t0 = time.time()
    cols = [TextColumn("[progress.description]{task.description}"), BarColumn(),
            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=console, transient=False) as prog:
        task = prog.add_task(f"{args.mode} fine-tune", total=args.steps)
        for step in range(args.steps):
            ids, att, lab = make_batch(tok, rows[step * args.batch:(step + 1) * args.batch], device)
            loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(round(loss.item(), 5))
            recent = sum(losses[-8:]) / len(losses[-8:])
            prog.update(task, advance=1, description=f"{args.mode} fine-tune loss(8)={recent:.3f}")
    wall = time.time() - t0

    tmp = args.out.with_name(args.out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    if args.mode == "full":
        tok.save_pretrained(tmp)
    log = {"mode": args.mode, "lr": args.lr, "steps": args.steps, "batch": args.batch,
           "warmup": args.warmup, "seed": args.seed, "examples_seen": need,
           "lora_r": args.lora_r if args.mode == "lora" else None,
           "lora_alpha": args.lora_alpha if args.mode == "lora" else None,
           "train_seconds": round(wall, 1), "losses": losses}
    (tmp / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    if args.out.exists():
        import shutil
        shutil.rmtree(args.out)
    tmp.rename(args.out)
    console.print(f"saved {args.out} ({wall:.0f} s, first-8 loss {sum(losses[:8]) / len(losses[:8]):.3f}, "
                  f"last-8 loss {sum(losses[-8:]) / len(losses[-8:]):.3f})")


if __name__ == "__main__":
    main()
