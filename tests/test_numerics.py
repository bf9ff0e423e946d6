"""Adversarial numerics of the scoring ops (issue 15, items 7 and 8): every backend against the float64
reference for extreme magnitudes, exact zeros, masked rows, NaN / inf with ``check=False``, and k bounds.

Rules under test (docs/cpp.md, "Numerics"): a prototype or pooled vector is zero only when it is exactly
zero; every other finite vector is normalised to unit length whatever its magnitude (no eps clamp);
masked-out prototypes are never used; with ``check=False`` a NaN/inf input gives NaN scores and the
top-k / re-rank never select a NaN value (such candidates come back, if at all, as (-inf, -1) padding);
``check=True`` rejects them naming the argument; k is an int in [1, 2**31 - 1] and a mostly-padding
result above 2 GiB is refused before anything is allocated.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_topk_matches

from pecm import ops, reference
from pecm.backends import available_backends

BACKENDS = [b for b in ("torch", "cpp") if b in available_backends()]
try:
    from pecm import _C
except ImportError:  # no C++ extension: the torch backend only
    _C = None
# the torch backend, then the C++ backend at every SIMD level this CPU has (like the `simd` fixture)
SIMD_BACKENDS = ["torch"] + ([f"cpp:{lvl}" for lvl in _C.simd_levels()] if "cpp" in BACKENDS else [])


@pytest.fixture(params=SIMD_BACKENDS)
def sbackend(request):
    """A backend name, with the C++ extension switched to the SIMD level of the parameter."""
    name, _, lvl = request.param.partition(":")
    if not lvl:
        yield name
        return
    before = _C.simd_level()
    _C.set_simd(lvl)
    yield name
    _C.set_simd(before)


F32_MAGS = (1e-30, 1e-20, 1e-8, 1.0, 1e19, 1e30, 3e38)


def _scaled(shape, mags, dtype, g):
    """Uniform directions in [-1, 1] times a magnitude drawn per prototype (mixed within an item)."""
    x = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    m = torch.tensor(mags, dtype=torch.float64)[torch.randint(len(mags), shape[:-1] + (1,), generator=g)]
    return (x * m).to(dtype)


def _case(mags, dtype=torch.float32, b=3, n=40, k=3, d=40, seed=0, masks=False):
    g = torch.Generator().manual_seed(seed)
    q = _scaled((b, k, d), mags, dtype, g)
    c = _scaled((n, k, d), mags, dtype, g)
    c[1, 0] = 0  # an exactly zero prototype: cosine 0
    w = torch.rand(k, generator=g, dtype=torch.float64).float() * 2
    qm = cm = None
    if masks:
        qm = torch.rand(b, k, generator=g) > 0.3
        cm = torch.rand(n, k, generator=g) > 0.3
        cm[2] = False  # a fully masked candidate
    return q, c, w, qm, cm


def _check_scores(got, ref, tol):
    for name, g, r in zip(("sim", "conf", "score"), got, ref):
        g = g.double().numpy()
        assert np.isfinite(g).all(), f"{name}: non-finite scores for finite inputs"
        np.testing.assert_allclose(g, r, atol=tol, rtol=0, err_msg=name)


def _all_paths(q, c, w, qm, cm, backend, tol, cp=None):
    """pecm_scores, pecm_topk and pecm_rerank (raw c, and prepared c) against the reference."""
    ref = reference.scores(q, c, w, qm, cm, None, cp)
    kw = dict(q_mask=qm, c_mask=cm, c_pooled=cp, backend=backend)
    _check_scores(ops.pecm_scores(q, c, w, **kw), ref, tol)
    n = c.shape[0]
    v, i = ops.pecm_topk(q, c, w, 7, **kw)
    assert_topk_matches(v, i, ref[2], 7, tol)
    cand = torch.arange(n).repeat(q.shape[0], 1)
    v, i = ops.pecm_rerank(q, c, cand, w, 5, **kw)
    assert_topk_matches(v, i, ref[2], 5, tol)
    cs = ops.prepare_candidates(c, w, c_mask=cm, c_pooled=cp)
    _check_scores(ops.pecm_scores(q, cs, None, q_mask=qm, backend=backend), ref, tol)


@pytest.mark.parametrize("masks", [False, True])
def test_float32_magnitudes_match_reference(sbackend, masks):
    """1e-30 ... 3e38, one magnitude per call and all mixed in one item, with Eq. 4 pooled on the fly
    and with given (raw) pooled vectors; on main these gave 0, eps-divided or NaN scores."""
    for mags in [(m,) for m in F32_MAGS] + [F32_MAGS, (1e-42, 1e-45)]:
        q, c, w, qm, cm = _case(mags, masks=masks)
        _all_paths(q, c, w, qm, cm, sbackend, 1e-5)
        g = torch.Generator().manual_seed(1)
        cp = _scaled((c.shape[0], c.shape[2]), mags, torch.float32, g)
        _all_paths(q, c, w, qm, cm, sbackend, 1e-5, cp=cp)


def test_gemm_path_magnitudes(sbackend):
    """Many queries (the C++ GEMM path, >= 12 per block) over huge / tiny candidates."""
    q, c, w, qm, cm = _case((1e-30, 1.0, 3e38), b=16, n=60, masks=True)
    ref = reference.scores(q, c, w, qm, cm)
    _check_scores(ops.pecm_scores(q, c, w, q_mask=qm, c_mask=cm, backend=sbackend), ref, 1e-5)
    v, i = ops.pecm_topk(q, c, w, 9, q_mask=qm, c_mask=cm, backend=sbackend)
    assert_topk_matches(v, i, ref[2], 9, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_type_extremes(sbackend, dtype):
    """float16: the smallest subnormal (6e-8) and the largest finite value (65504) mixed in one item;
    bfloat16: float32's range (1e-38, 1e-40 subnormal, 3e38)."""
    mags = (6e-8, 1e-3, 65504.0) if dtype == torch.float16 else (1e-40, 1e-38, 1.0, 3e38)
    q, c, w, qm, cm = _case(mags, dtype=dtype, masks=True)
    _all_paths(q, c, w, qm, cm, sbackend, 2e-2)


