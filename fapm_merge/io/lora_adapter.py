"""Read a PEFT LoRA adapter and rebuild one fine-tuned weight at a time from it.

FAPM needs ``dW = W_ft - W_pre`` per weight. For a LoRA fine-tune that is
``scale * B @ A`` (``scale = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA), so
nothing forces anyone to build and save the whole merged model first, as
mergekit's ``model: BASE+ADAPTER`` route does. :class:`LoraAdapter` maps every
adapter tensor to the base tensor it changes and, for one base tensor at a time,
returns ``W_ft`` computed exactly as ``peft``'s ``merge_and_unload`` computes it
(same operations, dtypes and order), so the native path and the ``BASE+ADAPTER``
path give bit-identical FAPM outputs when they work in the same dtype.

Covered: scale ``alpha/r`` and rsLoRA ``alpha/sqrt(r)``; ``rank_pattern`` and
``alpha_pattern`` (peft's rule: a pattern matches a module name ending in it);
``fan_in_fan_out`` (GPT-2 ``Conv1D`` stores ``W`` transposed); LoRA on embeddings
(``lora_embedding_A/B``: ``dW = (B @ A).T * scale``); ``lora_bias``;
``modules_to_save`` and saved ``base_layer`` tensors (full tensors that replace the
base's: ``dW = W_saved - W_pre``); tied input/output embeddings (updates aimed at the
tied output embedding land on the one stored tensor, as in peft). Refused with a
message: DoRA (``use_dora``), other PEFT types, ``target_parameters``,
``trainable_token_indices``, layer replication, and pickled adapter files
(``adapter_model.bin``) unless ``allow_pickle`` is set.

Nothing here decides which entries FAPM keeps: that is :mod:`fapm_merge.core`.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from fapm_merge.core.errors import FapmInputError
from fapm_merge.core.rules import FAPM
from fapm_merge.core.threads import map_chunks, worker_count
from fapm_merge.io.checkpoint import model_type, open_safetensors, tensor_shapes
from fapm_merge.io.model_paths import looks_local

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt")
_PEFT_PREFIX = "base_model.model."

# Adapter-config keys whose features change W_ft in ways this reader does not
# reproduce: refuse rather than silently compute a different task vector.
_UNSUPPORTED = {
    "use_dora": "DoRA rescales every column of W by a learned magnitude after the "
    "update, so its task vector is not scale * B @ A; merge it with mergekit's "
    f"`model: BASE+ADAPTER` syntax and merge_method: {FAPM} instead",
    "target_parameters": "LoRA on bare nn.Parameters (target_parameters) is not "
    "supported by the native path; use `model: BASE+ADAPTER`",
    "trainable_token_indices": "trainable token rows (trainable_token_indices) are not "
    "supported by the native path; use `model: BASE+ADAPTER`",
    "layer_replication": "layer_replication changes the model's layer list; use "
    "`model: BASE+ADAPTER`",
    "use_qalora": "QA-LoRA is not supported by the native path",
    "use_bdlora": "BD-LoRA is not supported by the native path",
}


def _set(value) -> bool:
    return bool(value) and value != {}


def _pattern_value(patterns: Mapping[str, float], module: str, default):
    """peft's ``get_pattern_key``: the first pattern the module name ends with."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraFactors:
    """One LoRA update ``scale * B @ A`` aimed at one module.

    Attributes:
        module (`str`): module name in the base model, e.g. ``model.layers.0.mlp.up_proj``.
        a_key, b_key (`str`): adapter tensor names of ``A`` ([r, in]) and ``B`` ([out, r]).
        scale (`float`): ``alpha / r`` or ``alpha / sqrt(r)`` (rsLoRA), after patterns.
        rank (`int`): ``r`` for this module (``rank_pattern`` applied).
        transpose (`bool`): the stored weight is ``(B @ A).T`` (fan_in_fan_out, embeddings).
        bias_key (`str`, *optional*): ``lora_B`` bias (``lora_bias``), added times ``scale``.
    """

    module: str
    a_key: str
    b_key: str
    scale: float
    rank: int
    transpose: bool
    bias_key: Optional[str] = None


