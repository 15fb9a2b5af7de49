"""Stage 7 of `make experiment`: the table and the trade-off plot from the eval results.

Reads the JSON lines that `fapm-merge eval` appended under experiments/work/results:
``main.jsonl`` (task accuracy and Wikipedia loss on the selection data, one line per
model) and ``lee.jsonl`` (loss on gensim's Lee news text). When a model was evaluated twice
(a resumed run), its last line counts.

Definitions (docs/experiments.md repeats them):

* accuracy: exact match of the greedy answer token on the scored validation prompts.
* accuracy retention = accuracy / accuracy of the full fine-tune (LoRA rows: of the
  LoRA fine-tune).
* CF% on a text = 100 * (PPL_model - PPL_base) / PPL_base: the relative loss of
  general ability versus the pre-trained model (0 = nothing forgotten; negative =
  better than the base). The table gives it per text and their mean.

Writes results/table.md, results/summary.json and docs/images/experiment-tradeoff.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from rich.console import Console

from fapm_merge.workflows.tradeoff import read_results

console = Console()


def last_records(path: Path) -> dict:
    """``{model: record}``, the last line per model winning (the reader `fapm-merge tradeoff` uses)."""
    return {r["model"]: r for r in read_results(path)} if path.exists() else {}


def classify(model: str):
    """(arm, method, strength, seed) from the model folder path."""
    p = Path(model)
    name, parent = p.name, p.parent.name
    if parent.endswith("-family"):
        # the family's sweeps (stages 4c, 6c): fapm-b0.25-s0.5, lines-a0.25,
        # fapm_lora-b0.5-s0.1, lines_lora-a0
        arm = "lora" if parent == "sweep-lora-family" else "full"
        label, _, value = name.rpartition("-")
        method = label.replace("fapm_lora", "fapm").replace("lines_lora", "lines").replace("-b", " beta ")
        return arm, method + (" (LoRA)" if arm == "lora" else ""), float(value[1:]), None
    if name == "base":
        return "ref", "base", None, None
    if name == "ft_full":
        return "full", "fine-tuned", None, None
    if name.startswith("lora-"):
        # lora-fapm-s0.1, lora-magnitude-s0.1, lora-wiseft-a0.5 (stage 6 and 6b)
        method, _, value = name[len("lora-"):].partition("-")
        strength = float(value[1:])
        if method == "fapm" and strength == 0:
            return "lora", "LoRA fine-tuned", strength, None
        return "lora", f"{method} (LoRA)", strength, None
    method, _, value = name.partition("-")
    strength = float(value[1:])  # s0.9 -> 0.9, a0.3 -> 0.3
    # DARE seeds live in sweep0/, sweep1/, sweep2/ (sweep-fapm/ holds FAPM and magnitude)
    seed = int(parent[len("sweep"):]) if method == "dare" and parent[len("sweep"):].isdigit() else None
    return "full", method, strength, seed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("experiments/work"))
    ap.add_argument("--docs", type=Path, default=Path("docs"))
    ap.add_argument("--prefix", default="",
                    help="read PREFIXmain.jsonl and PREFIXlee.jsonl (a side run); with a prefix "
                         "only results/PREFIXtable.md is written")
    ap.add_argument("--min-retention", type=float, default=0.97,
                    help="the margin run_experiment.sh decided at (its MIN_RETENTION)")
    args = ap.parse_args()
    res = args.work / "results"
    prefix = args.prefix
    main_r, lee_r = last_records(res / f"{prefix}main.jsonl"), last_records(res / f"{prefix}lee.jsonl")

    rows = []
    for model, r in main_r.items():
        arm, method, strength, seed = classify(model)
        m = r["metrics"]
        lee = lee_r.get(model, {}).get("metrics", {}).get("text", {})
        rows.append({"arm": arm, "method": method, "strength": strength, "seed": seed,
                     "acc": m["task"]["accuracy"], "n": m["task"]["examples"],
                     "wiki_ppl": m["text"]["perplexity"], "lee_ppl": lee.get("perplexity", math.nan),
                     "seconds": r["seconds"] + lee_r.get(model, {}).get("seconds", 0.0)})
    ref = {r["method"]: r for r in rows if r["method"] in ("base", "fine-tuned", "LoRA fine-tuned")}
    if "base" not in ref or "fine-tuned" not in ref:
        raise SystemExit("results lack the base or the fine-tuned model; run the earlier stages")
    base = ref["base"]

    def cf(ppl, key):
        return 100.0 * (ppl - base[key]) / base[key]

    # Group DARE seeds: mean and spread per strength.
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["arm"], r["method"], r["strength"]), []).append(r)
    table = []
    for (arm, method, strength), rs in groups.items():
        acc_ft = (ref.get("LoRA fine-tuned") if arm == "lora" else ref["fine-tuned"] if arm == "full" else None)
        entry = {"arm": arm, "method": method, "strength": strength, "seeds": sorted(r["seed"] for r in rs if r["seed"] is not None),
                 "n": rs[0]["n"]}
        for key in ("acc", "wiki_ppl", "lee_ppl"):
            vals = [r[key] for r in rs]
            entry[key] = statistics.fmean(vals)
            entry[key + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else None
        entry["cf_wiki"] = cf(entry["wiki_ppl"], "wiki_ppl")
        entry["cf_lee"] = cf(entry["lee_ppl"], "lee_ppl")
        entry["cf_mean"] = (entry["cf_wiki"] + entry["cf_lee"]) / 2
        entry["retention"] = 100.0 * entry["acc"] / acc_ft["acc"] if acc_ft else None
        table.append(entry)
    order = {"base": 0, "fine-tuned": 1, "fapm": 2, "magnitude": 3, "dare": 4, "wiseft": 5,
             "LoRA fine-tuned": 6, "fapm (LoRA)": 7, "magnitude (LoRA)": 8, "wiseft (LoRA)": 9}
    table.sort(key=lambda e: (order.get(e["method"], 10), e["strength"] or 0))

    lines = ["| model | sparsity / alpha | accuracy | retention % | PPL wiki | PPL Lee | CF% wiki | CF% Lee | CF% mean |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        acc = f"{e['acc']:.3f}" + (f" ± {e['acc_sd']:.3f}" if e["acc_sd"] is not None else "")
        ret = "-" if e["retention"] is None else f"{e['retention']:.1f}"
        name = e["method"] + (f" (seeds {','.join(map(str, e['seeds']))})" if len(e["seeds"]) > 1 else "")
        lines.append(f"| {name} | {fmt_strength(e)} | {acc} | {ret} | {e['wiki_ppl']:.3f} | {e['lee_ppl']:.3f} | "
                     f"{e['cf_wiki']:+.2f} | {e['cf_lee']:+.2f} | {e['cf_mean']:+.2f} |")
    md = "\n".join(lines) + "\n"
    md += "\n" + head_to_head(table)
    if any(e["method"] == "magnitude (LoRA)" for e in table):
        md += "\n" + head_to_head(table, arm="LoRA")
    md += "\n" + dominance(table)
    (res / f"{prefix}table.md").write_text(md)
    console.print(md)
    if prefix:  # a side run: the docs and the plot show the main protocol only
        return
    write_into_docs(args.docs / "experiments.md", md)
    decisions = decision_tables(res)
    if decisions:
        (res / "decision.md").write_text(decisions)
        console.print(decisions)
        write_into_docs(args.docs / "experiments.md", decisions, block="decision")
    family = family_tables(res, args.min_retention)
    if family:
        (res / "family.md").write_text(family)
        console.print(family)
        write_into_docs(args.docs / "experiments.md", family, block="family")
    (res / "summary.json").write_text(json.dumps({"rows": table, "eval_seconds": sum(r["seconds"] for r in rows)},
                                                 indent=1) + "\n")
    plot(table, args.docs / "images" / "experiment-tradeoff.png")


def fmt_strength(e: dict) -> str:
    if e["strength"] is None:
        return "-"
    return (f"alpha {e['strength']:g}" if e["method"].startswith("wiseft") else f"{e['strength']:g}")


def verdict(a: dict, b: dict) -> str:
    """FAPM point a against baseline point b at the same sparsity, mechanically.

    Forgetting is CF% on Wikipedia, the primary general text (the fine-tune's
    forgetting on the Lee text is too small to rank methods by; the table shows it).
    Accuracy within 0.01 (4 of the 400 test prompts) and CF% within 0.1 point
    count as equal: a descriptive tolerance; the decision block's paired intervals
    say what is significant. "wins" = at least as good on both axes and better on
    one; "loses" = the reverse; "trade-off" = better on one axis, worse on the other.
    """
    d_acc = a["acc"] - b["acc"]
    d_cf = b["cf_wiki"] - a["cf_wiki"]  # positive: FAPM forgets less
    # "within" includes the bound: 0.01 apart is equal, however the
    # subtraction rounds (0.75 - 0.74 is 0.010000000000000009).
    acc_s = 0 if abs(d_acc) <= 0.01 + 1e-9 else (1 if d_acc > 0 else -1)
    cf_s = 0 if abs(d_cf) <= 0.1 + 1e-9 else (1 if d_cf > 0 else -1)
    if acc_s == 0 and cf_s == 0:
        return "tie"
    if acc_s >= 0 and cf_s >= 0:
        return "wins"
    if acc_s <= 0 and cf_s <= 0:
        return "loses"
    return "trade-off"


def head_to_head(table, arm: str = "full") -> str:
    """FAPM against the baselines at each sparsity; ``arm="LoRA"`` for the LoRA update."""
    by = {(e["method"], e["strength"]): e for e in table}
    suffix = " (LoRA)" if arm == "LoRA" else ""
    others = ("magnitude",) if arm == "LoRA" else ("magnitude", "dare")
    header = f"| sparsity{' (LoRA arm)' if suffix else ''} | FAPM acc / CF% wiki |"
    for other in others:
        header += f" {other} acc / CF% wiki | FAPM vs {other} |"
    lines = [header.replace("dare acc", "DARE acc").replace("vs dare", "vs DARE"),
             "|---|---|" + "---|---|" * len(others)]
    for e in sorted((e for e in table if e["method"] == "fapm" + suffix), key=lambda e: e["strength"]):
        s = e["strength"]
        cells = [f"{s:g}", f"{e['acc']:.2f} / {e['cf_wiki']:+.2f}"]
        for other in others:
            o = by.get((other + suffix, s))
            cells += ([f"{o['acc']:.2f} / {o['cf_wiki']:+.2f}", verdict(e, o)] if o else ["not yet run", "-"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def dominance(table) -> str:
    """Each FAPM point against every baseline point of its arm, at any sparsity/alpha.

    Equal sparsity is not the only fair comparison: a user picks whatever point of a
    method's curve suits them. "dominated by" lists the baseline points at least as
    good on both axes (accuracy, CF% on Wikipedia) and better on one, with the same
    tolerances as `verdict`; "dominates" lists those it beats that way.
    """
    lines = ["| FAPM point | accuracy / CF% wiki | dominated by | dominates |", "|---|---|---|---|"]
    for arm, fapm_name in (("full", "fapm"), ("lora", "fapm (LoRA)")):
        rivals = [e for e in table if e["arm"] == arm and e["method"] not in (fapm_name, "fine-tuned", "LoRA fine-tuned")]
        for e in sorted((e for e in table if e["method"] == fapm_name), key=lambda e: e["strength"]):
            def label(o):
                return f"{o['method'].replace(' (LoRA)', '')} {fmt_strength(o)}"
            beaten_by = [label(o) for o in rivals if verdict(e, o) == "loses"]
            beats = [label(o) for o in rivals if verdict(e, o) == "wins"]
            lines.append(f"| {e['method']} {e['strength']:g} | {e['acc']:.2f} / {e['cf_wiki']:+.2f} | "
                         f"{', '.join(beaten_by) or 'none'} | {', '.join(beats) or 'none'} |")
    return "\n".join(lines) + "\n"


def _interval(value, interval, digits, signed=True):
    if value is None:
        return "undefined"
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    if interval and interval.get("low") is not None:
        text += f" [{interval['low']:+.{digits}f}, {interval['high']:+.{digits}f}]"
    return text


def decision_tables(res: Path) -> str:
    """What `fapm-merge tradeoff` selects on each arm on the selection data, with the
    paired 95% intervals it rests on, the default rule's verdict beside it, and the
    pick's held-out check (results/tradeoff-ARM.json, tradeoff-ARM-default.json)."""
    out = []
    for arm, name in (("full", "full fine-tune"), ("lora", "LoRA fine-tune")):
        path = res / f"tradeoff-{arm}.json"
        if not path.exists():
            continue
        d = json.loads(path.read_text())
        items = d.get("items", {})
        out.append(f"**{name[0].upper() + name[1:]} arm** (selection data: {items.get('prompts', 0)} "
                   f"validation prompts, {items.get('windows', 0)} Wikipedia passages; rule: {d['rule']}).\n")
        out.append("| model | accuracy | Δ accuracy vs fine-tune [95%] | CF% wiki [95%] "
                   "| CF cut, points [95%] | repaired | rule |")
        out.append("|---|---|---|---|---|---|---|")
        rank = {"base": 0, "finetuned": 1}
        for p in sorted(d["points"], key=lambda p: (rank.get(p["method"], 2), p["method"], p["strength"] or 0)):
            acc = p.get("accuracy_vs_ft") or {}
            cut = p.get("cf_reduction") or {}
            label = p["label"] if p["method"] not in ("base", "finetuned") else p["method"]
            verdict = p["verdict"] if p["verdict"] != "selected" else "**selected**"
            repaired = "-" if p.get("repaired") is None else f"{p['repaired']:.0%}"
            out.append(f"| {label} | {p['accuracy']:.3f} | "
                       f"{_interval(acc.get('estimate'), acc, 3) if acc else '-'} | "
                       f"{_interval(p['cf_pct'], p.get('cf_interval'), 2)} | "
                       f"{_interval(cut.get('estimate'), cut, 2) if cut else '-'} | {repaired} | {verdict} |")
        out.append("")
        out.append(("Selected: " if d.get("selected") else "Nothing selected: ") + d["reason"] + ".")
        for warning in d.get("warnings", []):
            out.append(f"Warning: {warning}.")
        if not d.get("selected"):
            out.extend(_held_out_verdict(res, d))
        default = res / f"tradeoff-{arm}-default.json"
        if default.exists():
            dd = json.loads(default.read_text())
            out.append("")
            out.append(f"The default rule ({dd['rule']}) on the same data, "
                       + ("selected: " if dd.get("selected") else "nothing selected, ") + dd["reason"] + ".")
        confirmation = d.get("confirmation")
        if confirmation:
            ni, repair = confirmation["noninferiority"], confirmation["repair"]
            diff, cut = ni["difference"], repair["cf_reduction"]
            cf = confirmation["cf"]
            out.append("")
            out.append(
                f"**Held-out check: {confirmation['status']}** ({confirmation['prompts']} test prompts from "
                f"{confirmation.get('groups') or '?'} movies, {confirmation['windows']} Wikipedia passages "
                f"that did not choose the model): {confirmation['selected']} has accuracy "
                f"{confirmation['accuracy']['selected']:.3f} against the fine-tune's "
                f"{confirmation['accuracy']['finetuned']:.3f} (difference {_interval(diff['estimate'], diff, 3)}, "
                f"one-sided lower bound {ni['lower_bound']:+.3f} vs margin -{ni['margin']:.3f}), CF "
                f"{_interval(cf['selected']['estimate'], cf['selected'], 2)}% against the fine-tune's "
                f"{_interval(cf['finetuned']['estimate'], cf['finetuned'], 2)}%: a cut of "
                f"{_interval(cut['estimate'], cut, 2)} CF points.")
        out.append("")
    return "\n".join(out)