def test_unit_is_exact_and_zero_only_when_zero():
    from pecm.operands import unit

    x = torch.zeros(5, 8)
    x[0, :] = 1e-40
    x[1, :] = 3e38
    x[2, 3] = 1e-45
    x[3, :] = 1e-7  # ||x|| < 1e-12 before: divided by eps instead of normalised
    n = torch.linalg.vector_norm(unit(x).double(), dim=-1)
    np.testing.assert_allclose(n[:4].numpy(), 1.0, rtol=1e-6)
    assert n[4] == 0
    xg = x.clone().requires_grad_(True)
    unit(xg).sum().backward()
    assert torch.isfinite(xg.grad[[0, 1, 3, 4]]).all()  # (row 2's true gradient, ~1/1e-45, is not a float32)


def test_prepared_candidates_are_unit(simd):
    """prepare_candidates / the index encoder path for tiny and huge float32 and float16 rows."""
    for dtype, mags in ((torch.float32, (1e-30, 3e38)), (torch.float16, (6e-8, 65504.0))):
        _, c, w, _, cm = _case(mags, dtype=dtype, masks=True)
        cs = ops.prepare_candidates(c, w, c_mask=cm)
        n = torch.linalg.vector_norm(cs.prototypes.double(), dim=-1)
        live = cm & (torch.linalg.vector_norm(c.double(), dim=-1) > 0)
        np.testing.assert_allclose(n[live].numpy(), 1.0, atol=2e-3)
        assert (n[~live] == 0).all()
        pn = torch.linalg.vector_norm(cs.pooled.double(), dim=-1)
        np.testing.assert_allclose(pn[live.any(1)].numpy(), 1.0, atol=2e-3)
        assert (pn[~live.any(1)] == 0).all()  # every prototype masked out (or zero): pooled zero


