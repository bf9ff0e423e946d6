"""Shared test utilities: random PECM inputs and tie-aware top-k comparison against the reference."""

from __future__ import annotations

import numpy as np
import torch

from pecm import ops, reference
from pecm.operands import Candidates

TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float64: 1e-9}


def make_inputs(b, n, k, d, dtype=torch.float32, masks=False, seed=0, ties=False):
    """Random q [B,K,D], c [N,K,D] (storage dtype), w [K]; optional masks with fully masked rows.

    ``ties=True`` makes candidates repeat (exact score ties) and adds a zero prototype.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, k, d, generator=g)
    c = torch.randn(n, k, d, generator=g)
    if ties and n >= 4:
        c[n // 2 :] = c[: n - n // 2].clone()  # duplicated rows -> tied scores
        c[0, 0] = 0.0  # zero prototype: cosine 0
    w = torch.rand(k, generator=g) * 2
    qm = cm = None
    if masks:
        qm = torch.rand(b, k, generator=g) > 0.3
        cm = torch.rand(n, k, generator=g) > 0.3
        if n > 1:
            cm[1] = False  # a fully masked candidate: C = 0
        if b > 1:
            qm[-1] = False  # a fully masked query
    return q.to(dtype), c.to(dtype), w, qm, cm


def ref_scores(q, c, w, qm=None, cm=None, qp=None, cp=None):
    """Float64 reference on the values actually given (after the storage-dtype rounding)."""
    return reference.scores(q.double(), c.double(), w.double(), qm, cm, qp, cp)


def assert_topk_matches(values, ids, ref_values, k, tol):
    """Tie-aware check of a [B, k] top-k result against a float64 [B, N] reference matrix.

    The returned values must equal the reference's sorted top-k values (so any tie order is
    accepted), every returned id must be valid and distinct and carry its own reference value,
    and the tail beyond N must be (-inf, -1).
    """
    values = values.detach().cpu().double().numpy()
    ids = ids.detach().cpu().numpy()
    b, n = ref_values.shape
    assert values.shape == (b, k) and ids.shape == (b, k)
    exp_v, _ = reference.topk(ref_values, k)
    m = min(k, n)
    np.testing.assert_allclose(values[:, :m], exp_v[:, :m], atol=tol, rtol=0)
    assert np.all(np.isneginf(values[:, m:])) and np.all(ids[:, m:] == -1)
    for i in range(b):
        row = ids[i, :m]
        assert np.all((row >= 0) & (row < n)), row
        assert len(set(row.tolist())) == m, "duplicate ids"
        np.testing.assert_allclose(ref_values[i, row], values[i, :m], atol=tol, rtol=0)
        assert np.all(np.diff(values[i, :m]) <= 1e-6), "not sorted descending"


def unit_masked(c, cm):
    """Unit prototypes with masked-out ones zero (what an index stores), in c's dtype."""
    u = torch.nn.functional.normalize(c.float(), dim=-1, eps=1e-12)
    if cm is not None:
        u = u * cm.unsqueeze(-1)
    return u.to(c.dtype)


def candidate_modes(c, w, cm, seed=0):
    """(name, kwargs for the ops, pooled vectors the reference should use or None)."""
    g = torch.Generator().manual_seed(seed)
    n, _, d = c.shape
    raw_pooled = torch.randn(n, d, generator=g) * (torch.rand(n, 1, generator=g) * 3 + 0.1)
    raw_pooled[0] = 0.0  # a zero pooled vector: sim 0
    u = unit_masked(c, cm)
    unit_pooled = torch.nn.functional.normalize(raw_pooled, dim=-1, eps=1e-12)
    return [
        ("raw", dict(c=c, c_mask=cm), None),
        ("raw+pooled", dict(c=c, c_mask=cm, c_pooled=raw_pooled.to(c.dtype)), raw_pooled.to(c.dtype)),
        ("unit", dict(c=u, c_mask=cm, normalized=True), None),
        ("unit+pooled", dict(c=u, c_mask=cm, c_pooled=unit_pooled.to(c.dtype), normalized=True), unit_pooled),
        ("prepared", dict(c=ops.prepare_candidates(c, w, c_mask=cm)), None),
        ("prepared+pooled", dict(c=ops.prepare_candidates(c, w, c_mask=cm, c_pooled=raw_pooled)), raw_pooled),
    ]


def call_op(op, q, mode_kw, w, qm, **kw):
    """Call ops.pecm_<op> with one of `candidate_modes`' kwargs (w omitted for a Candidates)."""
    mode_kw = dict(mode_kw)
    c = mode_kw.pop("c")
    wa = None if isinstance(c, Candidates) else w
    if op == "scores":
        return ops.pecm_scores(q, c, wa, q_mask=qm, **mode_kw, **kw)
    if op == "topk":
        return ops.pecm_topk(q, c, wa, kw.pop("k"), q_mask=qm, **mode_kw, **kw)
    cand = kw.pop("cand")
    return ops.pecm_rerank(q, c, cand, wa, kw.pop("k"), q_mask=qm, **mode_kw, **kw)
