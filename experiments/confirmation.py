"""Stage 7 of `make experiment`: which models the confirmation evaluates, and how to rebuild them.

`fapm-merge tradeoff --json` names what its rule selected on the selection data
(``"selected": {"model": ...}``, or null) and the arm's anchors (``"base"``,
``"finetuned"``). The confirmation evaluates those three (the two anchors when nothing was
selected) again on held-out data under
the SAME paths, so that `fapm-merge tradeoff --confirm` pairs them with their selection
records. Merges were deleted after their evaluation; each is rebuilt by `mergekit-yaml`
from the recipe its record in the selection results holds (absolute paths).

    plan TRADEOFF_JSON RESULTS CONFIRM RECIPE_DIR
        One line per model of the three that CONFIRM does not hold yet:
        ``MODEL<TAB>RECIPE<TAB>SEED``. RECIPE is ``-`` for a folder no merge wrote (the
        base, the full fine-tune), which must still be on disk; otherwise the record's
        recipe, written to RECIPE_DIR/<name>.yml. SEED is DARE's ``--random-seed`` (the
        sweep's, from its folder sweepN/), ``-`` otherwise.
    subset TRADEOFF_JSON CONFIRM OUT
        Writes OUT: CONFIRM's lines of the three models (the last line per model; the
        lines name their items file, which OUT shares when it sits beside CONFIRM).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List

import yaml


def confirmed_models(tradeoff_json: Path) -> List[str]:
    """Base, fine-tune and (if the rule selected one) the selected model of a tradeoff JSON.

    With nothing selected the anchors alone are scored on the held-out data, so that the
    verdict (keep the fine-tune) is checked on data that did not give it."""
    decision = json.loads(tradeoff_json.read_text())
    anchors = [decision["base"]["model"], decision["finetuned"]["model"]]
    return anchors + ([decision["selected"]["model"]] if decision["selected"] else [])


def last_lines(results: Path) -> Dict[str, str]:
    """``{model: line}`` of a results file, the last line per model winning (as `fapm-merge tradeoff` reads it)."""
    lines: Dict[str, str] = {}
    if results.exists():
        for line in results.read_text().splitlines():
            if line.strip():
                lines[json.loads(line)["model"]] = line
    return lines


def dare_seed(model: Path, recipe: dict) -> str:
    # run_experiment.sh sweeps DARE seed N into sweepN/
    if not str(recipe.get("merge_method", "")).startswith("dare"):
        return "-"
    seed = model.parent.name[len("sweep"):]
    if not seed.isdigit():
        raise SystemExit(f"{model}: a DARE merge outside a sweepN/ folder; its seed is unknown")
    return seed


def plan(tradeoff_json: Path, results: Path, confirm: Path, recipe_dir: Path) -> None:
    records = {model: json.loads(line) for model, line in last_lines(results).items()}
    done = last_lines(confirm)
    recipe_dir.mkdir(parents=True, exist_ok=True)
    for model in confirmed_models(tradeoff_json):
        if model in done:
            continue
        if model not in records:
            raise SystemExit(f"{model} (named by {tradeoff_json}) has no record in {results}")
        recipe = records[model].get("recipe")
        if recipe is None:
            if not Path(model).is_dir():
                raise SystemExit(f"{model} is no merge (its record has no recipe) and is not on disk; "
                                 "rerun the stage that wrote it")
            print(f"{model}\t-\t-")
            continue
        recipe_file = recipe_dir / f"{Path(model).parent.name}-{Path(model).name}.yml"
        recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
        print(f"{model}\t{recipe_file}\t{dare_seed(Path(model), recipe)}")


def subset(tradeoff_json: Path, confirm: Path, out: Path) -> None:
    lines = last_lines(confirm)
    wanted = confirmed_models(tradeoff_json)
    missing = [m for m in wanted if m not in lines]
    if missing:
        raise SystemExit(f"{confirm} lacks {missing}; run the confirmation first")
    out.write_text("".join(lines[m] + "\n" for m in wanted))


def main() -> None:
    command, *args = sys.argv[1:] or [""]
    if command == "plan" and len(args) == 4:
        plan(*map(Path, args))
    elif command == "subset" and len(args) == 3:
        subset(*map(Path, args))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
