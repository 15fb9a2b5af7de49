"""The ``fapm-merge`` command: a click group; each command's logic lives in the library."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import click

from fapm_merge.core.errors import FapmMergeError
from fapm_merge.core.rules import DEFAULT_BETA, DEFAULT_LORA_SPARSITY, DEFAULT_SPARSITY, FAPM, FAPM_LORA
from fapm_merge.evaluation.settings import (
    EVAL_DTYPES,
    LM_EVAL_BACKENDS,
    LM_EVAL_LOADING_BACKENDS,
    TASK_METRIC,
    TEXT_METRIC,
    EvalSettings,
)
from fapm_merge.workflows.tradeoff import RULES, SELECTIONS, Rule
from fapm_merge.workflows.tune import DEFAULT_ALPHAS, DEFAULT_BETAS, DEFAULT_SPARSITIES, FAMILY_BETAS, TuneSettings


EXIT_NOTHING_SELECTED = 3
"""Exit status of ``tradeoff`` and ``tune`` when the rule selects no model (not an error)."""


def _listed(values) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


@click.group()
@click.version_option(package_name="fapm-merge")
def main():
    """fapm-merge: FAPM (Forgetting-Aware Pruning, arXiv 2509.08255) for mergekit.

    The merge itself runs through plain `mergekit-yaml recipe.yml out/` with
    `merge_method: fapm`; these commands help around it.
    """


def _check_device(ctx, param, value: str) -> str:
    """A --device value torch accepts and this machine has (checked before any work)."""
    from fapm_merge.core.devices import DeviceError, check_device

    try:
        check_device(value)
    except DeviceError as error:
        raise click.BadParameter(str(error)) from None
    return value


def _refuse_cuda_flag(ctx, param, value):
    if value:
        raise click.UsageError("--cuda is mergekit-yaml's flag; here it is --device cuda "
                               "(or cuda:1, ...)", ctx=ctx)


# mergekit-yaml users type --cuda; click alone would answer "No such option"
_cuda_flag = click.option("--cuda", is_flag=True, hidden=True, expose_value=False,
                          callback=_refuse_cuda_flag)


def _absolute(ctx, param, value):
    """A folder the harness reads later, maybe from another working folder (Ray)."""
    return value.absolute() if value is not None else None


def _check_plot_path(ctx, param, value):
    """--plot must name a file type matplotlib writes (checked before any work)."""
    if value is not None and value.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise click.BadParameter(f"{value}: give a .png (or .pdf, .svg) path")
    return value


def _options(*decorators):
    """Apply click options in the order they are listed (as they read in --help)."""

    def apply(function):
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


class _FieldOption(click.Option):
    """An option that sets the field of its name of a settings dataclass, ``owner``
    (see `_takes`)."""

    def __init__(self, *declarations, owner: type, **attributes):
        super().__init__(*declarations, **attributes)
        self.owner = owner


def _field_option(owner: type, name: str, *declarations: str, **attributes):
    """The option for field NAME of the dataclass OWNER (``--name`` unless declared
    otherwise): its default is the field's (a sequence written comma-separated),
    shown in --help when there is one; ``default=`` overrides it."""
    if "default" in attributes:
        default = attributes.pop("default")
    else:
        default = next(f.default for f in dataclasses.fields(owner) if f.name == name)
        if isinstance(default, (tuple, list)):
            default = _listed(default)
    attributes.setdefault("show_default", default is not None and not attributes.get("is_flag"))
    return click.option(*(declarations or (f"--{name.replace('_', '-')}",)), name,
                        cls=_FieldOption, owner=owner, default=default, **attributes)


def _takes(owner: type, argument: str, build=None, *, parts=()):
    """Hand the command's options for OWNER's fields to it as one ARGUMENT,
    ``build(**values)`` (default: ``owner(**values)``), as mergekit's add_merge_options
    hands over one MergeOptions; a FapmMergeError becomes the command's error.

    ``parts``: arguments made by `_takes` decorators above this one that ``build``
    takes too (tune's settings hold its evaluation settings and its rule). Put the
    decorators right below the command decorator, above every option.
    """

    def decorate(function):
        fields = [param.name for param in getattr(function, "__click_params__", ())
                  if isinstance(param, _FieldOption) and param.owner is owner]

        @functools.wraps(function)
        def command(**values):
            given = {name: values.pop(name) for name in (*fields, *parts)}
            try:
                made = (build or owner)(**given)
            except FapmMergeError as error:
                raise click.ClickException(str(error)) from None
            return function(**{argument: made}, **values)

        return command

    return decorate


_eval_option = functools.partial(_field_option, EvalSettings)
_takes_eval_settings = _takes(EvalSettings, "evaluation")

_eval_options = _options(  # shared by eval and tune
    _eval_option("tokenizer", help="Tokenizer folder (default: each model's own), or 'bytes' for tokenizer-less toy models."),
    _eval_option("window", type=click.IntRange(1), help="Tokens per text window (non-overlapping)."),
    _eval_option("batch_size", type=click.IntRange(1), help="Windows per forward pass."),
    _eval_option("max_tokens", type=click.IntRange(2), help="Use only the first N tokens of --text."),
    _eval_option("use_bos", "--bos/--no-bos", help="Prepend the tokenizer's BOS token to each window and prompt."),
    _eval_option("device", callback=_check_device, help="cpu, cuda, cuda:1, ..."),
    _eval_option("dtype", type=click.Choice(EVAL_DTYPES), help="Model dtype for evaluation."),
)

_RULE_SETTING_HELP = {
    "min_retention": "least share of the fine-tune's accuracy a variant must be shown to keep.",
    "min_repair": "least share of the fine-tune's CF a variant must take away.",
    "max_cf": "largest CF% on the text allowed; selects the best accuracy under it.",
    "task_weight": "maximise TASK_WEIGHT * task_norm + general_norm.",
}
"""What each `Rule` setting means; its option is named after the rule that reads it."""


def _rule_default(name: str):
    return next(f.default for f in dataclasses.fields(Rule) if f.name == name)


_IMPLIED_RULES = {setting: selection.name for selection in SELECTIONS.values()
                  for setting in selection.parameters if _rule_default(setting) is None}
"""A setting without a default names its rule when given alone (--max-cf: max-cf)."""


def _rule(kind=None, **settings) -> Rule:
    """The selection rule the rule options describe: --rule, else the rule of a setting
    without a default that was given, else the first rule (TradeoffError if they cannot)."""
    if kind is None:
        kind = next((rule for setting, rule in _IMPLIED_RULES.items()
                     if settings.get(setting) is not None), RULES[0])
    return Rule(kind, **settings)


_rule_options = _options(  # shared by tradeoff and tune
    _field_option(Rule, "kind", "--rule", type=click.Choice(RULES), default=None, help=(
        f"Selection rule (default {RULES[0]}; "
        + "; ".join(f"--{setting.replace('_', '-')} alone implies {rule}"
                    for setting, rule in _IMPLIED_RULES.items()) + ").")),
    *(_field_option(Rule, setting, type=float, help=f"{selection.name}: {_RULE_SETTING_HELP[setting]}")
      for selection in SELECTIONS.values() for setting in selection.parameters),
)
_takes_rule = _takes(Rule, "rule", _rule)


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--sparsity", default=DEFAULT_SPARSITY, show_default=True, type=click.FloatRange(0.0, 1.0), help="Share of each task vector reset to the base.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT_DIR.")
def demo(out_dir: Path, sparsity: float, overwrite: bool):
    """Make a small Llama-shaped base/fine-tune pair locally and repair it with FAPM.

    Writes OUT_DIR/models/{base,finetuned}, OUT_DIR/recipe.yml and the merged model
    in OUT_DIR/merged, by running the real `mergekit-yaml` on the recipe.
    """
    from rich.console import Console

    from fapm_merge.workflows.demo import run_demo

    console = Console()
    try:
        result = run_demo(out_dir, sparsity=sparsity, overwrite=overwrite, console=console)
    except FapmMergeError as error:
        raise click.ClickException(str(error)) from None
    summary = result.summary
    console.print(summary.table(title=f"FAPM demo, sparsity {sparsity}"))
    console.print(
        f"{summary.tensors} tensors, kept {summary.kept_share:.2%} of task-vector entries "
        f"and {summary.energy_kept:.2%} of its energy (L2²); merge {result.merge_seconds:.1f} s, "
        f"total {result.seconds:.1f} s"
    )
    console.print(f"model card: {result.merged / 'README.md'}")


# Choosing the sparsity: analyze, sweep, eval, tradeoff (the logic lives in the library).


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--sparsity", "sparsity", default=None, help="Comma-separated shares reset to the base, e.g. 0.5,0.7,0.9,0.95.")
@click.option("--density", "density", default=None, help="Comma-separated kept shares instead (density = 1 - sparsity).")
@click.option("--beta", "betas", default=None, help="FAPM balance factors (>= 0), comma-separated, each at every value: 0 is magnitude pruning (magnitude-s0.9), 1 the paper's score (fapm-s0.9), others fapm-b0.5-s0.9 (default: the recipe's beta).")
@click.option("--baselines", default="", help="Comma-separated: magnitude (FAPM beta 0), dare (dare_linear), wiseft (task_arithmetic, W_pre + alpha*dW), lines (LiNeS: task_arithmetic with weight [alpha, 1] over the layers), depth (FAPM with sparsity falling over the layers).")
@click.option("--alpha", "alphas", default=None, help="WiSE-FT strengths (default: the densities of the sweep).")
@click.option("--seed", default=0, show_default=True, help="DARE seed (same stream as mergekit-yaml --random-seed SEED).")
@click.option("--device", default="cpu", show_default=True, callback=_check_device, help="Math device, e.g. cuda.")
@_cuda_flag
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True, help="Copy the base model's tokenizer into every output.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT_DIR.")
def sweep(recipe, out_dir, sparsity, density, betas, baselines, alphas, seed, device, copy_tokenizer, overwrite):
    """Write one merged model per value into OUT_DIR, reading every input tensor once.

    RECIPE is a mergekit recipe with merge_method: fapm (or fapm_lora, whose
    baselines magnitude and wiseft run on the same LoRA update) and a base_model. Each
    output folder OUT_DIR/<method>-s<value> (-d<value> with --density, wiseft-a<alpha>)
    equals `mergekit-yaml` run on the
    mergekit_config.yml written inside it, bit for bit, when its output folder has
    the variant's name (mergekit titles the model card with it); OUT_DIR/sweep.json
    lists the outputs. OUT_DIR appears only when every output is complete. A failure
    names its cause (a recipe path, the GPU, the disk, an input) and the fix.
    """
    from rich.console import Console

    from fapm_merge.io.failures import explain_failure
    from fapm_merge.workflows.sweep import run_sweep
    from fapm_merge.workflows.variants import SweepError, build_variants, load_recipe, parse_values

    console = Console(stderr=True)
    parsed, variants = None, None
    try:
        parsed = load_recipe(recipe)
        variants = build_variants(
            parsed,
            sparsities=parse_values(sparsity, "--sparsity") if sparsity else None,
            densities=parse_values(density, "--density") if density else None,
            betas=parse_values(betas, "--beta", high=None) if betas else None,
            baselines=[b.strip() for b in baselines.split(",") if b.strip()],
            alphas=parse_values(alphas, "--alpha") if alphas else None,
            seed=seed,
        )
        result = run_sweep(variants, out_dir, overwrite=overwrite, device=device, copy_tokenizer=copy_tokenizer)
    except (SweepError, FileExistsError) as error:
        raise click.ClickException(str(error)) from None
    except Exception as error:
        # raised inside mergekit/transformers/huggingface_hub/safetensors/torch: name
        # the cause (a recipe path, the GPU, the disk, an input), not the symptom;
        # anything else still gets one line with its type, and what to run next
        cause = explain_failure(error, recipe=parsed, recipe_path=recipe, out_dir=out_dir,
                                outputs=len(variants) if variants else 1)
        raise click.ClickException(f"the sweep stopped, nothing was written: {cause}") from None
    console.print(
        f"{len(variants)} models, {result.tensors} tensors each, in {result.seconds:.1f} s: "
        + ", ".join(v.name for v in variants)
    )
    console.print(f"manifest: {result.out_dir / 'sweep.json'}")
    # the output folder's name titles mergekit's model card: keep the variant's name
    console.print(f"to write one again, bit for bit: mergekit-yaml {result.out_dir}/NAME/mergekit_config.yml "
                  f"DIR/NAME{'' if copy_tokenizer else ' --no-copy-tokenizer'}"
                  + (f" (dare: --random-seed {seed})" if any(v.seed is not None for v in variants) else ""))


@main.command(name="eval")
@_cuda_flag
@_takes_eval_settings
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@_eval_option("text", type=click.Path(exists=True, path_type=Path), help="General text: mean token loss and perplexity. A text file (one document), a .jsonl of {\"text\": ...} lines or a folder of .txt files (one document each; windows never cross documents).")
@_eval_option("task", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="JSONL of {prompt, answer} (greedy exact match) or {prompt, choices, answer} (log-likelihood), each optionally with a group (prompts are resampled by group).")
@click.option("--out", "results", type=click.Path(dir_okay=False, path_type=Path), default=Path("results.jsonl"), show_default=True, help="Results file; one JSON line is appended per model.")
@_eval_options
@_eval_option("lm_eval_tasks", "--lm-eval", help="Comma-separated lm-evaluation-harness tasks (needs the 'eval' extra); per-sample metrics are kept as lm_eval:TASK/METRIC.")
@_eval_option("lm_eval_limit", type=int, help="Examples per lm-eval task (for quick runs).")
@_eval_option("lm_eval_backend", type=click.Choice(LM_EVAL_BACKENDS), help="How the harness runs the model: transformers here, vLLM (GPUs), or a completions server.")
@_eval_option("lm_eval_model_args", help="Passed to the harness's model_args, e.g. dtype=bfloat16,tensor_parallel_size=8,gpu_memory_utilization=0.8 (docs/scale.md).")
@_eval_option("lm_eval_include", type=click.Path(exists=True, file_okay=False, path_type=Path), callback=_absolute, help="Folder of your own lm-eval task YAML files (examples/lm_eval_task).")
def eval_command(models, results, evaluation: EvalSettings):
    """Evaluate MODEL folders; append one JSON line per model to --out.

    A MODEL that is a sweep folder (it holds sweep.json) stands for all its
    outputs. Each line carries the model's mergekit_config.yml when present, so
    `fapm-merge tradeoff` knows the method and strength of every point.
    """
    from rich.console import Console

    from fapm_merge.evaluation.evaluate import evaluate_model
    from fapm_merge.evaluation.results import append_result, expand_models, progress_line
    from fapm_merge.workflows.progress import LogLines

    console = Console(stderr=True)
    try:
        folders = expand_models(models)
        results.parent.mkdir(parents=True, exist_ok=True)  # fail now, not after the models
    except FapmMergeError as error:
        raise click.ClickException(str(error)) from None
    except OSError as error:
        raise click.ClickException(f"cannot write --out {results}: {error.strerror}") from None
    if results.is_dir():
        raise click.ClickException(f"--out {results} is a folder; give the path of a results file")
    # a log (stderr not a terminal) gets a timestamped line as each model starts and
    # ends, with what is left; a terminal a spinner, then the model's line
    log = None if console.is_terminal else LogLines("eval", stream=console.file)
    for number, folder in enumerate(folders, 1):
        try:
            if log is not None:
                log("models", number - 1, len(folders), f"evaluating {folder}")
                record = evaluate_model(folder, evaluation)
            else:
                with console.status(f"[{number}/{len(folders)}] evaluating {folder}"):
                    record = evaluate_model(folder, evaluation)
        except FapmMergeError as error:
            raise click.ClickException(f"{folder}: {error}") from None
        append_result(results, record)
        if log is not None:
            log("models", number, len(folders), progress_line(number, len(folders), record, width=10**6))
        else:
            click.echo(progress_line(number, len(folders), record), err=True)
    console.print(f"appended {len(folders)} line(s) to {results}")


@main.command()
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The YAML recipe OUT_DIR was made from (default: OUT_DIR/mergekit_config.yml, "
                   "which mergekit writes last): also check the card, presence and FAPM invariants.")
@click.option("--no-model-card", is_flag=True,
              help="The merge ran with --no-write-model-card: do not expect README.md and "
                   "mergekit_config.yml.")
@click.option("--checkpoint-only", is_flag=True,
              help="OUT_DIR is not a merge (an input model, a download): check its files only.")
def verify(out_dir: Path, recipe, no_model_card: bool, checkpoint_only: bool):
    """Check a merged model folder before using it.

    Every shard opens, the index matches the shards, config.json describes the
    tensors, every tensor is finite; with the recipe (--recipe, or the
    mergekit_config.yml mergekit writes into OUT_DIR last, so a folder without
    one did not finish and is refused), the model card is there,
    every input tensor is present with its shape, recipe keys mergekit ignores
    are flagged, and one-model fapm outputs are recomputed bit for bit. The
    report lists what was and was not checked. Exit status 1 when anything is
    wrong. Also useful on an input folder, to find a truncated download
    (--checkpoint-only).
    """
    from fapm_merge.io.recipe import load_recipe
    from fapm_merge.workflows.verify import format_report, verify_output

    try:
        parsed = load_recipe(recipe) if recipe else None
    except FapmMergeError as error:
        raise click.ClickException(str(error)) from None
    report = verify_output(out_dir, parsed, model_card=not no_model_card,
                           checkpoint_only=checkpoint_only)
    click.echo(format_report(report))
    if not report.ok:
        raise SystemExit(1)


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--cuda", is_flag=True, help="The merge will run with mergekit-yaml --cuda: check that torch here has a GPU.")
@click.option("--device", default=None, help="The merge's mergekit --device (cuda, cuda:1, cpu, ...): check it exists here.")
@click.option("--intermediate-dir", default=None, help="mergekit-multi's --intermediate-dir: check how stages will be read back.")
def lint(recipe: Path, cuda: bool, device, intermediate_dir):
    """Find recipe mistakes that plain mergekit-yaml accepts silently.

    mergekit 0.1.5 drops unknown parameter names without a word (a typo such as
    `spasity: 0.5` merges at the default 0.9) and ignores shared parameters written
    per model. Also checks values, required parameters and model paths the way
    mergekit will read them from this directory (missing folders; relative paths
    its model card sends to the Hugging Face hub). A mergekit-multi file is checked
    stage by stage. Run this before a long merge, from the directory you will merge
    in, with the --cuda/--device you will pass; exit status 1 when anything is found.
    """
    from fapm_merge.core.devices import merge_device_problems
    from fapm_merge.io.lint import lint_documents
    from fapm_merge.io.recipe import load_recipe_documents
    from fapm_merge.methods import register_methods

    register_methods()  # lint reads the methods' parameter specs

    try:
        documents = load_recipe_documents(recipe)
    except FapmMergeError as error:
        raise click.ClickException(str(error)) from None
    problems, notes = lint_documents(documents, intermediate_dir=intermediate_dir)
    lines = [str(problem) for problem in problems]
    if cuda or device:
        lines += merge_device_problems("cuda" if cuda and not device else device,
                                       "--cuda" if cuda and not device else f"--device {device}")
    for line in lines:
        click.echo(line)
    for note in notes:
        click.echo(f"note: {note}")
    if lines:
        raise SystemExit(1)
    click.echo(f"{recipe}: no problems found")


@main.command()
@_takes_rule
@click.argument("results", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_rule_options
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None, callback=_check_plot_path, help="PNG to write (default: RESULTS with .png).")
@click.option("--json", "json_path", is_flag=False, flag_value="-", default=None, type=click.Path(dir_okay=False, allow_dash=True, path_type=Path), help="Write the table and the decision as JSON to PATH; `--json` alone prints only the JSON, for scripts.")
@click.option("--base", default=None, help="Path of the base model's record (default: the recipes' base_model).")
@click.option("--finetuned", default=None, help="Path of the fine-tuned model's record (default: the recipes' fine-tuned model).")
@click.option("--title", default="", help="Plot title.")
@click.option("--task-metric", default=TASK_METRIC, show_default=True, help=f"Task axis: {TASK_METRIC!r} (eval --task accuracy) or an lm-eval per-sample metric, lm_eval:TASK/METRIC (e.g. lm_eval:arc_easy/acc).")
@click.option("--text-metric", default=TEXT_METRIC, show_default=True, help=f"General axis: {TEXT_METRIC!r} (eval --text loss) or an lm-eval perplexity task, lm_eval:TASK (e.g. lm_eval:wikitext).")
@click.option("--confirm", "confirm_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Results of the base, the fine-tune and the selected model on held-out --task/--text (same model paths): report the selection's numbers from there.")
def tradeoff(results, rule: Rule, plot_path, json_path, base, finetuned, title, task_metric, text_metric,
             confirm_path):
    """Place every evaluated model of RESULTS (from `fapm-merge eval`) on the
    forgetting / task plane, with paired 95% intervals, and select one by a stated rule.

    \b
    repair (default): a variant qualifies when the data SHOW that it keeps
      --min-retention of the fine-tune's accuracy (one-sided 95% lower bound of the
      paired difference, Tango's interval) and forgets significantly less, by at
      least --min-repair of the fine-tune's CF; the one that repairs the most wins
      (indistinguishable ones: higher accuracy, then the milder edit). The
      fine-tune's own forgetting must be significant. Else nothing is selected:
      "undecided" (too few prompts; how many would do) or "no variant qualifies".
    max-cf: the best accuracy among points with CF <= --max-cf %.
    weighted: maximise --task-weight * task_norm + general_norm.

    CF% = 100 (PPL - PPL_base) / PPL_base on eval's --text; CF cut = the fine-tune's
    CF minus the model's. The numbers the selection rests on were measured on the data
    that chose it: --confirm checks them on held-out data. Exit status 3 when nothing
    is selected.
    """
    import json as json_module

    from rich.console import Console

    from fapm_merge.evaluation.lm_eval import resolve_axes
    from fapm_merge.workflows.plots import plot_tradeoff
    from fapm_merge.workflows.tradeoff import (
        compute_tradeoff,
        confirm,
        read_results,
        summary_lines,
        tradeoff_table,
    )

    to_stdout = json_path is not None and str(json_path) == "-"
    console = Console(stderr=to_stdout)
    try:
        axes = resolve_axes(task_metric, text_metric)
        result = compute_tradeoff(read_results(results), base=base, finetuned=finetuned, rule=rule,
                                  task_metric=axes.task, text_metric=axes.text)
        if confirm_path is not None and result.selected is not None:
            result.confirmation = confirm(result, read_results(confirm_path))
    except FapmMergeError as error:
        raise click.ClickException(str(error)) from None
    plot_path = plot_path or results.with_suffix(".png")
    plot_tradeoff(result, plot_path, title=title)
    document = {**result.to_json(), "plot": str(plot_path)}
    if to_stdout:
        click.echo(json_module.dumps(document))
    else:
        console.print(tradeoff_table(result, width=console.width))
        for line in summary_lines(result):
            console.print(line, markup=False, highlight=False)
        if json_path:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json_module.dumps(document, indent=2) + "\n")
        console.print(f"plot: {plot_path}", markup=False, highlight=False)
    if result.selected is None:  # as tune: a script can tell "nothing qualifies" apart
        raise SystemExit(EXIT_NOTHING_SELECTED)


_tune_option = functools.partial(_field_option, TuneSettings)


def _tune_settings(evaluation: EvalSettings, rule: Rule, sparsities, betas, baselines, alphas, **settings):
    """The `TuneSettings` tune's options describe (SweepError for a malformed list)."""
    from fapm_merge.workflows.variants import parse_values

    return TuneSettings(
        sparsities=parse_values(sparsities, "--sparsity") if sparsities else None,
        betas=parse_values(betas, "--beta", high=None) if betas else None,
        baselines=[b.strip() for b in baselines.split(",") if b.strip()],
        alphas=parse_values(alphas, "--alpha") if alphas else None,
        rule=rule, eval=evaluation, device=evaluation.device, **settings)


@main.command()
@_cuda_flag
@_takes_eval_settings
@_takes_rule
@_takes(TuneSettings, "settings", _tune_settings, parts=("evaluation", "rule"))
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@_tune_option("text", type=click.Path(exists=True, path_type=Path), help="General text (a file, a .jsonl of {\"text\": ...} documents or a folder of .txt files, as for eval): forgetting as CF% (perplexity against the base). Needed unless --text-metric is an lm-eval task.")
@_tune_option("task", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Task JSONL (as for eval): accuracy, and what the fine-tune must keep. Needed unless --task-metric is an lm-eval metric.")
@_tune_option("task_metric", help=f"Task axis: {TASK_METRIC!r} (the --task file) or lm_eval:TASK/METRIC, a per-sample harness metric (e.g. lm_eval:arc_easy/acc).")
@_tune_option("text_metric", help=f"General axis: {TEXT_METRIC!r} (the --text file) or lm_eval:TASK, a harness perplexity task (e.g. lm_eval:wikitext).")
@_eval_option("lm_eval_backend", type=click.Choice(LM_EVAL_LOADING_BACKENDS), help="How the harness runs each model: transformers, or vLLM on GPUs.")
@_eval_option("lm_eval_model_args", help="Passed to the harness's model_args, e.g. dtype=bfloat16,tensor_parallel_size=8 (docs/scale.md).")
@_eval_option("lm_eval_include", type=click.Path(exists=True, file_okay=False, path_type=Path), callback=_absolute, help="Folder of your own lm-eval task YAML files.")
@_eval_option("lm_eval_limit", type=click.IntRange(1), help="Documents per lm-eval task (quick runs).")
@_tune_option("confirm_task", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Held-out task JSONL: the base, the fine-tune and the chosen model are scored on it after the decision (default: --confirm-share of --task, split off).")
@_tune_option("confirm_text", type=click.Path(exists=True, path_type=Path), help="Held-out text (file, .jsonl of documents or folder of .txt) for the same check (default: --confirm-share of --text's documents, split off).")
@_tune_option("confirm_share", type=float, help="Share of --task's prompts (whole groups) and --text's documents held out for the check; 0: no check unless both --confirm files are given.")
@_tune_option("screen", "--screen/--no-screen", help="Screen every variant on --screen-share of the selection data first; only those not already shown out (accuracy clearly below the margin, repair clearly below the best's, beyond two points of a line not shown to keep the task) are evaluated on the rest (each line screened mildest first, its strongest survivor to the rest first; on each part the text first, the prompts only where it leaves the variant in, the rest's text only where all the prompts show it keeps the task). The FAPM betas default to the family then. Skipped, with the reason, where the data cannot be cut (lm-eval axes, one-document text, --max-tokens) or the rule is not repair.")
@_tune_option("screen_share", type=float, help="Share of the selection prompts (whole groups) and documents every variant is screened on.")
@_tune_option("ray", is_flag=False, flag_value="local", help="Run the variants as Ray tasks (extra 'distributed'): --ray alone starts Ray here; --ray ADDRESS joins a cluster (auto, HOST:6379).")
@_tune_option("ray_gpus", type=click.IntRange(1), help="GPUs per Ray task with --device cuda (vLLM's tensor_parallel_size).")
@_tune_option("sparsities", "--sparsity", help=f"FAPM values, comma-separated (default: {_listed(DEFAULT_SPARSITIES[FAPM])} for {FAPM}; {_listed(DEFAULT_SPARSITIES[FAPM_LORA])} for {FAPM_LORA}).")
@_tune_option("betas", "--beta", help=f"FAPM balance factors (>= 0), each at every sparsity (default: the family {_listed(FAMILY_BETAS)} when screening, else {_listed(DEFAULT_BETAS)}; zero is magnitude pruning, one the paper's score).")
@_tune_option("baselines", help="Comma-separated: magnitude, wiseft, lines (LiNeS), depth (FAPM with a per-layer sparsity), dare (fapm only); empty for none.")
@_tune_option("alphas", "--alpha", help=f"WiSE-FT strengths (default {_listed(DEFAULT_ALPHAS[FAPM])}; {FAPM_LORA} {_listed(DEFAULT_ALPHAS[FAPM_LORA])}).")
@_tune_option("seed", help="DARE seed (mergekit-yaml --random-seed).")
@_rule_options
@_tune_option("max_on_disk", type=click.IntRange(1), help="Variants on disk at once (each is a full checkpoint).")
@_tune_option("keep_variants", is_flag=True, help="Keep every variant's weights in the work folder.")
@_tune_option("work_dir", "--work", type=click.Path(file_okay=False, path_type=Path), help="Work folder (results, plan, plot; default OUT_DIR.tune). Rerunning resumes there.")
@_tune_option("restart", is_flag=True, help="Discard the work folder's earlier results.")
@_tune_option("overwrite", is_flag=True, help="Replace an existing OUT_DIR.")
@_eval_options
@_tune_option("copy_tokenizer", "--copy-tokenizer/--no-copy-tokenizer", help="Copy the base's tokenizer into outputs (default: when the base has one).")
def tune(recipe, out_dir, settings: TuneSettings):
    """Sweep, evaluate, decide and write the chosen model to OUT_DIR, in one command.

    RECIPE is a mergekit recipe with merge_method: fapm (a full fine-tune; one
    fine-tuned model) or fapm_lora (a PEFT LoRA adapter). tune evaluates the base,
    the fine-tune and every variant (FAPM values plus baselines) on --text and
    --task, keeping at most --max-on-disk variants on disk, applies the rule
    (see `fapm-merge tradeoff --help`) and rebuilds the chosen variant from its
    recipe with mergekit, with a model card holding the evidence. Interrupted?
    Run the same command again: finished evaluations are reused.

    Screening (default; --no-screen to switch it off): every variant is first
    evaluated on --screen-share of the selection data; only those it does not
    already show out go on to the rest (the work folder's screening.json says
    why each went; docs/choosing-sparsity.md).

    The axes can come from lm-evaluation-harness (--task-metric, --text-metric),
    and the variants can run as Ray tasks (--ray): see docs/scale.md.

    Exit status 3 when no variant is chosen (nothing is written; the work folder
    holds the table and the plot).
    """
    import shlex
    import sys

    from rich.console import Console

    from fapm_merge.io.recipe import load_recipe
    from fapm_merge.workflows.progress import progress_reporter
    from fapm_merge.workflows.tradeoff import summary_lines, tradeoff_table
    from fapm_merge.workflows.tune import run_tune
    from fapm_merge.workflows.tune.workdir import work_folder

    console = Console()
    try:
        parsed = load_recipe(recipe)
    except FapmMergeError as error:
        raise click.ClickException(str(error)) from None
    names = {"anchors": "evaluate base and fine-tune", "variants": "merge + evaluate variants",
             "screen": "screen variants on a share", "rest": "evaluate survivors on the rest",
             "decision": "decide", "confirm": "check the choice on held-out data",
             "rebuild": "rebuild the chosen model"}
    with progress_reporter("tune", names, console=console) as progress:
        try:
            result = run_tune(parsed, out_dir, settings, progress=progress,
                              command=" ".join(shlex.quote(a) for a in ["fapm-merge", *sys.argv[1:]]))
        except KeyboardInterrupt:
            # click would print "Aborted!" and nothing about the finished work
            click.echo(f"\ninterrupted: run the same command to resume (finished evaluations are "
                       f"kept in the work folder {work_folder(out_dir, settings.work_dir)})", err=True)
            raise SystemExit(130) from None
        except (FapmMergeError, FileExistsError) as error:
            raise click.ClickException(str(error)) from None
        except Exception as error:
            # raised inside mergekit/transformers/torch during a merge or an evaluation:
            # the cause (a recipe path, the GPU, the disk, memory), as sweep names it
            from fapm_merge.io.failures import explain_failure

            cause = explain_failure(error, recipe=parsed, recipe_path=recipe,
                                    out_dir=out_dir, outputs=settings.max_on_disk)
            raise click.ClickException(
                f"tune stopped: {cause}. OUT_DIR was not written; finished evaluations are "
                "kept in the work folder, so the same command resumes") from None
    console.print(tradeoff_table(result.tradeoff, width=console.width))
    for line in summary_lines(result.tradeoff):
        console.print(line, markup=False, highlight=False)
    if result.screening:
        console.print(result.screening, markup=False, highlight=False)
    console.print(f"{result.evaluated} evaluated, {result.reused} reused, {result.seconds:.0f} s; "
                  f"work folder {result.work_dir}; plot {result.plot}", markup=False, highlight=False)
    console.print(result.message, markup=False, highlight=False)
    if result.out_dir is None:
        raise SystemExit(EXIT_NOTHING_SELECTED)


@main.command()
@click.argument("base", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("finetuned", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--adapter", default=None, help="A PEFT LoRA adapter folder on BASE instead of FINETUNED.")
@click.option("--sparsity", type=float, default=None, help=f"Share FAPM resets (default {DEFAULT_SPARSITY}; {DEFAULT_LORA_SPARSITY} with --adapter).")
@click.option("--beta", type=float, default=DEFAULT_BETA, show_default=True, help="The score's balance factor.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write every statistic as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None, callback=_check_plot_path, help="PNG with layer x module heatmaps and the score histogram.")
@click.option("--json-only", is_flag=True, help="Print the JSON to stdout and nothing else (for scripts).")
def analyze(base, finetuned, adapter, sparsity, beta, json_path, plot_path, json_only):
    """Show what FAPM would keep of FINETUNED - BASE, tensor by tensor, before merging.

    Streams both checkpoints one tensor at a time. Per layer: entries, share
    changed, share of positive scores, task-vector energy (L2²) kept by FAPM and
    by magnitude pruning at the same sparsity, and the overlap of the two masks.
    """
    import json as json_module

    from rich.console import Console

    from fapm_merge.workflows.analyze import analysis_table
    from fapm_merge.workflows.analyze import analyze as run_analysis

    if (finetuned is None) == (adapter is None):
        raise click.UsageError("give FINETUNED or --adapter (one of them)")
    try:
        result = run_analysis(base, finetuned, adapter=adapter, sparsity=sparsity, beta=beta, progress=not json_only)
    except (FapmMergeError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    document = result.to_json()
    if json_only:
        click.echo(json_module.dumps(document))
        return
    console = Console()
    console.print(analysis_table(result))
    for note in result.skipped:
        console.print(f"[yellow]skipped[/yellow] {note}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json_module.dumps(document, indent=1) + "\n")
        console.print(f"statistics: {json_path}")
    if plot_path:
        from fapm_merge.workflows.plots import plot_analysis

        plot_analysis(result.heatmaps(), result.histogram, plot_path,
                      title=f"FAPM at sparsity {result.settings['sparsity']:g}: {Path(base).name} → "
                            f"{Path(finetuned).name if finetuned else adapter}")
        console.print(f"plot: {plot_path}")
