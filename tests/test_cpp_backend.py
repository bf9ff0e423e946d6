"""C++ CPU backend ("cpp", `pecm._C`) against the float64 reference, on every SIMD path this CPU has.

All calls go through `pecm.ops.*(..., backend="cpp")`. Top-k comparisons are tie-aware: the sorted
values must match the reference top-k values, and every returned id's reference value must equal the
returned value (so any order among tied candidates is accepted).
"""

from __future__ import annotations

import functools
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_C = pytest.importorskip("pecm._C", reason="pecm._C is not built (pip install -e . or python setup.py build_ext)")

from pecm import ops  # noqa: E402
from pecm import reference as R  # noqa: E402
from pecm.operands import fold_queries  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
BY_INDEX = {"sim": 0, "conf": 1, "score": 2}


def tol(dt: str) -> float:
    return 1e-5 if dt == "f32" else 2e-2


def make_case(b, n, k, d, dt, seed=0, mask=False, ties=False):
    g = torch.Generator().manual_seed(seed + 1000 * k + d + 7 * n + b)
    q = torch.randn(b, k, d, generator=g)
    c = torch.randn(n, k, d, generator=g)
    if ties and n > 2:
        c[1::3] = c[0]  # many exact duplicates -> tied scores
    w = torch.rand(k, generator=g) + 0.1
    cm = qm = None
    if mask:
        cm = torch.rand(n, k, generator=g) > 0.4
        cm[0] = False  # a fully masked candidate: conf = score = 0
        qm = torch.rand(b, k, generator=g) > 0.3
        qm[:, 0] = True
    return q.to(DTYPES[dt]), c.to(DTYPES[dt]), w, qm, cm


@functools.lru_cache(maxsize=None)
def ref_case(b, n, k, d, dt, seed=0, mask=False, ties=False):
    q, c, w, qm, cm = make_case(b, n, k, d, dt, seed, mask, ties)
    return np.stack(R.scores(q.float(), c.float(), w, q_mask=qm, c_mask=cm))  # [3, B, N] float64


def check_topk(vals, ids, ref_by, k, t, cand=None):
    vals, ids = vals.numpy().astype(np.float64), ids.numpy()
    if cand is None:
        exp_v, _ = R.topk(ref_by, k)
    else:
        exp_v, _ = R.rerank(ref_by, cand, k)
    assert vals.shape == (ref_by.shape[0], k) and ids.shape == vals.shape
    finite = np.isfinite(exp_v)
    assert np.array_equal(ids == -1, ~finite), "padding (-1) must appear exactly where the reference runs out"
    assert np.all(np.isneginf(vals[~finite]))
    np.testing.assert_allclose(vals[finite], exp_v[finite], atol=t, rtol=0)
    for b in range(ids.shape[0]):
        row = ids[b][ids[b] >= 0]
        assert np.all(np.diff(vals[b][ids[b] >= 0]) <= 0), "values must be sorted descending"
        np.testing.assert_allclose(ref_by[b, row], vals[b][: len(row)], atol=t, rtol=0)
        if cand is None:
            assert len(set(row.tolist())) == len(row), "exhaustive top-k returns each candidate once"
        else:
            avail = {i: int((cand[b] == i).sum()) for i in set(row.tolist())}
            for i, cnt in zip(*np.unique(row, return_counts=True)):
                assert cnt <= avail[int(i)], "rerank returns an id at most once per occurrence"


# ------------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("b,n", [(1, 1), (7, 33)])
@pytest.mark.parametrize("d", [8, 64, 256])
@pytest.mark.parametrize("k", [1, 4, 26])
def test_scores_grid(simd, k, d, b, n, dt):
    q, c, w, _, _ = make_case(b, n, k, d, dt)
    got = ops.pecm_scores(q, c, w, backend="cpp")
    ref = ref_case(b, n, k, d, dt)
    for i, name in enumerate(("sim", "conf", "score")):
        assert got[i].dtype == torch.float32 and got[i].shape == (b, n), name
        np.testing.assert_allclose(got[i].numpy(), ref[i], atol=tol(dt), rtol=0, err_msg=name)


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("k,d", [(1, 8), (4, 64), (26, 256)])
def test_scores_masked_many_candidates(simd, k, d, dt):
    b, n = (7, 1000) if k < 26 else (1, 1000)
    q, c, w, qm, cm = make_case(b, n, k, d, dt, mask=True)
    got = ops.pecm_scores(q, c, w, q_mask=qm, c_mask=cm, backend="cpp")
    ref = ref_case(b, n, k, d, dt, mask=True)
    for i in range(3):
        np.testing.assert_allclose(got[i].numpy(), ref[i], atol=tol(dt), rtol=0)
    assert torch.all(got[1][:, 0] == 0) and torch.all(got[2][:, 0] == 0), "fully masked candidate -> conf 0"