def _held_out_verdict(res: Path, d: dict) -> list:
    """With nothing selected, the anchors on the held-out data (results/confirm.jsonl,
    written by the confirmation stage): does the data that gave no verdict agree?"""
    from fapm_merge.workflows.tradeoff import compute_tradeoff

    held_out = last_records(res / "confirm.jsonl")
    base, ft = d["base"]["model"], d["finetuned"]["model"]
    if base not in held_out or ft not in held_out:
        return []
    h = compute_tradeoff([held_out[base], held_out[ft]], base=base, finetuned=ft).to_json()
    cf = h["forgetting"]["cf"]
    same = h["outcome"] == d["outcome"]
    return ["", f"**Held-out check of the verdict: {'agrees' if same else 'differs'}** "
                f"({h['items'].get('prompts', 0)} test prompts, {h['items'].get('windows', 0)} Wikipedia "
                f"passages that did not give it): the fine-tune's CF there is {_interval(cf['estimate'], cf, 2)}%"
                f" ({'not ' if not h['forgetting']['significant'] else ''}significant), its accuracy "
                f"{h['finetuned']['accuracy']:.3f}."]


def family_tables(res: Path, min_retention: float) -> str:
    """The repair family against today's grid, per arm (docs/experiments.md, "The repair
    family"): the grid's decision (results/tradeoff-ARM-grid.json), the family's
    exhaustive one (tradeoff-ARM.json), the screened one replayed from the per-item
    values (benchmarks/bench_screening.py) with the evaluation each spends; the best
    qualifying point of every method; and, when both decisions pick, the family's pick
    against the grid's with paired intervals."""
    import sys

    from fapm_merge.evaluation import noninferiority as ni
    from fapm_merge.evaluation import stats

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_screening import replay

    from fapm_merge.workflows.tune.screening import cost

    out = []
    for arm, name in (("full", "Full fine-tune"), ("lora", "LoRA fine-tune")):
        paths = [res / f"tradeoff-{arm}-grid.json", res / f"tradeoff-{arm}.json", res / f"{arm}-arm.jsonl"]
        if not all(p.exists() for p in paths):
            continue
        grid, family = (json.loads(p.read_text()) for p in paths[:2])
        screened = replay(paths[2], base=family["base"]["model"], finetuned=family["finetuned"]["model"],
                          min_retention=min_retention)
        # today's grid, exhaustive: every record of its decision on everything (no replay needed)
        used = {p["model"] for p in grid["points"]}
        grid_cost = {key: sum(cost(r)[key] for m, r in last_records(res / f"{arm}-grid.jsonl").items()
                              if m in used) for key in ("prompts", "window_tokens")}

        def pick(decision):
            s = decision.get("selected")
            return f"**{s['label']}**" if s else f"nothing ({decision['outcome']})"

        ex, sc = screened["exhaustive"], screened["screened"]
        labels = {p["name"]: p["label"] for p in family["points"]}  # the replay names picks by folder
        out += [f"**{name} arm** (rule at retention {min_retention}):", "",
                "| plan | candidates | pick | prompts evaluated | window tokens evaluated |",
                "|---|---|---|---|---|",
                f"| today's default grid, exhaustive | {len(grid['points']) - 2} | {pick(grid)} | "
                f"{grid_cost['prompts']:,} | {grid_cost['window_tokens']:,} |",
                f"| the family, exhaustive | {screened['candidates']} | {pick(family)} | "
                f"{ex['prompts']:,} | {ex['window_tokens']:,} |",
                f"| the family, screened (replayed) | {screened['candidates']} | "
                f"{('**' + labels.get(sc['pick'], sc['pick']) + '**') if sc['pick'] else 'nothing (' + sc['outcome'] + ')'} | "
                f"{sc['prompts']:,} | {sc['window_tokens']:,} |", "",
                f"Screened and exhaustive picks {'agree' if screened['agree'] else 'DIFFER'}; the screening "
                f"share was {screened['share']['prompts']} prompts and {screened['share']['window_tokens']:,} "
                f"window tokens, {sc['evaluated_on_share']} candidates were screened on its text "
                f"({sc['prompts_on_share']} of them on its prompts too, the others out on repair by "
                f"their text) and {sc['survivors']} evaluated on the rest's prompts in "
                f"{len(screened['rest_rounds'])} rounds, {sc['text_on_rest']} of them on its text too "
                "(the others not shown to keep the task on all the prompts); "
                f"one-sided {screened['share']['confidence']:.0%} per test"
                + (f"; leaders that did not qualify on everything: {', '.join(screened['rejected_leaders'])}"
                   if screened["rejected_leaders"] else "") + "; against today's grid: "
                f"{sc['prompts'] / grid_cost['prompts']:.2f}x its prompts, "
                f"{sc['window_tokens'] / grid_cost['window_tokens']:.2f}x its window tokens.", ""]
        # the best qualifying point of each method (the rule's own order: largest CF cut)
        best = {}
        for p in family["points"]:
            if p["method"] in ("base", "finetuned") or (p.get("noninferiority") or {}).get("verdict") != "qualifies":
                continue
            cut = (p.get("cf_reduction") or {}).get("estimate")
            if cut is not None and (p["method"] not in best or cut > best[p["method"]]["cf_reduction"]["estimate"]):
                best[p["method"]] = p
        out += ["| method | its point shown non-inferior with the largest CF cut | Δ accuracy vs fine-tune [95%] "
                "| CF cut, points [95%] | rule |", "|---|---|---|---|---|"]
        for method in sorted({p["method"] for p in family["points"]} - {"base", "finetuned"}):
            p = best.get(method)
            if p is None:
                out.append(f"| {method} | none shown non-inferior | - | - | - |")
                continue
            acc, cut = p["accuracy_vs_ft"], p["cf_reduction"]
            out.append(f"| {method} | {p['label']} | {_interval(acc['estimate'], acc, 3)} | "
                       f"{_interval(cut['estimate'], cut, 2)} | {p['verdict']} |")
        out.append("")
        g, f = grid.get("selected"), family.get("selected")
        if g and f and g["model"] != f["model"]:
            records = last_records(paths[2])
            rf, rg, rb = (records[m] for m in (f["model"], g["model"], family["base"]["model"]))
            text = [r["metrics"]["text"]["per_item"] for r in (rf, rg, rb)]
            task = [r["metrics"]["task"]["per_item"] for r in (rf, rg)]
            docs = text[1].get("window_document")
            cut = stats.cf_reduction(text[0]["window_loss"], text[1]["window_loss"], text[2]["window_loss"],
                                     text[1]["window_tokens"], groups=docs if docs and len(set(docs)) > 1 else None)
            acc = ni.accuracy_difference_score([int(c) for c in task[0]["correct"]],
                                               [int(c) for c in task[1]["correct"]], groups=task[1].get("group"))
            out += [f"The family's pick {f['label']} against the grid's {g['label']}, paired on the same "
                    f"selection data: accuracy {_interval(acc.estimate, {'low': acc.low, 'high': acc.high}, 3)}, "
                    f"CF {_interval(cut.estimate, {'low': cut.low, 'high': cut.high}, 2)} points lower "
                    "(positive: the family's pick forgets less).", ""]
        elif g and f:
            out += ["The family picks the grid's own pick.", ""]
    return "\n".join(out)


