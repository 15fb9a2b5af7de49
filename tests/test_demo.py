"""`fapm-merge demo`, the README's first command, end to end (it runs mergekit-yaml)."""

import pytest
import torch
from click.testing import CliRunner

from helpers import load_state
from reference import reference_fapm

pytestmark = pytest.mark.slow


def test_demo_builds_the_pair_runs_mergekit_yaml_and_summarises(tmp_path):
    from fapm_merge.cli import main

    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", str(out), "--sparsity", "0.8"])
    assert result.exit_code == 0, result.output
    assert "kept" in result.output and "model card:" in result.output
    assert (out / "merged" / "README.md").read_text().count("FAPM") >= 1
    assert not list(tmp_path.glob(".merged.partial-*")) and not list(out.glob(".merged.partial-*"))

    pre_state = load_state(out / "models" / "base")
    ft_state = load_state(out / "models" / "finetuned")
    merged = load_state(out / "merged")
    assert set(merged) == set(pre_state)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        expected, _ = reference_fapm(pre_state[name], ft_state[name], 0.8)
        assert torch.equal(merged[name], expected), name

    again = CliRunner().invoke(main, ["demo", str(out)])
    assert again.exit_code != 0 and "--overwrite" in again.output
