"""Using the model a trade-off selected: the command that makes it again, bit for bit.

A sweep variant folder holds the recipe that makes it (``mergekit_config.yml``), but
three things decide whether plain ``mergekit-yaml`` writes the *same* folder again:

* the output folder's own name: mergekit titles the model card with it
  (``os.path.basename(out_path)``; ``merged/`` gives ``# Untitled Model (1)``), so
  the new folder must carry the variant's name (``chosen/fapm-s0.9``);
* the tokenizer: the sweep copied the base's tokenizer or not
  (``--no-copy-tokenizer``); without one in the base, mergekit logs a traceback
  unless told not to copy;
* DARE's random stream: ``--random-seed`` with the sweep's ``--seed``.

When the selected point is the base or the fine-tuned model itself there is no
merge to rerun: the advice says so. Light on purpose: no torch, no mergekit.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from fapm_merge.evaluation.results import SWEEP_MANIFEST
from fapm_merge.io.model_paths import looks_local, reference_path
from fapm_merge.io.recipe import RECIPE_FILE, RecipeError, load_recipe, named_models

TOKENIZER_FILE = "tokenizer_config.json"
"""mergekit copies a tokenizer only when the donor has this file (and tokenizer.json)."""


@dataclass(frozen=True)
class Choice:
    """How to use a selected model.

    Attributes:
        model (`Path`): the selected model folder.
        command (`List[str]`, *optional*): the ``mergekit-yaml`` argv that writes the
            same folder again, bit for bit; None when there is nothing to rerun.
        advice (`str`): one line for the user.
    """

    model: Path
    command: Optional[List[str]]
    advice: str

    @property
    def shell(self) -> Optional[str]:
        """The command as one shell line (quoted where needed), or None."""
        return shlex.join(self.command) if self.command else None


def _seed(model_dir: Path) -> Optional[int]:
    """The DARE seed the sweep recorded for this variant (sweep.json beside it)."""
    manifest = model_dir.parent / SWEEP_MANIFEST
    try:
        variants = json.loads(manifest.read_text())["variants"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for variant in variants:
        if isinstance(variant, dict) and variant.get("name") == model_dir.name:
            return variant.get("seed")
    return None


def use_the_choice(
    model_dir: Path, *, role: Optional[str] = None, out_parent: Path = Path("chosen")
) -> Choice:
    """What to do with the model a trade-off selected.

    Args:
        model_dir (`Path`): the selected model folder (a sweep variant, or the base
            or fine-tuned model).
        role (`str`, *optional*): ``"base"`` or ``"finetuned"`` when the selected
            point is that anchor (``tradeoff``'s ``Point.method``); otherwise None.
        out_parent (`Path`, defaults to ``chosen``): the folder the new copy goes
            into; the copy itself is ``out_parent/<variant name>``, because mergekit
            titles the model card with its output folder's name.

    Returns:
        Choice: ``command`` reproduces a merge output bit for bit (weights,
        config.json, mergekit_config.yml, the model card, the tokenizer files);
        None for the anchors and folders that are no merge output.
    """
    model_dir = Path(model_dir)
    if role == "finetuned":
        return Choice(model_dir, None, (
            f"the fine-tuned model itself scores best: use {model_dir} as it is (there is no merge "
            "to rerun); at the values tried, pruning its task vector costs more task accuracy than "
            "it returns in general ability"))
    if role == "base":
        return Choice(model_dir, None, (
            f"the base model scores best: under this rule the fine-tune's task gain does not pay "
            f"for what it forgets; use {model_dir} as it is, or revisit the fine-tune or the rule"))
    recipe_file = model_dir / RECIPE_FILE
    if not recipe_file.is_file():
        return Choice(model_dir, None, (
            f"{model_dir} holds no {RECIPE_FILE}: it is not a merge output (a base or fine-tuned "
            "model); use it as it is"))
    command = ["mergekit-yaml", str(recipe_file.absolute()), str(Path(out_parent) / model_dir.name)]
    if not (model_dir / TOKENIZER_FILE).is_file():
        command.append("--no-copy-tokenizer")  # the variant has none: do not copy (nor fail to)
    seed = _seed(model_dir)
    try:
        recipe = load_recipe(recipe_file)
    except RecipeError:
        recipe = {}
    method = str(recipe.get("merge_method", ""))
    relative = [ref for _where, ref in named_models(recipe)
                if not ref.startswith("/") and looks_local(reference_path(ref))]
    if seed is not None and method.startswith("dare"):
        command += ["--random-seed", str(seed)]
    advice = (f"`{shlex.join(command)}` writes the same folder again, bit for bit (model card "
              f"included: mergekit titles it with the output folder's name, {model_dir.name})")
    if relative:
        advice += f"; run it from the directory the sweep ran in ({', '.join(relative)} are relative)"
    return Choice(model_dir, command, advice)


__all__ = ["Choice", "use_the_choice"]
