"""Peer implementations the PECM ops are compared against, and the correctness gate.

(a) ``eager``   obvious PyTorch: per chunk, materialise the [B, chunk, K] cosines, weighted mean,
                times the pooled cosine, ``torch.topk`` per chunk and a merge.
(b) ``gemm``    GEMM-formulated PyTorch: the weights folded into the query, one [B, K*D] x [K*D, chunk]
                matmul plus the pooled [B, D] x [D, chunk] matmul per chunk, ``torch.topk``.
(c) ``compile`` ``torch.compile`` of the obvious per-chunk code of (a).
(d) ``numpy``   the GEMM formulation in NumPy (float32), ``argpartition`` top-k.
(e) ``faiss``   FAISS ``IndexFlatIP`` over the pooled vectors only: exact search with K+1 times less
                work, a lower bound for any exact PECM search (checked against the reference *sim*).

Every implementation (peers and pecm backends alike) must pass `check` against `pecm.reference`
on a small case before it is timed; one that fails is recorded as failed and gets no time.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .. import reference
from .workload import Workload, make_workload

CHUNK = 4096
Maker = Callable[[str, Workload], Callable[[], object]]


def _query(wl: Workload):
    """Unit query prototypes [B, K, D], unit pooled query [B, D] (float32)."""
    qh = F.normalize(wl.q.float(), dim=-1)
    w = wl.w.float()
    hq = F.normalize((qh * w.view(1, -1, 1)).sum(1), dim=-1)
    return qh, w, hq


def _merge(best_v, best_i, v, i, k):
    if best_v is None:
        return v, i
    vv, pos = torch.topk(torch.cat([best_v, v], 1), min(k, best_v.shape[1] + v.shape[1]), dim=1)
    return vv, torch.gather(torch.cat([best_i, i], 1), 1, pos)


def _eager_chunk(qh, w, hq, cc, cpc):
    cos = torch.einsum("bkd,nkd->bnk", qh, cc.float())  # [B, chunk, K]
    conf = (cos * w).sum(-1) / w.sum()
    sim = hq @ cpc.float().T
    return sim * conf


def _chunked_topk(wl: Workload, score_chunk) -> Tuple[torch.Tensor, torch.Tensor]:
    n, k = wl.c.shape[0], wl.topk
    bv = bi = None
    for s in range(0, n, CHUNK):
        sc = score_chunk(s, min(n, s + CHUNK))
        v, i = torch.topk(sc, min(k, sc.shape[1]), dim=1)
        bv, bi = _merge(bv, bi, v, i + s, k)
    return bv, bi


def _chunked_scores(wl: Workload, score_chunk) -> torch.Tensor:
    n = wl.c.shape[0]
    return torch.cat([score_chunk(s, min(n, s + CHUNK)) for s in range(0, n, CHUNK)], 1)


def _rerank_finish(score, cand, k):
    score = score.masked_fill(cand < 0, float("-inf"))
    v, pos = torch.topk(score, min(k, score.shape[1]), dim=1)
    return v, torch.gather(cand, 1, pos)


def _eager_rerank(qh, w, hq, c, cp, cand):
    idx = cand.clamp_min(0)
    cc = c[idx].float()  # [B, M, K, D]
    cos = torch.einsum("bkd,bmkd->bmk", qh, cc)
    conf = (cos * w).sum(-1) / w.sum()
    sim = torch.einsum("bd,bmd->bm", hq, cp[idx].float())
    return sim * conf


def _raise_recompile_limit(limit: int = 256) -> None:
    """Dynamo caches compiled graphs per code object; every grid point (and the ragged last chunk)
    is a new static shape, and past the default limit (8) it silently falls back to eager, which
    would time the eager code under the "compile" label."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)


def make_eager(op: str, wl: Workload, compiled: bool = False):
    chunk_fn, rr_fn = _eager_chunk, _eager_rerank
    if compiled:
        _raise_recompile_limit()
        chunk_fn = torch.compile(_eager_chunk, dynamic=False)
        rr_fn = torch.compile(_eager_rerank, dynamic=False)
    qh, w, hq = _query(wl)
    c, cp = wl.c, wl.cp

    def score_chunk(s, e):
        return chunk_fn(qh, w, hq, c[s:e], cp[s:e])

    if op == "topk":
        return lambda: _chunked_topk(wl, score_chunk)
    if op == "scores":
        return lambda: _chunked_scores(wl, score_chunk)
    return lambda: _rerank_finish(rr_fn(qh, w, hq, c, cp, wl.cand), wl.cand, wl.topk)


