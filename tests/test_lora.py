"""LoRA fine-tunes (issue 4): FAPM through `BASE+ADAPTER` and through the native reader.

Every adapter here is made by peft on a tiny real transformers model. The independent
reference is peft itself (PeftModel.from_pretrained + merge_and_unload gives W_ft)
followed by the plain FAPM reference of tests/reference.py; mergekit's own
`model: BASE+ADAPTER` route is run for the same adapter, and the native `fapm_lora`
output must equal both bit for bit.
"""

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from helpers import load_state, run_merge_in_process, run_mergekit_yaml
from reference import reference_fapm, reference_keep_count, reference_mask, reference_scores

from fapm_merge.core import FapmInputError
from fapm_merge.io.lora_adapter import LoraAdapter, load_bound_adapter, resolve_adapter_path
from fapm_merge.workflows.demo import TINY_CONFIGS, build_model

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

# name -> (architecture, LoraConfig keyword arguments, base dtype)
CASES = {
    # LoRA on an embedding, trained modules_to_save head, rank/alpha patterns
    "llama-embed-mts-patterns": (
        "llama",
        dict(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"],
            modules_to_save=["lm_head"], rank_pattern={"v_proj": 2}, alpha_pattern={"up_proj": 3},
        ),
        torch.float32,
    ),
    # rsLoRA scale alpha/sqrt(r) on every linear layer, bfloat16 checkpoint
    "llama-rslora-bf16": (
        "llama",
        dict(
            r=8, lora_alpha=16, use_rslora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        torch.bfloat16,
    ),
    # tied embeddings: LoRA on both the input embedding and the tied head
    "qwen2-tied": (
        "qwen2",
        dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "lm_head", "q_proj"]),
        torch.float32,
    ),
    # GPT-2 Conv1D stores W transposed: fan_in_fan_out; a trained modules_to_save
    # tensor; lora_bias (B's bias times scale is added to the layer's bias)
    "gpt2-conv1d-mts-bias": (
        "gpt2",
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True,
             modules_to_save=["wpe"], lora_bias=True),
        torch.float32,
    ),
}


def _load(folder, dtype):
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, config.architectures[0])
    return cls.from_pretrained(folder, dtype=dtype)


def make_adapter(base_dir, out_dir, *, seed=0, dtype=torch.float32, save_kwargs=None, **lora):
    """A peft adapter with nonzero A and B and "trained" modules_to_save copies."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_load(base_dir, dtype), LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name or "lora_B" in name and name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(out_dir, **(save_kwargs or {}))
    return Path(out_dir).resolve()


def peft_merged_state(base_dir, adapter_dir, dtype):
    """W_ft by peft's own merge, in memory: the independent reference of W_ft."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load(base_dir, dtype), str(adapter_dir))
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def native_recipe(base, adapter, **parameters):
    return {
        "merge_method": "fapm_lora",
        "base_model": str(base),
        "models": [{"model": str(base)}],
        "parameters": {"adapter": str(adapter), **parameters},
    }


def plus_recipe(base, adapter, **parameters):
    model = {"model": f"{base}+{adapter}"}
    if parameters:
        model["parameters"] = parameters
    return {"merge_method": "fapm", "base_model": str(base), "models": [model]}


@pytest.fixture(scope="session")
def lora_root(tmp_path_factory):
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="session")
def bases(lora_root):
    """One base checkpoint per (architecture, dtype)."""
    made = {}

    def get(arch, dtype):
        key = (arch, dtype)
        if key not in made:
            folder = lora_root / f"base-{arch}-{str(dtype).split('.')[-1]}"
            build_model(TINY_CONFIGS[arch]).to(dtype).save_pretrained(folder)
            made[key] = folder.resolve()
        return made[key]

    return get


