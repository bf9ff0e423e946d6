"""GPU readiness of the Triton kernels (issue 17), checked under the interpreter on the CPU.

- the grid-stride loops that keep every grid within CUDA's limits (forced by lowering common.MAX_GRID);
- no host sync in the op path for device tensors (forced by `pecm.operands.on_device` -> True, the
  backend stubbed out, every Python-level sync counted);
- the bfloat16 hi/lo split (the path the GPU takes) and the fast precision mode against float64;
- the pinned-config switch, the finer re-rank split for small B, the big top-k tiles' pruning and the
  full-sort fallback of the top-k merge.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import assert_topk_matches, make_inputs  # noqa: E402
from test_triton_kernels import DEVICES, check_topk, fresh_triton_backend, make_cand  # noqa: E402

from pecm import ops, reference  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _triton_ready():
    fresh_triton_backend()


def _mod(name):
    from pecm.backends import triton_backend  # noqa: F401  (registers pecm.kernels in a source checkout)

    return importlib.import_module(f"pecm.kernels.{name}")


def _ref(q, c, w, qm=None, cm=None):
    return reference.scores(q.double(), c.double(), w.double(), qm, cm)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_grid", [1, 3])
def test_grid_stride_loops_cover_every_tile(device, monkeypatch, max_grid):
    """MAX_GRID programs walk all tiles (what CUDA's 65,535 limit on grid axis 1 would otherwise break:
    scores for N > 4.2M, top-k with many splits, the backward GEMM with P = N): scores, top-k with
    many splits, re-rank with several splits and the backward all match the reference."""
    monkeypatch.setattr(_mod("common"), "MAX_GRID", max_grid)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    q, c, w, qm, cm = make_inputs(18, 70, 3, 16, masks=True, seed=1, ties=True)
    ref = _ref(q, c, w, qm, cm)
    out = ops.pecm_scores(dev(q), dev(c), dev(w), q_mask=dev(qm), c_mask=dev(cm), backend="triton")
    for got, exp in zip(out, ref):
        np.testing.assert_allclose(got.double().cpu().numpy(), exp, atol=1e-5, rtol=0)
    v, i = ops.pecm_topk(dev(q[:6]), dev(c), dev(w), 5, q_mask=dev(qm[:6]), c_mask=dev(cm), chunk_size=16,
                         backend="triton")  # fmt: skip
    assert_topk_matches(v, i, ref[2][:6], 5, 1e-5)
    cand = make_cand(70, 3, 40)
    v, i = ops.pecm_rerank(dev(q[:3]), dev(c), dev(cand), dev(w), 4, q_mask=dev(qm[:3]), c_mask=dev(cm),
                           backend="triton")  # fmt: skip
    check_topk(v, i, ref[2][:3], 4, 1e-5, cand=cand.numpy())
    # backward: every GEMM and the elementwise prologue through the grid stride
    qg, cg = dev(q[:5]).requires_grad_(), dev(c[:40]).requires_grad_()
    qt, ct = q[:5].clone().requires_grad_(), c[:40].clone().requires_grad_()
    for qq, cc, be in ((qg, cg, "triton"), (qt, ct, "torch")):
        s, cf, r = ops.pecm_scores(qq, cc, dev(w) if be == "triton" else w, backend=be)
        (s.sum() + 2 * cf.sum() + 3 * r.sum()).backward()
    np.testing.assert_allclose(qg.grad.cpu().numpy(), qt.grad.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(cg.grad.cpu().numpy(), ct.grad.numpy(), atol=1e-4, rtol=1e-4)


def test_grids_are_one_dimensional_and_capped(monkeypatch):
    common = _mod("common")
    assert common.MAX_GRID == 2**31 - 1  # CUDA's axis-0 limit; axes 1 and 2 are never used
    assert common.grid_1d(10) == (10,) and common.grid_1d(0) == (1,)
    monkeypatch.setattr(common, "MAX_GRID", 7)
    assert common.grid_1d(10**9) == (7,)


# ------------------------------------------------------------------------------------------------
# no host sync in the op path
# ------------------------------------------------------------------------------------------------
class _Stub:
    """A backend that returns correctly shaped results without touching the data."""

    name = "triton"
    differentiable = True

    def supports(self, device, dtype):
        return True

    def scores(self, qs, cs):
        z = torch.zeros((qs.b, cs.n))
        return z, z.clone(), z.clone()

    def topk(self, qs, cs, k, by, chunk_size):
        return torch.zeros((qs.b, k)), torch.zeros((qs.b, k), dtype=torch.int64)

    def rerank(self, qs, cs, cand, k, by):
        return torch.zeros((qs.b, k)), torch.zeros((qs.b, k), dtype=torch.int64)


@pytest.fixture
def sync_counter(monkeypatch):
    """Pretend every tensor lives on a device (`on_device` -> True), stub the backend, and count every
    Python-level read of a tensor value (bool / int / float / index / item / tolist / numpy / torch.equal)."""
    from pecm import backends, library
    from pecm import operands as operands_mod

    for mod in (operands_mod, library, ops):
        monkeypatch.setattr(mod, "on_device", lambda t: True)
    stub = _Stub()
    monkeypatch.setattr(library, "get_backend_by_name", lambda name: stub)
    monkeypatch.setattr(backends, "resolve_backend", lambda *a, **k: "triton")
    monkeypatch.setattr(ops, "resolve_backend", lambda *a, **k: "triton")
    monkeypatch.setattr(ops, "get_backend", lambda *a, **k: stub)  # no C++ CPU fast path (CPU tensors only)
    calls = []
    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    orig_equal = torch.equal

    def equal(*a, **k):
        calls.append("torch.equal")
        return orig_equal(*a, **k)

    monkeypatch.setattr(torch, "equal", equal)
    return calls


def test_op_path_has_no_host_sync_for_device_tensors(sync_counter):
    q, c, w, qm, cm = make_inputs(3, 20, 4, 8, masks=True, seed=2)
    cand = torch.randint(-1, 20, (3, 9))
    w2 = w.clone()  # equal weights, another tensor: the "same weights" check must not sync either
    sync_counter.clear()
    ops.pecm_scores(q, c, w, q_mask=qm, c_mask=cm, backend="triton")
    ops.pecm_topk(q, c, w, 5, q_mask=qm, c_mask=cm, backend="triton")
    ops.pecm_rerank(q, c, cand, w, 4, q_mask=qm, c_mask=cm, backend="triton")
    cs = ops.prepare_candidates(c, w, c_mask=cm)  # (its own normalisation pass may sync: not the op path)
    qs = ops.prepare_queries(q, w2, q_mask=qm)
    sync_counter.clear()
    ops.pecm_topk(qs, cs, None, 5, backend="triton")
    ops.pecm_rerank(qs, cs, cand, None, 4, backend="triton")
    ops.pecm_topk(q, cs, w2, 5, q_mask=qm, backend="triton")
    assert sync_counter == [], f"host syncs in the op path: {sync_counter}"


def test_device_checks_are_queued_and_exact_with_check(sync_counter):
    """On a device the bad values are not silently used: the queued assert fails (on the CPU here it
    fails at once); check=True gives the exact ValueError naming the argument."""
    q, c, w, _, _ = make_inputs(2, 10, 3, 4, seed=3)
    bad = torch.tensor([[0, 10], [1, -1]])
    with pytest.raises(RuntimeError, match="candidates: ids must be in"):
        ops.pecm_rerank(q, c, bad, w, 2, backend="triton")
    with pytest.raises(ValueError, match=r"candidates: ids must be in \[-1, N=10\).*got 10"):
        ops.pecm_rerank(q, c, bad, w, 2, backend="triton", check=True)
    with pytest.raises(RuntimeError, match="w: weights must be finite and non-negative"):
        ops.pecm_topk(q, c, -w, 2, backend="triton")
    with pytest.raises(ValueError, match="w: weights must be non-negative"):
        ops.pecm_topk(q, c, -w, 2, backend="triton", check=True)
    with pytest.raises(ValueError, match="w: weights must be non-negative"):
        ops.prepare_candidates(c, -w, check=True)
    with pytest.raises(ValueError, match="w: weights must be non-negative"):
        ops.prepare_queries(q, -w, check=True)


@pytest.mark.parametrize("device", DEVICES)
def test_rerank_kernel_never_reads_out_of_range_ids(device):
    """Whatever the host-side check does, ids outside [-1, N) are padding inside the kernel."""
    from pecm.backends.triton_backend import kernels

    q, c, w, _, _ = make_inputs(2, 12, 3, 8, seed=4)
    qs = ops.prepare_queries(q.to(device), w.to(device))
    cs = ops.prepare_candidates(c.to(device), w.to(device))
    cand = torch.tensor([[3, 12, 10**6, -5, 1], [-1, 2**40, 0, 11, 13]], device=device)
    v, i = kernels.pecm_rerank(qs, cs, cand, 5, 0)
    ref = _ref(q, c, w)[2]
    ok = cand.cpu().clone()
    ok[(ok < 0) | (ok >= 12)] = -1
    exp_v, _ = reference.rerank(ref, ok.numpy(), 5)
    got = v.double().cpu().numpy()
    fin = np.isfinite(exp_v)
    assert np.array_equal(np.isfinite(got), fin)
    np.testing.assert_allclose(got[fin], exp_v[fin], atol=1e-5, rtol=0)
    assert sorted(i[0].tolist()) == [-1, -1, -1, 1, 3] and sorted(i[1].tolist()) == [-1, -1, -1, 0, 11]


# ------------------------------------------------------------------------------------------------
# precision: the bfloat16 hi/lo split and the fast mode
# ------------------------------------------------------------------------------------------------
def _scores_err(device, dtype, seed=5):
    q, c, w, qm, cm = make_inputs(3, 40, 5, 24, dtype=dtype, masks=True, seed=seed, ties=True)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    out = ops.pecm_scores(dev(q), dev(c), dev(w), q_mask=dev(qm), c_mask=dev(cm), backend="triton")
    ref = _ref(q, c, w, qm, cm)
    return max(float(np.abs(g.double().cpu().numpy() - r).max()) for g, r in zip(out, ref)), out


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_hi_lo_split_is_the_path_taken(device, monkeypatch):
    """bfloat16 storage takes MODE 1 (hi/lo split) under the interpreter too (its bfloat16 products run as
    float32 dots of the split operands, common._EMU_BF16), with the split's accuracy: far inside 2e-2 and
    different from the float32 path (MODE 0)."""
    common, scores = _mod("common"), _mod("pecm_scores")
    assert common.dot_mode(torch.bfloat16) == 1 and common.dot_mode(torch.float16) == 1
    assert common.dot_mode(torch.float32) == 0
    err1, out1 = _scores_err(device, torch.bfloat16)
    monkeypatch.setattr(scores, "dot_mode", lambda dt, fast=None: 0)
    err0, out0 = _scores_err(device, torch.bfloat16)
    monkeypatch.setattr(scores, "dot_mode", lambda dt, fast=None: 2)
    err2, out2 = _scores_err(device, torch.bfloat16)
    assert max(err0, err1, err2) < 2e-2
    diff = lambda a, b: max(float((x - y).abs().max()) for x, y in zip(a, b))  # noqa: E731
    # the split ran (not the float32 path) and kept its accuracy (~2^-16 relative), far closer to the
    # float32 path than the query rounded once to bfloat16 (MODE 2)
    assert 0 < diff(out1, out0) < 1e-4 and diff(out2, out0) > 10 * diff(out1, out0), (
        diff(out1, out0),
        diff(out2, out0),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_fast_precision_mode(device, monkeypatch):
    """PECM_TRITON_PRECISION=fast: the query rounded once to the half storage type (MODE 2), one dot;
    within DESIGN §2's 2e-2 for half types (scores, top-k, re-rank); float32 storage is unaffected."""
    common = _mod("common")
    exact32 = _scores_err(device, torch.float32)[1]
    exact16 = _scores_err(device, torch.float16)[1]
    monkeypatch.setenv("PECM_TRITON_PRECISION", "fast")
    assert common.dot_mode(torch.float16) == 2 and common.dot_mode(torch.float32) == 0
    for dtype in (torch.float16, torch.bfloat16):
        err, out = _scores_err(device, dtype)
        assert err < 2e-2, (dtype, err)
        if dtype == torch.float16:
            assert not torch.equal(out[2], exact16[2])
    assert all(torch.equal(a, b) for a, b in zip(_scores_err(device, torch.float32)[1], exact32))
    q, c, w, qm, cm = make_inputs(3, 40, 5, 24, dtype=torch.bfloat16, masks=True, seed=6, ties=True)
    ref = _ref(q, c, w, qm, cm)[2]
    dev = lambda t: t.to(device)  # noqa: E731
    v, i = ops.pecm_topk(dev(q), dev(c), dev(w), 6, q_mask=dev(qm), c_mask=dev(cm), backend="triton")
    check_topk(v, i, ref, 6, 2e-2)
    cand = make_cand(40, 3, 30)
    v, i = ops.pecm_rerank(dev(q), dev(c), dev(cand), dev(w), 5, q_mask=dev(qm), c_mask=dev(cm), backend="triton")
    check_topk(v, i, ref, 5, 2e-2, cand=cand.numpy())
    monkeypatch.setenv("PECM_TRITON_PRECISION", "fastest")
    with pytest.raises(ValueError, match="PECM_TRITON_PRECISION"):
        ops.pecm_scores(dev(q), dev(c), dev(w), backend="triton")


