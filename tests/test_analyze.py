"""fapm-merge analyze: every statistic against the plain reference (argsort masks)."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from helpers import load_state, variant
from reference import reference_keep_count, reference_mask, reference_scores

from fapm_merge.workflows.analyze import analyze, split_name, tensor_stats
from fapm_merge.cli import main


def by_hand(pre, ft, sparsity):
    """The analyze statistics of one tensor, written out with the reference."""
    delta = (ft.double() - pre.double()).flatten()
    energy = delta.square()
    k = reference_keep_count(pre.numel(), sparsity)
    fapm = reference_mask(reference_scores(pre, ft), k)
    magnitude = reference_mask(reference_scores(pre, ft, beta=0.0), k)
    total = float(energy.sum())
    return {
        "numel": pre.numel(),
        "changed": int((ft != pre).sum()),
        "positive": float((reference_scores(pre, ft) > 0).double().mean()),
        "energy_kept": float(energy[fapm].sum()) / total if total else 0.0,
        "energy_kept_magnitude": float(energy[magnitude].sum()) / total if total else 0.0,
        "overlap": float((fapm & magnitude).sum()) / k if k and total else None,
        "mean_abs_pre": float(pre.double().abs().mean()),
        "max_abs_delta": float(delta.abs().max()),
        "kept": k,
    }


@pytest.fixture(scope="module")
def analysed(llama_pair):
    return analyze(*llama_pair, sparsity=0.8)


def test_every_tensor_matches_the_reference(llama_pair, analysed):
    base, ft = (load_state(p) for p in llama_pair)
    assert sorted(t.name for t in analysed.tensors) == sorted(base)
    frozen = 0
    for stats in analysed.tensors:
        expected = by_hand(base[stats.name], ft[stats.name], 0.8)
        for key, value in expected.items():
            got = getattr(stats, key)
            if value is None or isinstance(value, int):
                assert got == value, (stats.name, key)
            else:
                assert got == pytest.approx(value, rel=1e-6, abs=1e-12), (stats.name, key)
        frozen += stats.changed == 0
    assert frozen >= 1  # the toy fine-tune leaves some tensors unchanged: covered


def test_layers_pool_their_tensors(analysed):
    layer = analysed.layers()[1]
    members = [t for t in analysed.tensors if t.layer == 1]
    energy = [t.delta_l2**2 for t in members]
    assert layer["numel"] == sum(t.numel for t in members)
    assert layer["energy_kept"] == pytest.approx(sum(t.energy_kept * e for t, e in zip(members, energy)) / sum(energy))
    assert layer["positive"] == pytest.approx(sum(t.positive * t.numel for t in members) / layer["numel"])
    compared = [t for t in members if t.overlap is not None]
    assert layer["overlap"] == pytest.approx(sum(t.overlap * t.kept for t in compared) / sum(t.kept for t in compared))


def test_names_split_into_layer_and_module():
    assert split_name("model.layers.12.self_attn.q_proj.weight") == (12, "self_attn.q_proj")
    assert split_name("transformer.h.3.attn.c_attn.bias") == (3, "attn.c_attn.bias")
    assert split_name("lm_head.weight") == (None, "lm_head")


def test_beta_zero_is_magnitude_everywhere(llama_pair):
    pre, ft = (load_state(p)["model.layers.0.mlp.up_proj.weight"] for p in llama_pair)
    stats = tensor_stats("t", pre, ft, sparsity=0.7, beta=0.0)
    assert stats.overlap == 1.0 and stats.energy_kept == stats.energy_kept_magnitude


def test_cli_json_only_table_and_plot(llama_pair, analysed, tmp_path):
    out = CliRunner().invoke(main, ["analyze", *map(str, llama_pair), "--sparsity", "0.8", "--json-only"])
    assert out.exit_code == 0, out.output
    document = json.loads(out.output)  # nothing but JSON on stdout
    assert document["totals"] == pytest.approx(analysed.totals())
    assert document["settings"]["sparsity"] == 0.8 and len(document["tensors"]) == len(analysed.tensors)
    png, js = tmp_path / "a.png", tmp_path / "a.json"
    out = CliRunner().invoke(main, ["analyze", *map(str, llama_pair), "--plot", str(png), "--json", str(js)])
    assert out.exit_code == 0, out.output
    assert "layer 1" in out.output and png.read_bytes()[:4] == b"\x89PNG"
    assert json.loads(js.read_text())["settings"]["sparsity"] == 0.9  # the default


def test_cli_errors(llama_pair, model_pairs, tmp_path):
    from fapm_merge.workflows.demo import TINY_CONFIGS, build_model

    out = CliRunner().invoke(main, ["analyze", str(llama_pair[0])])
    assert out.exit_code != 0 and "FINETUNED or --adapter" in out.output
    other_vocab = tmp_path / "vocab80"
    build_model(dict(TINY_CONFIGS["llama"], vocab_size=80)).save_pretrained(other_vocab)
    out = CliRunner().invoke(main, ["analyze", str(llama_pair[0]), str(other_vocab)])
    assert out.exit_code != 0 and "(64, 32) in the base and (80, 32)" in out.output and "same architecture" in out.output
    # Regression: llama vs qwen2 of equal sizes gave a full table and exit 0.
    out = CliRunner().invoke(main, ["analyze", str(llama_pair[0]), str(model_pairs["qwen2"][1])])
    assert out.exit_code != 0 and "is a 'llama' model and" in out.output and "a 'qwen2' one" in out.output
    out = CliRunner().invoke(main, ["analyze", *map(str, llama_pair), "--sparsity", "1.5"])
    assert out.exit_code != 0 and "sparsity must be a number in [0, 1]" in out.output


def test_adapter_equals_peft_merged_weights(llama_pair, tmp_path):
    from test_lora import make_adapter, peft_merged_state

    base = llama_pair[0]
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    result = analyze(base, adapter=str(adapter))
    assert result.settings["sparsity"] == 0.1  # the paper's LoRA default
    merged, pre = peft_merged_state(base, adapter, torch.float32), load_state(base)
    names = [t.name for t in result.tensors]
    assert names and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in names)
    for stats in result.tensors:
        expected = tensor_stats(stats.name, pre[stats.name], merged[stats.name], sparsity=0.1)
        assert stats == expected
    assert not math.isnan(result.totals()["energy_kept"])


def test_tensors_on_one_side_only_are_named(llama_pair, tmp_path):
    """Regression: a tensor missing from the fine-tune was left out without a word."""
    base, ft = llama_pair
    name = "model.layers.1.mlp.up_proj.weight"
    partial = variant(ft, tmp_path / "partial", lambda state: state.update({"extra.weight": state.pop(name)}))
    result = analyze(base, partial)
    assert result.skipped == ["extra.weight: only in the fine-tune", f"{name}: missing from the fine-tune"]
    assert name not in {t.name for t in result.tensors}
    out = CliRunner().invoke(main, ["analyze", str(base), str(partial)])
    assert out.exit_code == 0 and f"skipped {name}: missing from the fine-tune" in out.output
