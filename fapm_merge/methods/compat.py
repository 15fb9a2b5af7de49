"""Every use of mergekit's private or internal API, in one place.

mergekit 0.1.5 has no public API for what ``fapm-merge sweep`` does (plan several
recipes, run them in one executor over shared inputs, then finish each output as
``mergekit-yaml`` would). The names below are underscored functions of
``mergekit.merge`` and fields of internal graph tasks. Nothing else in fapm-merge
touches them: when a mergekit release moves one, :func:`private_api_problems`
names it (tests/test_layout.py runs it), and only this file needs mending.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

PRIVATE_API: Tuple[Tuple[str, str, Tuple[str, ...]], ...] = (
    # (module, attribute, fields the code reads or sets on it)
    ("mergekit.merge", "_model_out_config", ()),
    ("mergekit.merge", "_copy_tokenizer", ()),
    ("mergekit.merge", "_copy_tagalong_files", ()),
    ("mergekit.io.tasks", "SaveTensor", ("tensor_name", "tensor_task", "writer_task")),
    ("mergekit.io.tasks", "FinalizeModel", ("tensor_save_tasks", "writer_task")),
    (
        "mergekit.merge_methods.task_adapter",
        "ExecuteMergeMethodTask",
        ("method_name", "gather_tensors", "model_order", "base_model", "output_weight",
         "parameters", "input_parameters", "dtype", "out_dtype"),
    ),
)
"""What this module relies on; checked by :func:`private_api_problems`."""


def private_api_problems() -> List[str]:
    """One line per private name (or field) the installed mergekit lacks; empty
    when everything fapm-merge relies on is where it was in mergekit 0.1.5."""
    problems = []
    for module_name, attribute, fields in PRIVATE_API:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            problems.append(f"{module_name} cannot be imported ({error})")
            continue
        target = getattr(module, attribute, None)
        if target is None:
            problems.append(f"{module_name}.{attribute} is gone")
            continue
        known = getattr(target, "model_fields", None)
        for field in fields:
            if known is not None and field not in known:
                problems.append(f"{module_name}.{attribute} has no field {field!r}")
    return problems


def model_out_config(config, arch_info):
    """The output model's ``config.json`` object, as ``mergekit-yaml`` builds it."""
    from mergekit.merge import _model_out_config

    return _model_out_config(config, arch_info)


def copy_tokenizer(config, out_path: str, options) -> None:
    """Copy the donor model's tokenizer into ``out_path``, as ``mergekit-yaml`` does."""
    from mergekit.merge import _copy_tokenizer

    _copy_tokenizer(config, out_path, options=options)


def copy_tagalong_files(config, out_path: str, files: List[str], options) -> None:
    """Copy the architecture's extra files (e.g. generation configs) into ``out_path``."""
    from mergekit.merge import _copy_tagalong_files

    _copy_tagalong_files(config, out_path, files=files, options=options)


def save_tasks(targets) -> list:
    """The ``SaveTensor`` tasks among a plan's targets, in plan order."""
    from mergekit.io.tasks import SaveTensor

    return [target for target in targets if isinstance(target, SaveTensor)]


def tensor_name(save) -> str:
    """The output tensor a ``SaveTensor`` writes."""
    return save.tensor_name


def tensor_task(save):
    """The task whose value a ``SaveTensor`` writes (for a merge: its ``ExecuteMergeMethodTask``)."""
    return save.tensor_task


def with_tensor_task(save, tensor_task):
    """A copy of a ``SaveTensor`` that saves ``tensor_task``'s value instead."""
    return type(save)(**{**dict(save), "tensor_task": tensor_task})


def finalize_task(saves: list):
    """The task that writes the index and closes the shards after ``saves``."""
    from mergekit.io.tasks import FinalizeModel

    return FinalizeModel(tensor_save_tasks=tuple(saves), writer_task=saves[0].writer_task)


def merge_method_task_class() -> type:
    """mergekit's per-tensor merge task class, ``ExecuteMergeMethodTask``, for a
    task whose fields hold such tasks (pydantic needs the class itself)."""
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    return ExecuteMergeMethodTask


@dataclass(frozen=True)
class PlannedMerge:
    """What mergekit planned for one output tensor, as plain data.

    Attributes:
        method_name (`str`): the registered merge method.
        tensor_name (`str`): the output tensor.
        base_model: the base model reference (None without one).
        models (`tuple`): every input model reference, in mergekit's order.
        parameters (`dict`): shared parameters, resolved for this tensor.
        input_parameters (`dict`): per model, its parameters for this tensor.
        dtype (`str`, *optional*): the recipe's ``dtype`` (inputs cast to it).
        out_dtype (`str`, *optional*): the recipe's ``out_dtype``.
    """

    method_name: str
    tensor_name: str
    base_model: Any
    models: Tuple[Any, ...]
    parameters: Dict[str, Any]
    input_parameters: Dict[Any, Dict[str, Any]]
    dtype: Optional[str]
    out_dtype: Optional[str]


def planned_merge(task) -> PlannedMerge:
    """The plain-data view of a save task's ``ExecuteMergeMethodTask``."""
    return PlannedMerge(
        method_name=task.method_name,
        tensor_name=task.output_weight.name,
        base_model=task.base_model,
        models=tuple(task.model_order),
        parameters=dict(task.parameters.items()),
        input_parameters={model: dict(values.items())
                          for model, values in task.input_parameters.items()},
        dtype=task.dtype,
        out_dtype=task.out_dtype,
    )


def gather_task(task):
    """The task that loads a merge task's input tensors (shared by equal plans)."""
    return task.gather_tensors


def group_label(task) -> Optional[str]:
    return task.group_label()


__all__ = [
    "PRIVATE_API",
    "PlannedMerge",
    "copy_tagalong_files",
    "copy_tokenizer",
    "finalize_task",
    "gather_task",
    "merge_method_task_class",
    "model_out_config",
    "planned_merge",
    "private_api_problems",
    "save_tasks",
    "tensor_name",
    "tensor_task",
    "with_tensor_task",
]
