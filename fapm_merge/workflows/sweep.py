"""One read of the inputs, many merges: a sparsity sweep and its baselines.

A sweep is a list of *variants* (:mod:`fapm_merge.workflows.variants`), each a
complete mergekit recipe that differs from the others only in its method and
parameters (same base, same fine-tuned models, same dtype). Every variant is planned
by mergekit's own ``MergePlanner`` exactly as ``mergekit-yaml`` would plan it; all
plans then run in one mergekit ``Executor``:

* the tensor-loading tasks of all plans are the same tasks, so the executor reads
  each input tensor once for all variants;
* per output tensor, one task (:mod:`fapm_merge.methods.sweep_graph`) computes
  every variant's output. FAPM variants (and magnitude pruning, which is FAPM with
  ``beta: 0``) score the task vector once per distinct ``beta`` with
  :func:`fapm_merge.core.fapm_scores` and select each keep count with
  :func:`~fapm_merge.core.find_threshold` and :func:`~fapm_merge.core.select_where`,
  which keep exactly the entries the ``fapm`` kernel keeps for one model at
  coefficient 1. Every other variant (``rescale``, several models, DARE, WiSE-FT)
  runs mergekit's own per-tensor task on the shared inputs.

So every output equals a ``mergekit-yaml`` run of the ``mergekit_config.yml``
written beside it, bit for bit (tests/test_sweep.py checks it against the real
command). DARE variants each get their own random stream seeded like
``mergekit-yaml --random-seed SEED`` and drawn in the same tensor order.

The whole OUT_DIR appears atomically when every variant is complete; it holds one
model folder per variant and ``sweep.json`` (variant name, method, strength, path).
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence

import torch
import yaml

from fapm_merge.evaluation.results import SWEEP_MANIFEST
from fapm_merge.io.recipe import RECIPE_FILE
from fapm_merge.methods import compat
from fapm_merge.methods.sweep_graph import seeded_streams, sweep_targets
from fapm_merge.workflows.variants import PlannedVariant, SweepError, Variant


@dataclass
class SweepResult:
    out_dir: Path
    variants: List[Variant]
    seconds: float
    tensors: int
    manifest: dict = field(default_factory=dict)


def _shared_inputs(variants: Sequence[Variant]) -> None:
    def key(recipe):
        models = sorted(m["model"] for m in recipe.get("models") or [])
        return recipe.get("base_model"), tuple(models), recipe.get("dtype")

    first = key(variants[0].recipe)
    for variant in variants[1:]:
        if key(variant.recipe) != first:
            raise SweepError(
                f"variant {variant.name} reads other inputs ({key(variant.recipe)}) than "
                f"{variants[0].name} ({first}); a sweep shares one base, models and dtype"
            )


def run_sweep(
    variants: Sequence[Variant],
    out_dir: Path,
    *,
    overwrite: bool = False,
    device: str = "cpu",
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
    progress: bool = True,
) -> SweepResult:
    """Write one model folder per variant into ``out_dir``, reading inputs once.

    Args:
        variants (`Sequence[Variant]`): from :func:`build_variants`.
        out_dir (`Path`): the sweep folder; appears only when complete.
        overwrite (`bool`, defaults to False): replace an existing ``out_dir``.
        device (`str`, defaults to "cpu"): math device (``cuda`` like ``--cuda``).
        copy_tokenizer (`bool`, defaults to True): copy the base's tokenizer files.
        write_model_card (`bool`, defaults to True): README.md per variant, as mergekit.
        progress (`bool`, defaults to True): a rich progress bar on stderr.
    """
    from mergekit.architecture import get_architecture_info
    from mergekit.card import generate_card
    from mergekit.config import MergeConfiguration
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    from fapm_merge.io.atomic import atomic_output_dir
    if not variants:
        raise SweepError("nothing to sweep")
    _shared_inputs(variants)
    if device != "cpu" and any(v.seed is not None for v in variants):
        raise SweepError(
            "the DARE baseline's random stream is reproduced on the CPU only; "
            "run the sweep without --device or without the dare baseline"
        )
    started = time.perf_counter()
    options = MergeOptions(
        device=device,
        copy_tokenizer=copy_tokenizer,
        write_model_card=write_model_card,
        quiet=True,
        lazy_unpickle=False,
    )
    sweep_id = uuid.uuid4().hex
    out_dir = Path(out_dir).absolute()
    with atomic_output_dir(out_dir, overwrite=overwrite) as work:
        loader_cache = LoaderCache()
        loader_cache.setup(options=options)
        plans: List[PlannedVariant] = []
        for variant in variants:
            config = MergeConfiguration.model_validate(copy.deepcopy(variant.recipe))
            arch_info = get_architecture_info(config, options)
            cfg_out = compat.model_out_config(config, arch_info)
            for model in config.referenced_models():
                loader_cache.get(model)
            targets = MergePlanner(config, arch_info, options=options, out_model_config=cfg_out).plan_to_disk(
                out_path=str(work / variant.name)
            )
            saves = compat.save_tasks(targets)
            if len(saves) != len(targets) - 1:
                raise SweepError(f"unexpected extra tasks in the plan of {variant.name}")
            plans.append(PlannedVariant(variant, config, arch_info, cfg_out, saves))

        names = [compat.tensor_name(save) for save in plans[0].saves]
        for planned in plans[1:]:
            if [compat.tensor_name(save) for save in planned.saves] != names:
                raise SweepError(f"{planned.variant.name} plans other output tensors than "
                                 f"{plans[0].variant.name}")
        seeded = tuple(v.seed is not None for v in variants)
        targets = sweep_targets([planned.saves for planned in plans], seeded, sweep_id)
        with seeded_streams(sweep_id, [v.seed for v in variants]):
            executor = Executor(
                targets=targets,
                math_device=torch.device(device),
                storage_device=torch.device("cpu"),
            )
            _execute(executor, len(targets), len(variants), progress)

        manifest = {"variants": []}
        for planned in plans:
            variant, config, arch_info = planned.variant, planned.config, planned.arch_info
            folder = work / variant.name
            planned.out_config.save_pretrained(str(folder))
            config_yaml = yaml.safe_dump(variant.recipe, sort_keys=False)
            if write_model_card:
                card = generate_card(config=config, config_yaml=config_yaml, name=variant.name)
                (folder / "README.md").write_text(card, encoding="utf-8")
            # Always written: eval and tradeoff read the recipe from here.
            (folder / RECIPE_FILE).write_text(config_yaml, encoding="utf-8")
            if copy_tokenizer:
                try:
                    compat.copy_tokenizer(config, str(folder), options)
                except Exception as error:  # as mergekit: the weights are still fine
                    print(f"warning: no tokenizer copied into {variant.name}: {error}")
            compat.copy_tagalong_files(config, str(folder), arch_info.tagalong_files or [], options)
            manifest["variants"].append(
                {
                    "name": variant.name,
                    "method": variant.method,
                    **variant.strength,
                    "seed": variant.seed,
                    "path": str(out_dir / variant.name),
                }
            )
        seconds = time.perf_counter() - started
        manifest["seconds"] = round(seconds, 3)
        manifest["tensors"] = len(names)
        (work / SWEEP_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return SweepResult(out_dir, list(variants), seconds, len(names), manifest)


def _execute(executor, total: int, variants: int, progress: bool) -> None:
    if not progress:
        for _ in executor.run(quiet=True):
            pass
        return
    from rich.console import Console

    from fapm_merge.workflows.progress import progress_reporter

    what = f"{variants} outputs"
    with progress_reporter("sweep", {"tensors": "sweep: output tensors"}, console=Console()) as report:
        report("tensors", 0, total, what)
        for done, _ in enumerate(executor.run(quiet=True), 1):
            report("tensors", done, total, what)


__all__ = [
    "SweepResult",
    "run_sweep",
]