def make_compile(op: str, wl: Workload):
    return make_eager(op, wl, compiled=True)


def make_gemm(op: str, wl: Workload):
    qh, w, hq = _query(wl)
    b, k, d = qh.shape
    qw = (qh * (w / w.sum()).view(1, k, 1)).reshape(b, k * d)
    c2 = wl.c.reshape(wl.c.shape[0], k * d)
    cp = wl.cp

    def score_chunk(s, e):
        return (hq @ cp[s:e].float().T) * (qw @ c2[s:e].float().T)

    if op == "topk":
        return lambda: _chunked_topk(wl, score_chunk)
    if op == "scores":
        return lambda: _chunked_scores(wl, score_chunk)

    def rerank():
        idx = wl.cand.clamp_min(0)
        conf = torch.bmm(c2[idx].float(), qw.unsqueeze(-1)).squeeze(-1)
        sim = torch.bmm(cp[idx].float(), hq.unsqueeze(-1)).squeeze(-1)
        return _rerank_finish(sim * conf, wl.cand, wl.topk)

    return rerank


def _np_storage(t: torch.Tensor) -> np.ndarray:
    """The storage as a NumPy array without a copy; bfloat16 (which NumPy lacks) as its uint16 bits."""
    t = t.detach().cpu()
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _np_to_f32(a: np.ndarray) -> np.ndarray:
    """float16/float32 -> float32; uint16 bfloat16 bits -> float32 (the bits are the top half)."""
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)


def make_numpy(op: str, wl: Workload):
    qh, w, hq = _query(wl)
    b, k, d = qh.shape
    qw = (qh * (w / w.sum()).view(1, k, 1)).reshape(b, k * d).cpu().numpy()
    hqn = hq.cpu().numpy()
    c2 = _np_storage(wl.c.reshape(wl.c.shape[0], k * d))
    cp = _np_storage(wl.cp)
    f32 = _np_to_f32
    n, kk = c2.shape[0], wl.topk

    def score_chunk(s, e):
        return (hqn @ f32(cp[s:e]).T) * (qw @ f32(c2[s:e]).T)

    def topk_rows(sc, kk):
        kk = min(kk, sc.shape[1])
        part = np.argpartition(-sc, kk - 1, axis=1)[:, :kk]
        pv = np.take_along_axis(sc, part, 1)
        order = np.argsort(-pv, axis=1, kind="stable")
        return np.take_along_axis(pv, order, 1), np.take_along_axis(part, order, 1)

    def topk():
        bv = bi = None
        for s in range(0, n, CHUNK):
            v, i = topk_rows(score_chunk(s, min(n, s + CHUNK)), kk)
            i = i + s
            if bv is not None:
                v, i = np.concatenate([bv, v], 1), np.concatenate([bi, i], 1)
                v, pos = topk_rows(v, kk)
                i = np.take_along_axis(i, pos, 1)
            bv, bi = v, i
        return torch.from_numpy(bv), torch.from_numpy(bi)

    if op == "topk":
        return topk
    if op == "scores":
        return lambda: torch.from_numpy(
            np.concatenate([score_chunk(s, min(n, s + CHUNK)) for s in range(0, n, CHUNK)], 1)
        )

    cand = wl.cand.cpu().numpy()

    def rerank():
        idx = np.maximum(cand, 0)
        conf = np.einsum("bmx,bx->bm", f32(c2[idx]), qw)
        sim = np.einsum("bmd,bd->bm", f32(cp[idx]), hqn)
        sc = np.where(cand < 0, -np.inf, sim * conf)
        v, pos = topk_rows(sc, kk)
        return torch.from_numpy(v), torch.from_numpy(np.take_along_axis(cand, pos, 1))

    return rerank


