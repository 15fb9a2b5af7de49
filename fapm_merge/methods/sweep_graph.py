"""The sweep's mergekit graph: every variant's value of one output tensor, from one read.

``fapm-merge sweep`` (:mod:`fapm_merge.workflows.sweep`) plans each variant with
mergekit's own planner; :func:`sweep_targets` then re-points every variant's save
tasks at one :class:`SweepTensorTask` per output tensor, whose input tensors are
gathered once for all variants. A variant whose tensor is the core's exact select
(``fapm`` on one model at coefficient 1, magnitude pruning being ``beta: 0``) is
computed here, the scores once per distinct ``beta``; every other one runs
mergekit's own per-tensor task on the shared inputs. mergekit's task classes and
fields are reached through :mod:`fapm_merge.methods.compat` only.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from mergekit.graph import Task

from fapm_merge.core import (
    FapmInputError,
    fapm_scores,
    find_threshold,
    is_exact_select,
    keep_count,
    merge_coefficients,
    select_where,
)
from fapm_merge.core.rules import FAPM
from fapm_merge.methods import compat
from fapm_merge.methods.common import is_lora_reference

ExecuteMergeMethodTask = compat.merge_method_task_class()

_rng_lock = threading.Lock()
_rng_states: Dict[Tuple[str, int], torch.Tensor] = {}
"""Per (sweep id, variant index): the CPU random state of that DARE variant's stream."""


_FAST_SHARED = {"beta", "lambda", "normalize", "rescale", "density_rescale"}
_FAST_INPUT = {"sparsity", "density", "weight"}


@dataclass(frozen=True)
class _SelectPlan:
    """A variant's tensor that is the core's exact select: one model, coefficient 1."""

    beta: float
    base_model: Any
    model: Any
    k: int


def _exact_select_plan(plan: "compat.PlannedMerge", tensors: Dict[Any, torch.Tensor]) -> Optional[_SelectPlan]:
    """The select this ``fapm`` merge reduces to (see `core.rules.is_exact_select`),
    or None: then mergekit's own kernel computes it."""
    if plan.method_name != FAPM or plan.base_model is None or plan.dtype is not None:
        return None
    non_base = [m for m in plan.models if m != plan.base_model]
    if len(non_base) != 1:
        return None
    model = non_base[0]
    pre, ft = tensors.get(plan.base_model), tensors.get(model)
    if pre is None or ft is None or not (pre.is_floating_point() and ft.is_floating_point()):
        return None
    params, inputs = plan.parameters, plan.input_parameters[model]
    # A parameter this path does not know (a later kernel option) may change the
    # output: let mergekit's kernel compute it instead of guessing.
    if set(params) - _FAST_SHARED or set(inputs) - _FAST_INPUT:
        return None
    coefficients = merge_coefficients([inputs["weight"]], params["lambda"], params["normalize"])
    if not is_exact_select(coefficients, rescale=params["rescale"],
                           density_rescale=bool(params.get("density_rescale"))):
        return None
    try:
        k = keep_count(pre.numel(), sparsity=inputs["sparsity"], density=inputs["density"],
                       lora=is_lora_reference(model))
    except FapmInputError as error:
        raise FapmInputError(f"fapm: model {model}, tensor {plan.tensor_name!r}: {error}") from None
    return _SelectPlan(params["beta"], plan.base_model, model, k)