@dataclass
class TensorUpdate:
    """Everything in the adapter that changes one base tensor, in peft's merge order."""

    replacement_key: Optional[str] = None  # modules_to_save / base_layer full tensor
    factors: List[LoraFactors] = field(default_factory=list)
    bias_of: List[LoraFactors] = field(default_factory=list)  # this tensor is a bias


_resolved: Dict[Tuple[str, bool], Path] = {}


def resolve_adapter_path(adapter: str, *, allow_pickle: bool = False) -> Path:
    """A local adapter folder for ``adapter``: a folder path, or a hub id ``org/name[@rev]``.

    Hub ids are fetched with ``huggingface_hub.snapshot_download`` (adapter files only);
    offline, a clear error says so.
    """
    path = Path(os.path.expanduser(adapter))
    if path.is_dir():
        return path.resolve()
    if looks_local(adapter):
        raise FapmInputError(
            f"adapter {adapter!r}: not a folder; give the folder holding "
            f"{ADAPTER_CONFIG} and {SAFETENSORS_FILE} (or a Hugging Face hub id org/name)"
        )
    repo, _, revision = adapter.partition("@")
    key = (adapter, allow_pickle)
    if key in _resolved:  # the kernel runs once per tensor: ask the hub once
        return _resolved[key]
    try:
        import huggingface_hub

        patterns = [ADAPTER_CONFIG, SAFETENSORS_FILE] + (list(PICKLE_FILES) if allow_pickle else [])
        local = huggingface_hub.snapshot_download(
            repo, revision=revision or None, allow_patterns=patterns
        )
    except Exception as error:
        raise FapmInputError(
            f"adapter {adapter!r} is not a local folder and could not be fetched from the "
            f"Hugging Face hub ({type(error).__name__}: {error}); download it and give "
            "the folder's absolute path"
        ) from None
    _resolved[key] = Path(local)
    return _resolved[key]