def test_many_queries_use_blocked_path(simd):
    # B = 70 spans two query blocks: 64 queries on the GEMM path, the last 6 on the dot-product path.
    for dt in DTYPES:
        q, c, w, qm, cm = make_case(70, 40, 4, 300, dt, mask=True)
        got = ops.pecm_scores(q, c, w, q_mask=qm, c_mask=cm, backend="cpp")
        ref = ops.pecm_scores(q.double(), c.double(), w.double(), q_mask=qm, c_mask=cm, backend="torch")
        for i in range(3):
            np.testing.assert_allclose(got[i].numpy(), ref[i].numpy(), atol=tol(dt), rtol=0)


# GEMM path (query blocks of >= 12 queries, 48-row candidate blocks, 6x2 / 12x1 micro-tiles, 256-wide
# reduction slices): B around the threshold and the micro-tile sizes, N not a multiple of 6 / 12 / 48,
# K*D and D not multiples of the slice or the vector width.
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("b", [11, 12, 13, 16, 24, 25, 64, 77])
@pytest.mark.parametrize("n,k,d", [(1, 4, 300), (47, 4, 300), (97, 3, 20), (49, 26, 256)])
def test_gemm_path_scores(simd, dt, b, n, k, d):
    mask = n > 1
    q, c, w, qm, cm = make_case(b, n, k, d, dt, mask=mask)
    got = ops.pecm_scores(q, c, w, q_mask=qm, c_mask=cm, backend="cpp")
    ref = ref_case(b, n, k, d, dt, mask=mask)
    for i, name in enumerate(("sim", "conf", "score")):
        np.testing.assert_allclose(got[i].numpy(), ref[i], atol=tol(dt), rtol=0, err_msg=name)


@pytest.mark.parametrize("by", ["score", "sim", "conf"])
@pytest.mark.parametrize("dt", ["f32", "f16"])
@pytest.mark.parametrize("b,n,topk", [(12, 97, 5), (16, 1, 3), (64, 145, 10), (77, 50, 60), (13, 300, 7)])
def test_gemm_path_topk(simd, by, dt, b, n, topk):
    k, d = 4, 72
    q, c, w, qm, cm = make_case(b, n, k, d, dt, mask=n > 1)
    vals, ids = ops.pecm_topk(q, c, w, topk, q_mask=qm, c_mask=cm, by=by, backend="cpp")
    check_topk(vals, ids, ref_case(b, n, k, d, dt, mask=n > 1)[BY_INDEX[by]], topk, tol(dt))


@pytest.mark.parametrize("topk", [3, 40, 100])
def test_gemm_path_topk_ties(simd, topk):
    b, n, k, d = 20, 99, 4, 16
    q, c, w, _, _ = make_case(b, n, k, d, "f32", ties=True)
    vals, ids = ops.pecm_topk(q, c, w, topk, backend="cpp")
    check_topk(vals, ids, ref_case(b, n, k, d, "f32", ties=True)[2], topk, 1e-5)