# ------------------------------------------------------------------------------------------------
# pinned configs
# ------------------------------------------------------------------------------------------------
def test_pinned_config_switch(monkeypatch):
    common = _mod("common")
    monkeypatch.delenv("PECM_TRITON_CONFIG", raising=False)
    assert common.config_mode() == "autotune"
    monkeypatch.setenv("PECM_TRITON_CONFIG", "pinned")
    assert common.config_mode() == "pinned"
    monkeypatch.setattr(common, "interpret", lambda: False)  # the GPU choice
    for name in ("pecm_scores", "pecm_topk", "pecm_rerank", "pecm_scores_bwd"):
        mod = _mod(name)
        for attr in ("PINNED", "PINNED_RAW") if name != "pecm_scores_bwd" else ("PINNED",):
            meta, warps, stages = getattr(mod, attr)
            assert isinstance(meta, dict) and isinstance(warps, int) and isinstance(stages, int)
        if name == "pecm_scores_bwd":
            assert mod.pinned_config() == mod.PINNED and mod.PINNED in mod._GPU_MM_CONFIGS
        else:
            assert mod.pinned_config(False) == mod.PINNED and mod.pinned_config(True) == mod.PINNED_RAW
            assert mod.PINNED in mod._GPU_CONFIGS
    # the autotuners keep exactly the pinned config and time nothing
    import triton

    topk = _mod("pecm_topk")
    cfgs = topk._all_configs()  # the GPU set (interpret() is patched off above)
    prune = topk._pecm_topk_kernel.early_config_prune
    c16 = torch.empty(1, 8, dtype=torch.float16)
    args = dict(KT=64, SUB=64, MODE=1, B_BUCKET=1024)
    for raw, want in ((False, topk.PINNED), (True, topk.PINNED_RAW)):
        got = prune(cfgs, {"c_ptr": c16}, NORM=raw, POOL=2 if raw else 0, D_PAD=256, H_ELEMS=8192, **args)
        assert len(got) == 1 and common._same_config(got[0], want)
    assert common.bench_or_skip(lambda: pytest.fail("timed in pinned mode")) == [0.0, 0.0, 0.0]
    monkeypatch.setenv("PECM_TRITON_CONFIG", "autotune")
    assert len(prune(cfgs, {"c_ptr": c16}, NORM=False, POOL=0, **args)) > 1
    assert isinstance(cfgs[0], triton.Config)
    monkeypatch.setenv("PECM_TRITON_CONFIG", "tuned")
    with pytest.raises(ValueError, match="PECM_TRITON_CONFIG"):
        common.config_mode()