def make_faiss(op: str, wl: Workload):
    import faiss

    _, _, hq = _query(wl)
    index = faiss.IndexFlatIP(wl.cp.shape[1])
    index.add(np.ascontiguousarray(wl.cp.float().cpu().numpy()))
    hqn = np.ascontiguousarray(hq.cpu().numpy())

    def search():
        v, i = index.search(hqn, wl.topk)
        return torch.from_numpy(v), torch.from_numpy(i)

    return search


def make_backend(name: str) -> Maker:
    """A pecm backend as an implementation: the public op with ``backend=name``."""
    from .. import ops

    def maker(op: str, wl: Workload):
        if op == "topk":
            return lambda: ops.pecm_topk(wl.q, wl.c, wl.w, wl.topk, c_pooled=wl.cp, normalized=True, backend=name)
        if op == "rerank":
            return lambda: ops.pecm_rerank(
                wl.q, wl.c, wl.cand, wl.w, wl.topk, c_pooled=wl.cp, normalized=True, backend=name
            )
        return lambda: ops.pecm_scores(wl.q, wl.c, wl.w, c_pooled=wl.cp, normalized=True, backend=name)[2]

    return maker


# name -> (maker, ops supported, what the values mean)
PEERS: Dict[str, Tuple[Maker, Tuple[str, ...], str]] = {
    "eager": (make_eager, ("topk", "rerank", "scores"), "score"),
    "gemm": (make_gemm, ("topk", "rerank", "scores"), "score"),
    "compile": (make_compile, ("topk", "rerank", "scores"), "score"),
    "numpy": (make_numpy, ("topk", "rerank", "scores"), "score"),
    "faiss": (make_faiss, ("topk",), "sim"),
}


def unavailable_reason(name: str, device: str) -> Optional[str]:
    """Why a peer cannot run here (None if it can)."""
    if name == "faiss":
        try:
            import faiss  # noqa: F401
        except ImportError:
            return "faiss is not installed"
        if device != "cpu":
            return "faiss-cpu only (the GPU build is not part of this comparison)"
    if name == "numpy" and device != "cpu":
        return "NumPy runs on the CPU only"
    return None


def check(maker: Maker, op: str, by: str = "score", dtype: str = "float16", device: str = "cpu", tol: float = 3e-3):
    """Run ``maker`` on a small case and compare with `pecm.reference`; returns (ok, message).

    top-k / rerank: the returned ids must be valid (in the candidate set for rerank), the returned
    values must equal the reference value of those ids, and the values must equal the reference
    top-k values (ties may swap ids, never values). scores: elementwise against the reference.
    """
    wl = make_workload(3, 257, 4, 16, m=40, dtype=dtype, device=device, topk=7, seed=123)
    wl.cand[0, :5] = -1  # padding must be ignored
    wl.cand[1, 1] = wl.cand[1, 0]  # a repeated candidate
    try:
        out = maker(op, wl)()
    except Exception as e:  # a crashing implementation is a failed one
        return False, f"raised {type(e).__name__}: {e}"
    sim, conf, score = reference.scores(wl.q, wl.c, wl.w, c_pooled=wl.cp)
    want = {"score": score, "sim": sim, "conf": conf}[by]
    if op == "scores":
        got = np.asarray(out.detach().cpu().double())
        if got.shape != want.shape:
            return False, f"shape {got.shape} != {want.shape}"
        err = float(np.abs(got - want).max())
        return (err <= tol, f"max |error| {err:.2e} (tol {tol:g})")
    vals, ids = (np.asarray(t.detach().cpu().double()) for t in out)
    ids = ids.astype(np.int64)
    if op == "topk":
        rv, _ = reference.topk(want, wl.topk)
    else:
        rv, _ = reference.rerank(want, wl.cand.cpu().numpy(), wl.topk)
        cand = wl.cand.cpu().numpy()
        if not all(set(ids[b]) <= set(cand[b]) for b in range(ids.shape[0])):
            return False, "returned ids outside the candidate set"
    if vals.shape != rv.shape or ids.shape != rv.shape:
        return False, f"shape {vals.shape} != {rv.shape}"
    if ids.min() < 0 or ids.max() >= want.shape[1]:
        return False, "invalid ids"
    own = np.take_along_axis(want, ids, 1)
    err = max(float(np.abs(own - vals).max()), float(np.abs(rv - vals).max()))
    return (err <= tol, f"max |error| {err:.2e} (tol {tol:g})")