class LoraAdapter:
    """A PEFT LoRA adapter read lazily; rebuilds fine-tuned base tensors on request.

    Args:
        folder (`os.PathLike`): adapter folder with ``adapter_config.json`` and
            ``adapter_model.safetensors`` (what ``PeftModel.save_pretrained`` writes).
        allow_pickle (`bool`, defaults to False): also read ``adapter_model.bin``;
            pickle can run code, so it is opt-in (loaded with ``weights_only=True``).

    Raises:
        FapmInputError: missing files, a non-LoRA or DoRA adapter, a pickled file
            without opt-in, or a tensor whose role is unknown; messages name the file.
    """

    def __init__(self, folder: os.PathLike, *, allow_pickle: bool = False):
        self.folder = Path(folder)
        config_path = self.folder / ADAPTER_CONFIG
        if not config_path.is_file():
            raise FapmInputError(
                f"{config_path} not found: the adapter folder must hold the "
                f"{ADAPTER_CONFIG} and {SAFETENSORS_FILE} that peft's save_pretrained writes"
            )
        try:
            self.config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise FapmInputError(
                f"{config_path} is not valid JSON ({error}); was it still being written? "
                "Save the adapter again with peft's save_pretrained"
            ) from None
        if not isinstance(self.config, dict):
            raise FapmInputError(f"{config_path} must hold a JSON object (peft's LoraConfig)")
        self._check_config(config_path)
        self.weights_file, self._tensors = self._open_weights(allow_pickle)
        self.updates, self.base_layers = self._parse_keys()

    # -- reading ---------------------------------------------------------------------------
    def _check_config(self, config_path: Path) -> None:
        peft_type = str(self.config.get("peft_type", "")).upper()
        if peft_type != "LORA":
            raise FapmInputError(
                f"{config_path}: peft_type {peft_type or 'missing'!r} is not LORA; "
                "the native adapter path reads LoRA adapters only"
            )
        for key, why in _UNSUPPORTED.items():
            if _set(self.config.get(key)):
                raise FapmInputError(f"{config_path}: {key} is set: {why}")

    def _open_weights(self, allow_pickle: bool):
        path = self.folder / SAFETENSORS_FILE
        if path.is_file():
            handle = open_safetensors(path)
            return path, {name: handle for name in handle.keys()}
        for name in PICKLE_FILES:
            pickled = self.folder / name
            if pickled.is_file():
                if not allow_pickle:
                    raise FapmInputError(
                        f"{pickled} is a pickled file, and loading pickle can run "
                        "arbitrary code: convert the adapter to safetensors (load it with "
                        "peft and save_pretrained(..., safe_serialization=True)), or set "
                        "the parameter allow_pickle: true if you trust its source"
                    )
                state = torch.load(pickled, map_location="cpu", weights_only=True)
                return pickled, dict(state)
        raise FapmInputError(f"no {SAFETENSORS_FILE} in {self.folder}")

    def tensor(self, key: str) -> torch.Tensor:
        """One adapter tensor by its stored name."""
        source = self._tensors[key]
        return source.get_tensor(key) if hasattr(source, "get_tensor") else source

    def shape(self, key: str) -> Tuple[int, ...]:
        source = self._tensors[key]
        if hasattr(source, "get_slice"):
            return tuple(source.get_slice(key).get_shape())
        return tuple(source.shape)

    def _scale_and_rank(self, module: str) -> Tuple[float, int]:
        rank = int(_pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"]))
        alpha = float(
            _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config["lora_alpha"])
        )
        if self.config.get("use_rslora"):
            return alpha / math.sqrt(rank), rank
        return alpha / rank, rank

    def _parse_keys(self):
        """Group adapter tensors by the base module they change."""
        lora: Dict[str, Dict[str, str]] = {}
        full: Dict[str, str] = {}  # base-model tensor name -> adapter key (full tensor)
        base_layers: Dict[str, str] = {}
        suffixes = {
            ".lora_A.weight": "A",
            ".lora_B.weight": "B",
            ".lora_B.bias": "bias",
            ".lora_embedding_A": "embA",
            ".lora_embedding_B": "embB",
        }
        for key in self._tensors:
            name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
            if ".lora_magnitude_vector" in name:
                raise FapmInputError(f"{self.weights_file}: {key} is a DoRA magnitude: {_UNSUPPORTED['use_dora']}")
            for suffix, role in suffixes.items():
                if name.endswith(suffix):
                    lora.setdefault(name[: -len(suffix)], {})[role] = key
                    break
            else:
                if ".base_layer." in name:
                    # peft saves the base weight of a targeted embedding (and of a
                    # tied layer) and loads it back over the model's: it is W_ft's start.
                    base_layers[name.replace(".base_layer.", ".")] = key
                elif ".lora_" in name or ".modules_to_save." in name:
                    raise FapmInputError(
                        f"{self.weights_file}: tensor {key!r} has a LoRA role this reader "
                        "does not know; use mergekit's `model: BASE+ADAPTER` syntax"
                    )
                else:
                    full[name] = key  # modules_to_save: the whole trained tensor
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out"))
        updates: Dict[str, TensorUpdate] = {}
        for module, roles in lora.items():
            embedding = "embA" in roles or "embB" in roles
            a_key = roles.get("embA" if embedding else "A")
            b_key = roles.get("embB" if embedding else "B")
            if a_key is None or b_key is None:
                raise FapmInputError(
                    f"{self.weights_file}: module {module!r} has only one of lora_A/lora_B"
                )
            scale, rank = self._scale_and_rank(module)
            a_rows = self.shape(a_key)[0]
            if a_rows != rank:
                raise FapmInputError(
                    f"{self.weights_file}: module {module!r} has rank {a_rows} but "
                    f"{ADAPTER_CONFIG} says r={rank} (rank_pattern applied)"
                )
            factors = LoraFactors(
                module, a_key, b_key, scale, rank,
                transpose=embedding or fan_in_fan_out, bias_key=roles.get("bias"),
            )
            updates.setdefault(module + ".weight", TensorUpdate()).factors.append(factors)
            if factors.bias_key:
                updates.setdefault(module + ".bias", TensorUpdate()).bias_of.append(factors)
        for name, key in full.items():
            updates.setdefault(name, TensorUpdate()).replacement_key = key
        return updates, base_layers

    # -- binding to a base model -----------------------------------------------------------
    def bind(
        self,
        base_names: Iterable[str],
        *,
        base_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None,
        tied: Optional[Mapping[str, str]] = None,
        base_label: str = "the base model",
    ) -> "BoundAdapter":
        """Map every adapter entry to a tensor of the base; refuse what does not fit.

        Args:
            base_names (`Iterable[str]`): tensor names of the base checkpoint.
            base_shapes (`Mapping[str, tuple]`, *optional*): their shapes, to check the
                adapter's before any work is done.
            tied (`Mapping[str, str]`, *optional*): tensor names absent from the base
                because they are tied, mapped to the stored tensor they share
                (``{"lm_head.weight": "model.embed_tokens.weight"}``).
            base_label (`str`): how error messages name the base.

        Raises:
            FapmInputError: an adapter module with no matching base tensor (adapter for
                another architecture) or with a shape that does not fit; the message
                names the module, the adapter file and the base.
        """
        names = set(base_names)
        tied = dict(tied or {})
        bound: Dict[str, TensorUpdate] = {}
        # Stored (untied) names first: peft merges modules in model order, and the
        # input embedding comes before the output head that is tied to it.
        ordered = sorted(self.updates.items(), key=lambda item: item[0] not in names)
        for name, update in ordered:
            target = name if name in names else tied.get(name)
            if target is None:
                raise FapmInputError(
                    f"adapter {self.weights_file}: module {name.rsplit('.', 1)[0]!r} "
                    f"(tensor {name!r}) does not exist in {base_label}: the adapter was "
                    "made for another architecture or another base model"
                )
            into = bound.setdefault(target, TensorUpdate())
            if update.replacement_key is not None:
                if into.replacement_key is not None or into.factors:
                    raise FapmInputError(
                        f"adapter {self.weights_file}: {name!r} is a saved full tensor "
                        f"(modules_to_save) of a layer tied to {target!r}; merging it "
                        "would silently drop one of the two updates. Untie the base "
                        "(save it with tie_word_embeddings=False) first"
                    )
                into.replacement_key = update.replacement_key
            into.factors.extend(update.factors)
            into.bias_of.extend(update.bias_of)
        if base_shapes is not None:
            for target, update in bound.items():
                self._check_shapes(target, update, tuple(base_shapes[target]), base_label)
        return BoundAdapter(self, bound, {tied.get(n, n): k for n, k in self.base_layers.items()})

    def _check_shapes(self, target: str, update: TensorUpdate, shape, base_label: str):
        def fail(what: str, got) -> None:
            raise FapmInputError(
                f"adapter {self.weights_file}: {what} has shape {tuple(got)} but "
                f"{target!r} in {base_label} is {shape}: the adapter was trained on a "
                "different base model (check base_model_name_or_path in "
                f"{ADAPTER_CONFIG})"
            )

        if update.replacement_key is not None:
            got = self.shape(update.replacement_key)
            if tuple(got) != shape:
                fail(f"saved tensor {update.replacement_key!r}", got)
        for f in update.factors:
            out_dim, in_dim = self.shape(f.b_key)[0], self.shape(f.a_key)[1]
            got = (in_dim, out_dim) if f.transpose else (out_dim, in_dim)
            if got != shape:
                fail(f"module {f.module!r} (B @ A)", got)
        for f in update.bias_of:
            if self.shape(f.bias_key) != shape:
                fail(f"bias {f.bias_key!r}", self.shape(f.bias_key))