@pytest.mark.interpret
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_pinned_launch_and_bad_value_at_the_op(monkeypatch):
    q, c, w, _, _ = make_inputs(2, 20, 3, 8, seed=7)
    ref = _ref(q, c, w)[2]
    monkeypatch.setenv("PECM_TRITON_CONFIG", "pinned")
    v, i = ops.pecm_topk(q, c, w, 4, backend="triton")
    assert_topk_matches(v, i, ref, 4, 1e-5)
    monkeypatch.setenv("PECM_TRITON_CONFIG", "bogus")
    with pytest.raises(ValueError, match="PECM_TRITON_CONFIG"):
        ops.pecm_topk(q, c, w, 4, backend="triton")


# ------------------------------------------------------------------------------------------------
# launch shapes and merges
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_rerank_small_batch_splits_m_finely(device, monkeypatch):
    """B = 1: the scored tile shrinks (to 16 ids) so that more programs share M; still exact."""
    rr = _mod("pecm_rerank")
    monkeypatch.setattr(rr, "target_programs", lambda dev: 64)
    seen = {}
    orig = rr._pecm_rerank_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kw):
                seen.update(kw, grid=grid)
                return orig[grid](*args, **kw)

            return run

    monkeypatch.setattr(rr, "_pecm_rerank_kernel", Spy())
    q, c, w, qm, cm = make_inputs(1, 40, 4, 16, masks=True, seed=8, ties=True)
    cand = make_cand(40, 1, 100, pad_frac=0.1)
    dev = lambda t: t.to(device)  # noqa: E731
    v, i = ops.pecm_rerank(dev(q), dev(c), dev(cand), dev(w), 20, q_mask=dev(qm), c_mask=dev(cm), backend="triton")
    assert seen["SUB"] == 16 < seen["KT"] and seen["grid"][0] == 7  # 100 ids / 16 per program
    check_topk(v, i, _ref(q, c, w, qm, cm)[2], 20, 1e-5, cand=cand.numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_topk_merge_without_bitonic_merge(device, monkeypatch):
    """The full-sort fallback of `common._merge_sorted` (a Triton without tl.bitonic_merge)."""
    import triton.language as tl

    common = _mod("common")
    assert bool(common.HAS_BITONIC_MERGE)  # Triton 3.6 and 3.8 both have it
    monkeypatch.setattr(common, "HAS_BITONIC_MERGE", tl.constexpr(False))
    q, c, w, qm, cm = make_inputs(5, 50, 3, 8, masks=True, seed=9, ties=True)
    v, i = ops.pecm_topk(q.to(device), c.to(device), w.to(device), 7, q_mask=qm.to(device), c_mask=cm.to(device),
                         backend="triton")  # fmt: skip
    assert_topk_matches(v, i, _ref(q, c, w, qm, cm)[2], 7, 1e-5)


def test_big_topk_tiles_only_for_large_half_batches():
    import triton

    topk = _mod("pecm_topk")
    big = [triton.Config(dict(m), num_warps=w, num_stages=s) for m, w, s in topk._BIG_GPU_CONFIGS]
    for cfg in big:
        cfg.pecm_big = True
    base = [triton.Config(dict(m), num_warps=w, num_stages=s) for m, w, s in topk._GPU_CONFIGS]
    c16, c32 = torch.empty(1, 8, dtype=torch.float16), torch.empty(1, 8, dtype=torch.float32)
    args = dict(KT=64, SUB=64, NORM=False, POOL=0)
    got = topk._prune(base + big, {"c_ptr": c16}, MODE=1, B_BUCKET=1024, **args)
    assert any(getattr(c, "pecm_big", False) for c in got)
    assert all(c.kwargs["BLOCK_B"] >= 64 and c.num_stages >= 3 for c in got if getattr(c, "pecm_big", False))
    for kw in (dict(MODE=1, B_BUCKET=16), dict(MODE=0, B_BUCKET=1024)):
        got = topk._prune(base + big, {"c_ptr": c16 if kw["MODE"] else c32}, **kw, **args)
        assert got and not any(getattr(c, "pecm_big", False) for c in got)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_device_sync_on_cuda():
    """On a GPU: the three ops (prepared operands and raw ones) run under torch's sync debug mode "error"."""
    q, c, w, qm, cm = (None if t is None else t.cuda() for t in make_inputs(4, 300, 5, 32, masks=True, seed=10))
    cand = torch.randint(-1, 300, (4, 50), device="cuda")
    cs, qs = ops.prepare_candidates(c, w, c_mask=cm), ops.prepare_queries(q, w, q_mask=qm)
    ops.pecm_topk(qs, cs, None, 5)  # compile / warm up outside the checked region
    ops.pecm_rerank(qs, cs, cand, None, 5)
    ops.pecm_scores(q, c, w, q_mask=qm, c_mask=cm)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.pecm_topk(qs, cs, None, 5)
        ops.pecm_rerank(qs, cs, cand, None, 5)
        ops.pecm_topk(q, c, w, 5, q_mask=qm, c_mask=cm)
        ops.pecm_rerank(q, c, cand, w, 5, q_mask=qm, c_mask=cm)
        ops.pecm_scores(q, c, w, q_mask=qm, c_mask=cm)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_topk_raw_narrow_tiles_sub_below_kt(device, dtype):
    """Raw candidates use SUB = 32 < KT = 64 tiles (the branchless narrow-tile merge): exact against float64."""
    assert _mod("common").raw_sub(64, 256, {"POOL": 2}) == 32  # D = 256 pooled on the fly: SUB 32 < KT 64
    q, c, w, qm, cm = make_inputs(3, 150, 3, 256, dtype=dtype, masks=True, seed=11)
    v, i = ops.pecm_topk(
        q.to(device), c.to(device), w.to(device), 40, q_mask=qm.to(device), c_mask=cm.to(device), backend="triton"
    )
    ref = _ref(q, c, w, qm, cm)[2]
    assert_topk_matches(v, i, ref, 40, 2e-2 if dtype == torch.float16 else 1e-5)