@pytest.fixture(scope="session")
def case_runs(lora_root, bases):
    """Per case: base, adapter, peft's W_ft, native output, BASE+ADAPTER output (cached)."""
    runs = {}

    def get(case):
        if case not in runs:
            arch, lora, dtype = CASES[case]
            base = bases(arch, dtype)
            adapter = make_adapter(base, lora_root / f"adapter-{case}", dtype=dtype, **lora)
            dtype_name = str(dtype).split(".")[-1]
            native = run_merge_in_process(
                {**native_recipe(base, adapter), "dtype": dtype_name}, lora_root / f"native-{case}"
            )
            plus = run_merge_in_process(
                {**plus_recipe(base, adapter), "dtype": dtype_name},
                lora_root / f"plus-{case}",
                lora_merge_cache=str(lora_root / "cache"),
            )
            runs[case] = dict(
                base=base, adapter=adapter, dtype=dtype,
                pre=load_state(base), ft=peft_merged_state(base, adapter, dtype),
                native=load_state(native), plus=load_state(plus),
            )
        return runs[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_native_equals_peft_reference_and_base_plus_adapter_bit_for_bit(case, case_runs):
    """Same base and adapter: the native path, mergekit's BASE+ADAPTER path and the
    plain reference on peft's merged weights agree exactly, tensor by tensor."""
    run = case_runs(case)
    pre, ft, native, plus = run["pre"], run["ft"], run["native"], run["plus"]
    assert set(native) == set(plus) == set(pre)
    touched = [name for name in pre if not torch.equal(ft[name], pre[name])]
    assert touched, "the adapter must change something or the test proves nothing"
    for name in pre:
        assert native[name].dtype == pre[name].dtype
        assert torch.equal(native[name], plus[name]), name
        expected, _ = reference_fapm(pre[name], ft[name], sparsity=0.1)
        assert torch.equal(native[name], expected), name


@pytest.mark.parametrize("case", list(CASES))
def test_untouched_weights_are_the_base_bit_for_bit(case, case_runs):
    run = case_runs(case)
    bound = load_bound_adapter(str(run["adapter"]), run["base"])
    untouched = [name for name in run["pre"] if not bound.touches(name)]
    assert untouched
    for name in untouched:
        assert torch.equal(run["native"][name], run["pre"][name]), name
        assert torch.equal(run["ft"][name], run["pre"][name]), name  # peft agrees


def test_default_sparsity_is_one_tenth_for_lora(case_runs):
    """Each adapted weight keeps floor(0.9 * numel) entries of its (dense) update."""
    run = case_runs("llama-embed-mts-patterns")
    name = "model.layers.0.self_attn.q_proj.weight"
    pre, ft, out = run["pre"][name], run["ft"][name], run["native"][name]
    assert bool((ft != pre).all())  # a dense LoRA update: every entry moved
    assert int((out != pre).sum()) == (pre.numel() * 9) // 10


def test_sparsity_is_overridable(case_runs, lora_root):
    run = case_runs("gpt2-conv1d-mts-bias")
    out = load_state(run_merge_in_process(
        {**native_recipe(run["base"], run["adapter"], sparsity=0.6), "dtype": "float32"},
        lora_root / "native-sparsity-0.6",
    ))
    name = "transformer.h.0.attn.c_attn.weight"
    expected, _ = reference_fapm(run["pre"][name], run["ft"][name], sparsity=0.6)
    assert torch.equal(out[name], expected)
    assert not torch.equal(out[name], run["native"][name])


@pytest.mark.parametrize("rescale", [False, True])
def test_beta_density_lambda_and_rescale_reach_the_kernel(case_runs, lora_root, rescale):
    """Regression guard: fapm_lora hard-coding beta, lambda or rescale, or dropping
    density, went unnoticed while the tests set only sparsity."""
    run = case_runs("gpt2-conv1d-mts-bias")  # float32
    name = "transformer.h.0.attn.c_attn.weight"
    pre, ft = run["pre"][name], run["ft"][name]
    k = reference_keep_count(pre.numel(), 0.2)  # density 0.8
    mask = reference_mask(reference_scores(pre, ft, beta=0.5), k).view(pre.shape)
    assert not torch.equal(mask, reference_mask(reference_scores(pre, ft), k).view(pre.shape))
    recipe = native_recipe(run["base"], run["adapter"], beta=0.5, density=0.8, rescale=rescale,
                           **{"lambda": 0.7})
    out = load_state(run_merge_in_process(
        {**recipe, "dtype": "float32"}, lora_root / f"native-params-rescale-{rescale}"
    ))[name]
    kept = (ft - pre) * mask
    if not rescale:
        assert torch.equal(out, pre + kept * 0.7)
        return
    factor = float((ft - pre).double().abs().sum() / kept.double().abs().sum())
    assert factor > 1.01  # the rescale is visible
    torch.testing.assert_close(out, pre + kept * (0.7 * factor), rtol=1e-6, atol=0)


def test_reader_scales_patterns_and_transposes(case_runs):
    """Unit view of the reader: scale per module and Conv1D/embedding transposes."""
    llama = LoraAdapter(case_runs("llama-embed-mts-patterns")["adapter"])
    scales = {f.module.split(".")[-1]: (f.scale, f.rank, f.transpose)
              for u in llama.updates.values() for f in u.factors}
    assert scales["q_proj"] == (8 / 4, 4, False)
    assert scales["v_proj"] == (8 / 2, 2, False)  # rank_pattern
    assert scales["up_proj"] == (3 / 4, 4, False)  # alpha_pattern
    assert scales["embed_tokens"] == (8 / 4, 4, True)  # (B @ A).T
    assert llama.updates["lm_head.weight"].replacement_key is not None  # modules_to_save
    rs = LoraAdapter(case_runs("llama-rslora-bf16")["adapter"])
    assert {f.scale for u in rs.updates.values() for f in u.factors} == {16 / 8**0.5}
    gpt2 = LoraAdapter(case_runs("gpt2-conv1d-mts-bias")["adapter"])
    assert all(f.transpose for u in gpt2.updates.values() for f in u.factors)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("block_elements", [1, 200])
def test_blockwise_lora_add_equals_peft_merge_bit_for_bit(case, block_elements, case_runs, monkeypatch):
    """Regression guard for the row-block LoRA add (`BoundAdapter._add_delta`): with
    blocks far smaller than any weight (one row; uneven blocks of several rows), every
    rebuilt W_ft, transposed embeddings and Conv1D included, equals peft's merge."""
    import fapm_merge.io.lora_adapter as lora_module

    monkeypatch.setattr(lora_module, "_ADD_BLOCK_ELEMENTS", block_elements)
    run = case_runs(case)
    bound = load_bound_adapter(str(run["adapter"]), run["base"])
    rebuilt = 0
    for name, pre in run["pre"].items():
        finetuned = bound.finetuned(name, pre)
        if finetuned is None:
            continue
        assert finetuned.dtype == pre.dtype
        assert torch.equal(finetuned, run["ft"][name]), name
        rebuilt += 1
    assert rebuilt > 1


@pytest.mark.parametrize("case", ["qwen2-tied", "llama-embed-mts-patterns", "gpt2-conv1d-mts-bias"])
def test_rebuilding_a_weight_twice_gives_the_same_weight(case, case_runs):
    """Regression: W_ft built from a tensor the adapter saves in full (a tied layer's
    base_layer copy, modules_to_save) was added into in place; safetensors had mapped
    that tensor from the file, so every later read in the process (a second merge,
    another test) saw the previous update added again."""
    run = case_runs(case)
    bound = load_bound_adapter(str(run["adapter"]), run["base"])
    saved_in_full = [n for n in run["pre"] if n in bound.base_layers
                     or (n in bound.updates and bound.updates[n].replacement_key)]
    assert saved_in_full
    for name in saved_in_full:
        for _ in range(3):
            assert torch.equal(bound.finetuned(name, run["pre"][name]), run["ft"][name]), name


# -- refusals ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def llama_base(bases):
    return bases("llama", torch.float32)


def test_dora_is_refused_with_a_clear_message(llama_base, lora_root):
    adapter = make_adapter(llama_base, lora_root / "dora", r=4, lora_alpha=8,
                           target_modules=["q_proj"], use_dora=True)
    with pytest.raises(FapmInputError, match=r"use_dora.*DoRA.*BASE\+ADAPTER"):
        LoraAdapter(adapter)
    with pytest.raises(FapmInputError, match="DoRA"):
        run_merge_in_process(native_recipe(llama_base, adapter), lora_root / "dora-out")


def test_pickled_adapter_needs_opt_in(llama_base, lora_root, case_runs):
    adapter = make_adapter(llama_base, lora_root / "pickled", r=4, lora_alpha=8,
                           target_modules=["q_proj"], save_kwargs={"safe_serialization": False})
    assert (adapter / "adapter_model.bin").is_file()
    with pytest.raises(FapmInputError, match=r"adapter_model\.bin.*pickle.*allow_pickle"):
        LoraAdapter(adapter)
    out = load_state(run_merge_in_process(
        native_recipe(llama_base, adapter, allow_pickle=True), lora_root / "pickled-out"
    ))
    ft = peft_merged_state(llama_base, adapter, torch.float32)
    pre = load_state(llama_base)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(out[name], reference_fapm(pre[name], ft[name], sparsity=0.1)[0])


def test_adapter_for_another_architecture_names_module_and_file(llama_base, case_runs, lora_root):
    gpt2_adapter = case_runs("gpt2-conv1d-mts-bias")["adapter"]
    with pytest.raises(FapmInputError) as error:
        run_merge_in_process(native_recipe(llama_base, gpt2_adapter), lora_root / "wrong-arch")
    assert f"{gpt2_adapter / 'adapter_config.json'} was trained on a 'gpt2' model" in str(error.value)
    assert f"{llama_base} is a 'llama' one" in str(error.value)
    # Without peft's record of the family (older peft, hand-made configs) the modules
    # that match nothing in the base are named instead.
    anonymous = lora_root / "gpt2-adapter-anonymous"
    shutil.copytree(gpt2_adapter, anonymous, dirs_exist_ok=True)
    config = json.loads((anonymous / "adapter_config.json").read_text())
    config.pop("auto_mapping", None)
    (anonymous / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FapmInputError) as error:
        load_bound_adapter(str(anonymous), llama_base)
    message = str(error.value)
    assert "adapter_model.safetensors" in message and str(anonymous) in message
    assert "transformer.h." in message and "another architecture" in message


@pytest.mark.parametrize("family, base_type, refused", [
    ("qwen2", "llama", True),
    ("gemma3", "gemma3_text", False),  # *_text model types live in their family's module
    ("llama4", "llama4_text", False),
    ("mistral", "mistral", False),
])
def test_model_family_check_knows_text_only_model_types(tmp_path, family, base_type, refused):
    from types import SimpleNamespace

    from fapm_merge.io.lora_adapter import _check_model_family

    (tmp_path / "config.json").write_text(json.dumps({"model_type": base_type}))
    adapter = SimpleNamespace(folder=tmp_path / "adapter", config={
        "auto_mapping": {"parent_library": f"transformers.models.{family}.modeling_{family}"}})
    if refused:
        with pytest.raises(FapmInputError, match=f"trained on a '{family}' model, but base model"):
            _check_model_family(adapter, tmp_path)
    else:
        _check_model_family(adapter, tmp_path)


def test_adapter_for_another_family_with_fitting_shapes_is_refused(bases, lora_root):
    """Regression: a qwen2 adapter on an equally sized llama base merged with exit 0."""
    qwen_adapter = make_adapter(bases("qwen2", torch.float32), lora_root / "adapter-qwen2-plain",
                                dtype=torch.float32, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    llama = bases("llama", torch.float32)
    with pytest.raises(FapmInputError, match=r"trained on a 'qwen2' model .* is a 'llama' one"):
        load_bound_adapter(str(qwen_adapter), llama)


def test_adapter_with_shapes_that_do_not_fit_names_module_and_file(lora_root, case_runs):
    wider = dict(TINY_CONFIGS["llama"], intermediate_size=64)
    other = lora_root / "llama-wider-base"
    build_model(wider).save_pretrained(other)
    adapter = case_runs("llama-embed-mts-patterns")["adapter"]
    with pytest.raises(FapmInputError, match=r"mlp\.up_proj.*\(48, 32\).*\(64, 32\)") as error:
        load_bound_adapter(str(adapter), other)
    assert str(adapter / "adapter_model.safetensors") in str(error.value)


def test_modules_to_save_on_a_tied_head_is_refused(lora_root, bases):
    base = bases("qwen2", torch.float32)
    adapter = make_adapter(base, lora_root / "tied-mts", r=4, lora_alpha=8,
                           target_modules=["embed_tokens"], modules_to_save=["lm_head"])
    with pytest.raises(FapmInputError, match=r"lm_head.*tied.*model\.embed_tokens\.weight"):
        load_bound_adapter(str(adapter), base)


def test_missing_adapter_fails_at_plan_time(llama_base, lora_root):
    with pytest.raises(ValidationError, match=r"adapter.*has no adapter_config\.json"):
        run_merge_in_process(native_recipe(llama_base, lora_root / "no-such-adapter"),
                             lora_root / "missing-out")


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FapmInputError, match=r"not a local folder.*Hugging Face hub"):
        resolve_adapter_path("some-org/some-lora-adapter")


def test_hub_id_is_resolved_with_huggingface_hub(case_runs, lora_root, monkeypatch):
    """`adapter: org/name` goes through huggingface_hub.snapshot_download; offline it
    is served from the hub cache, laid out here exactly as huggingface_hub writes it."""
    import shutil

    import huggingface_hub.constants

    run = case_runs("llama-embed-mts-patterns")
    cache = lora_root / "hub-cache"
    repo = cache / "models--some-org--medqa-lora"
    shutil.copytree(run["adapter"], repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    out = load_state(run_merge_in_process(
        {**native_recipe(run["base"], "some-org/medqa-lora"), "dtype": "float32"},
        lora_root / "native-hub-id",
    ))
    assert set(out) == set(run["native"])
    for name in out:
        assert torch.equal(out[name], run["native"][name]), name


def test_retrained_adapter_at_same_path_is_reread(llama_base, lora_root):
    """Regression guard: mergekit's lora cache is keyed by path strings only and goes
    stale when an adapter is retrained in place; the native reader must not."""
    folder = lora_root / "retrained"
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj"])
    make_adapter(llama_base, folder, seed=1, **kwargs)
    pre = load_state(llama_base)["model.layers.0.self_attn.q_proj.weight"]
    first = load_bound_adapter(str(folder), llama_base).finetuned(
        "model.layers.0.self_attn.q_proj.weight", pre)
    make_adapter(llama_base, folder, seed=2, **kwargs)
    os.utime(folder / "adapter_model.safetensors", ns=(1, 10**18))  # mtime surely differs
    second = load_bound_adapter(str(folder), llama_base).finetuned(
        "model.layers.0.self_attn.q_proj.weight", pre)
    assert not torch.equal(first, second)


# -- mergekit-yaml end to end, and the shipped recipes ---------------------------------------

def _substituted(recipe_file, base, adapter):
    config = yaml.safe_load(recipe_file.read_text())
    config = copy.deepcopy(config)
    config["base_model"] = str(base)
    for model in config["models"]:
        model["model"] = f"{base}+{adapter}" if "+" in model["model"] else str(base)
    if "adapter" in config.get("parameters", {}):
        config["parameters"]["adapter"] = str(adapter)
    config["dtype"] = "float32"
    return config


@pytest.mark.slow
def test_shipped_recipes_run_with_mergekit_yaml_and_agree(case_runs, lora_root):
    """recipes/lora-native.yml and recipes/lora-base-plus-adapter.yml, paths substituted,
    through the real mergekit-yaml (the second with --lora-merge-cache): same output,
    and only the base+adapter route leaves a merged copy on disk."""
    run = case_runs("qwen2-tied")
    native_out, plus_out = lora_root / "yaml-native", lora_root / "yaml-plus"
    cache = lora_root / "yaml-cache"
    run_mergekit_yaml(_substituted(RECIPES / "lora-native.yml", run["base"], run["adapter"]),
                      native_out, "--lora-merge-cache", str(lora_root / "unused-cache"))
    run_mergekit_yaml(_substituted(RECIPES / "lora-base-plus-adapter.yml", run["base"], run["adapter"]),
                      plus_out, "--lora-merge-cache", str(cache))
    native, plus = load_state(native_out), load_state(plus_out)
    assert set(native) == set(plus) == set(run["pre"])
    for name in native:
        assert torch.equal(native[name], plus[name]), name
        assert torch.equal(native[name], run["native"][name]), name
    assert any(cache.iterdir())  # BASE+ADAPTER wrote a merged copy ...
    assert not (lora_root / "unused-cache").exists() or not any((lora_root / "unused-cache").iterdir())


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]"])
def test_unreadable_adapter_config_names_the_file(content, lora_root, llama_base):
    """Regression: an empty or half-written adapter_config.json (seen when a benchmark
    rewrote the adapter during a merge) raised a bare JSONDecodeError from json's
    internals; it must name the file and say what to do."""
    folder = lora_root / f"adapter-bad-config-{len(content)}"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(content)
    with pytest.raises(FapmInputError, match="adapter_config.json"):
        LoraAdapter(folder)