def test_fully_masked_query_gives_zero_conf(simd):
    q, c, w, _, _ = make_case(2, 33, 4, 8, "f32")
    qm = torch.tensor([[False] * 4, [True, False, True, True]])
    sim, conf, score = ops.pecm_scores(q, c, w, q_mask=qm, backend="cpp")
    ref = np.stack(R.scores(q, c, w, q_mask=qm))
    assert torch.all(conf[0] == 0) and torch.all(score[0] == 0)
    np.testing.assert_allclose(conf.numpy(), ref[1], atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("by", ["score", "sim", "conf"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("b,n,topk", [(1, 1, 1), (1, 1, 5), (7, 33, 5), (7, 33, 40), (1, 1000, 10), (1, 1000, 1000)])
def test_topk(simd, by, dt, b, n, topk):
    k, d = 4, 64
    mask = n > 1
    q, c, w, qm, cm = make_case(b, n, k, d, dt, mask=mask)
    vals, ids = ops.pecm_topk(q, c, w, topk, q_mask=qm, c_mask=cm, by=by, backend="cpp")
    ref = ref_case(b, n, k, d, dt, mask=mask)[BY_INDEX[by]]
    check_topk(vals, ids, ref, topk, tol(dt))


@pytest.mark.parametrize("by", ["score", "conf"])
@pytest.mark.parametrize("topk", [3, 20, 33])
def test_topk_ties(simd, by, topk):
    b, n, k, d = 7, 33, 4, 8
    q, c, w, qm, cm = make_case(b, n, k, d, "f32", ties=True)
    vals, ids = ops.pecm_topk(q, c, w, topk, by=by, backend="cpp")
    ref = ref_case(b, n, k, d, "f32", ties=True)[BY_INDEX[by]]
    check_topk(vals, ids, ref, topk, 1e-5)


def test_topk_large_k_and_single_query_shape(simd):
    q, c, w, _, _ = make_case(1, 1000, 26, 8, "f16")
    ref = ref_case(1, 1000, 26, 8, "f16")[2]
    for topk in (100, 249, 250, 999, 1000, 1500):  # heap path below N/4, materialised path above
        vals, ids = ops.pecm_topk(q[0], c, w, topk, backend="cpp")
        assert vals.shape == (topk,)
        check_topk(vals[None], ids[None], ref, topk, 2e-2)


def test_topk_empty_inputs_via_ops():
    q, c, w, _, _ = make_case(2, 5, 4, 8, "f32")
    v, i = ops.pecm_topk(q, c[:0], w, 3, backend="cpp")
    assert torch.all(i == -1) and torch.all(torch.isneginf(v))
    v, i = ops.pecm_topk(q[:0], c, w, 3, backend="cpp")
    assert v.shape == (0, 3)
    s = ops.pecm_scores(q, c[:0], w, backend="cpp")
    assert s[0].shape == (2, 0)


# ------------------------------------------------------------------------------------------- rerank
@pytest.mark.parametrize("by", ["score", "sim", "conf"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("topk", [1, 5, 60])
def test_rerank_padding_and_duplicates(simd, by, dt, topk):
    b, n, k, d = 7, 33, 4, 64
    q, c, w, qm, cm = make_case(b, n, k, d, dt, mask=True)
    g = np.random.default_rng(3)
    cand = g.integers(-1, n, size=(b, 50))
    cand[:, :5] = cand[:, 5:10]  # duplicates
    cand[2] = -1  # a query with only padding
    cand[3, ::2] = -1
    vals, ids = ops.pecm_rerank(q, c, torch.from_numpy(cand), w, topk, q_mask=qm, c_mask=cm, by=by, backend="cpp")
    ref = ref_case(b, n, k, d, dt, mask=True)[BY_INDEX[by]]
    check_topk(vals, ids, ref, topk, tol(dt), cand=cand)
    assert torch.all(ids[2] == -1)


def test_rerank_long_candidate_lists(simd):
    b, n, k, d = 2, 1000, 4, 64
    q, c, w, qm, cm = make_case(b, n, k, d, "bf16", mask=True)
    cand = np.random.default_rng(5).integers(-1, n, size=(b, 700))
    vals, ids = ops.pecm_rerank(q, c, cand, w, 100, q_mask=qm, c_mask=cm, backend="cpp")
    check_topk(vals, ids, ref_case(b, n, k, d, "bf16", mask=True)[2], 100, 2e-2, cand=cand)


@pytest.mark.parametrize("b,m", [(1, 1), (1, 255), (1, 257), (1, 1000), (3, 513), (9, 300)])
def test_rerank_gather_blocks(simd, b, m):
    # One-query tiles gather up to 256 rows, split evenly over the threads when B is small:
    # M around the block size, padding and duplicates across block boundaries.
    n, k, d = 400, 3, 40
    q, c, w, qm, cm = make_case(b, n, k, d, "f16", mask=True)
    rng = np.random.default_rng(m)
    cand = rng.integers(-1, n, size=(b, m))
    cand[:, m // 2 :] = np.where(rng.random((b, m - m // 2)) < 0.3, cand[:, : m - m // 2], cand[:, m // 2 :])
    vals, ids = ops.pecm_rerank(q, c, cand, w, 50, q_mask=qm, c_mask=cm, backend="cpp")
    check_topk(vals, ids, ref_case(b, n, k, d, "f16", mask=True)[2], 50, 2e-2, cand=cand)


# ---------------------------------------------------------------------------------- backend plumbing
def test_backend_registry_and_supports():
    from pecm.backends import available_backends, get_backend

    assert "cpp" in available_backends()
    be = get_backend("cpp", torch.device("cpu"), torch.float16)
    assert be.name == "cpp" and be.differentiable is False
    for dt in DTYPES.values():
        assert be.supports(torch.device("cpu"), dt)
    assert not be.supports(torch.device("cpu"), torch.float64)
    assert not be.supports(torch.device("cuda"), torch.float32)


def test_cpp_refuses_gradients_and_float64():
    q, c, w, _, _ = make_case(1, 3, 2, 8, "f32")
    with pytest.raises(ValueError, match="not differentiable"):
        ops.pecm_scores(q.requires_grad_(), c, w, backend="cpp")
    with pytest.raises((TypeError, ValueError)):
        ops.pecm_scores(q.detach().double(), c.double(), w, backend="cpp")


def _ext_args(b=2, n=5, k=3, d=4):
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    qa = {"qw": f(b, k * d), "qden": np.abs(f(b, k)), "qp": f(b, d)}
    ca = {"c": f(n, k, d), "dtype": "float32", "w": np.ones(k, np.float32), "mask": None, "pooled": f(n, d)}
    return qa, ca


@pytest.mark.parametrize(
    "which,mutate,match",
    [
        ("q", lambda a: a.update(qw=a["qw"][:, :-1]), "qw: expected shape"),
        ("q", lambda a: a.update(qden=a["qden"][0]), "qden: expected shape"),
        ("q", lambda a: a.update(qp=a["qp"][:, :-1]), "qw: expected shape"),
        ("c", lambda a: a.update(c=a["c"].reshape(5, -1)), r"c: expected shape \[N, K, D\]"),
        ("c", lambda a: a.update(c=a["c"].astype(np.float16)), "c: dtype"),
        ("c", lambda a: a.update(c=np.asfortranarray(a["c"])), "c: expected a C-contiguous"),
        ("c", lambda a: a.update(dtype="float8"), "dtype: expected"),
        ("c", lambda a: a.update(pooled=a["pooled"][:-1]), "c_pooled: expected shape"),
        ("c", lambda a: a.update(pooled=a["pooled"].astype(np.float64)), "c_pooled: dtype"),
        ("c", lambda a: a.update(mask=np.ones((5, 2), bool)), "c_mask: expected shape"),
        ("c", lambda a: a.update(mask=np.ones((5, 3), np.float32)), "c_mask: expected a C-contiguous bool"),
        ("c", lambda a: a.update(w=np.ones(4, np.float32)), "w: expected"),
        ("c", lambda a: a.update(pooled=None, pooled_normalized=True), "pooled_normalized"),
        ("c", lambda a: a.update(eps=0.0), "eps"),
    ],
)
def test_extension_argument_checks_raise_value_error(which, mutate, match):
    """_C.Queries / _C.Candidates check what memory safety needs and name the argument."""
    qa, ca = _ext_args()
    mutate(qa if which == "q" else ca)
    with pytest.raises(ValueError, match=match):
        _C.scores(_C.Queries(**qa), _C.Candidates(**ca))


def test_extension_k_by_and_candidate_checks():
    qa, ca = _ext_args()
    qs, cs = _C.Queries(**qa), _C.Candidates(**ca)
    with pytest.raises(ValueError, match="k: expected"):
        _C.topk(qs, cs, 0, _C.By.SCORE)
    with pytest.raises(TypeError):
        _C.topk(qs, cs, 1, "nope")  # the binding takes the enum
    with pytest.raises(ValueError, match="candidates: ids"):
        _C.rerank(qs, cs, np.array([[0, 5], [1, 2]]), 1, _C.By.SCORE)
    with pytest.raises(ValueError, match="candidates: expected shape"):
        _C.rerank(qs, cs, np.array([0, 1]), 1, _C.By.SCORE)
    qa2, _ = _ext_args(k=4)
    with pytest.raises(ValueError, match="queries: K=4"):
        _C.scores(_C.Queries(**qa2), cs)


def test_extension_operand_objects_report_their_promises():
    qa, ca = _ext_args()
    cs = _C.Candidates(**ca, normalized=True, pooled_normalized=True)
    assert (cs.N, cs.K, cs.D, cs.normalized, cs.pooled_normalized) == (5, 3, 4, True, True)
    assert (_C.Queries(**qa).B, _C.Queries(**qa).K) == (2, 3)


def test_set_simd_rejects_unknown_and_unsupported_levels():
    with pytest.raises(ValueError, match="level"):
        _C.set_simd("sse9")
    if "avx512" not in _C.simd_levels():
        with pytest.raises(ValueError, match="not supported"):
            _C.set_simd("avx512")
    assert _C.simd_level() in _C.simd_levels()


@pytest.mark.parametrize("want", ["scalar", "avx2", "avx512", "bogus"])
def test_env_var_caps_simd_level(want):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PECM_CPP_SIMD": want}
    code = "from pecm import _C; print(_C.simd_level(), _C.simd_levels()[-1])"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got, best = r.stdout.split()
    assert got == (want if want in _C.simd_levels() else best)


@pytest.mark.skipif(
    shutil.which("objdump") is None or platform.machine() not in ("x86_64", "AMD64"), reason="needs objdump, x86"
)
def test_avx_instructions_only_inside_dispatched_kernels():
    """SIGILL safety: every AVX/AVX-512 (VEX/EVEX) instruction of the module lies in pecm::avx2 / pecm::avx512."""
    out = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", _C.__file__], capture_output=True, text=True, check=True
    ).stdout
    func, outside, inside = None, set(), 0
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            func = m.group(1)
            continue
        parts = line.split("\t")
        if func is None or len(parts) < 2:
            continue
        ins = parts[1].strip()
        if ins.startswith("v") or "ymm" in ins or "zmm" in ins:
            if "pecm::avx2::" in func or "pecm::avx512::" in func:
                inside += 1
            else:
                outside.add(func)
    if "avx2" in _C.simd_levels():
        assert inside > 0, "expected vector code in the dispatched kernels (is the module stripped?)"
    assert not outside, f"AVX instructions outside the dispatched kernels: {sorted(outside)[:5]}"


def _prep64(q, w, qm, qp):
    """float64 query operands, written out independently of pecm.ops."""
    q = q.double()
    wq = w.double().expand(q.shape[0], -1).clone()
    if qm is not None:
        wq = wq * qm.double()
    qhat = q / q.norm(dim=-1, keepdim=True).clamp_min(ops.EPS)
    qw3 = qhat * wq.unsqueeze(-1)
    pooled = qw3.sum(1) if qp is None else qp.double()
    return qw3.reshape(q.shape[0], -1), wq, pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(ops.EPS)


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("pooled", [False, True])
def test_prepare_query_matches_float64_and_torch_prep(dt, mask, pooled):
    """The C++ query prep (used by `ops.prepare_queries` on the CPU) equals float64 math and the torch fold."""
    from pecm.backends import get_backend

    be = get_backend("cpp", torch.device("cpu"), DTYPES[dt])
    q, _, w, qm, _ = make_case(4, 3, 5, 24, dt, seed=3, mask=mask)
    q[1, 2] = 0  # zero prototype: normalised by eps, stays 0
    if mask:
        qm[2] = False  # fully masked query: qw = qden = 0, pooled from zeros -> 0
    qp = torch.randn(4, 24).to(DTYPES[dt]) if pooled else None
    if pooled:
        qp[3] = 0
    got = be.prepare_queries(q, w, qm, qp, ops.EPS)
    want = _prep64(q, w, qm, qp)
    torch_prep = fold_queries(q, w, qm, qp)
    for g, r, t in zip(got, want, torch_prep):
        assert g.dtype == torch.float32 and g.shape == r.shape
        torch.testing.assert_close(g.double(), r, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g, t, rtol=1e-6, atol=1e-6)
    assert torch.all(got[0].view(4, 5, 24)[1, 2] == 0)
    if mask:
        assert torch.all(got[0][2] == 0) and torch.all(got[1][2] == 0)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"q": np.zeros((2, 12), np.float32)}, "q: expected shape"),
        ({"q": np.zeros((2, 3, 4), np.float16)}, "q: dtype"),
        ({"dtype": "int8"}, "dtype: expected"),
        ({"w": np.ones(4, np.float32)}, "w: expected"),
        ({"q_mask": np.ones((2, 4), bool)}, "q_mask: expected shape"),
        ({"q_mask": np.ones((2, 3), np.float32)}, "q_mask: expected a C-contiguous bool"),
        ({"q_mask": [[True] * 3] * 2}, "q_mask: expected a numpy array"),
        ({"q_pooled": np.ones((2, 5), np.float32)}, "q_pooled: expected shape"),
    ],
)
def test_prepare_query_argument_checks(kw, match):
    args = {
        "q": np.ones((2, 3, 4), np.float32),
        "dtype": "float32",
        "w": np.ones(3, np.float32),
        "q_mask": None,
        "q_pooled": None,
        "eps": 1e-8,
    }
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        _C.prepare_query(**args)


# ------------------------------------------------------------------------------- on-the-fly modes
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("b,d", [(1, 24), (5, 64), (16, 24), (70, 40)])
def test_on_the_fly_normalisation_every_path(simd, dt, masks, b, d):
    """Raw c (with / without raw pooled vectors), unit c without pooled and prepared c, on the
    dot-product (B < 12), GEMM (B >= 12) and gather (rerank) paths of this SIMD level, D not a
    multiple of the vector width: all equal the float64 reference."""
    from helpers import call_op, candidate_modes, make_inputs

    q, c, w, qm, cm = make_inputs(b, 61, 5, d, dtype=DTYPES[dt], masks=masks, seed=b + d, ties=True)
    cand = torch.from_numpy(np.random.default_rng(d).integers(-1, 61, size=(b, 300)))
    for name, kw, ref_pooled in candidate_modes(c, w, cm, seed=d):
        ref = np.stack(R.scores(q.double(), c.double(), w.double(), qm, cm, None, ref_pooled))
        got = call_op("scores", q, kw, w, qm, backend="cpp")
        for i in range(3):
            np.testing.assert_allclose(got[i].numpy(), ref[i], atol=tol(dt), rtol=0, err_msg=name)
        for by in ("score", "sim"):
            vals, ids = call_op("topk", q, kw, w, qm, k=9, by=by, backend="cpp")
            check_topk(vals, ids, ref[BY_INDEX[by]], 9, tol(dt))
        vals, ids = call_op("rerank", q, kw, w, qm, k=12, cand=cand, backend="cpp")
        check_topk(vals, ids, ref[2], 12, tol(dt), cand=cand.numpy())


def test_masked_prototypes_are_not_read(simd):
    """A prototype masked out in every row is skipped, so NaN stored there cannot leak into scores."""
    q, c, w, _, _ = make_case(3, 20, 4, 32, "f32")
    cm = torch.ones(20, 4, dtype=torch.bool)
    cm[:, 2] = False
    bad = c.clone()
    bad[:, 2] = float("nan")
    got = ops.pecm_scores(q, bad, w, c_mask=cm, backend="cpp")
    ref = np.stack(R.scores(q, c, w, c_mask=cm))
    for i in range(3):
        np.testing.assert_allclose(got[i].numpy(), ref[i], atol=1e-5, rtol=0)


def test_stale_extension_is_refused_with_a_clear_error():
    """A _C built for another pecm version is not used: the registry reports why (rebuild)."""
    import pecm

    assert _C.__version__ == pecm.__version__
    code = (
        "import pecm; pecm.__version__ = '0.0.0-other'\n"
        "from pecm import backends\n"
        "print(backends.available_backends()); print(backends.backend_errors()['cpp'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.strip().splitlines()
    assert "cpp" not in first
    assert "stale" in second and "0.0.0-other" in second and "make build" in second
