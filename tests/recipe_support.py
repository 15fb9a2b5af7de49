"""Helpers for the recipe, multi-stage and model-card tests.

Recipes name real models (users copy them from model cards); the tests map those
names onto one tiny local "task family": a base and several fine-tunes of it whose
task vectors disagree in sign on many entries, as independent task fine-tunes do.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from fapm_merge.workflows.demo import TINY_CONFIGS, build_model, simulate_finetune
from helpers import console_script

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
FAMILY_SIZE = 4
# Fine-tune i uses seed 11 + i; odd ones are pushed the other way so signs conflict.
_STRENGTHS = (1.0, -0.8, 1.3, -1.1)


def build_family(root: Path, size: int = FAMILY_SIZE, arch: str = "llama") -> Tuple[Path, List[Path]]:
    """Write ``root/base`` and ``root/ft{i}`` (safetensors); return absolute paths."""
    root = Path(root)
    model = build_model(TINY_CONFIGS[arch], seed=0)
    base = root / "base"
    model.save_pretrained(base)
    finetunes = []
    for index in range(size):
        model = build_model(TINY_CONFIGS[arch], seed=0)
        simulate_finetune(model, seed=11 + index, strength=_STRENGTHS[index % len(_STRENGTHS)])
        path = root / f"ft{index}"
        model.save_pretrained(path)
        finetunes.append(path.resolve())
    return base.resolve(), finetunes


def recipe_paths(include_lora: bool = False) -> List[Path]:
    """Every recipe in recipes/ (lora-*.yml belong to the LoRA tests)."""
    return sorted(
        path
        for path in RECIPES_DIR.glob("*.yml")
        if include_lora or not path.name.startswith("lora-")
    )


def load_documents(path: Path) -> List[dict]:
    return [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc is not None]


def _model_name(entry) -> str:
    return entry if isinstance(entry, str) else entry["model"]


def model_names(documents: Sequence[dict]) -> Tuple[List[str], List[str]]:
    """(base names, fine-tune names) in order of first appearance, stages excluded."""
    stages = {doc["name"] for doc in documents if "name" in doc}
    bases: List[str] = []
    finetunes: List[str] = []
    for doc in documents:
        base = doc.get("base_model")
        if base and base not in stages and base not in bases:
            bases.append(base)
        for entry in doc.get("models", []):
            name = _model_name(entry)
            if name not in stages and name not in finetunes and name not in bases:
                finetunes.append(name)
    return bases, finetunes


def substitute(documents: Sequence[dict], mapping: Dict[str, str]) -> List[dict]:
    """Copies of the documents with model names replaced (stage names kept)."""
    out = []
    for doc in documents:
        doc = dict(doc)
        if doc.get("base_model") in mapping:
            doc["base_model"] = mapping[doc["base_model"]]
        models = []
        for entry in doc.get("models", []):
            if isinstance(entry, str):
                models.append(mapping.get(entry, entry))
            else:
                entry = dict(entry)
                entry["model"] = mapping.get(entry["model"], entry["model"])
                models.append(entry)
        if "models" in doc:
            doc["models"] = models
        out.append(doc)
    return out


def family_mapping(documents: Sequence[dict], base: Path, finetunes: Sequence[Path]) -> Dict[str, str]:
    """Map the recipe's base to the tiny base and its fine-tunes to ft0, ft1, ..."""
    bases, names = model_names(documents)
    assert len(bases) == 1, f"a recipe here has exactly one base model, got {bases}"
    assert len(names) <= len(finetunes), f"recipe needs {len(names)} fine-tunes"
    mapping = {bases[0]: str(base)}
    mapping.update({name: str(path) for name, path in zip(names, finetunes)})
    return mapping


def write_documents(documents: Sequence[dict], path: Path) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump_all(list(documents), sort_keys=False))
    return path


def run_cli(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run an unmodified mergekit console script in a subprocess; fail loudly."""
    result = subprocess.run(
        [console_script(script), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def run_multi_subprocess(recipe: Path, out: Path, intermediate: Path, *extra: str):
    """The real ``mergekit-multi`` on a multi-document recipe."""
    return run_cli(
        "mergekit-multi", recipe, "--out-path", out, "--intermediate-dir", intermediate,
        "--no-copy-tokenizer", *extra,
    )


def run_multi_in_process(recipe: Path, out: Path, intermediate: Path, *extra: str):
    """mergekit-multi's own click command, in this process (no start-up cost)."""
    from click.testing import CliRunner
    from mergekit.scripts.multimerge import main

    result = CliRunner().invoke(
        main,
        [str(recipe), "--out-path", str(out), "--intermediate-dir", str(intermediate),
         "--no-copy-tokenizer", *extra],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return result


def run_stages_by_hand(
    documents: Sequence[dict], out: Path, workdir: Path, random_seed: Optional[int] = None
) -> Dict[Optional[str], Path]:
    """Run each stage with mergekit's run_merge, in file order, wiring stage names
    to the folders written before; returns {stage name (None = final): folder}."""
    from helpers import run_merge_in_process

    stages = {doc["name"]: Path(workdir) / doc["name"] for doc in documents if "name" in doc}
    written: Dict[Optional[str], Path] = {}
    for doc in documents:
        doc = dict(doc)
        name = doc.pop("name", None)
        (config,) = substitute([doc], {key: str(path) for key, path in stages.items()})
        target = stages[name] if name is not None else Path(out)
        options = {} if random_seed is None else {"random_seed": random_seed}
        run_merge_in_process(config, target, **options)
        written[name] = target
    return written


def substitute_text(text: str, mapping: Dict[str, str]) -> str:
    """Replace model names in a recipe's text, keeping its comments (longest first,
    so no name is replaced inside a longer one)."""
    for name in sorted(mapping, key=len, reverse=True):
        text = text.replace(name, mapping[name])
    return text


def card_yaml(readme: Path) -> str:
    """The YAML block a mergekit model card shows under 'Configuration'."""
    text = Path(readme).read_text()
    start = text.index("```yaml\n") + len("```yaml\n")
    return text[start : text.index("\n```", start)]
