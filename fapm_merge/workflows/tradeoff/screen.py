"""Screen, then decide: drop the candidates a share of the selection data already shows out.

Tune's cost is evaluation. Most of a large family (FAPM over sparsity x beta, LiNeS,
depth schedules, WiSE-FT) is far from the pick: strong edits lose the task, mild ones
repair little. So every candidate is first evaluated on a seeded **screening share**
(:data:`SCREEN_SHARE` of the selection prompts, or of their groups, and of the text's
documents: :func:`screening_share`); only the survivors are evaluated on the rest, and
their two records make the record on the whole selection data (:func:`combine`), on
which the repair rule decides as without screening (:mod:`.rules`).

A candidate is declared **out** (:func:`screen`) only when the screening share already
shows it out, at a stricter level than the decision's (:data:`SCREEN_CONFIDENCE`):

(a) **accuracy**: it is clearly below the non-inferiority bound: the one-sided upper
    bound of its paired accuracy difference to the fine-tune (Tango's score interval,
    :func:`fapm_merge.evaluation.noninferiority.noninferior`) lies below ``-margin``;
    or, once evaluated on all the selection prompts, the decision's own test there does
    not show it keeps the task: then it cannot qualify whatever its repair (an exact
    consequence, no error), and the rest of the text is not spent on it;
(b) **repair**: it repairs clearly less than the **leader**: the one-sided lower bound
    of its paired loss difference to the leader lies above 0
    (:func:`fapm_merge.evaluation.stats.loss_difference`, a studentized interval over
    whole documents: :data:`SCREEN_INTERVAL`). The leader is the candidate with the
    lowest loss on the share (the largest CF cut) among those shown to keep the task at
    the decision's own level (one-sided 95% lower bound above ``-margin``): on all the
    selection data when it was evaluated there, else on the share. An out on repair is **provisional**: it
    holds only once the leader qualifies on the whole selection data. When it does
    not, it may no longer lead, the next one leads, and what it alone showed out goes
    on to the rest (:func:`run_screening`): a leader that fails would otherwise take
    with it the candidates it had dropped, among them, possibly, the exhaustive
    decision's pick;
(c) **line**: along a monotone line (one method label, growing strength: sparsity up,
    WiSE-FT / LiNeS alpha down; :func:`fapm_merge.workflows.tradeoff.rules.edit_size`),
    once :data:`LINE_STOP` consecutive points are not shown to keep the task, the
    stronger points of that line are out without being evaluated further: accuracy
    only falls as an edit grows (an assumption about the edits, stated: a line whose
    accuracy came back would lose its stronger points). A point counts when the share
    shows it out on (a), or when the decision's own accuracy test on all the selection
    data fails or cannot decide; a point the share keeps and whose verdict on
    everything is still to come breaks the run. The pick must be shown to keep the
    task, so it can be lost this way only if it did where two milder points of its
    own line could not.

**The order of evaluation** (:meth:`Screening.next_stage`, :meth:`Screening.task_stage`,
:meth:`Screening.rest_stage`) changes no rule above, only which records exist when they
are applied, and so what the rules can spare. **On each part the text comes first and
the prompts second**, because each rule reads one of them: rule (b) the text, rules (a)
and (c) the prompts. So a candidate its text shows out on repair is never evaluated on
the share's prompts (of the candidates its text does not show out, the one with the
lowest loss gets its prompts first, with those not clearly repairing less than it:
should it be shown to keep the task, it leads and puts them out); and a survivor is
evaluated on the rest's text only when all the selection prompts show it keeps the task.
A line is screened mildest first, **as far as rule (c) lets it**: its next point goes on
the share as soon as fewer than :data:`LINE_STOP` points right before it are out on
accuracy, not shown to keep the task on everything, or still waiting for that verdict
(its share is then spent whatever those verdicts say), so the strong end of a line that
loses the task is never screened. A line that can screen no further sends its
**strongest** waiting survivor to the rest: should it keep the task on everything it may
lead, and its milder survivors, repairing less, may go out on repair (b) before their
rest is spent. And of the survivors proposed for the rest in a round, the one with the
lowest loss on the share goes first, with those the share does not show repairing
clearly less than it; the others wait for its verdict, which may make it the leader that
puts them out. Should nothing qualify in the end, the survivors the prompts left
undecided get the rest's text too, so the decision tells *undecided* from *no variant
qualifies* as it would without screening.

**Why one level per test, and not a Bonferroni share of it over the K candidates.**
Screening must not change the decision, and the decision over a subset of the
candidates equals the decision over all of them whenever the subset holds two: the
exhaustive **leader** (the qualified candidate with the largest CF cut) and the
exhaustive **pick** (the best of those tied with it: higher accuracy, milder edit,
plan order). Qualifying is a comparison with the fine-tune alone, so dropping any
other candidate moves neither. Wrongly dropping *some* qualified candidate is
harmless; only those two must survive, so the error to control is two candidates'
(each out on a test at one-sided 99% at most 1% of the time when it truly is not
out), not K's. The decision keeps its own one-sided 95% (and the loss interval's
two-sided 95%) for the survivors, on all the selection data.

:func:`screen` is pure: given the plan (in order), the anchors' and the evaluated
candidates' screening records and the decision's word on those evaluated on everything,
it says per candidate ``keep``, ``out`` (with the reason) or ``pending`` (not evaluated
yet), and :meth:`Screening.next_stage` and :meth:`Screening.rest_stage` what to evaluate
next on the share and on the rest. :func:`run_screening` drives it round by round with
two callbacks (evaluate on the share, evaluate on the rest) for tune's runner (in
process or on Ray) and for the replay benchmark alike.

Torch-free (numpy and scipy through the statistics modules).
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

from fapm_merge.evaluation import noninferiority as ni
from fapm_merge.evaluation import stats
from fapm_merge.evaluation.results import PER_ITEM
from fapm_merge.evaluation.settings import TASK_METRIC, TEXT_METRIC
from fapm_merge.io.recipe import describe_recipe
from fapm_merge.workflows.tradeoff.rules import MIN_RETENTION, TradeoffError, edit_size

SCREEN_SHARE = 0.3
"""Share of the selection prompts (or groups) and documents every candidate is screened on."""

SCREEN_SEED = 0
"""Seed of the shuffle that picks the screening share."""

SCREEN_CONFIDENCE = 0.99
"""One-sided level of every screening test (module docstring: stricter than the
decision's 95%, and not divided among the candidates)."""

SCREEN_INTERVAL = "t"
"""How rule (b) bounds a loss difference on the share: a studentized interval over its
documents (:func:`fapm_merge.evaluation.stats.loss_difference`, ``method="t"``). The
share holds few documents (11 of the replication's 36), where the percentile cluster
bootstrap the decision uses on all of them is too narrow: under no difference its
one-sided 99% bound was crossed about 2% of the time, the t interval's well under 1%."""

LINE_STOP = 2
"""Consecutive points of a line out on accuracy after which its stronger points are out
unevaluated: one could be bad luck on the share, two in a row of a monotone edit are not."""

KEEP, OUT, PENDING = "keep", "out", "pending"
"""A candidate's screening status."""

ACCURACY, REPAIR, LINE = "accuracy", "repair", "line"
"""Why a candidate is out: rule (a), (b) or (c) of the module docstring."""


# --------------------------------------------------------------------------- the share


def screened_units(units: int, share: float = SCREEN_SHARE, seed: int = SCREEN_SEED) -> Tuple[int, ...]:
    """Which of ``range(units)`` (prompts, prompt groups or documents, in file order) are
    in the screening share: ``round(share * units)`` (half up) of them from a seeded
    shuffle, at least one and, with two units or more, at least one left for the rest.
    Sorted. The runner picks the task lines and documents it writes with this."""
    if not 0 < share < 1:
        raise TradeoffError(f"the screening share must be between 0 and 1, got {share}")
    if units < 1:
        raise TradeoffError("nothing to screen on: no prompts or documents")
    count = min(max(math.floor(share * units + 0.5), 1), max(units - 1, 1))
    order = list(range(units))
    random.Random(seed).shuffle(order)
    return tuple(sorted(order[:count]))


@dataclass(frozen=True)
class ScreeningShare:
    """The items of the selection data in the screening share (the rest: the others).

    Attributes:
        prompts (`Tuple[int, ...]`): indices of the screened prompts, ascending.
        prompt_count (`int`): prompts in the selection data.
        windows (`Tuple[int, ...]`): indices of the screened windows, ascending.
        window_documents (`Tuple[int, ...]`): every window's document in the selection
            data (the whole record's ``window_document``).
        prompt_groups (`Tuple[str, ...]`, *optional*): every prompt's group, when the
            task has groups.
    """

    prompts: Tuple[int, ...]
    prompt_count: int
    windows: Tuple[int, ...]
    window_documents: Tuple[int, ...]
    prompt_groups: Optional[Tuple[str, ...]] = None

    @property
    def window_count(self) -> int:
        return len(self.window_documents)

    def part(self, screened: bool) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """``(prompt indices, window indices)`` of the screening share or of the rest."""
        if screened:
            return self.prompts, self.windows
        prompts, windows = set(self.prompts), set(self.windows)
        return (tuple(i for i in range(self.prompt_count) if i not in prompts),
                tuple(i for i in range(self.window_count) if i not in windows))


def screening_share(prompts: int, window_documents: Sequence[int], *,
                    prompt_groups: Optional[Sequence[str]] = None,
                    share: float = SCREEN_SHARE, seed: int = SCREEN_SEED) -> ScreeningShare:
    """The screening share of the selection data, from its per-item indices.

    Prompts: whole groups when there are groups (numbered in the order they first
    appear, as :func:`fapm_merge.evaluation.split.split_task` does), else single prompts.
    Windows: whole documents (the distinct ``window_document`` ids, ascending: equal to
    the text's document numbers when every document gave a window); a text of one
    document is screened on its first windows, contiguous (its windows are correlated;
    the runner then needs a text cut at that window boundary).

    Args:
        prompts (`int`): prompts in the selection task.
        window_documents (`Sequence[int]`): each window's document (a record's
            ``per_item.window_document``).
        prompt_groups (`Sequence[str]`, *optional*): each prompt's group.
        share (`float`, defaults to 0.3), seed (`int`, defaults to 0): as :func:`screened_units`.
    """
    documents = [int(d) for d in window_documents]
    if prompt_groups is not None:
        if len(prompt_groups) != prompts:
            raise TradeoffError(f"one group per prompt is needed: {len(prompt_groups)} for {prompts}")
        groups = [str(g) for g in prompt_groups]
        units = list(dict.fromkeys(groups))
        chosen = {units[i] for i in screened_units(len(units), share, seed)}
        prompt_indices = tuple(i for i, g in enumerate(groups) if g in chosen)
    else:
        prompt_indices = screened_units(prompts, share, seed)
    names = sorted(set(documents))
    if len(names) > 1:
        chosen_documents = {names[i] for i in screened_units(len(names), share, seed)}
        windows = tuple(i for i, d in enumerate(documents) if d in chosen_documents)
    else:
        windows = tuple(range(len(screened_units(len(documents), share, seed))))
    return ScreeningShare(prompt_indices, prompts, windows, tuple(documents),
                          None if prompt_groups is None else tuple(str(g) for g in prompt_groups))


def share_of(record: dict, *, share: float = SCREEN_SHARE, seed: int = SCREEN_SEED,
             task_metric: str = TASK_METRIC, text_metric: str = TEXT_METRIC) -> ScreeningShare:
    """:func:`screening_share` of the selection data a record (with per-item values) was
    measured on."""
    task, text = _items(record, task_metric), _items(record, text_metric)
    # records of an eval before documents were kept: one text, one document
    documents = text.get("window_document") or [0] * len(text["window_loss"])
    return screening_share(len(task["correct"]), documents,
                           prompt_groups=task.get("group"), share=share, seed=seed)


# --------------------------------------------------------------------------- records


def _items(record: dict, metric: str) -> dict:
    values = (record.get("metrics") or {}).get(metric)
    items = values.get(PER_ITEM) if isinstance(values, dict) else None
    if not isinstance(items, dict):
        raise TradeoffError(f"{record.get('model')}: no per-item values of the {metric!r} metric "
                            "(read the results with their items file); screening needs them")
    return items


def _task_values(correct: str, groups: Optional[List[str]]) -> Dict[str, Any]:
    """The task metric's aggregates from its per-prompt outcomes, as eval computes them
    (:func:`fapm_merge.evaluation.metrics.task_accuracy`)."""
    hits = correct.count("1")
    values: Dict[str, Any] = {"accuracy": hits / len(correct), "examples": len(correct),
                              "correct": hits}
    per_item: Dict[str, Any] = {"correct": correct}
    if groups is not None:
        values["groups"] = len(set(groups))
        per_item["group"] = groups
    values[PER_ITEM] = per_item
    return values


def _text_values(losses: List[float], tokens: List[int], documents: Optional[List[int]]
                 ) -> Dict[str, Any]:
    """The text metric's aggregates from its per-window values, as eval computes them
    (:func:`fapm_merge.evaluation.metrics.mean_token_loss`: the summed window losses
    added in window order, over the predicted tokens)."""
    total = 0.0
    for loss in losses:
        total += loss
    count = sum(tokens)
    values: Dict[str, Any] = {"loss": total / count, "perplexity": math.exp(total / count),
                              "tokens": count, "windows": len(losses)}
    per_item: Dict[str, Any] = {"window_loss": losses, "window_tokens": tokens}
    if documents is not None:  # None: an older eval's record, which kept no documents
        values["documents"] = len(set(documents))
        per_item["window_document"] = documents
    values[PER_ITEM] = per_item
    return values


def _renumbered(documents: Sequence[int]) -> List[int]:
    """Document ids as eval gives them on a text holding only these documents: 0, 1, ...
    in order."""
    numbers = {d: i for i, d in enumerate(sorted(set(documents)))}
    return [numbers[d] for d in documents]


def _check_metrics(record: dict, task_metric: str, text_metric: str, *, partial: bool = False) -> None:
    """Screening splits the --task and --text files only; ``partial``: a record may hold
    one of the two (screening evaluates them apart)."""
    held = set(record.get("metrics") or {})
    extra = sorted(held - {task_metric, text_metric})
    missing = not held if partial else {task_metric, text_metric} - held
    if missing:
        raise TradeoffError(f"{record.get('model')}: no {text_metric!r} or {task_metric!r} metric "
                            "in its record; screening needs them")
    if extra or task_metric != TASK_METRIC or text_metric != TEXT_METRIC:
        raise TradeoffError(f"{record.get('model')}: screening splits the --task and --text "
                            f"files only; this record has {', '.join(extra) or 'other axes'}")


def restrict(record: dict, share: ScreeningShare, *, screened: bool,
             task_metric: str = TASK_METRIC, text_metric: str = TEXT_METRIC) -> dict:
    """A whole-data record cut to the screening share (``screened``) or to the rest: what
    eval gives on those prompts and documents alone (aggregates recomputed, documents
    numbered from 0). The benchmark replays screening with it; :func:`combine` undoes it.

    Args:
        record (`dict`): a record with per-item values, measured on the whole selection data.
        share (`ScreeningShare`): from :func:`screening_share` of the same data.
        screened (`bool`): the screening share (True) or the rest (False).
    """
    _check_metrics(record, task_metric, text_metric)
    task, text = _items(record, task_metric), _items(record, text_metric)
    if len(task["correct"]) != share.prompt_count or len(text["window_loss"]) != share.window_count:
        raise TradeoffError(f"{record.get('model')}: measured on {len(task['correct'])} prompts and "
                            f"{len(text['window_loss'])} windows, the share on {share.prompt_count} "
                            f"and {share.window_count}")
    prompts, windows = share.part(screened)
    groups = task.get("group")
    out = {key: value for key, value in record.items() if key not in ("metrics", "items")}
    out["metrics"] = {
        task_metric: {**_settings(record["metrics"][task_metric]),
                      **_task_values("".join(task["correct"][i] for i in prompts),
                                     None if groups is None else [groups[i] for i in prompts])},
        text_metric: {**_settings(record["metrics"][text_metric]),
                      **_text_values([text["window_loss"][i] for i in windows],
                                     [text["window_tokens"][i] for i in windows],
                                     None if "window_document" not in text else
                                     _renumbered([text["window_document"][i] for i in windows]))}}
    part = "screen" if screened else "rest"
    for values in out["metrics"].values():  # a part is other data than the whole
        values["sha256"] = _joint_digest(part, values.get("sha256"))
    return out


_DERIVED = {"accuracy", "examples", "correct", "groups", "by_kind", "loss", "perplexity", "tokens",
            "windows", "documents", PER_ITEM, "sha256", "file", "parts"}


def _settings(values: dict) -> dict:
    """A metric's entries that are settings, not results (window, bos, ...)."""
    return {key: value for key, value in values.items() if key not in _DERIVED}


def _joint_digest(*parts: Optional[str]) -> str:
    return hashlib.sha256("+".join(str(p) for p in parts).encode()).hexdigest()


def combine(screening: dict, rest: dict, share: ScreeningShare, *,
            files: Optional[Mapping[str, Mapping[str, Any]]] = None,
            task_metric: str = TASK_METRIC, text_metric: str = TEXT_METRIC) -> dict:
    """A candidate's record on the whole selection data from its records on the
    screening share and on the rest: the per-item values put back in the original order,
    the aggregates recomputed from them exactly as eval computes them, so a survivor is
    evaluated on the rest only. Of the metrics both parts hold (the two, or the same one:
    the prompts alone, whose verdict decides whether the rest's text is needed).

    Args:
        screening, rest (`dict`): the same model's records (with per-item values) on the
            screening share's prompts and documents and on the others.
        share (`ScreeningShare`): the share both were cut by.
        files (`Mapping`, *optional*): per metric, the ``file`` and ``sha256`` of the
            whole selection data; without, ``sha256`` is a digest of the two parts'
            (the same for every model combined from the same parts, as pairing needs)
            and ``parts`` names the two files.

    Returns:
        `dict`: the record, with ``seconds`` the sum of the two and without an
        ``items`` pointer (:func:`fapm_merge.evaluation.results.append_result` writes one).
    """
    for record in (screening, rest):
        _check_metrics(record, task_metric, text_metric, partial=True)
    if screening.get("model") != rest.get("model"):
        raise TradeoffError(f"combining the records of two models: {screening.get('model')} "
                            f"and {rest.get('model')}")
    metrics = {}
    parts = (screening["metrics"], rest["metrics"])
    both = [m for m in (task_metric, text_metric) if m in parts[0] and m in parts[1]]
    if not both or any(set(p) != set(both) for p in parts):
        raise TradeoffError(f"{rest.get('model')}: its two parts hold other metrics "
                            f"({', '.join(sorted(parts[0]))} and {', '.join(sorted(parts[1]))})")
    for metric in both:
        settings = [_settings(p[metric]) for p in parts]
        if settings[0] != settings[1]:
            raise TradeoffError(f"{rest.get('model')}: the two parts of {metric!r} were measured "
                                f"with different settings: {settings[0]} vs {settings[1]}")
    screened = dict(zip(("prompts", "windows"), share.part(True)))
    remaining = dict(zip(("prompts", "windows"), share.part(False)))

    def merged(key: str, metric: str, unit: str) -> list:
        a, b = _items(screening, metric)[key], _items(rest, metric)[key]
        if (len(a), len(b)) != (len(screened[unit]), len(remaining[unit])):
            raise TradeoffError(f"{rest.get('model')}: {len(a)} + {len(b)} {unit} in the two parts, "
                                f"the share has {len(screened[unit])} + {len(remaining[unit])}")
        whole: list = [None] * (len(a) + len(b))
        for indices, values in ((screened[unit], a), (remaining[unit], b)):
            for index, value in zip(indices, values):
                whole[index] = value
        return whole

    whole_values = {}
    if task_metric in both:
        has_groups = "group" in _items(rest, task_metric)
        groups = merged("group", task_metric, "prompts") if has_groups else None
        if groups is not None and share.prompt_groups is not None and tuple(groups) != share.prompt_groups:
            raise TradeoffError(f"{rest.get('model')}: its prompt groups are not those of the share")
        task = _task_values("".join(merged("correct", task_metric, "prompts")), groups)
        kinds = [p[task_metric].get("by_kind") for p in parts]
        if all(isinstance(k, dict) for k in kinds):
            task["by_kind"] = {kind: {key: sum(k.get(kind, {}).get(key, 0) for k in kinds)
                                      for key in ("examples", "correct")}
                               for kind in dict.fromkeys([*kinds[0], *kinds[1]])}
        whole_values[task_metric] = task
    if text_metric in both:
        with_documents = "window_document" in _items(rest, text_metric)
        for part, indices in ((screening, screened["windows"]), (rest, remaining["windows"])):
            expected = _renumbered([share.window_documents[i] for i in indices])
            if with_documents and list(_items(part, text_metric)["window_document"]) != expected:
                raise TradeoffError(f"{part.get('model')}: its windows' documents are not those of "
                                    "the share; was it measured on the share's text?")
        whole_values[text_metric] = _text_values(merged("window_loss", text_metric, "windows"),
                                                 merged("window_tokens", text_metric, "windows"),
                                                 list(share.window_documents) if with_documents else None)
    for metric, values in whole_values.items():
        given = dict((files or {}).get(metric) or {})
        values.update(_settings(parts[1][metric]))
        values["file"] = given.get("file")
        values["sha256"] = given.get("sha256") or _joint_digest(*(p[metric].get("sha256") for p in parts))
        if not given:
            values["parts"] = [p[metric].get("file") for p in parts]
        metrics[metric] = values
    out = {key: value for key, value in rest.items() if key not in ("metrics", "items")}
    out["metrics"] = metrics
    out["seconds"] = float(screening.get("seconds") or 0.0) + float(rest.get("seconds") or 0.0)
    return out


# --------------------------------------------------------------------------- the verdicts


@dataclass(frozen=True)
class Candidate:
    """One planned variant, as screening sees it.

    Attributes:
        model (`str`): its records' ``model`` (the variant's folder).
        name (`str`): its name in the plan.
        method (`str`), strength (`float`, *optional*), strength_name (`str`, *optional*):
            what :func:`fapm_merge.io.recipe.describe_recipe` says of its recipe; a
            method with a scalar strength is a line (:func:`edit_size` orders it).
    """

    model: str
    name: str
    method: str
    strength: Optional[float] = None
    strength_name: Optional[str] = None

    @classmethod
    def of(cls, model: str, name: str, recipe: Optional[dict]) -> "Candidate":
        """The candidate of a planned variant (its folder, name and recipe) or a record."""
        return cls(str(model), name, *describe_recipe(recipe))

    @property
    def on_line(self) -> bool:
        return self.strength is not None


@dataclass(frozen=True)
class Verdict:
    """Screening's word on one candidate.

    Attributes:
        candidate (`Candidate`).
        status (`str`): ``keep``, ``out`` or ``pending``.
        reason (`str`): why, with the numbers.
        rule (`str`, *optional*): for ``out``: ``accuracy``, ``repair`` or ``line``.
        upper_bound (`float`, *optional*): the one-sided upper bound of its paired accuracy
            difference to the fine-tune at the screening level.
        loss_vs_leader (`stats.Interval`, *optional*): ``L - L_leader`` at the screening level.
    """

    candidate: Candidate
    status: str
    reason: str
    rule: Optional[str] = None
    upper_bound: Optional[float] = None
    loss_vs_leader: Optional[stats.Interval] = None

    def to_json(self) -> dict:
        return {"name": self.candidate.name, "model": self.candidate.model,
                "status": self.status, "rule": self.rule, "reason": self.reason,
                "upper_bound": self.upper_bound,
                "loss_vs_leader": self.loss_vs_leader.to_json() if self.loss_vs_leader else None}


@dataclass(frozen=True)
class Screening:
    """The verdicts of :func:`screen`, in plan order.

    Attributes:
        verdicts (`Tuple[Verdict, ...]`).
        confidence (`float`): the one-sided level of the tests (:data:`SCREEN_CONFIDENCE`).
        margin (`float`): the accuracy points a candidate may lose, from the fine-tune's
            accuracy on the screening share.
        leader (`Candidate`, *optional*): the candidate rule (b) compares with.
        prompts, windows (`int`): the share's.
        not_qualified (`Tuple[str, ...]`): the models the whole-data decision did not
            qualify, so none of them leads (:func:`run_screening`).
        on_whole (`Tuple[str, ...]`): the models evaluated on all the selection prompts.
        kept_on_whole (`Tuple[str, ...]`): those of them the decision's own test there
            shows keep the task.
        with_prompts (`Tuple[str, ...]`): the models evaluated on the share's prompts (the
            others evaluated there have its text only).
        share_losses (`Mapping[str, List[float]]`, *optional*), share_tokens (`List[int]`,
            *optional*), share_documents (`List[int]`, *optional*): the evaluated
            candidates' window losses on the share by model, the windows' tokens and
            documents (None: one document), for :meth:`rest_stage`'s comparisons.
    """

    verdicts: Tuple[Verdict, ...]
    confidence: float
    margin: float
    leader: Optional[Candidate] = None
    prompts: int = 0
    windows: int = 0
    not_qualified: Tuple[str, ...] = ()
    on_whole: Tuple[str, ...] = ()
    kept_on_whole: Tuple[str, ...] = ()
    with_prompts: Tuple[str, ...] = ()
    share_losses: Optional[Mapping[str, List[float]]] = field(default=None, repr=False, compare=False)
    share_tokens: Optional[List[int]] = field(default=None, repr=False, compare=False)
    share_documents: Optional[List[int]] = field(default=None, repr=False, compare=False)

    def _with(self, status: str) -> List[Candidate]:
        return [v.candidate for v in self.verdicts if v.status == status]

    def kept(self) -> List[Candidate]:
        """Evaluated on the share and not out: evaluate them on the rest."""
        return self._with(KEEP)

    def out(self) -> List[Candidate]:
        return self._with(OUT)

    def pending(self) -> List[Candidate]:
        """Neither evaluated on the share nor out by their line."""
        return self._with(PENDING)

    def waiting(self) -> List[Candidate]:
        """Kept on the share (text and prompts) and not evaluated on the rest yet."""
        whole, prompts = set(self.on_whole), set(self.with_prompts)
        return [c for c in self.kept() if c.model in prompts and c.model not in whole]

    def awaiting_prompts(self) -> List[Candidate]:
        """Kept on the share's text, its prompts not evaluated yet."""
        prompts = set(self.with_prompts)
        return [c for c in self.kept() if c.model not in prompts]

    @property
    def finished(self) -> bool:
        """Nothing left to evaluate: every survivor (:meth:`kept`) is on everything."""
        return not self.next_stage() and not self.task_stage() and not self.rest_stage()

    def verdict(self, model: str) -> Verdict:
        return next(v for v in self.verdicts if v.candidate.model == model)

    def next_stage(self) -> List[Candidate]:
        """What to evaluate on the screening share's text next, in plan order: every pending
        candidate off a line and the mildest pending point of each line, once no verdict
        still to come could stop the line before it (:meth:`_open_run`): its share is then
        spent whatever those verdicts say, and it may show a milder point out on repair
        before that one's rest is spent."""
        verdicts = {v.candidate.model: v for v in self.verdicts}
        chosen = set()
        for points in _lines([v.candidate for v in self.verdicts]).values():
            pending = [c for c in points if verdicts[c.model].status == PENDING]
            if pending and self._open_run(points[:points.index(pending[0])]) < LINE_STOP:
                chosen.add(pending[0].model)
        return [c for c in self.pending() if not c.on_line or c.model in chosen]

    def task_stage(self) -> List[Candidate]:
        """What to evaluate on the screening share's prompts next, in plan order: of the
        candidates whose text there shows them not out, the one with the lowest loss, with
        every other the share does not show repairing clearly less than it (rule b's test,
        as if it led); should it be shown to keep the task, it leads and they are out on
        repair without their prompts; should it not, they are proposed again."""
        return self._likeliest_first([c.model for c in self.awaiting_prompts()])

    def rest_stage(self) -> List[Candidate]:
        """What to evaluate on the rest next, in plan order. The proposals: every survivor
        off a line waiting for it and, of each line with nothing to screen this round
        (:meth:`next_stage`), its strongest waiting survivor (should it keep the task on
        everything, it may lead and show the milder ones out on repair before their rest
        is spent; should it not, the milder one is proposed next). Of those, the one with
        the lowest loss on the share goes, with every other the share does not show
        repairing clearly less than it (rule b's test, as if it led): should it qualify
        on everything, it leads and they are out; should it not, they are proposed again."""
        # a line still screening, or with a point awaiting its prompts, is not done
        busy = {c.model for c in self.next_stage() + self.awaiting_prompts()}
        waiting = self.waiting()
        proposals = [c.model for c in waiting if not c.on_line]
        for points in _lines([v.candidate for v in self.verdicts]).values():
            if not any(c.model in busy for c in points):
                survivors = [c for c in points if c in waiting]
                if survivors:
                    proposals.append(survivors[-1].model)
        return self._likeliest_first(proposals)

    def _likeliest_first(self, proposals: Collection[str]) -> List[Candidate]:
        """Of ``proposals`` (models), the one with the lowest loss on the share (ties: plan
        order) and every other the share does not show repairing clearly less than it, in
        plan order: should it lead, it would put those others out on repair (rule b)."""
        ordered = [v.candidate.model for v in self.verdicts if v.candidate.model in set(proposals)]
        if len(ordered) > 1 and self.share_losses is not None:
            losses, tokens = self.share_losses, self.share_tokens
            best = min(ordered, key=lambda m: _mean_loss(losses[m], tokens))  # ties: plan order
            ordered = [m for m in ordered if m == best or not stats.loss_difference(
                losses[m], losses[best], tokens, groups=self.share_documents,
                confidence=2 * self.confidence - 1, method=SCREEN_INTERVAL).low > 0]
        return [v.candidate for v in self.verdicts if v.candidate.model in set(ordered)]

    def _open_run(self, milder: Sequence[Candidate]) -> int:
        """How many of a line's ``milder`` points (all screened, mildest first) right
        before its next one may end up not shown to keep the task, which rule (c) counts:
        out on accuracy on the share, not shown to keep it on everything, or still
        waiting for that verdict."""
        verdicts = {v.candidate.model: v for v in self.verdicts}
        shown = set(self.kept_on_whole)
        run = 0
        for candidate in reversed(milder):
            verdict = verdicts[candidate.model]
            if not (verdict.rule == ACCURACY or (verdict.status == KEEP and candidate.model not in shown)):
                break
            run += 1
        return run

    def to_json(self) -> dict:
        names = {v.candidate.model: v.candidate.name for v in self.verdicts}
        return {"confidence": self.confidence, "margin": self.margin,
                "leader": self.leader.name if self.leader else None,
                "not_qualified_on_whole": [names.get(m, m) for m in self.not_qualified],
                "prompts": self.prompts, "windows": self.windows,
                "verdicts": [v.to_json() for v in self.verdicts]}


def _line_order(candidates: Sequence[Candidate]) -> List[Candidate]:
    """Candidates by line (first appearance of the method), mildest edit first (stable)."""
    first = {}
    for index, candidate in enumerate(candidates):
        first.setdefault(candidate.method, index)
    return sorted(candidates, key=lambda c: (first[c.method], edit_size(c) if c.on_line else 0.0))


def _lines(candidates: Sequence[Candidate]) -> Dict[str, List[Candidate]]:
    """The candidates on a line, by line (method), each mildest first."""
    lines: Dict[str, List[Candidate]] = {}
    for candidate in _line_order([c for c in candidates if c.on_line]):
        lines.setdefault(candidate.method, []).append(candidate)
    return lines


def screen(plan: Sequence[Candidate], base: dict, finetuned: dict, evaluated: Mapping[str, dict], *,
           min_retention: float = MIN_RETENTION, on_whole: Optional[Mapping[str, bool]] = None,
           not_qualified: Collection[str] = ()) -> Screening:
    """Each candidate's screening verdict from the records measured on the screening share
    and what the decision on all the selection data says of those evaluated there.

    Args:
        plan (`Sequence[Candidate]`): every candidate of the tune, in plan order.
        base, finetuned (`dict`): the anchors' records on the screening share, with
            per-item values (the base is not compared with: only checked to be paired).
        evaluated (`Mapping[str, dict]`): the records on the screening share of the
            candidates evaluated so far, by ``Candidate.model``: the text's, with the
            prompts' once those are evaluated (a record without them may go out on
            repair, rule b, and otherwise waits for them: :meth:`Screening.task_stage`).
        min_retention (`float`, defaults to 0.99): the repair rule's, which sets the margin.
        on_whole (`Mapping[str, bool]`, defaults to none): the candidates evaluated on all
            the selection prompts (share and rest), by model: whether the decision's own
            non-inferiority test shows there that it keeps the task (one it does not is
            out, rule a, and counts for rule c; one it does may lead, rule b).
        not_qualified (`Collection[str]`, defaults to none): models the decision on the
            whole selection data did not qualify; none of them may lead (rule b).

    Returns:
        `Screening`: per candidate ``keep``, ``out`` (rule and reason) or ``pending``.
    """
    on_whole = on_whole or {}
    models = [c.model for c in plan]
    if len(set(models)) != len(models):
        raise TradeoffError("a candidate is planned twice: " +
                            ", ".join(sorted({m for m in models if models.count(m) > 1})))
    unknown = sorted(set(evaluated) - set(models))
    if unknown:
        raise TradeoffError(f"records of models that are not in the plan: {', '.join(unknown)}")
    confidence = SCREEN_CONFIDENCE
    ft_task, ft_text = _items(finetuned, TASK_METRIC), _items(finetuned, TEXT_METRIC)
    stats.check_paired(_items(base, TEXT_METRIC)["window_loss"], ft_text["window_loss"], "windows")
    correct_ft = [int(c) for c in ft_task["correct"]]
    margin = ni.margin_for(min_retention, sum(correct_ft) / len(correct_ft))
    prompt_groups = ft_task.get("group")
    documents = ft_text.get("window_document")
    window_groups = list(documents) if documents and len(set(documents)) > 1 else None
    tokens = ft_text["window_tokens"]

    verdicts: Dict[str, Verdict] = {}
    checks: Dict[str, ni.NonInferiority] = {}
    losses: Dict[str, List[float]] = {}
    for candidate in plan:
        record = evaluated.get(candidate.model)
        if record is None:
            continue
        text = _items(record, TEXT_METRIC)  # the text comes first: rule (b) needs no prompts
        if list(text["window_tokens"]) != list(tokens):
            raise TradeoffError(f"{candidate.model}: its windows are not the fine-tune's; screening "
                                "records must all be measured on the same screening share")
        losses[candidate.model] = list(text["window_loss"])
        if TASK_METRIC not in record["metrics"]:
            continue  # its prompts on the share are still to come (:meth:`Screening.task_stage`)
        task = _items(record, TASK_METRIC)
        check = ni.noninferior([int(c) for c in task["correct"]], correct_ft, margin,
                               groups=prompt_groups, confidence=confidence)
        checks[candidate.model] = check
        if check.verdict == ni.FAILS:
            verdicts[candidate.model] = Verdict(
                candidate, OUT,
                f"accuracy clearly below the margin on the screening share: difference "
                f"{check.difference.estimate:+.3f}, one-sided {confidence:.2%} upper bound "
                f"{check.upper_bound:+.3f} < -{margin:.3f} ({check.difference.n} prompts)",
                ACCURACY, check.upper_bound)

    # (a) on everything: the decision's own accuracy test on all the selection prompts does
    # not show it keeps the task, so it cannot qualify whatever its repair (exact, no error)
    for candidate in plan:
        if on_whole.get(candidate.model) is False and candidate.model not in verdicts:
            verdicts[candidate.model] = Verdict(
                candidate, OUT,
                "not shown to keep the task on all the selection prompts (the decision's own "
                f"one-sided {stats.CONFIDENCE:.0%} test), so it cannot qualify whatever its repair",
                ACCURACY, checks[candidate.model].upper_bound if candidate.model in checks else None)

    # (c): along each line, LINE_STOP consecutive points not shown to keep the task (out
    # on accuracy on the share, or not shown on everything) stop it. A point evaluated on
    # the share alone and not out breaks the run: its verdict on everything is to come.
    for points in _lines(plan).values():
        run: List[Candidate] = []
        for candidate in points:
            if len(run) >= LINE_STOP:
                if candidate.model not in verdicts and candidate.model not in on_whole:
                    verdicts[candidate.model] = _beyond(candidate, run, checks.get(candidate.model),
                                                        on_whole)
                continue
            verdict = verdicts.get(candidate.model)
            if (verdict is not None and verdict.rule == ACCURACY) or on_whole.get(candidate.model) is False:
                run.append(candidate)
            elif candidate.model in checks:
                run = []

    # (b): the leader repairs the most among those shown to keep the task, at the
    # decision's level, on everything or on the share; outs on repair are provisional
    # until it qualifies on everything
    shown = [c for c in plan if c.model in checks and c.model not in verdicts
             and c.model not in not_qualified
             and (on_whole[c.model] if c.model in on_whole else
                  _keeps_task(checks[c.model], evaluated[c.model], correct_ft, margin, prompt_groups))]
    leader = min(shown, key=lambda c: _mean_loss(losses[c.model], tokens)) if shown else None
    for candidate in plan:
        if candidate.model not in losses or candidate.model in verdicts:
            continue
        check = checks.get(candidate.model)
        between = None
        if leader is not None and candidate is not leader:
            # the two-sided interval at 2c - 1 has the one-sided bounds at c
            between = stats.loss_difference(losses[candidate.model], losses[leader.model], tokens,
                                            groups=window_groups, confidence=2 * confidence - 1,
                                            method=SCREEN_INTERVAL)
            if between.low > 0 and candidate.model not in on_whole:
                verdicts[candidate.model] = Verdict(
                    candidate, OUT,
                    f"repair clearly below the leader {leader.name}'s on the screening share: "
                    f"loss difference {between.estimate:+.4f}, one-sided {confidence:.2%} lower "
                    f"bound {between.low:+.4f} > 0 ({between.units} windows or documents); "
                    f"holds while {leader.name} qualifies on all the selection data",
                    REPAIR, None if check is None else check.upper_bound, between)
                continue
        if candidate.model in on_whole:  # the decision rules on it; the share's word is moot
            reason = "shown to keep the task on all the selection prompts; the decision rules on it"
        elif check is None:
            reason = ("its text on the share does not show it out"
                      + ("" if between is None else f" (loss vs the leader {leader.name} low end "
                         f"{between.low:+.4f} <= 0)") + "; its prompts on the share are to come")
        else:
            reason = (f"not shown out at one-sided {confidence:.2%}: accuracy upper bound "
                      f"{check.upper_bound:+.3f} >= -{margin:.3f}"
                      + ("" if between is None else f", loss vs the leader {leader.name} low end "
                         f"{between.low:+.4f} <= 0"))
        verdicts[candidate.model] = Verdict(
            candidate, KEEP, reason + (" (the leader)" if candidate is leader else ""),
            None, None if check is None else check.upper_bound, between)
    for candidate in plan:
        verdicts.setdefault(candidate.model, Verdict(
            candidate, PENDING, "not evaluated on the screening share yet"))
    return Screening(tuple(verdicts[c.model] for c in plan), confidence, margin, leader,
                     len(correct_ft), len(tokens), tuple(m for m in models if m in set(not_qualified)),
                     tuple(m for m in models if m in on_whole),
                     tuple(m for m in models if on_whole.get(m)), tuple(m for m in models if m in checks),
                     losses, list(tokens), window_groups)


def _beyond(candidate: Candidate, run: List[Candidate], check: Optional[ni.NonInferiority],
            on_whole: Mapping[str, bool]) -> Verdict:
    """Rule (c)'s verdict on a point beyond ``run``, the points that stopped its line."""
    first, last = run[-2], run[-1]
    on_share_only = all(c.model not in on_whole for c in run[-2:])
    why = ("both clearly below the accuracy margin on the screening share" if on_share_only else
           "neither shown to keep the task on all the selection data (or clearly below the margin "
           "on the share)")
    return Verdict(candidate, OUT,
                   f"beyond {first.name} and {last.name} on its line ({candidate.method}), {why}, "
                   "and accuracy only falls as the edit grows; "
                   + ("not evaluated" if check is None else "not evaluated on the rest"),
                   LINE, None if check is None else check.upper_bound)


def _keeps_task(check: ni.NonInferiority, record: dict, correct_ft: List[int], margin: float,
                groups: Optional[Sequence[str]]) -> bool:
    """Does the share show the candidate keeps the task at the decision's own level
    (one-sided 95%)? (``check`` is at the stricter screening level: qualifying there is
    qualifying here.)"""
    if check.verdict == ni.QUALIFIES:
        return True
    correct = [int(c) for c in _items(record, TASK_METRIC)["correct"]]
    return ni.noninferior(correct, correct_ft, margin, groups=groups,
                          confidence=stats.CONFIDENCE).verdict == ni.QUALIFIES


def _mean_loss(losses: Sequence[float], tokens: Sequence[int]) -> float:
    """Mean token loss on the share's windows: the lowest repairs the most (the CF cut
    is a growing function of ``L_ft - L``, the same for every candidate)."""
    return math.fsum(losses) / sum(tokens)



# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class ScreeningRun:
    """What :func:`run_screening` did.

    Attributes:
        screening (`Screening`): the last verdicts (its ``kept()`` were all evaluated on
            everything; ``not_qualified`` those the whole data did not qualify).
        stages (`List[List[str]]`): the names evaluated on the share's text, stage by stage.
        prompt_stages (`List[List[str]]`): the names evaluated on the share's prompts,
            stage by stage (those its text did not show out, the likeliest leader first).
        rest_rounds (`List[List[str]]`): the names evaluated on the rest's prompts, round
            by round (each line's strongest survivor first; more follow a rejected leader).
        text_rounds (`List[List[str]]`): the names evaluated on the rest's text, round by
            round: those the rest's prompts showed keep the task (and, when nothing
            qualified, those they left undecided, so the decision can say so).
        rejected_leaders (`List[str]`): the leaders that did not qualify on the whole
            selection data (or were stopped on their line there), in order.
        on_share (`Dict[str, dict]`): every record on the share, by model (its text, and
            its prompts where they were evaluated).
        rest (`Dict[str, dict]`): every record on the rest, by model (its prompts, and its
            text where it was evaluated).
        whole (`Dict[str, dict]`): every candidate evaluated on all of the rest, its record
            on the whole selection data (:func:`combine`), by model, in plan order: with
            the anchors', what the decision reads.
    """

    screening: Screening
    stages: List[List[str]]
    prompt_stages: List[List[str]]
    rest_rounds: List[List[str]]
    text_rounds: List[List[str]]
    rejected_leaders: List[str]
    on_share: Dict[str, dict]
    rest: Dict[str, dict]
    whole: Dict[str, dict]


def one_metric(record: dict, metric: str) -> dict:
    """``record`` with only ``metric`` (what eval gives when given only that metric's file)."""
    out = {key: value for key, value in record.items() if key not in ("metrics", "items")}
    out["metrics"] = {metric: record["metrics"][metric]}
    return out


def with_part(known: Optional[dict], record: dict) -> dict:
    """A model's record on one part of the data holding the metrics of both records (the
    text and the prompts, evaluated apart); ``seconds`` added."""
    if known is None:
        return record
    if known.get("model") != record.get("model") or set(known["metrics"]) & set(record["metrics"]):
        raise TradeoffError(f"{record.get('model')}: two records of the same metric on one part of "
                            "the data, or of two models")
    out = {**known, "metrics": {**known["metrics"], **record["metrics"]}}
    out["seconds"] = float(known.get("seconds") or 0.0) + float(record.get("seconds") or 0.0)
    return out


def run_screening(plan: Sequence[Candidate], base: dict, finetuned: dict, share: ScreeningShare, *,
                  evaluate_share: Callable[[List[Candidate], str], Mapping[str, dict]],
                  evaluate_rest: Callable[[List[Candidate], str], Mapping[str, dict]],
                  rule: Any = None) -> ScreeningRun:
    """Screen ``plan`` round by round until nothing is left to evaluate. Each round
    evaluates the share's text of what :meth:`Screening.next_stage` names, then the
    share's prompts of what :meth:`Screening.task_stage` names (what the text shows out
    on repair needs none), then the rest's prompts of what :meth:`Screening.rest_stage`
    names, and the rest's text of those of them the decision's own accuracy test on all
    the selection prompts shows keep the task (the others cannot qualify, whatever their
    repair); the decision on all the selection data then says which qualify, and
    :func:`screen` rules again with all that. So a line stops where two consecutive
    points are not shown to keep the task, before its stronger points cost anything; a
    leader that does not qualify on everything stops leading, and what it alone showed
    out is kept again (module docstring, rules a to c, and the order of evaluation).
    Should nothing qualify, the survivors the prompts left undecided get their text too:
    the decision then tells *undecided* from *no variant qualifies* as without screening.

    Args:
        plan (`Sequence[Candidate]`): every candidate, in plan order.
        base, finetuned (`dict`): the anchors' records on the whole selection data, with
            per-item values (cut to the share here, :func:`restrict`).
        share (`ScreeningShare`): the share (:func:`share_of` the fine-tune's record).
        evaluate_share, evaluate_rest (`Callable`): evaluate these candidates on the
            share's (the rest's) prompts (``metric`` the task metric) or documents (the
            text metric); their records, holding that metric, by model.
        rule (`Rule`, *optional*): the decision's (the repair rule at its defaults).

    Returns:
        `ScreeningRun`.
    """
    from fapm_merge.workflows.tradeoff.points import accuracy_test, compute_tradeoff
    from fapm_merge.workflows.tradeoff.rules import Rule

    rule = rule if rule is not None else Rule()
    base_share, ft_share = (restrict(r, share, screened=True) for r in (base, finetuned))
    files = {metric: {key: finetuned["metrics"][metric].get(key) for key in ("file", "sha256")}
             for metric in (TASK_METRIC, TEXT_METRIC)}
    # the decision's own accuracy test, on the prompts alone
    ft_task = _items(finetuned, TASK_METRIC)
    margin = ni.margin_for(rule.min_retention, float(finetuned["metrics"][TASK_METRIC]["accuracy"]))
    on_share: Dict[str, dict] = {}
    rest: Dict[str, dict] = {}
    whole: Dict[str, dict] = {}
    stages: List[List[str]] = []
    prompt_stages: List[List[str]] = []
    rest_rounds: List[List[str]] = []
    text_rounds: List[List[str]] = []
    on_whole: Dict[str, bool] = {}
    whole_checks: Dict[str, ni.NonInferiority] = {}
    not_qualified: Tuple[str, ...] = ()
    leaders: List[Candidate] = []
    qualified_any = False

    def rescreen() -> Screening:
        result = screen(plan, base_share, ft_share, on_share, min_retention=rule.min_retention,
                        on_whole=on_whole, not_qualified=not_qualified)
        if result.leader is not None and result.leader not in leaders:
            leaders.append(result.leader)
        return result

    def on_the_share(candidates: List[Candidate], metric: str, log: List[List[str]]) -> None:
        log.append([c.name for c in candidates])
        records = evaluate_share(candidates, metric)
        for c in candidates:
            on_share[c.model] = with_part(on_share.get(c.model), records[c.model])

    def text_on_the_rest(candidates: List[Candidate]) -> None:
        nonlocal whole, not_qualified, qualified_any
        text_rounds.append([c.name for c in candidates])
        records = evaluate_rest(candidates, TEXT_METRIC)
        for c in candidates:  # each combined once, as its rest arrives
            rest[c.model] = with_part(rest[c.model], records[c.model])
            whole[c.model] = combine(on_share[c.model], rest[c.model], share, files=files)
        whole = {c.model: whole[c.model] for c in plan if c.model in whole}  # plan order
        decision = compute_tradeoff([base, finetuned, *whole.values()], base=base["model"],
                                    finetuned=finetuned["model"], rule=rule)
        points = [p for p in decision.points if p.model in whole]
        for p in points:  # the decision's accuracy test is the one screening applied
            if (p.noninferiority.verdict == ni.QUALIFIES) != on_whole[p.model]:
                raise TradeoffError(f"{p.name}: the decision's accuracy test and screening's "
                                    "disagree on the same prompts; report this")
        qualified_any = any(p.verdict in ("ok", "selected") for p in points)
        # without a significant forgetting nothing qualifies, whoever leads: leaders stand
        not_qualified = (tuple(p.model for p in points if p.verdict not in ("ok", "selected"))
                         if decision.forgetting.significant else ())

    screening = rescreen()
    while True:
        progressed = False
        to_share = screening.next_stage()
        if to_share:
            on_the_share(to_share, TEXT_METRIC, stages)
            screening, progressed = rescreen(), True
        to_prompts = screening.task_stage()
        if to_prompts:
            on_the_share(to_prompts, TASK_METRIC, prompt_stages)
            screening, progressed = rescreen(), True
        to_rest = screening.rest_stage()
        if to_rest:
            rest_rounds.append([c.name for c in to_rest])
            records = evaluate_rest(to_rest, TASK_METRIC)
            for c in to_rest:
                rest[c.model] = records[c.model]
                prompts = combine(one_metric(on_share[c.model], TASK_METRIC), rest[c.model], share)
                whole_checks[c.model] = accuracy_test(_items(prompts, TASK_METRIC)["correct"], ft_task, margin)
                on_whole[c.model] = whole_checks[c.model].verdict == ni.QUALIFIES
            kept = [c for c in to_rest if on_whole[c.model]]
            if kept:
                text_on_the_rest(kept)
            screening, progressed = rescreen(), True
        if not progressed:
            break
    undecided = [c for c in plan if c.model in whole_checks and c.model not in whole
                 and whole_checks[c.model].verdict == ni.UNDECIDED]
    if not qualified_any and undecided:
        text_on_the_rest(undecided)
        screening = rescreen()
    # leaders that failed on everything, or were stopped on their line before reaching it
    rejected = [c.name for c in leaders if c.model in set(not_qualified) or on_whole.get(c.model) is False
                or screening.verdict(c.model).rule == LINE]
    return ScreeningRun(screening, stages, prompt_stages, rest_rounds, text_rounds, rejected,
                        on_share, rest, whole)


__all__ = [
    "ACCURACY",
    "Candidate",
    "KEEP",
    "LINE",
    "LINE_STOP",
    "OUT",
    "PENDING",
    "REPAIR",
    "SCREEN_CONFIDENCE",
    "SCREEN_INTERVAL",
    "SCREEN_SEED",
    "SCREEN_SHARE",
    "Screening",
    "ScreeningRun",
    "ScreeningShare",
    "Verdict",
    "combine",
    "one_metric",
    "restrict",
    "run_screening",
    "screen",
    "screened_units",
    "screening_share",
    "share_of",
    "with_part",
]
