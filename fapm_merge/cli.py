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


# --- issue 6: choosing the sparsity (analyze, sweep, eval, tradeoff); logic in the library ---


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--sparsity", "sparsity", default=None, help="Comma-separated shares reset to the base, e.g. 0.5,0.7,0.9,0.95.")
@click.option("--density", "density", default=None, help="Comma-separated kept shares instead (density = 1 - sparsity).")
@click.option("--baselines", default="", help="Comma-separated: magnitude (FAPM beta 0), dare (dare_linear), wiseft (task_arithmetic, W_pre + alpha*dW).")
@click.option("--alpha", "alphas", default=None, help="WiSE-FT strengths (default: the densities of the sweep).")
@click.option("--seed", default=0, show_default=True, help="DARE seed (same stream as mergekit-yaml --random-seed SEED).")
@click.option("--device", default="cpu", show_default=True, help="Math device, e.g. cuda.")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True, help="Copy the base model's tokenizer into every output.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT_DIR.")
def sweep(recipe, out_dir, sparsity, density, baselines, alphas, seed, device, copy_tokenizer, overwrite):
    """Write one merged model per value into OUT_DIR, reading every input tensor once.

    RECIPE is a mergekit recipe with merge_method: fapm and a base_model. Each
    output folder OUT_DIR/<method>-s<value> equals `mergekit-yaml` run on the
    mergekit_config.yml written inside it, bit for bit; OUT_DIR/sweep.json lists
    the outputs. OUT_DIR appears only when every output is complete.
    """
    from rich.console import Console

    from fapm_merge.sweep import SweepError, build_variants, load_recipe, parse_values, run_sweep

    console = Console(stderr=True)
    try:
        variants = build_variants(
            load_recipe(recipe),
            sparsities=parse_values(sparsity, "--sparsity") if sparsity else None,
            densities=parse_values(density, "--density") if density else None,
            baselines=[b.strip() for b in baselines.split(",") if b.strip()],
            alphas=parse_values(alphas, "--alpha") if alphas else None,
            seed=seed,
        )
        result = run_sweep(variants, out_dir, overwrite=overwrite, device=device, copy_tokenizer=copy_tokenizer)
    except (SweepError, FileExistsError) as error:
        raise click.ClickException(str(error)) from None
    console.print(
        f"{len(variants)} models, {result.tensors} tensors each, in {result.seconds:.1f} s: "
        + ", ".join(v.name for v in variants)
    )
    console.print(f"manifest: {result.out_dir / 'sweep.json'}")