@dataclass
class BoundAdapter:
    """An adapter matched to one base model: ``finetuned(name, W_pre)`` per tensor."""

    adapter: LoraAdapter
    updates: Dict[str, TensorUpdate]
    base_layers: Dict[str, str]

    def touches(self, name: str) -> bool:
        return name in self.updates or name in self.base_layers

    @torch.no_grad()
    def finetuned(self, name: str, pre: torch.Tensor) -> Optional[torch.Tensor]:
        """``W_ft`` for base tensor ``name`` as peft's merge_and_unload makes it; None if untouched.

        Args:
            name (`str`): base tensor name.
            pre (`torch.Tensor`): ``W_pre`` in the dtype the merged model is built in.
        """
        update = self.updates.get(name)
        start_key = (update.replacement_key if update else None) or self.base_layers.get(name)
        if update is None and start_key is None:
            return None
        # Loading a state dict copies saved tensors into the model's dtype.
        device = pre.device  # with --cuda the base arrives on the GPU
        # Always a private copy: the deltas are added in place, and a saved tensor read
        # from safetensors can share the file's memory map (or, pickled, be the loaded
        # object itself), so adding into it would change what the next call reads.
        result = (
            self.adapter.tensor(start_key).to(device=device, dtype=pre.dtype, copy=True)
            if start_key
            else pre.clone()
        )
        for f in (update.factors if update else ()):
            self._add_delta(result, f, device)  # peft: base_layer.weight.data += delta_weight
        for f in (update.bias_of if update else ()):
            result += _adapter_dtype(self.adapter.tensor(f.bias_key).to(device)) * f.scale
        return result

    def _add_delta(self, result: torch.Tensor, f: LoraFactors, device: torch.device) -> None:
        """``result += scale * B @ A`` in place, with peft's arithmetic.

        The product is one full matmul, as peft computes it (a matmul split into row
        blocks is not guaranteed to round the same). Scaling it and adding it to
        ``result`` go by row blocks of about `_ADD_BLOCK_ELEMENTS`, so the float32
        product is read once while in cache and no full-size ``scale * product`` or
        mixed-dtype temporary is made: 2.6x faster than ``result += product * scale``
        on a 2048x5632 bf16 weight, same bits (each element is the same two roundings).
        """
        a = _adapter_dtype(self.adapter.tensor(f.a_key).to(device))
        b = _adapter_dtype(self.adapter.tensor(f.b_key).to(device))
        product = b @ a
        delta = product.T if f.transpose else product  # shape checked against the base at bind
        rows = max(1, _ADD_BLOCK_ELEMENTS // max(1, delta.shape[1]))
        blocks = [(start, min(start + rows, delta.shape[0]))
                  for start in range(0, delta.shape[0], rows)]

        def add(_, start: int, end: int) -> None:
            block = delta[start:end]
            block.mul_(f.scale)  # in place: the product is ours, nobody else holds it
            result[start:end] += block

        # Blocks on the kernel's single-threaded workers: two small torch ops per
        # block would otherwise each be a parallel region whose barrier stalls on a
        # busy machine (same ops per block, so the same bits).
        map_chunks(add, blocks, worker_count(result, len(blocks)))

    @property
    def touched(self) -> List[str]:
        return sorted(set(self.updates) | set(self.base_layers))


_ADD_BLOCK_ELEMENTS = 1 << 16
"""Elements per row block when adding a LoRA product into a weight (cache-sized)."""


def _adapter_dtype(tensor: torch.Tensor) -> torch.Tensor:
    # PeftModel.from_pretrained(autocast_adapter_dtype=True) keeps adapter weights in
    # float32 even when they were saved in float16/bfloat16.
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor


# -- binding to a base checkpoint on disk, cached per process ---------------------------------
_cache: Dict[tuple, BoundAdapter] = {}
_cache_lock = threading.Lock()


def _fingerprint(folder: Path) -> tuple:
    # Re-read an adapter retrained at the same path (mergekit's lora cache goes stale).
    return tuple(
        (p.name, p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(folder.iterdir())
        if p.is_file()
    )


def base_checkpoint_layout(base_folder: os.PathLike) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, str]]:
    """``(shapes, tied)`` of a local base checkpoint: tensor shapes and tied names.

    ``tied`` maps the output-embedding weight name to the input-embedding weight name
    when the config ties them and the checkpoint stores only the input embedding.
    """
    folder = Path(base_folder)
    shapes = tensor_shapes(folder)
    return shapes, _tied_names(folder, shapes)


