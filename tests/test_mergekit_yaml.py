"""The unmodified `mergekit-yaml` and `mergekit-multi` commands know `fapm` (subprocess).

This is what proves the start-up hook registers the plugin: nothing in these
processes imports fapm_merge explicitly.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from helpers import console_script, fapm_recipe, load_state, run_mergekit_yaml
from reference import reference_fapm

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _assert_matches_reference(base, finetuned, out, sparsity):
    pre_state, ft_state, out_state = load_state(base), load_state(finetuned), load_state(out)
    assert set(out_state) == set(pre_state)
    for name, tensor in out_state.items():
        expected, _ = reference_fapm(pre_state[name], ft_state[name], sparsity)
        assert torch.equal(tensor, expected), name


def test_plain_mergekit_yaml_merges_fapm_element_for_element(model_pairs, tmp_path):
    base, finetuned = model_pairs["qwen2"]  # biases and tied embeddings
    out = tmp_path / "out"
    run_mergekit_yaml(fapm_recipe(base, finetuned, sparsity=0.8), out)
    _assert_matches_reference(base, finetuned, out, 0.8)
    card = (out / "README.md").read_text()
    assert "FAPM" in card and "2509.08255" in card


def test_plain_mergekit_multi_knows_fapm(llama_pair, tmp_path):
    base, finetuned = llama_pair
    stage = dict(fapm_recipe(base, finetuned, sparsity=0.9), name="repaired")
    recipe = tmp_path / "multi.yml"
    recipe.write_text(yaml.safe_dump_all([stage], sort_keys=False))
    result = subprocess.run(
        [console_script("mergekit-multi"), str(recipe), "--intermediate-dir", str(tmp_path / "stages"),
         "--out-path", str(tmp_path / "final"), "--no-copy-tokenizer"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    produced = [p.parent for p in tmp_path.rglob("*.safetensors") if "final" in str(p) or "stages" in str(p)]
    assert produced, "mergekit-multi wrote no model"
    _assert_matches_reference(base, finetuned, produced[0], 0.9)


def _build_wheel(directory: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-q", "-w", str(directory), str(REPO)],
        check=True, capture_output=True,
    )
    (wheel,) = directory.glob("fapm_merge-*.whl")
    return wheel


def test_regular_wheel_install_registers_for_plain_mergekit_yaml(llama_pair, tmp_path):
    """`pip install .` (not editable): the wheel ships the hook at site-packages root.

    A fresh venv gets mergekit/torch through a plain path line (which does NOT run
    the editable install's .pth files) and our wheel unpacked into its own
    site-packages, so only the wheel's hook can make `fapm` known.
    """
    wheel = _build_wheel(tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    for root_file in ("_fapm_merge_startup.py", "fapm_merge.pth", "fapm_merge.start"):
        assert root_file in names, f"{root_file} missing from {wheel.name}"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    zipfile.ZipFile(wheel).extractall(site)
    deps = next(p for p in map(Path, sys.path) if (p / "mergekit").is_dir())
    (site / "zz_deps.pth").write_text(f"{deps}\n")
    python = venv / "bin" / "python"
    # without PYTHONPATH: a checkout named there would be imported instead of the wheel
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1"}

    probe = subprocess.run(
        [str(python), "-c", "import sys, fapm_merge; print(fapm_merge.__file__); "
         "print('torch' in sys.modules)"],
        capture_output=True, text=True, check=True, cwd=tmp_path, env=env,  # not the repo
    )
    assert str(site) in probe.stdout, "the wheel's copy must be the one imported"

    base, finetuned = llama_pair
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(fapm_recipe(base, finetuned, sparsity=0.9)))
    out = tmp_path / "out"
    result = subprocess.run(
        [str(python), "-c", "from mergekit.scripts.run_yaml import main; main()",
         str(recipe), str(out), "--no-copy-tokenizer"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_matches_reference(base, finetuned, out, 0.9)
