"""Data that did not choose the model: tune's selection and confirmation parts, and the
check, before the variants are merged, that the selection prompts can decide at all.

* :func:`split_data`: the settings the selection evaluates with and the held-out
  evaluation (``--confirm-task``/``--confirm-text``, or a seeded share of ``--task`` and
  ``--text`` split off into the work folder by :mod:`fapm_merge.evaluation.split`).
* :func:`check_resolvable`: can this many prompts show the retention margin for a
  variant with no true loss? If not, stop with both remedies (more prompts; the margin
  they resolve) instead of evaluating for hours to answer "undecided".
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, Tuple

from fapm_merge.evaluation import noninferiority as ni
from fapm_merge.evaluation.settings import TASK_METRIC, TEXT_METRIC, EvalSettings
from fapm_merge.workflows.tune.plan import TuneError, TuneSettings

DATA_FOLDER = "data"
"""Where in the work folder the split files go."""

CONFIRM_FILE = "confirm.jsonl"
"""The held-out records of the base, the fine-tune and the chosen variant."""


def split_data(work: Path, settings: TuneSettings) -> Tuple[TuneSettings, Optional[EvalSettings]]:
    """The settings the selection evaluates with, and the held-out evaluation (None: no
    held-out check: ``--confirm-share 0`` without both files, or lm-eval axes).

    Args:
        work (`Path`): the work folder (the split files go to its ``data/``).
        settings (`TuneSettings`): resolved settings.
    """
    from fapm_merge.evaluation.split import write_confirmation_split

    given = {"--confirm-task": settings.confirm_task, "--confirm-text": settings.confirm_text}
    if (settings.task_metric, settings.text_metric) != (TASK_METRIC, TEXT_METRIC):
        if any(given.values()):
            raise TuneError("--confirm-task and --confirm-text hold out --task and --text files; "
                            "with lm-eval axes there are none to hold out")
        return settings, None
    if not 0 <= settings.confirm_share < 1:
        raise TuneError(f"--confirm-share must be in [0, 1), got {settings.confirm_share}")
    if settings.confirm_share == 0:
        if all(given.values()):
            return settings, replace(settings.eval, task=settings.confirm_task.absolute(),
                                     text=settings.confirm_text.absolute())
        if any(given.values()):
            missing = next(option for option, path in given.items() if path is None)
            raise TuneError(f"--confirm-share 0 splits nothing off, so {missing} is needed too")
        return settings, None
    evaluation = settings.eval
    files = None
    if settings.confirm_task is None or settings.confirm_text is None:
        try:
            files = write_confirmation_split(
                evaluation.task if settings.confirm_task is None else None,
                evaluation.text if settings.confirm_text is None else None,
                work / DATA_FOLDER, share=settings.confirm_share)
        except ValueError as error:  # EvalInputError: too few prompts or documents to split
            raise TuneError(f"{error}; or give held-out files with --confirm-task/--confirm-text, "
                            "or --confirm-share 0 to skip the held-out check") from None
    task, confirm_task = ((evaluation.task, settings.confirm_task.absolute()) if settings.confirm_task
                          else (files.selection_task, files.confirmation_task))
    text, confirm_text = ((evaluation.text, settings.confirm_text.absolute()) if settings.confirm_text
                          else (files.selection_text, files.confirmation_text))
    return (replace(settings, eval=replace(evaluation, task=task, text=text)),
            replace(evaluation, task=confirm_task, text=confirm_text))


def check_resolvable(prompts: int, accuracy: float, settings: TuneSettings, *, measured: bool) -> None:
    """Stop when ``prompts`` selection prompts cannot show the retention margin even for a
    variant with no true loss that differs from the fine-tune on a share
    :data:`~fapm_merge.evaluation.noninferiority.PLANNING_DISCORDANCE` of the prompts
    (80% power; the repair rule only).

    Args:
        prompts (`int`): selection prompts.
        accuracy (`float`): the fine-tune's accuracy, or 1 before it is measured (the
            widest margin it can give).
        settings (`TuneSettings`): the rule.
        measured (`bool`): whether ``accuracy`` was measured (the message says so).
    """
    rule = settings.rule
    if rule.kind != "repair" or settings.task_metric != TASK_METRIC:
        return
    margin = ni.margin_for(rule.min_retention, accuracy)
    resolvable = ni.resolvable_margin(prompts, ni.PLANNING_DISCORDANCE)
    if resolvable <= margin:
        return
    needed = ni.prompts_needed(margin, ni.PLANNING_DISCORDANCE)
    retention = max(0.0, 1 - resolvable / accuracy)
    raise TuneError(
        f"the {prompts} selection prompts cannot show that a variant keeps {rule.min_retention:g} of the "
        f"fine-tune's accuracy{f' ({accuracy:.3f})' if measured else ''}: that is a margin of "
        f"{margin:.3f}, and these prompts resolve about {resolvable:.3f} (80% power for a variant with "
        f"no true loss that answers {ni.PLANNING_DISCORDANCE:.0%} of the prompts differently). Every "
        f"variant would come out 'undecided'. Either give about {needed} selection prompts, or ask "
        f"for what these can show: --min-retention {retention:.3f} (docs/choosing-sparsity.md)")


__all__ = ["CONFIRM_FILE", "DATA_FOLDER", "check_resolvable", "split_data"]