class SweepTensorTask(Task[Tuple[Optional[torch.Tensor], ...]]):
    """Every variant's value of one output tensor, from one gathered input."""

    tasks: Tuple[ExecuteMergeMethodTask, ...]
    seeded: Tuple[bool, ...]
    sweep_id: str

    def arguments(self) -> Dict[str, Task]:
        return {"tensors": compat.gather_task(self.tasks[0])}

    def group_label(self) -> Optional[str]:
        return compat.group_label(self.tasks[0])

    def uses_accelerator(self) -> bool:
        return True

    @torch.no_grad()
    def execute(self, tensors: Dict[Any, torch.Tensor], **_kwargs) -> Tuple[Optional[torch.Tensor], ...]:
        results: List[Optional[torch.Tensor]] = [None] * len(self.tasks)
        scores_by_beta: Dict[float, Any] = {}
        for index, task in enumerate(self.tasks):
            plan = compat.planned_merge(task)
            select = _exact_select_plan(plan, tensors)
            if select is None:
                results[index] = self._delegate(index, task, tensors)
                continue
            pre, ft = tensors[select.base_model], tensors[select.model]
            if pre.shape != ft.shape:  # mergekit's own message, as the kernel would give
                results[index] = self._delegate(index, task, tensors)
                continue
            dtype = torch.promote_types(pre.dtype, ft.dtype)  # GroupMergeMethod's alignment
            pre, ft = pre.to(dtype), ft.to(dtype)
            if select.beta not in scores_by_beta:
                scores_by_beta[select.beta] = fapm_scores(pre, ft, beta=select.beta,
                                                          name=plan.tensor_name)
            scores = scores_by_beta[select.beta]
            threshold = find_threshold(scores.values, select.k)
            out = select_where(pre, ft, scores.values, threshold).to(pre.dtype)
            if plan.out_dtype is not None:
                from mergekit.common import dtype_from_name

                out = out.to(dtype_from_name(plan.out_dtype))
            results[index] = out
        return tuple(results)

    def _delegate(self, index: int, task: ExecuteMergeMethodTask, tensors) -> Optional[torch.Tensor]:
        if not self.seeded[index]:
            return task.execute(tensors=tensors)
        # This variant's own random stream, as if it were the only merge running.
        key = (self.sweep_id, index)
        with _rng_lock:
            outer = torch.get_rng_state()
            torch.set_rng_state(_rng_states[key])
            try:
                return task.execute(tensors=tensors)
            finally:
                _rng_states[key] = torch.get_rng_state()
                torch.set_rng_state(outer)


class PickVariant(Task[Optional[torch.Tensor]]):
    """One variant's tensor out of a :class:`SweepTensorTask`."""

    sweep_task: SweepTensorTask
    index: int

    def arguments(self) -> Dict[str, Task]:
        return {"values": self.sweep_task}

    def group_label(self) -> Optional[str]:
        return self.sweep_task.group_label()

    def execute(self, values, **_kwargs) -> Optional[torch.Tensor]:
        return values[self.index]


@contextmanager
def seeded_streams(sweep_id: str, seeds: Sequence[Optional[int]]) -> Iterator[None]:
    """Each seeded (DARE) variant's own CPU random stream while the sweep runs.

    Args:
        sweep_id (`str`): the run's id, so that two sweeps never share a stream.
        seeds (`Sequence[Optional[int]]`): per variant, in order, its seed or None;
            a stream starts as ``mergekit-yaml --random-seed SEED`` starts it.
    """
    for index, seed in enumerate(seeds):
        if seed is not None:
            generator_state = torch.Generator().manual_seed(seed).get_state()
            with _rng_lock:
                _rng_states[(sweep_id, index)] = generator_state
    try:
        yield
    finally:
        with _rng_lock:
            for index in range(len(seeds)):
                _rng_states.pop((sweep_id, index), None)


def sweep_targets(saves_per_variant: Sequence[Sequence[Any]], seeded: Tuple[bool, ...],
                  sweep_id: str) -> List[Any]:
    """The executor's targets: per variant, its save tasks re-pointed at the shared
    :class:`SweepTensorTask` of each output tensor, then its finalize task.

    Args:
        saves_per_variant (`Sequence[Sequence]`): per variant, mergekit's ``SaveTensor``
            tasks in plan order (the same output tensors for every variant).
        seeded (`Tuple[bool, ...]`): per variant, whether it draws from its own random
            stream (:func:`seeded_streams`).
        sweep_id (`str`): the run's id, as given to :func:`seeded_streams`.
    """
    per_variant_saves: List[List[Any]] = [[] for _ in saves_per_variant]
    for position in range(len(saves_per_variant[0])):
        merge_tasks = tuple(compat.tensor_task(saves[position]) for saves in saves_per_variant)
        sweep_task = SweepTensorTask(tasks=merge_tasks, seeded=seeded, sweep_id=sweep_id)
        for index, saves in enumerate(saves_per_variant):
            per_variant_saves[index].append(
                compat.with_tensor_task(saves[position], PickVariant(sweep_task=sweep_task, index=index))
            )
    targets: List[Any] = []
    for saves in per_variant_saves:
        targets.extend(saves)
        targets.append(compat.finalize_task(saves))
    return targets


__all__ = ["PickVariant", "SweepTensorTask", "seeded_streams", "sweep_targets"]