def write_into_docs(doc: Path, md: str, block: str = "results-table") -> None:
    """Replace a generated block of docs/experiments.md, so the page shows this run."""
    start, end = f"<!-- {block}:start -->", f"<!-- {block}:end -->"
    if not doc.exists():
        return
    text = doc.read_text()
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        doc.write_text(head + start + "\n" + md + end + tail)
        console.print(f"table written into {doc}")


def plot(table, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    styles = {"fapm": ("tab:red", "o", "FAPM"), "magnitude": ("tab:blue", "s", "magnitude pruning of dW"),
              "dare": ("tab:green", "^", "DARE (mean of 3 seeds)"), "wiseft": ("tab:purple", "D", "WiSE-FT"),
              "fapm (LoRA)": ("tab:orange", "v", "FAPM on LoRA (native path)"),
              "magnitude (LoRA)": ("tab:cyan", "<", "magnitude pruning of LoRA dW"),
              "wiseft (LoRA)": ("tab:pink", ">", "WiSE-FT on LoRA dW")}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ref = {e["method"]: e for e in table if e["method"] in ("base", "fine-tuned", "LoRA fine-tuned")}
    for method, (color, marker, label) in styles.items():
        # (a LoRA row has no retention until the LoRA fine-tune itself is evaluated)
        es = sorted((e for e in table if e["method"] == method and e["retention"] is not None),
                    key=lambda e: e["strength"])
        if not es:
            continue
        if method == "dare":  # say how many seeds the points really average
            seeds = max(len(e["seeds"]) for e in es)
            label = f"DARE (mean of {seeds} seeds)" if seeds > 1 else "DARE (one seed)"
        x_cf = [e["cf_wiki"] for e in es]
        y_ret = [e["retention"] for e in es]
        axes[0].plot(x_cf, y_ret, marker=marker, color=color, label=label)
        for e in es:
            axes[0].annotate(f"{e['strength']:g}", (e["cf_wiki"], e["retention"]), fontsize=7,
                             xytext=(3, 3), textcoords="offset points", color=color)
        if method.startswith("wiseft"):
            continue  # alpha is not a sparsity; WiSE-FT appears only in the trade-off panel
        s = [e["strength"] for e in es]
        axes[1].plot(s, [e["retention"] for e in es], marker=marker, color=color, label=label)
        axes[2].plot(s, [e["cf_wiki"] for e in es], marker=marker, color=color, label=label)
    for name, marker in (("fine-tuned", "*"), ("LoRA fine-tuned", "P")):
        if name in ref:
            axes[0].scatter([ref[name]["cf_wiki"]], [ref[name]["retention"]], marker=marker, s=160,
                            color="black", label=f"{name} (full update)", zorder=5)
    axes[0].axvline(0, color="gray", lw=0.8)
    axes[0].set_xlabel("CF% on Wikipedia (perplexity vs base; left = less forgetting)")
    axes[0].set_ylabel("accuracy retention % (vs its fine-tune)")
    axes[0].set_title("trade-off (labels: sparsity, or alpha for WiSE-FT)")
    axes[1].set_xlabel("sparsity (share of dW reset)")
    axes[1].set_ylabel("accuracy retention %")
    axes[1].set_title("task accuracy kept")
    axes[2].set_xlabel("sparsity (share of dW reset)")
    axes[2].set_ylabel("CF% on Wikipedia")
    axes[2].set_title("forgetting left")
    axes[2].axhline(0, color="gray", lw=0.8)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct, Rotten Tomatoes SFT: FAPM vs baselines (experiments/, docs/experiments.md)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    console.print(f"plot: {out}")


if __name__ == "__main__":
    main()