def _tied_names(folder: Path, shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, str]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        return {}
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder))
    if not getattr(config, "tie_word_embeddings", False):
        return {}
    # Build the model skeleton on the meta device (no memory) only to learn which
    # module is the input and which the output embedding.
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            with torch.device("meta"):
                model = auto.from_config(config)
            break
        except (ValueError, KeyError):
            continue
    else:
        return {}
    names = {id(module): name for name, module in model.named_modules()}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None:
        return {}
    source, alias = names[id(inputs)] + ".weight", names[id(outputs)] + ".weight"
    if alias in shapes or source not in shapes:
        return {}
    return {alias: source}


def _check_model_family(adapter: LoraAdapter, base_folder: Path) -> None:
    """Refuse an adapter peft recorded for another model family, even when its shapes fit.

    peft's ``auto_mapping.parent_library`` (``transformers.models.<family>.modeling_...``)
    names the family the adapter was trained on; config.json's ``model_type`` the base's.
    Either may be absent (then nothing is checked).
    """
    library = str((adapter.config.get("auto_mapping") or {}).get("parent_library") or "")
    parts = library.split(".")
    if len(parts) < 3 or parts[:2] != ["transformers", "models"]:
        return
    family, base_type = parts[2], str(model_type(base_folder) or "").replace("-", "_")
    if base_type and base_type != family and not base_type.startswith(family + "_"):
        trained_on = adapter.config.get("base_model_name_or_path")
        raise FapmInputError(
            f"{adapter.folder / ADAPTER_CONFIG} was trained on a {family!r} model"
            + (f" ({trained_on})" if trained_on else "")
            + f", but base model {base_folder} is a {base_type!r} one: give the base the "
            "adapter was trained on"
        )


