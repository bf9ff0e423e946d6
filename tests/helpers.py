"""Shared test utilities: random PECM inputs and tie-aware top-k comparison against the reference."""

from __future__ import annotations

import numpy as np
import torch

from pecm import reference

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
