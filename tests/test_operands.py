"""`pecm.operands` / `pecm.ops` operand contract: Candidates, Queries, prepare_*, By, and every
candidate mode (raw, raw + raw pooled, unit without pooled, prepared) against the float64 reference
on the torch and cpp backends (the cpp SIMD paths are covered per level in test_cpp_backend.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import TOL, assert_topk_matches, call_op, candidate_modes, make_inputs, unit_masked

from pecm import ops, reference
from pecm.backends import available_backends
from pecm.operands import PREP_CHUNK, By, Candidates, Queries

BACKENDS = [b for b in ("torch", "cpp") if b in available_backends()]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("b", [1, 3, 16])
def test_every_candidate_mode_matches_reference(backend, dtype, masks, b):
    q, c, w, qm, cm = make_inputs(b, 57, 5, 24, dtype=dtype, masks=masks, seed=b + 10 * masks, ties=True)
    tol = TOL[dtype]
    cand = torch.from_numpy(np.random.default_rng(b).integers(-1, 57, size=(b, 40)))
    for name, kw, ref_pooled in candidate_modes(c, w, cm, seed=b):
        ref = reference.scores(q.double(), c.double(), w.double(), qm, cm, None, ref_pooled)
        got = call_op("scores", q, kw, w, qm, backend=backend)
        for g, r, what in zip(got, ref, ("sim", "conf", "score")):
            np.testing.assert_allclose(g.double().numpy(), r, atol=tol, rtol=0, err_msg=f"{name} {what}")
        for by, ref_by in zip(("sim", "conf", "score"), ref):
            v, i = call_op("topk", q, kw, w, qm, k=7, by=by, backend=backend)
            assert_topk_matches(v, i, ref_by, 7, tol)
        v, i = call_op("rerank", q, kw, w, qm, k=9, cand=cand, backend=backend)
        exp_v, _ = reference.rerank(ref[2], cand.numpy(), 9)
        np.testing.assert_allclose(v.double().numpy(), exp_v, atol=tol, rtol=0, err_msg=name)


# ---------------------------------------------------------------------------------- prepare_candidates
@pytest.mark.parametrize("dtype", DTYPES)
def test_prepare_candidates_is_unit_masked_zero_and_pooled(dtype):
    _, c, w, _, cm = make_inputs(1, 40, 6, 16, dtype=dtype, masks=True, seed=2, ties=True)
    cs = ops.prepare_candidates(c, w, c_mask=cm)
    assert cs.prepared and cs.dtype == dtype and cs.pooled.dtype == dtype and cs.n == 40
    norms = cs.prototypes.float().norm(dim=-1)
    valid = cm & (c.float().norm(dim=-1) > 0)
    assert torch.allclose(norms[valid], torch.ones(()), atol=TOL[dtype])
    assert torch.all(cs.prototypes[~cm] == 0)
    for i in range(cs.n):
        exp = reference.pooled(c[i].double().numpy(), w.double().numpy(), cm[i].numpy())
        np.testing.assert_allclose(cs.pooled[i].double().numpy(), exp, atol=TOL[dtype], rtol=0)


def test_prepare_candidates_blocked_equals_one_block():
    _, c, w, _, cm = make_inputs(1, PREP_CHUNK + 77, 3, 8, masks=True, seed=4)
    big = ops.prepare_candidates(c, w, c_mask=cm)
    small = ops.prepare_candidates(c[-100:], w, c_mask=cm[-100:])
    assert torch.equal(big.prototypes[-100:], small.prototypes) and torch.equal(big.pooled[-100:], small.pooled)


def test_prepared_with_unit_pooled_is_wrapped_without_copy():
    _, c, w, _, cm = make_inputs(1, 30, 4, 8, masks=True, seed=5)
    u = unit_masked(c, cm)
    p = torch.nn.functional.normalize(torch.randn(30, 8), dim=-1)
    cs = ops.prepare_candidates(u, w, c_mask=cm, c_pooled=p, normalized=True)
    assert cs.prototypes.data_ptr() == u.data_ptr() and cs.pooled.data_ptr() == p.data_ptr()
    cs2 = ops.prepare_candidates(cs.prototypes, w, c_mask=cm, normalized=True)  # pooled computed, c shared
    assert cs2.prototypes.data_ptr() == u.data_ptr() and cs2.prepared


def test_prepare_candidates_is_differentiable():
    q, c, w, qm, cm = make_inputs(3, 9, 4, 8, dtype=torch.float64, masks=True, seed=6)
    c.requires_grad_(True)
    w = w.double().requires_grad_(True)

    def f(c, w):
        cs = ops.prepare_candidates(c, w, c_mask=cm)
        return ops.pecm_scores(q, cs, None, q_mask=qm, backend="torch")[2].sum()

    assert torch.autograd.gradcheck(f, (c, w), eps=1e-6, atol=1e-6)


def test_candidates_are_frozen_and_validated():
    _, c, w, _, cm = make_inputs(1, 10, 4, 8, masks=True)
    cs = ops.prepare_candidates(c, w, c_mask=cm)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cs.prototypes = c
    for kwargs, exc, match in [
        (dict(prototypes=c[0], weights=w), ValueError, r"c: expected shape \[N, K, D\]"),
        (dict(prototypes=c.int(), weights=w), TypeError, "c: dtype"),
        (dict(prototypes=c, weights=w[:3]), ValueError, r"w: expected shape \[K=4\]"),
        (dict(prototypes=c, weights=-w), ValueError, "w: weights must be non-negative"),
        (dict(prototypes=c, weights=w, mask=cm[:3]), ValueError, r"c_mask: expected shape \[N=10, K=4\]"),
        (dict(prototypes=c, weights=w, mask=cm.float()), TypeError, "c_mask: expected a bool mask"),
        (dict(prototypes=c, weights=w, pooled=torch.ones(10, 3)), ValueError, "c_pooled.*D=8"),
        (dict(prototypes=c, weights=w, pooled_normalized=True), ValueError, "pooled_normalized"),
    ]:
        with pytest.raises(exc, match=match):
            Candidates(**kwargs)


def test_ops_take_candidates_and_refuse_conflicting_arguments():
    q, c, w, qm, cm = make_inputs(2, 20, 4, 8, masks=True, seed=7)
    cs = ops.prepare_candidates(c, w, c_mask=cm)
    ref = ops.pecm_topk(q, c, w, 5, q_mask=qm, c_mask=cm, backend="torch")
    for wa in (None, w, w.clone(), w.numpy()):  # the same weights, by identity or by value
        got = ops.pecm_topk(q, cs, wa, 5, q_mask=qm, backend="torch")
        torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="w: differs from the weights"):
        ops.pecm_topk(q, cs, w * 2, 5)
    with pytest.raises(ValueError, match="c_mask: must be None when c is a Candidates"):
        ops.pecm_scores(q, cs, None, c_mask=cm)
    with pytest.raises(ValueError, match="c_pooled: must be None"):
        ops.pecm_scores(q, cs, None, c_pooled=torch.ones(20, 8))
    with pytest.raises(TypeError, match="w: expected the weights"):
        ops.pecm_scores(q, c, None)


# ------------------------------------------------------------------------------------ prepare_queries
@pytest.mark.parametrize("backend", BACKENDS)
def test_prepared_queries_give_the_same_results(backend):
    q, c, w, qm, cm = make_inputs(4, 30, 4, 8, masks=True, seed=8)
    qs = ops.prepare_queries(q, w, q_mask=qm)
    assert isinstance(qs, Queries) and qs.b == 4 and qs.qw.shape == (4, 32)
    a = ops.pecm_scores(q, c, w, q_mask=qm, c_mask=cm, backend=backend)
    b = ops.pecm_scores(qs, c, w, c_mask=cm, backend=backend)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    single = ops.prepare_queries(q[0], w, q_mask=qm[0])
    v, i = ops.pecm_topk(single, c, w, 3, c_mask=cm, backend=backend)
    assert v.shape == (3,) and torch.equal(i, ops.pecm_topk(q[:1], c, w, 3, q_mask=qm[:1], c_mask=cm)[1][0])
    with pytest.raises(ValueError, match="q_mask: must be None when q is a Queries"):
        ops.pecm_scores(qs, c, w, q_mask=qm)
    with pytest.raises(ValueError, match="q: was prepared with other weights"):
        ops.pecm_scores(qs, c, w * 3)
    with pytest.raises(ValueError, match="w: weights must be non-negative"):
        ops.prepare_queries(q, -w)


# --------------------------------------------------------------------------------------------- By
def test_by_is_one_encoding():
    assert [b.label for b in By] == ["score", "sim", "conf"]
    assert By.parse("sim") is By.SIM and By.parse(By.CONF) is By.CONF
    with pytest.raises(ValueError, match="by: expected one of"):
        By.parse("rank")
    _C = pytest.importorskip("pecm._C")
    assert {m.name: int(m.value) for m in _C.By.__members__.values()} == {b.name: int(b) for b in By}
    pytest.importorskip("triton")
    import importlib

    from pecm.backends import triton_backend  # noqa: F401  (makes pecm.kernels importable in a checkout)

    common = importlib.import_module("pecm.kernels.common")
    assert (common.BY_SCORE, common.BY_SIM, common.BY_CONF) == (By.SCORE, By.SIM, By.CONF)


def test_operands_pickle_without_backend_caches():
    import pickle

    q, c, w, qm, cm = make_inputs(2, 12, 4, 8, dtype=torch.float16, masks=True, seed=9)
    cs, qs = ops.prepare_candidates(c, w, c_mask=cm), ops.prepare_queries(q, w, q_mask=qm)
    before = ops.pecm_topk(qs, cs, None, 4)  # fills the backend caches (cpp: a pybind11 handle)
    cs2, qs2 = pickle.loads(pickle.dumps(cs)), pickle.loads(pickle.dumps(qs))
    assert cs2._cache == {} and cs2.prepared and torch.equal(cs2.prototypes, cs.prototypes)
    after = ops.pecm_topk(qs2, cs2, None, 4)
    assert torch.equal(before[1], after[1]) and torch.equal(before[0], after[0])


@pytest.mark.parametrize("masks", [False, True])
def test_prepare_candidates_float16_cpu_encoder_equals_torch_math(masks):
    """float16 CPU candidates go through the C++ item encoder: the same unit prototypes and pooled
    vectors as the torch preparation (to float16 rounding); a non-finite norm is refused."""
    from pecm.operands import normalize_block

    _, c, w, _, cm = make_inputs(1, 300, 6, 40, dtype=torch.float16, masks=masks, seed=10, ties=True)
    cs = ops.prepare_candidates(c, w, c_mask=cm)
    chat, cp = normalize_block(c, w.float(), cm, None, False, False, torch.float32)
    torch.testing.assert_close(cs.prototypes.float(), chat, atol=1e-3, rtol=0)
    torch.testing.assert_close(cs.pooled.float(), cp, atol=1e-3, rtol=0)
    for dt in (torch.float16, torch.float32, torch.bfloat16):  # the C++ encoder and the torch path alike
        bad = c.to(dt)
        bad[3, 1, 0] = float("inf")
        with pytest.raises(ValueError, match="c: a prototype's norm is not finite"):
            ops.prepare_candidates(bad, w, c_mask=cm)