def load_bound_adapter(
    adapter: str, base_folder: os.PathLike, *, allow_pickle: bool = False
) -> BoundAdapter:
    """The adapter ``adapter`` bound to the base checkpoint in ``base_folder`` (cached).

    Args:
        adapter (`str`): adapter folder or hub id (see `resolve_adapter_path`).
        base_folder (`os.PathLike`): local folder of the base checkpoint (safetensors).
        allow_pickle (`bool`, defaults to False): allow ``adapter_model.bin``.
    """
    folder = resolve_adapter_path(adapter, allow_pickle=allow_pickle)
    base_folder = Path(base_folder)
    key = (str(folder), _fingerprint(folder), str(base_folder.resolve()), allow_pickle)
    with _cache_lock:
        bound = _cache.get(key)
        if bound is None:
            lora = LoraAdapter(folder, allow_pickle=allow_pickle)
            _check_model_family(lora, base_folder)  # before reading every shard header
            shapes, tied = base_checkpoint_layout(base_folder)
            bound = lora.bind(
                shapes, base_shapes=shapes, tied=tied, base_label=f"base model {base_folder}"
            )
            _cache.clear()  # one adapter at a time in practice; do not pile them up
            _cache[key] = bound
        return bound


__all__ = [
    "LoraAdapter",
    "BoundAdapter",
    "LoraFactors",
    "TensorUpdate",
    "base_checkpoint_layout",
    "load_bound_adapter",
    "resolve_adapter_path",
]
