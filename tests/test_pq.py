"""pecm.pq: product-quantised candidates scored from their codes, against the float64 reference of the
decoded prototypes (exact for the decoded values), on every backend; encoder agreement across ISAs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_topk_matches

from pecm import ops, pq, reference
from pecm.operands import By

faiss = pytest.importorskip("faiss")

K, D, M = 5, 32, 4


def _data(n, seed=0, masks=True, per_slot=False, coarse=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, K, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    cm = rng.random((n, K)) > 0.25 if masks else None
    if masks:
        cm[:3] = False  # rows with every prototype masked out: den = 0, conf = 0
        x[~cm] = 0
    cb = pq.train(x, cm, M, per_slot, seed=seed, coarse=coarse)
    codes, scales = pq.encode(x, cm, cb)
    pooled = rng.standard_normal((n, D))
    pooled = (pooled / np.linalg.norm(pooled, axis=1, keepdims=True)).astype(np.float16)
    w = (rng.random(K) * 2).astype(np.float32)
    cs = pq.PQCandidates(
        torch.from_numpy(codes),
        torch.from_numpy(scales),
        torch.from_numpy(pooled),
        None if cm is None else torch.from_numpy(cm),
        torch.from_numpy(w),
    )
    return cb, cs, codes, scales, pooled, cm, w


def _ref(q, qm, cb, codes, scales, pooled, cm, w):
    """Float64 (sim, conf, score) of the decoded prototypes (the stored pooled vectors as given: the index
    stores them unit length and the kernels use them as they are)."""
    dec = pq.decode(codes, scales, cb, np.float64)
    _, conf, _ = reference.scores(q.astype(np.float64), dec, w.astype(np.float64), q_mask=qm, c_mask=cm)
    qs = ops.prepare_queries(
        torch.from_numpy(q), torch.from_numpy(w), q_mask=None if qm is None else torch.from_numpy(qm)
    )
    sim = qs.qp.double().numpy() @ pooled.astype(np.float64).T
    return sim, conf, sim * conf


def _backends():
    out = ["torch", "cpp"]
    from pecm import kernels

    if kernels.HAS_TRITON:
        out.append("triton")
    return out


def _run(backend, monkeypatch, fn):
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return fn()


@pytest.mark.parametrize("coarse", [0, 2])
@pytest.mark.parametrize("per_slot", [False, True])
@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("backend", _backends())
def test_scores_exact_for_decoded(per_slot, masks, backend, coarse, monkeypatch):
    if coarse and not masks:
        pytest.skip("coarse stages: covered with masks")
    n = 300 if backend != "triton" else 70
    cb, cs, codes, scales, pooled, cm, w = _data(500, seed=1, masks=masks, per_slot=per_slot, coarse=coarse)
    assert codes.shape[2] == coarse + M and cb.codes == coarse + M
    cs = pq.PQCandidates(
        cs.codes[:n], cs.scales[:n], cs.pooled[:n], None if cs.mask is None else cs.mask[:n], cs.weights
    )
    rng = np.random.default_rng(2)
    q = rng.standard_normal((3, K, D)).astype(np.float32) * 3.0  # raw queries: the ops normalise them
    qm = rng.random((3, K)) > 0.3 if masks else None
    qs = ops.prepare_queries(
        torch.from_numpy(q), torch.from_numpy(w), q_mask=None if qm is None else torch.from_numpy(qm)
    )
    table = pq.lut(qs, cb)
    ref = _ref(q, qm, cb, codes[:n], scales[:n], pooled[:n], None if cm is None else cm[:n], w)
    got = _run(backend, monkeypatch, lambda: pq.pq_scores(qs, table, cs, backend=backend))
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g.double().numpy(), r, atol=2e-6, rtol=0)
    if masks:
        assert np.all(got[1].numpy()[:, :3] == 0)  # every prototype masked: conf 0


@pytest.mark.parametrize("coarse", [0, 1])
@pytest.mark.parametrize("by", ["score", "sim", "conf"])
@pytest.mark.parametrize("k", [1, 7, 400])
@pytest.mark.parametrize("backend", _backends())
def test_topk_and_rerank(by, k, backend, coarse, monkeypatch):
    if backend == "triton" and k == 400:
        pytest.skip("interpreter: the k > N case is covered by tests/test_triton_pq.py")
    if coarse and (by != "score" or (backend == "triton" and k != 7)):
        pytest.skip("coarse stages: covered by the score ranking")
    n = 300
    cb, cs, codes, scales, pooled, cm, w = _data(n, seed=3, coarse=coarse)
    cs = pq.PQCandidates(cs.codes.clone(), cs.scales.clone(), cs.pooled.clone(), cs.mask.clone(), cs.weights)
    cs.codes[10] = cs.codes[11]  # exact ties
    cs.scales[10] = cs.scales[11]
    cs.pooled[10] = cs.pooled[11]
    cs.mask[10] = cs.mask[11]
    codes, scales, pooled, cm = cs.codes.numpy(), cs.scales.numpy(), cs.pooled.numpy(), cs.mask.numpy()
    rng = np.random.default_rng(4)
    q = np.concatenate(
        [
            pq.decode(codes[11:12], scales[11:12], cb),  # a query equal to the tied rows
            rng.standard_normal((2, K, D)).astype(np.float32),
        ]
    )
    qs = ops.prepare_queries(torch.from_numpy(q), torch.from_numpy(w))
    table = pq.lut(qs, cb)
    ref = _ref(q, None, cb, codes, scales, pooled, cm, w)[{"sim": 0, "conf": 1, "score": 2}[by]]
    v, i = _run(backend, monkeypatch, lambda: pq.pq_topk(qs, table, cs, k, by, backend=backend))
    assert_topk_matches(v, i, ref, k, 2e-6)
    cand = np.stack([rng.choice(n, 40, replace=False) for _ in range(3)])
    cand[:, ::5] = -1
    cand[0, 1] = 10
    cand[0, 2] = 11
    vr, ir = _run(
        backend,
        monkeypatch,
        lambda: pq.pq_topk(qs, table, cs, k, By.parse(by), cand=torch.from_numpy(cand), backend=backend),
    )
    sub = np.where(cand >= 0, np.take_along_axis(ref, np.maximum(cand, 0), 1), -np.inf)
    exp, _ = reference.topk(sub, k)
    m = min(k, int((cand[0] >= 0).sum()))
    np.testing.assert_allclose(vr.double().numpy()[:, :m], exp[:, :m], atol=2e-6, rtol=0)
    ir = ir.numpy()
    for b in range(3):
        live = ir[b][ir[b] >= 0]
        assert set(live.tolist()) <= set(cand[b][cand[b] >= 0].tolist())
        np.testing.assert_allclose(ref[b, live], vr.numpy()[b, : live.size], atol=2e-6)
    assert np.all(ir[:, m:] == -1)


def test_encoders_agree_across_isas():
    from pecm import _C
    from pecm.backends import cpp_backend

    cb, cs, *_ = _data(400, seed=5)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((200, K, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    mk = rng.random((200, K)) > 0.2
    ref_codes, ref_scales = pq._encode_torch(x, mk.view(np.uint8), cb)
    level = _C.simd_level()
    try:
        for lv in _C.simd_levels():
            cpp_backend.set_simd(lv)
            codes, scales = pq.encode(x, mk, cb)
            assert np.array_equal(codes, ref_codes), lv
            np.testing.assert_allclose(scales, ref_scales, rtol=1e-6)
    finally:
        cpp_backend.set_simd(level)
    assert np.all(scales[~mk] == 0) and np.all(codes[~mk] == 0)
    dec = pq.decode(codes, scales, cb, np.float64)
    np.testing.assert_allclose(np.linalg.norm(dec, axis=-1)[mk], 1.0, atol=1e-6)


def test_nearest_centroid_and_ties():
    """Each code is the nearest centroid (brute force), and duplicate centroids resolve to the smaller code."""
    cb, *_ = _data(400, seed=7, masks=False)
    cent = cb.centroids.copy()
    cent[0, :, 5] = cent[0, :, 3]  # exact duplicate centroids: code 3 must win
    cb2 = pq.Codebook(cent)
    x = np.zeros((2, K, D), dtype=np.float32)
    x[0] = cent[0, :, 3].reshape(-1)  # every subvector is centroid 3 / 5
    x[1] = np.random.default_rng(8).standard_normal((K, D))
    codes, _ = pq.encode(x, None, cb2)
    assert np.all(codes[0] == 3)
    sub = x[1].reshape(K, M, D // M)
    d2 = ((sub[:, :, None, :] - cent[0][None]) ** 2).sum(-1)  # [K, M, 256]
    best = d2.min(-1)
    got = np.take_along_axis(d2, codes[1][..., None].astype(np.int64), -1)[..., 0]
    np.testing.assert_allclose(got, best, rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    x = np.random.default_rng(0).standard_normal((10, K, D)).astype(np.float32)
    with pytest.raises(ValueError, match="at least 256"):
        pq.train(x, None, M, True)  # 10 prototypes per slot
    with pytest.raises(ValueError, match="pq_m"):
        pq.check_m(5, D)
    with pytest.raises(ValueError, match="pq_m"):
        pq.check_m(True, D)
    with pytest.raises(ValueError, match="centroids"):
        pq.Codebook(np.zeros((1, 4, 255, 8), np.float32))
    assert pq.default_m(256) == 64 and pq.default_m(12) == 3 and pq.default_m(96) == 24 and pq.default_m(10) == 2


def _clustered(n, seed, centres=12, noise=0.3):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, K, D))
    x = c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, K, D))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_coarse_stages_decode_and_error():
    """Coarse stages: every code is the nearest centroid of the residual it saw, the decoded prototypes are
    unit length, and on clustered prototypes the quantisation error falls with each stage."""
    x = _clustered(2000, seed=11)
    mk = np.random.default_rng(12).random((2000, K)) > 0.1
    x[~mk] = 0
    errs = []
    for r in (0, 1, 2):
        cb = pq.train(x, mk, M, False, seed=0, coarse=r)
        assert cb.r == r and (r == 0) == (cb.coarse is None)
        codes, scales = pq.encode(x, mk, cb)
        assert codes.shape == (2000, K, r + M)
        assert np.all(codes[~mk] == 0) and np.all(scales[~mk] == 0)
        dec = pq.decode(codes, scales, cb, np.float64)
        np.testing.assert_allclose(np.linalg.norm(dec, axis=-1)[mk], 1.0, atol=1e-6)
        assert np.all(dec[~mk] == 0)
        errs.append(np.linalg.norm(dec - x, axis=-1)[mk].mean())
        if r:  # stage 0 codes: the nearest coarse centroid of the prototype itself (brute force)
            d2 = ((x[:50, :, None, :] - cb.coarse[None, :, 0]) ** 2).sum(-1)  # [50, K, 256]
            got = np.take_along_axis(d2, codes[:50, :, :1].astype(np.int64), -1)[..., 0]
            np.testing.assert_allclose(got[mk[:50]], d2.min(-1)[mk[:50]], rtol=1e-5, atol=1e-6)
    assert errs[1] < 0.8 * errs[0] and errs[2] < errs[1], errs


def test_coarse_few_distinct_prototypes_are_exact():
    """A slot with at most 256 distinct prototypes gets them as its coarse centroids: their codes are exact."""
    rng = np.random.default_rng(13)
    base = rng.standard_normal((40, K, D)).astype(np.float32)
    base /= np.linalg.norm(base, axis=-1, keepdims=True)
    x = base[rng.integers(0, 40, 600)]
    cb = pq.train(x, None, M, False, seed=0, coarse=1)
    codes, scales = pq.encode(x, None, cb)
    np.testing.assert_allclose(pq.decode(codes, scales, cb, np.float64), x, atol=1e-6)
    with pytest.raises(ValueError, match="pq_coarse"):
        pq.check_coarse(pq.MAX_COARSE + 1)
    with pytest.raises(ValueError, match="pq_coarse"):
        pq.check_coarse(True)
    with pytest.raises(ValueError, match="coarse"):
        pq.Codebook(cb.centroids, np.zeros((K, 1, 256, D + 1), np.float32))


@pytest.mark.parametrize("b", [1, 5])
def test_cpp_scan_across_row_groups(b):
    """With B > 1 the cpp exhaustive drivers run a PQ problem in groups of 8 tiles of 48 rows, one query at a
    time: at N = 3,300 (8 full groups, a partial one, a partial last tile) every score, the small-k top-k (heaps)
    and the large-k top-k (materialised) equal the float64 decoded reference, for every SIMD level's tile."""
    from pecm import _C
    from pecm.backends import cpp_backend

    n = 3300
    cb, cs, codes, scales, pooled, cm, w = _data(n, seed=7, coarse=1)
    q = np.random.default_rng(8).standard_normal((b, K, D)).astype(np.float32)
    qs = ops.prepare_queries(torch.from_numpy(q), torch.from_numpy(w))
    table = pq.lut(qs, cb)
    ref = _ref(q, None, cb, codes, scales, pooled, cm, w)
    level = _C.simd_level()
    try:
        for lv in _C.simd_levels():
            cpp_backend.set_simd(lv)
            cs = pq.PQCandidates(cs.codes, cs.scales, cs.pooled, cs.mask, cs.weights)  # a fresh cpp handle
            for g, r in zip(pq.pq_scores(qs, table, cs, backend="cpp"), ref):
                np.testing.assert_allclose(g.double().numpy(), r, atol=2e-6, rtol=0, err_msg=lv)
            for k in (10, n):  # heaps; k * 4 >= N: the materialised path
                v, i = pq.pq_topk(qs, table, cs, k, "score", backend="cpp")
                assert_topk_matches(v, i, ref[2], k, 2e-6)
    finally:
        cpp_backend.set_simd(level)