# ----------------------------------------------------------------------------------------------
# NaN / inf
# ----------------------------------------------------------------------------------------------
def _poisoned():
    q, c, w, qm, cm = _case((1.0,), b=2, n=30, masks=True, seed=3)
    c[4, 0, 5] = float("nan")  # a used prototype holds NaN
    c[7, 1, 2] = float("inf")
    cm[4, 0] = cm[7, 1] = True
    c[9, 2, :] = float("nan")  # a masked-out prototype: never used, changes nothing
    cm[9, 2] = False
    return q, c, w, qm, cm


def _finite_ref(q, c, w, qm, cm):
    c0 = c.clone()
    c0[9, 2] = 0.0
    ref = reference.scores(q, c0, w, qm, cm)[2]
    ref[:, [4, 7]] = np.nan  # the reference rule: NaN in a used value -> NaN score
    return ref


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the reference on NaN rows
def test_nan_candidates_never_ranked(sbackend):
    """check=False: NaN/inf candidates score NaN, are never returned; torch used to return only NaN
    candidates and cpp a wrong top-k. A masked-out NaN changes nothing."""
    q, c, w, qm, cm = _poisoned()
    ref = _finite_ref(q, c, w, qm, cm)
    s = ops.pecm_scores(q, c, w, q_mask=qm, c_mask=cm, backend=sbackend)[2].double().numpy()
    assert np.isnan(s[:, [4, 7]]).all()
    keep = [j for j in range(30) if j not in (4, 7)]
    np.testing.assert_allclose(s[:, keep], ref[:, keep], atol=1e-5)
    for k in (3, 30):
        v, i = ops.pecm_topk(q, c, w, k, q_mask=qm, c_mask=cm, backend=sbackend)
        rv, _ = reference.topk(ref, k)
        np.testing.assert_allclose(v.double().numpy(), rv, atol=1e-5)  # NaN never selected: -inf tail
        assert not (set(i.flatten().tolist()) & {4, 7})
        assert (i[:, 28:] == -1).all() if k == 30 else True
        cand = torch.tensor([[4, 7, 0, 9, -1, 4], [7, 7, 1, 2, 3, 4]])
        v, i = ops.pecm_rerank(q, c, cand, w, min(k, 6), q_mask=qm, c_mask=cm, backend=sbackend)
        rv, ri = reference.rerank(ref, cand.numpy(), min(k, 6))
        np.testing.assert_allclose(v.double().numpy(), rv, atol=1e-5)
        assert (i.numpy()[np.isneginf(rv)] == -1).all()


def test_nan_query_gives_only_padding(sbackend):
    q, c, w, _, _ = _case((1.0,), b=2, n=10)
    q[1, 0, 0] = float("nan")
    v, i = ops.pecm_topk(q, c, w, 4, backend=sbackend)
    assert torch.isfinite(v[0]).all() and (i[0] >= 0).all()
    assert torch.isneginf(v[1]).all() and (i[1] == -1).all()


@pytest.mark.parametrize("where", ["q", "c", "c_pooled", "q_pooled"])
def test_check_true_names_the_argument(where):
    q, c, w, _, _ = _case((1.0,), b=2, n=10)
    args = dict(q=q, c=c, q_pooled=torch.ones(2, 40), c_pooled=torch.ones(10, 40))
    args[where] = args[where].clone()
    args[where].view(-1)[3] = float("inf")
    with pytest.raises(ValueError, match=f"^{where}: contains NaN or inf"):
        ops.pecm_topk(args["q"], args["c"], w, 3, q_pooled=args["q_pooled"], c_pooled=args["c_pooled"], check=True)


# ----------------------------------------------------------------------------------------------
# k bounds (issue 15 item 8)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k, err, match", [(2**62, ValueError, "k: expected an int <= 2147483647"),
                                           (10**9, ValueError, "k: 1000000000 exceeds the 10"),
                                           (True, TypeError, "k: expected an int"),
                                           (0, ValueError, "k: expected an int >= 1"),
                                           (2.0, TypeError, "k: expected an int")])  # fmt: skip
