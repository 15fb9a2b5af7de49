"""Seeded kernel inputs and the stored digests of the kernel's outputs on them.

``tests/data/kernel_digests.json`` holds SHA-256 digests of what the kernel returned
on these inputs when it was written (issue 20: generated once from the kernel on
main before it was split into modules). ``tests/test_kernel_bits.py`` recomputes
them, at 1, 2 and 4 torch threads, and compares. They cover what the plain
reference (``reference.py``) cannot check bit for bit: float64 sums over values
spread across many decades (mean, L1 rescale, several models), and the score
formula on extremes.

Only public ``fapm_merge.core`` names are used here, so the digests can be made by
any version of the kernel. Each case also digests its inputs: a failure there means
torch's random generator changed, not the kernel. Rewrite the file only for an
output change that was intended and reviewed::

    PYTHONPATH=. python tests/kernel_cases.py --write
"""

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import torch

from fapm_merge import core
from helpers import bits, torch_threads

DIGESTS = Path(__file__).resolve().parent / "data" / "kernel_digests.json"
DIRECT = (1 << 17) + 3  # whole-tensor kthvalue
BIG = (1 << 19) + 4099  # sampled bracket, one-pass path; odd: a tail that is not 8-aligned
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32, "f64": torch.float64}
SPARSITIES = (0.0, 0.1, 0.5, 0.9, 0.999, 1.0)


