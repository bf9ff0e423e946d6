"""Float64 reference of the PECM score (DESIGN §1), written for obviousness, not speed.

For a query item q (K prototypes q_k in R^D, mask mq) and a candidate c (c_k, mc), weights w >= 0:

    ẑ_k   = z_k / ||z_k||            (a zero prototype stays zero: cos with it is 0)
    s_k   = cos(q_k, c_k)            Eq. 1, prototypes aligned by index k
    m_k   = mq_k * mc_k              joint mask (all ones when no masks are given)
    C     = Σ_k w_k m_k s_k / Σ_k w_k m_k      Eq. 2/6; defined as 0 when Σ_k w_k m_k = 0
    h     = Σ_k w_k m_k' ẑ_k         Eq. 4 with the item's *own* mask m' (unless a pooled vector is given)
    sim   = cos(h_q, h_c)            Eq. 3; 0 when either pooled vector is zero
    R     = sim * C                  Eq. 7

Conventions every backend follows: a fully masked pair has C = 0 (so R = 0); a zero-length
prototype or pooled vector has cosine 0 with anything. "Zero" means exactly zero: there is no eps,
any other finite vector is normalised to unit length whatever its magnitude (float32 1e-45 ... 3.4e38;
float64 has the range to do that here without scaling). The values of masked-out prototypes are never
used (a NaN there changes nothing). NaN/inf in a used value gives NaN scores, and `topk` / `rerank`
never select a NaN value: such candidates are left out, as if they were padding (see docs/cpp.md,
"Numerics"; the ops reject non-finite inputs up front with ``check=True``).

Everything here is numpy float64 with explicit loops over pairs (vectorised over k, d only), so
that it is obviously the formula above. Use small shapes.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def _np64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() else x).numpy()
    return np.asarray(x, dtype=np.float64)


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    return v / n if n > 0 else np.zeros_like(v)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(_unit(a), _unit(b)))


def pooled(z: np.ndarray, w: np.ndarray, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Eq. 4 for one item: h = Σ_k w_k m_k ẑ_k, returned unit length (zero if h = 0). z: [K, D]."""
    k = z.shape[0]
    m = np.ones(k) if mask is None else np.asarray(mask, dtype=np.float64)
    h = sum(w[i] * _unit(z[i]) for i in range(k) if m[i])
    return _unit(np.asarray(h, dtype=np.float64) + np.zeros(z.shape[1]))


def pair_score(
    q: np.ndarray,
    c: np.ndarray,
    w: np.ndarray,
    q_mask: Optional[np.ndarray] = None,
    c_mask: Optional[np.ndarray] = None,
    q_pooled: Optional[np.ndarray] = None,
    c_pooled: Optional[np.ndarray] = None,
) -> Tuple[float, float, float]:
    """(sim, C, R) of one query [K, D] against one candidate [K, D]."""
    k = q.shape[0]
    mq = np.ones(k) if q_mask is None else np.asarray(q_mask, dtype=np.float64)
    mc = np.ones(k) if c_mask is None else np.asarray(c_mask, dtype=np.float64)
    m = mq * mc
    s = np.array([cos(q[i], c[i]) if m[i] else 0.0 for i in range(k)])
    den = float(np.sum(w * m))
    conf = float(np.sum(w * m * s) / den) if den > 0 else 0.0
    hq = pooled(q, w, mq) if q_pooled is None else _unit(np.asarray(q_pooled, dtype=np.float64))
    hc = pooled(c, w, mc) if c_pooled is None else _unit(np.asarray(c_pooled, dtype=np.float64))
    sim = float(np.dot(hq, hc))
    return sim, conf, sim * conf


def _unit_rows(z: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(z, axis=-1, keepdims=True)
    return np.divide(z, n, out=np.zeros_like(z), where=n > 0)


def scores(q, c, w, q_mask=None, c_mask=None, q_pooled=None, c_pooled=None):
    """(sim, conf, score), each float64 [B, N]. q: [B, K, D] or [K, D]; c: [N, K, D].

    The same formulas as `pair_score`, vectorised over pairs with numpy (tests check that the
    two agree); `pair_score` is the definition.
    """
    q, c, w = _np64(q), _np64(c), _np64(w)
    if q.ndim == 2:
        q = q[None]
        q_mask = None if q_mask is None else _np64(q_mask)[None]
        q_pooled = None if q_pooled is None else _np64(q_pooled)[None]
    (b, k, _), n = q.shape, c.shape[0]
    mq = np.ones((b, k)) if q_mask is None else _np64(q_mask)
    mc = np.ones((n, k)) if c_mask is None else _np64(c_mask)
    qh = np.where(mq[..., None] > 0, _unit_rows(q), 0.0)  # masked-out prototypes are never used
    ch = np.where(mc[..., None] > 0, _unit_rows(c), 0.0)
    s = np.einsum("bkd,nkd->bnk", qh, ch)  # Eq. 1 for every pair and k
    m = mq[:, None, :] * mc[None, :, :]
    den = np.sum(w * m, axis=-1)
    num = np.sum(w * m * s, axis=-1)
    conf = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    hq = _unit_rows(np.einsum("k,bkd->bd", w, qh)) if q_pooled is None else _unit_rows(_np64(q_pooled))
    hc = _unit_rows(np.einsum("k,nkd->nd", w, ch)) if c_pooled is None else _unit_rows(_np64(c_pooled))
    sim = hq @ hc.T
    return sim, conf, sim * conf


def topk(values: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Descending top-k of each row of a float64 [B, N] matrix; (-inf, -1) padding when k > N.

    NaN values are never selected (they count as missing, so they end up as padding)."""
    values = np.asarray(values, dtype=np.float64)
    b, n = values.shape
    out_v = np.full((b, k), -np.inf)
    out_i = np.full((b, k), -1, dtype=np.int64)
    for i in range(b):
        order = sorted((j for j in range(n) if not np.isnan(values[i, j])), key=lambda j: -values[i, j])[:k]
        out_v[i, : len(order)] = values[i, order]
        out_i[i, : len(order)] = order
    return out_v, out_i


def rerank(values: np.ndarray, candidates: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Best k of each row's candidate ids (-1 = padding) by values[b, id], descending."""
    values = np.asarray(values, dtype=np.float64)
    cand = np.asarray(candidates, dtype=np.int64)
    b = cand.shape[0]
    out_v = np.full((b, k), -np.inf)
    out_i = np.full((b, k), -1, dtype=np.int64)
    for i in range(b):
        ids = [int(j) for j in cand[i] if j >= 0 and not np.isnan(values[i, j])]
        ids = sorted(ids, key=lambda j: -values[i, j])[:k]
        out_v[i, : len(ids)] = values[i, ids]
        out_i[i, : len(ids)] = ids
    return out_v, out_i
