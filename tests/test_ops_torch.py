"""The torch backend (and the ops layer around it) against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TOL, assert_topk_matches, make_inputs, ref_scores

from pecm import ops, reference

SHAPES = [(b, n, k, d) for b in (1, 7) for n in (0, 1, 33, 1000) for k in (1, 4, 26) for d in (8, 64, 256)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("b,n,k,d", SHAPES)
def test_scores_shapes(b, n, k, d):
    q, c, w, qm, cm = make_inputs(b, n, k, d, masks=(n % 2 == 1), seed=b * 7 + n + k + d)
    sim, conf, score = ops.pecm_scores(q, c, w, q_mask=qm, c_mask=cm, backend="torch")
    assert sim.shape == conf.shape == score.shape == (b, n) and sim.dtype == torch.float32
    for got, exp in zip((sim, conf, score), ref_scores(q, c, w, qm, cm)):
        torch.testing.assert_close(got.double(), torch.from_numpy(exp), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("by", ["score", "sim", "conf"])
def test_topk_vs_reference(dtype, masks, by):
    q, c, w, qm, cm = make_inputs(7, 300, 26, 64, dtype=dtype, masks=masks, seed=3)
    sim, conf, score = ref_scores(q, c, w, qm, cm)
    ref = {"score": score, "sim": sim, "conf": conf}[by]
    for k in (1, 10, 300, 345):  # k > N included
        v, i = ops.pecm_topk(q, c, w, k, q_mask=qm, c_mask=cm, by=by, backend="torch", chunk_size=64)
        assert_topk_matches(v, i, ref, k, TOL[dtype])


@pytest.mark.parametrize("chunk", [1, 7, 33, 1000, None])
def test_topk_chunked_equals_unchunked(chunk):
    q, c, w, qm, cm = make_inputs(3, 200, 4, 16, masks=True, seed=5)
    v0, i0 = ops.pecm_topk(q, c, w, 17, q_mask=qm, c_mask=cm, backend="torch", chunk_size=10_000)
    v1, i1 = ops.pecm_topk(q, c, w, 17, q_mask=qm, c_mask=cm, backend="torch", chunk_size=chunk)
    torch.testing.assert_close(v0, v1, atol=1e-6, rtol=0)
    _, _, score = ref_scores(q, c, w, qm, cm)
    assert_topk_matches(v1, i1, score, 17, 1e-5)


def test_topk_ties_and_zeros():
    q, c, w, qm, cm = make_inputs(4, 64, 4, 8, ties=True, seed=9)
    _, _, score = ref_scores(q, c, w)
    v, i = ops.pecm_topk(q, c, w, 40, backend="torch", chunk_size=5)
    assert_topk_matches(v, i, score, 40, 1e-5)
    # all-zero query: every score is 0, ids are any distinct rows
    v, i = ops.pecm_topk(torch.zeros(1, 4, 8), c, w, 10, backend="torch")
    assert torch.all(v == 0) and len(set(i[0].tolist())) == 10


@pytest.mark.parametrize("dtype", DTYPES)
def test_rerank_vs_reference(dtype):
    q, c, w, qm, cm = make_inputs(5, 120, 26, 32, dtype=dtype, masks=True, seed=11)
    g = torch.Generator().manual_seed(1)
    cand = torch.randint(0, 120, (5, 40), generator=g)
    cand[:, ::3] = -1  # padding
    cand[0, :] = -1  # a query with no candidates at all
    sim, conf, score = ref_scores(q, c, w, qm, cm)
    for by, ref in (("score", score), ("sim", sim), ("conf", conf)):
        for k in (1, 5, 30, 50):
            v, i = ops.pecm_rerank(q, c, cand, w, k, q_mask=qm, c_mask=cm, by=by, backend="torch")
            ev, _ = reference.rerank(ref, cand.numpy(), k)
            np.testing.assert_allclose(v.double().numpy(), ev, atol=TOL[dtype], rtol=0)
            assert torch.all(i[0] == -1)
            valid = i >= 0
            for b in range(5):
                assert set(i[b][valid[b]].tolist()) <= set(cand[b].tolist()) - {-1}
                got = ref[b, i[b][valid[b]].numpy()]
                np.testing.assert_allclose(got, v[b][valid[b]].double().numpy(), atol=TOL[dtype], rtol=0)


def test_pooled_vectors_replace_eq4():
    q, c, w, _, _ = make_inputs(3, 20, 4, 8, seed=2)
    qp, cp = torch.randn(3, 8), torch.randn(20, 8) * 3  # not unit: the ops normalise
    got = ops.pecm_scores(q, c, w, q_pooled=qp, c_pooled=cp, backend="torch")
    exp = ref_scores(q, c, w, qp=qp.double().numpy(), cp=cp.double().numpy())
    for a, e in zip(got, exp):
        np.testing.assert_allclose(a.double().numpy(), e, atol=1e-5)
    v, i = ops.pecm_topk(q, c, w, 5, q_pooled=qp, c_pooled=cp, backend="torch")
    assert_topk_matches(v, i, exp[2], 5, 1e-5)


def test_normalized_flag_skips_normalisation():
    q, c, w, _, cm = make_inputs(2, 50, 4, 8, masks=True, seed=4)
    chat = torch.nn.functional.normalize(c, dim=-1) * cm.unsqueeze(-1)
    a = ops.pecm_scores(q, c, w, c_mask=cm, backend="torch")
    b = ops.pecm_scores(q, chat, w, c_mask=cm, backend="torch", normalized=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_single_query_and_numpy_inputs():
    q, c, w, _, _ = make_inputs(1, 30, 4, 8, seed=6)
    s_np = ops.pecm_scores(q[0].numpy(), c.numpy(), w.numpy(), backend="torch")
    assert s_np[2].shape == (30,) and isinstance(s_np[2], torch.Tensor)
    v, i = ops.pecm_topk(q[0].numpy(), c.numpy(), w.numpy(), 4, backend="torch")
    assert v.shape == (4,) and i.dtype == torch.int64
    _, _, score = ref_scores(q, c, w)
    assert_topk_matches(v[None], i[None], score, 4, 1e-5)


def test_empty_inputs():
    _, c, w, _, _ = make_inputs(1, 10, 4, 8)
    s = ops.pecm_scores(torch.zeros(0, 4, 8), c, w, backend="torch")
    assert s[0].shape == (0, 10)
    v, i = ops.pecm_topk(torch.randn(2, 4, 8), torch.zeros(0, 4, 8), w, 3, backend="torch")
    assert v.shape == (2, 3) and torch.all(torch.isneginf(v)) and torch.all(i == -1)
    v, i = ops.pecm_rerank(torch.randn(2, 4, 8), c, torch.zeros(2, 0, dtype=torch.long), w, 3, backend="torch")
    assert torch.all(i == -1)


def test_non_contiguous_inputs():
    q, c, w, _, _ = make_inputs(3, 40, 4, 8, seed=8)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous strides
    ct = c[::1].transpose(0, 1).contiguous().transpose(0, 1)
    assert not qt.is_contiguous() and not ct.is_contiguous()
    for x, y in zip(ops.pecm_scores(qt, ct, w, backend="torch"), ops.pecm_scores(q, c, w, backend="torch")):
        torch.testing.assert_close(x, y)


def test_gradcheck_float64():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    qm = torch.tensor([[True, False, True], [True, True, True]])
    cm = torch.rand(5, 3) > 0.2
    cm[0] = True

    def f(q, c, w):
        return ops.pecm_scores(q, c, w, q_mask=qm, c_mask=cm, backend="torch")

    assert torch.autograd.gradcheck(f, (q, c, w), eps=1e-6, atol=1e-6)


def test_gradcheck_pooled():
    torch.manual_seed(1)
    q = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.ones(3, dtype=torch.float64)
    qp = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    cp = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)

    def f(q, c, qp, cp):
        return ops.pecm_scores(q, c, w, q_pooled=qp, c_pooled=cp, backend="torch")[2]

    assert torch.autograd.gradcheck(f, (q, c, qp, cp), eps=1e-6, atol=1e-6)


def test_float32_grad_matches_float64():
    q, c, w, qm, cm = make_inputs(3, 6, 4, 8, masks=True, seed=12)
    grads = []
    for dt in (torch.float32, torch.float64):
        qq, cc, ww = (t.detach().to(dt).requires_grad_() for t in (q, c, w))
        s, cf, r = ops.pecm_scores(qq, cc, ww, q_mask=qm, c_mask=cm, backend="torch")
        (s.sum() + 2 * cf.sum() + 3 * r.sum()).backward()
        grads.append([t.grad.double() for t in (qq, cc, ww)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ops.available_backends())
def test_rerank_prepares_only_the_candidate_rows(backend):
    """normalized=False re-ranks via the distinct candidate rows (ids mapped back); it must agree with
    re-ranking the normalised full copy, including duplicated ids, padding and all-padding input."""
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("triton needs CUDA here")
    q, c, w, qm, cm = make_inputs(3, 500, 26, 16, masks=True, seed=21)
    c = c * 3.0  # not unit length: normalised inside
    cand = torch.tensor([[7, 7, 499, -1, 0, 250], [3, -1, -1, 3, 3, 3], [-1, 12, 480, 100, 101, 102]])
    chat = torch.nn.functional.normalize(c, dim=-1) * cm.unsqueeze(-1)
    cp = torch.nn.functional.normalize((chat * w.view(1, -1, 1)).sum(1), dim=-1)
    for k in (1, 4, 8):
        a = ops.pecm_rerank(q, c, cand, w, k, q_mask=qm, c_mask=cm, backend=backend)
        b = ops.pecm_rerank(q, chat, cand, w, k, q_mask=qm, c_mask=cm, c_pooled=cp, normalized=True, backend=backend)
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
        assert torch.equal(a[1], b[1])
        sim, conf, score = ref_scores(q, c, w, qm, cm)
        ev, _ = reference.rerank(score, cand.numpy(), k)
        np.testing.assert_allclose(a[0].double().numpy(), ev, atol=1e-5, rtol=0)
    v, i = ops.pecm_rerank(q, c, torch.full((3, 4), -1), w, 2, backend=backend)
    assert torch.all(torch.isneginf(v)) and torch.all(i == -1)
