"""Triton backend plumbing: registry behaviour with/without Triton or CUDA, `supports`, autotune pruning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from pecm import ops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, **env) -> str:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    for k, v in env.items():
        if v is None:
            full.pop(k, None)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_without_triton_the_package_imports_and_reports_triton_unavailable():
    out = _run(
        "import sys; sys.modules['triton'] = None\n"
        "import pecm\n"
        "from pecm import backends\n"
        "print(backends.available_backends())\n"
        "print(backends.backend_errors()['triton'])\n"
        "import pecm.kernels as k; print(k.HAS_TRITON, bool(k.IMPORT_ERROR))\n",
        TRITON_INTERPRET="1",
    )
    lines = out.strip().splitlines()
    assert "triton" not in lines[0] and "torch" in lines[0]
    assert "triton" in lines[1].lower()
    assert lines[2] == "False True"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cpu_only_without_interpreter_reports_why():
    out = _run(
        "from pecm import backends\nprint(backends.available_backends()); print(backends.backend_errors()['triton'])",
        TRITON_INTERPRET=None,
    )
    first, second = out.strip().splitlines()
    assert "triton" not in first
    assert "TRITON_INTERPRET" in second and "CUDA" in second


@pytest.mark.interpret
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_supports_and_dtype_errors():
    pytest.importorskip("triton")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # shared helpers, any import mode
    from test_triton_kernels import fresh_triton_backend

    fresh_triton_backend()
    from pecm.backends import get_backend

    be = get_backend("triton", torch.device("cpu"), torch.float32)
    assert be.name == "triton" and be.differentiable
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert be.supports(torch.device("cpu"), dt)
    assert not be.supports(torch.device("cpu"), torch.float64)
    q = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises((TypeError, ValueError), match="triton"):
        ops.pecm_scores(q, q, torch.ones(3), backend="triton")


def test_autotune_pruning_keeps_fitting_configs():
    pytest.importorskip("triton")
    import importlib

    import triton

    from pecm.backends import triton_backend  # noqa: F401  (registers pecm.kernels in a source checkout)

    # the package re-exports functions named like their modules: fetch the modules themselves
    common, pecm_rerank, pecm_topk = (
        importlib.import_module(f"pecm.kernels.{m}") for m in ("common", "pecm_rerank", "pecm_topk")
    )

    cfgs = [triton.Config(dict(m), num_warps=w, num_stages=s) for m, w, s in pecm_topk._GPU_CONFIGS]
    prune = common.prune_configs("BLOCK_B", "KT", f32_budget=256, half_budget=256)
    c32 = torch.empty(1, 8, dtype=torch.float32)
    c16 = torch.empty(1, 8, dtype=torch.float16)
    big = prune(cfgs, {"c_ptr": c32}, KT=1024, MODE=0)
    assert big and all(c.num_stages * (c.kwargs["BLOCK_B"] * c.kwargs["BLOCK_KD"] * 4 + c.kwargs["BLOCK_KD"] * 1024 * 4)
                       <= common.SMEM_BUDGET for c in big)  # fmt: skip
    for mode, elt in ((0, c32), (1, c16)):  # configs that spill at sm_90 are dropped, the others kept
        kept = prune(cfgs, {"c_ptr": elt}, KT=64, MODE=mode)
        assert 3 <= len(kept) < len(cfgs)
        assert all(c.kwargs["BLOCK_B"] * 64 * c.kwargs["BLOCK_KD"] // (32 * c.num_warps) <= 256 for c in kept)
    gcfgs = [triton.Config(dict(m), num_warps=w, num_stages=s) for m, w, s in pecm_rerank._GPU_CONFIGS]
    kept = pecm_rerank._prune_gather(gcfgs, {}, KT=1024)
    assert len(kept) == 1 and kept[0].kwargs["BLOCK_KD"] == 16  # nothing fits: the smallest gather chunk
    kept = pecm_rerank._prune_gather(gcfgs, {}, KT=64)
    assert kept and all(64 * c.kwargs["BLOCK_KD"] <= 16 * 32 * c.num_warps for c in kept)


def test_autotune_pruning_for_raw_candidates():
    """Prepared candidates never see the raw-only configs; raw ones try only those; with Eq. 4 pooled on
    the fly the configs whose h tile fits in registers are kept (scores, top-k and re-rank)."""
    pytest.importorskip("triton")
    import importlib

    import triton

    from pecm.backends import triton_backend  # noqa: F401

    common, pecm_rerank, pecm_scores, pecm_topk = (
        importlib.import_module(f"pecm.kernels.{m}") for m in ("common", "pecm_rerank", "pecm_scores", "pecm_topk")
    )

    def cfg_list(mod):
        base = [triton.Config(dict(m), num_warps=w, num_stages=s) for m, w, s in mod._GPU_CONFIGS]
        raw = [triton.Config(dict(m), num_warps=w, num_stages=s) for m, w, s in mod._RAW_GPU_CONFIGS]
        for c in raw:
            c.pecm_raw = True
        return base, raw

    c16 = torch.empty(1, 8, dtype=torch.float16)
    for mod, cols, kw in ((pecm_scores, "BLOCK_N", {}), (pecm_topk, "SUB", dict(KT=64, SUB=32))):
        base, raw = cfg_list(mod)
        prune = common.prune_configs("BLOCK_B", cols, f32_budget=1024, half_budget=1024)
        prep = prune(base + raw, {"c_ptr": c16}, MODE=1, NORM=False, POOL=0, D_PAD=256, H_ELEMS=8192, **kw)
        assert prep and not any(getattr(c, "pecm_raw", False) for c in prep)
        assert prep == prune(base, {"c_ptr": c16}, MODE=1, NORM=False, POOL=0, **kw)  # as before raw configs
        got = prune(base + raw, {"c_ptr": c16}, MODE=1, NORM=True, POOL=2, D_PAD=256, H_ELEMS=8192, **kw)
        assert got and all(c.pecm_raw for c in got)
        for c in got:
            assert 256 * {**kw, **c.kwargs}[cols] <= min(8192, common.H_PER_THREAD * 32 * c.num_warps)
    assert common.raw_sub(64, 256, dict(POOL=2)) == 8192 // 256  # the default budget: 32-wide tiles at D = 256
    assert common.raw_sub(64, 256, dict(POOL=2), 8192) == 32 and common.raw_sub(64, 256, dict(POOL=1), 8192) == 64
    assert common.raw_sub(64, 4096, dict(POOL=2), 8192) == 64  # h does not fit even 16 wide: two-step, KT wide
    gcfgs = [triton.Config(dict(m), num_warps=w, num_stages=s) for m, w, s in pecm_rerank._GPU_CONFIGS]
    kept = pecm_rerank._prune_gather(gcfgs, {}, KT=64, SUB=32, POOL=2, D_PAD=256, H_ELEMS=8192)
    assert kept and all(32 * 256 <= common.H_PER_THREAD * 32 * c.num_warps for c in kept)


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """Ahead-of-time compile (Triton front end + ptxas) of every kernel's first config for sm_90, for prepared
    candidates and for raw ones normalised and pooled on the fly (K = 26, D = 256)."""
    pytest.importorskip("triton")
    r = subprocess.run(
        [sys.executable, str(ROOT / "kernels" / "aot_check.py"), "--quick", "--kt", "64"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "all kernels compiled" in r.stdout
    # per dtype: scores, top-k and re-rank for prepared and raw candidates + the backward GEMMs (4 distinct
    # specialisations of the B = N = 256 launches); + the prologue (the same compile for every dtype)
    assert r.stdout.count("ok    ") == 3 * (6 + 4) + 1
