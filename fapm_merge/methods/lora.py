"""``merge_method: fapm_lora``: FAPM on a LoRA adapter's update, without a merged copy.

mergekit's ``model: BASE+ADAPTER`` route builds the whole fine-tuned model with
transformers+peft and writes it to ``--lora-merge-cache`` before any method runs.
This method instead reads the adapter itself (mergekit 0.1.5 has no hook to add
graph tasks, so the adapter comes in as the ``adapter`` parameter) and, for each
base tensor, rebuilds ``W_ft`` from ``lora_A``/``lora_B`` only for that tensor,
then hands ``(W_pre, W_ft)`` to the same core as ``fapm``. Recipe::

    merge_method: fapm_lora
    base_model: /models/base
    models:
      - model: /models/base          # mergekit requires a models list: the base
    parameters:
      adapter: /adapters/my-lora     # folder with adapter_config.json, or org/name
      sparsity: 0.1                  # default for LoRA (paper: prune ~10%)

Tensors the adapter does not touch are returned as the base tensor itself (bit for
bit). See docs/lora.md and recipes/lora-native.yml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BeforeValidator
from typing_extensions import Annotated

from mergekit.merge_methods.base import (BasePolicy, GroupMergeMethod, InputContract, MergeMethodSpec,
                                         ParameterScope, ParameterSpec, TensorGroup)

from fapm_merge.core import DEFAULT_LORA_SPARSITY, FapmInputError, fapm_merge, keep_count
from fapm_merge.core.rules import FAPM_LORA
from fapm_merge.io.lora_adapter import ADAPTER_CONFIG, load_bound_adapter
from fapm_merge.io.model_paths import looks_local
from fapm_merge.methods.common import PAPER_URL, share_parameter, shared_specs


def _check_adapter(value: Any) -> Any:
    """Plan-time check (before any tensor is read) of the ``adapter`` parameter."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"{FAPM_LORA} parameter 'adapter' must be the path of a PEFT adapter folder "
            f"(or a hub id org/name), got {value!r}"
        )
    path = Path(value).expanduser()
    if looks_local(value) and not (path / ADAPTER_CONFIG).is_file():
        raise ValueError(
            f"{FAPM_LORA} parameter 'adapter': {path} has no {ADAPTER_CONFIG}; give the "
            "folder that peft's save_pretrained wrote"
        )
    return value


FAPM_LORA_PARAMETERS = (
    ParameterSpec(
        "adapter",
        Annotated[str, BeforeValidator(_check_adapter)],
        ParameterScope.SHARED,
        description="PEFT LoRA adapter: local folder or Hugging Face hub id org/name[@rev]",
    ),
    ParameterSpec(
        "sparsity",
        share_parameter("sparsity"),
        ParameterScope.SHARED,
        default=None,
        description=f"share of the LoRA update reset to the base (default {DEFAULT_LORA_SPARSITY})",
    ),
    ParameterSpec(
        "density",
        share_parameter("density"),
        ParameterScope.SHARED,
        default=None,
        description="share kept, 1 - sparsity; not with sparsity",
    ),
    *shared_specs("beta", "lambda", "rescale"),  # the same knobs as `fapm`, declared once
    ParameterSpec(
        "allow_pickle",
        bool,
        ParameterScope.SHARED,
        default=False,
        description="read a pickled adapter_model.bin (pickle can run code: opt-in)",
    ),
)


def _base_folder(group: TensorGroup) -> Path:
    reference = group.base.id
    if getattr(reference, "lora", None):
        raise FapmInputError(
            f"{FAPM_LORA}: base_model {reference} carries an adapter; give the plain base "
            "as base_model and the adapter as the `adapter` parameter"
        )
    local_path = getattr(reference, "local_path", None)
    if local_path is None:  # direct Python callers may use plain ids
        raise FapmInputError(
            f"{FAPM_LORA} needs the base model's location: call it through mergekit "
            "(its tensor ids are ModelReferences)"
        )
    return Path(local_path())


class FapmLoraMerge(GroupMergeMethod):
    """FAPM on a LoRA update ``dW = scale * B @ A``, read straight from the adapter.

    Per base tensor the adapter touches, ``W_ft`` is rebuilt as peft's merge does and
    the top ``1 - sparsity`` share of ``S = |dW| - beta * mean(|W_pre|) * |dW| /
    |W_pre|`` is kept (https://arxiv.org/abs/2509.08255); other tensors pass through.
    """

    spec = MergeMethodSpec(
        name=FAPM_LORA,
        pretty_name="FAPM on a LoRA adapter (native)",
        reference_url=PAPER_URL,
        parameters=FAPM_LORA_PARAMETERS,
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=0, max_non_base=0),
    )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        name = group.metadata.name
        bound = load_bound_adapter(
            parameters["adapter"], _base_folder(group), allow_pickle=parameters["allow_pickle"]
        )
        finetuned = bound.finetuned(name, base)
        if finetuned is None:
            return base  # untouched by the adapter: the base, bit for bit
        try:
            k = keep_count(base.numel(), sparsity=parameters["sparsity"],
                           density=parameters["density"], lora=True)
        except FapmInputError as error:
            raise FapmInputError(f"{FAPM_LORA}, tensor {name!r}: {error}") from None
        return fapm_merge(
            base,
            [finetuned],
            keep_counts=[k],
            beta=parameters["beta"],
            lambda_=parameters["lambda"],
            rescale=parameters["rescale"],
            name=name,
        ).to(base.dtype)


fapm_lora_method = FapmLoraMerge()

__all__ = ["FAPM_LORA_PARAMETERS", "FapmLoraMerge", "fapm_lora_method"]
