"""The ``fapm-merge`` command: a click group; each command's logic lives in the library."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click


@click.group()
@click.version_option(package_name="fapm-merge")
def main():
    """fapm-merge: FAPM (Forgetting-Aware Pruning, arXiv 2509.08255) for mergekit.

    The merge itself runs through plain `mergekit-yaml recipe.yml out/` with
    `merge_method: fapm`; these commands help around it.
    """


def _mergekit_yaml() -> str:
    local = Path(sys.executable).parent / "mergekit-yaml"
    found = str(local) if local.exists() else shutil.which("mergekit-yaml")
    if not found:
        raise click.ClickException("mergekit-yaml not found: pip install 'mergekit>=0.1.5,<0.2'")
    return found


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--sparsity", default=0.9, show_default=True, help="Share of each task vector reset to the base.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT_DIR.")
def demo(out_dir: Path, sparsity: float, overwrite: bool):
    """Make a small Llama-shaped base/fine-tune pair locally and repair it with FAPM.

    Writes OUT_DIR/models/{base,finetuned}, OUT_DIR/recipe.yml and the merged model
    in OUT_DIR/merged, by running the real `mergekit-yaml` on the recipe.
    """
    import yaml
    from rich.console import Console

    from fapm_merge.atomic import atomic_output_dir
    from fapm_merge.summary import summarize_merge
    from fapm_merge.toy_models import DEMO_CONFIG, save_pair

    console = Console()
    out_dir = out_dir.absolute()
    merged = out_dir / "merged"
    if merged.exists() and not overwrite:
        raise click.ClickException(f"{merged} exists; pass --overwrite or choose another OUT_DIR")
    started = time.perf_counter()
    with console.status("building the demo pair (Llama-shaped, ~6M parameters)"):
        base, finetuned = save_pair(DEMO_CONFIG, out_dir / "models")
    recipe = {
        "merge_method": "fapm",
        "base_model": str(base),
        "models": [{"model": str(finetuned), "parameters": {"sparsity": sparsity}}],
        "dtype": "float32",
    }
    recipe_path = out_dir / "recipe.yml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    command = [_mergekit_yaml(), str(recipe_path), "", "--no-copy-tokenizer"]
    merge_started = time.perf_counter()
    with atomic_output_dir(merged, overwrite=True) as work:
        command[2] = str(work)
        console.print(f"[bold]running[/bold] mergekit-yaml {recipe_path} {merged} --no-copy-tokenizer")
        result = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if result.returncode != 0:
            raise click.ClickException(f"mergekit-yaml failed with exit code {result.returncode}")
    merge_seconds = time.perf_counter() - merge_started
    summary = summarize_merge(base, finetuned, merged)
    console.print(summary.table(title=f"FAPM demo, sparsity {sparsity}"))
    console.print(
        f"{summary.tensors} tensors, kept {summary.kept_share:.2%} of task-vector entries "
        f"and {summary.energy_kept:.2%} of its energy (L2²); merge {merge_seconds:.1f} s, "
        f"total {time.perf_counter() - started:.1f} s"
    )
    console.print(f"model card: {merged / 'README.md'}")