def test_k_bounds(backend, k, err, match):
    q, c, w, _, _ = _case((1.0,), b=2, n=10)
    with pytest.raises(err, match=match):
        ops.pecm_topk(q, c, w, k, backend=backend)
    with pytest.raises(err, match=match.replace("the 10", "the 3")):
        ops.pecm_rerank(q, c, torch.zeros(2, 3, dtype=torch.int64), w, k, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_beyond_n_is_padded(backend):
    q, c, w, _, _ = _case((1.0,), b=2, n=10)
    v, i = ops.pecm_topk(q, c, w, 1000, backend=backend)  # small padded result: allowed, as the contract says
    assert v.shape == (2, 1000) and torch.isneginf(v[:, 10:]).all() and (i[:, 10:] == -1).all()


def test_cpp_binding_refuses_huge_k():
    _C = pytest.importorskip("pecm._C")
    from pecm.backends.cpp_backend import _candidates, _queries

    q, c, w, _, _ = _case((1.0,), b=1, n=4)
    cs = ops.prepare_candidates(c, w)
    qs = ops.prepare_queries(q, w)
    with pytest.raises(ValueError, match="k: expected an int <= 2147483647"):
        _C.topk(_queries(qs), _candidates(cs), 2**40, _C.By(0))


# ----------------------------------------------------------------------------------------------
# Triton (interpreter): a few cases
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mags", [(1e-30,), (1e19,), (1e-30, 1.0, 1e30)])
def test_triton_magnitudes(mags):
    if "triton" not in available_backends():
        pytest.skip("triton backend unavailable")
    q, c, w, qm, cm = _case(mags, b=2, n=12, k=3, d=16, masks=True)
    ref = reference.scores(q, c, w, qm, cm)
    _check_scores(ops.pecm_scores(q, c, w, q_mask=qm, c_mask=cm, backend="triton"), ref, 1e-5)
    v, i = ops.pecm_topk(q, c, w, 4, q_mask=qm, c_mask=cm, backend="triton")
    assert_topk_matches(v, i, ref[2], 4, 1e-5)
    cand = torch.arange(12).repeat(2, 1)
    v, i = ops.pecm_rerank(q, c, cand, w, 4, q_mask=qm, c_mask=cm, backend="triton")
    assert_topk_matches(v, i, ref[2], 4, 1e-5)


def test_triton_nan_never_ranked():
    if "triton" not in available_backends():
        pytest.skip("triton backend unavailable")
    q, c, w, _, _ = _case((1.0,), b=1, n=16, k=2, d=16)
    c[3, 0, 0] = float("nan")
    c[5] = 3e38  # beyond what the on-the-fly Triton scale covers: NaN, never a wrong rank
    v, i = ops.pecm_topk(q, c, w, 16, backend="triton")
    assert not ({3, 5} & set(i.flatten().tolist())) and (i[0, 14:] == -1).all()
    assert torch.isfinite(v[0, :14]).all()


# ----------------------------------------------------------------------------------------------
# CLI: non-finite queries exit 2 with one line naming the input
# ----------------------------------------------------------------------------------------------
def test_cli_search_refuses_non_finite_queries(tmp_path, capsys):
    from pecm.cli import main

    rng = np.random.default_rng(0)
    np.save(tmp_path / "p.npy", rng.standard_normal((20, 3, 8)).astype(np.float32))
    q = rng.standard_normal((2, 3, 8)).astype(np.float32)
    q[1, 0, 0] = np.nan
    np.save(tmp_path / "q.npy", q)
    ix = str(tmp_path / "ix")
    assert main(["index", "create", ix, "-K", "3", "-D", "8"]) == 0
    assert main(["index", "add", ix, "--prototypes", str(tmp_path / "p.npy")]) == 0
    capsys.readouterr()
    rc = main(["search", ix, "--query-file", str(tmp_path / "q.npy"), "--json"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "--query-file: contains NaN or inf values" in err
    rc = main(["search", ix, "--query-file", str(tmp_path / "q.npy"), "-k", str(2**62)])
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and "-k: expected an int in [1, 2147483647]" in err