def pair(numel, dtype, seed, kind="normal"):
    """W_pre, W_ft with zeros in W_pre, untouched entries (dW == 0) and, for
    ``ties``, few distinct values (many equal scores at any threshold)."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    pre = torch.randn(numel, generator=gen, dtype=wide) * 0.02
    delta = torch.randn(numel, generator=gen, dtype=wide) * 3e-4
    if kind == "ties":
        pre = (pre * 200).round() / 200
        delta = (delta * 8000).round() / 8000
    elif kind == "wide":  # magnitudes over 30 decades: float64 sums depend on order
        pre = pre * 10 ** torch.randint(-12, 18, (numel,), generator=gen).to(wide)
    pre[: numel // 50] = 0.0  # W_pre == 0: -inf scores, or 0 where dW == 0 too
    delta[numel // 100 : numel // 25] = 0.0  # untouched entries score 0
    return pre.to(dtype), (pre + delta).to(dtype)


def rescaled_models():
    """W_pre and two task vectors over 18 decades: their float64 L1 sums depend on
    the order, so a sum split between threads could move the rescale factor."""
    gen = torch.Generator().manual_seed(7)
    pre = torch.randn(BIG, generator=gen) * 0.02
    fts = [pre + torch.randn(BIG, generator=gen)
           * 10 ** torch.randint(-12, 6, (BIG,), generator=gen).float() for _ in range(2)]
    return pre, fts


def extreme_pair(dtype):
    """Values over 600 decades (float64; 80 for float32): subnormals, overflow to
    inf, 0/0, zeros in W_pre and dW == 0."""
    gen = torch.Generator().manual_seed(0)
    n = 1_000_003
    top = 38 if dtype == torch.float32 else 300
    pre = torch.randn(n, generator=gen, dtype=dtype) * 10 ** torch.randint(
        -top - 5, top, (n,), generator=gen).to(dtype)
    ft = pre + torch.randn(n, generator=gen, dtype=dtype) * 10 ** torch.randint(
        -top - 5, top, (n,), generator=gen).to(dtype)
    finite = torch.isfinite(pre) & torch.isfinite(ft) & torch.isfinite(ft - pre)
    pre, ft = pre[finite], ft[finite]
    pre[::97] = 0.0
    ft[::89] = pre[::89]
    return pre, ft


def digest(*values) -> str:
    """SHA-256 of tensors (dtype, shape, bits), floats (exact hex), ints and
    dataclasses (their fields)."""
    sha = hashlib.sha256()
    for value in values:
        if isinstance(value, torch.Tensor):
            sha.update(f"{value.dtype}{tuple(value.shape)}".encode())
            sha.update(bits(value).numpy().tobytes())
        elif dataclasses.is_dataclass(value):
            sha.update(digest(*dataclasses.astuple(value)).encode())
        elif isinstance(value, float):
            sha.update(value.hex().encode())
        else:
            sha.update(repr(value).encode())
    return sha.hexdigest()


def _selection_cases():
    """One model at coefficient 1, direct and sampled selection, every dtype, ties."""
    for size_name, numel in (("direct", DIRECT), ("sampled", BIG)):
        for dtype_name, dtype in DTYPES.items():
            for kind in ("normal", "ties"):
                name = f"{size_name}/{dtype_name}/{kind}"
                pre, ft = pair(numel, dtype, seed=numel + len(dtype_name), kind=kind)
                yield f"{name}/inputs", lambda pre=pre, ft=ft: (pre, ft)
                for sparsity in SPARSITIES:
                    k = core.keep_count(numel, sparsity=sparsity)
                    yield f"{name}/merge/{sparsity}", (
                        lambda pre=pre, ft=ft, k=k: (core.fapm_merge(pre, [ft], keep_counts=[k]),))

                def pruned(pre=pre, ft=ft, k=core.keep_count(numel, sparsity=0.9)):
                    scores = core.fapm_scores(pre, ft, beta=2.5)
                    threshold = core.find_threshold(scores.values, k)
                    delta = core.pruned_delta(pre, ft, k, beta=2.5, rescale=True)
                    return (scores.values, scores.mean_abs_pre, scores.coefficient,
                            scores.delta_l1, threshold, delta.values, delta.rescale_factor)

                yield f"{name}/scores-threshold-pruned", pruned


def _float64_sum_cases():
    """Outputs whose float64 sums depend on the order of the additions."""
    for dtype_name in ("bf16", "f32"):
        pre, ft = pair(BIG * 3, DTYPES[dtype_name], seed=5, kind="wide")
        k = core.keep_count(pre.numel(), sparsity=0.9)
        yield f"wide/{dtype_name}/inputs", lambda pre=pre, ft=ft: (pre, ft)
        yield f"wide/{dtype_name}/merge", (
            lambda pre=pre, ft=ft, k=k: (core.fapm_merge(pre, [ft], keep_counts=[k]),))

        def scores(pre=pre, ft=ft):
            got = core.fapm_scores(pre, ft)
            return got.values, got.mean_abs_pre, got.coefficient, got.delta_l1

        yield f"wide/{dtype_name}/scores", scores
    pre, fts = rescaled_models()
    k = core.keep_count(BIG, sparsity=0.8)
    yield "rescale/inputs", lambda: (pre, *fts)
    yield "rescale/merge", lambda: (core.fapm_merge(
        pre, fts, keep_counts=[k, k], weights=[0.3, 0.7], rescale=True),)
    for numel in (core.MEAN_BLOCK_ELEMENTS + 40_000,  # one block (one row) and a tail over 32K
                  core.MEAN_BLOCK_ELEMENTS * 9 + 33_000):  # the last group: one block and the tail
        pre, _ = pair(numel, torch.float32, seed=numel, kind="wide")
        yield f"mean/{numel}/inputs", lambda pre=pre: (pre,)
        yield f"mean/{numel}", lambda pre=pre: (core.mean_abs(pre),)
    for dtype_name in ("f32", "f64"):
        pre, ft = extreme_pair(DTYPES[dtype_name])
        yield f"extreme/{dtype_name}/inputs", lambda pre=pre, ft=ft: (pre, ft)
        for beta in (1.0, 1e-30, 3.7):
            def scores(pre=pre, ft=ft, beta=beta):
                got = core.fapm_scores(pre, ft, beta=beta, chunk_elements=65_536)
                return got.values, got.coefficient, got.delta_l1

            yield f"extreme/{dtype_name}/scores/{beta}", scores


GROUPS = {"selection": _selection_cases, "float64-sums": _float64_sum_cases}


def compute(group: str) -> dict:
    """``{case: digest}`` of one group, computed now."""
    return {name: digest(*run()) for name, run in GROUPS[group]()}


def stored(group: str) -> dict:
    return json.loads(DIGESTS.read_text())[group]


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    with torch_threads(1):
        found = {group: compute(group) for group in GROUPS}
    DIGESTS.parent.mkdir(exist_ok=True)
    DIGESTS.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    print(f"wrote {sum(map(len, found.values()))} digests to {DIGESTS}")
