"""Search of an `ArchiveIndex`: exhaustive (streamed fused top-k) and two-stage (pooled top-M + rerank).

Exhaustive: the committed rows are read in chunks of ``chunk_size`` items with positioned reads
into two reused buffers (the next chunk is read by a helper thread while the current one is
scored), so memory stays bounded by the chunk size whatever the index size. Each chunk is wrapped,
without a copy or a second validation, as a prepared `pecm.ops.Candidates` (the index stores unit
prototypes, masked ones zero, and unit pooled vectors) and goes through ``pecm.ops.pecm_topk`` with
the queries prepared once (`pecm.ops.Queries`); the per-chunk results are merged exactly with global
row numbers by `pecm.topk.RunningTopK`, then mapped to global ids. Tombstoned rows are excluded by
asking a chunk for ``k + (its number of tombstones)`` and dropping them.

Two-stage: a streamed GEMM top-M over ``pooled.bin`` (cosine of unit pooled vectors, i.e. ``sim``),
then ``pecm.ops.pecm_rerank`` over the M gathered candidates (read through ``numpy.memmap``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import ops
from ..operands import By, Candidates, Queries
from ..topk import RunningTopK, empty_topk
from . import filters
from .format import pooled_values, unit_int8_rows_

DEFAULT_CHUNK = 8192
POOLED_CHUNK = 65536
MODES = ("exhaustive", "two_stage", "ann")
SPARSE_FILTER = 0.25  # a filter passing at most this fraction of the rows gathers them instead of streaming all


def _check_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    return int(v)


def _queries(index, queries, q_mask) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    q = queries.detach().cpu() if isinstance(queries, torch.Tensor) else torch.from_numpy(np.array(queries))
    if not q.dtype.is_floating_point:
        raise TypeError(f"queries: expected a float array, got dtype {q.dtype}")
    if q.ndim == 2:
        q = q.unsqueeze(0)
        q_mask = None if q_mask is None else np.asarray(q_mask)[None]
    if q.ndim != 3 or tuple(q.shape[1:]) != (index.K, index.D):
        raise ValueError(f"queries: expected shape [B, K={index.K}, D={index.D}], got {list(q.shape)}")
    qm = None
    if q_mask is not None:
        qm = torch.as_tensor(np.array(q_mask))
        if tuple(qm.shape) != (q.shape[0], index.K):
            raise ValueError(f"q_mask: expected shape [B={q.shape[0]}, K={index.K}], got {list(qm.shape)}")
        qm = qm.bool()
    return q.float().contiguous(), qm


class _ChunkReader:
    """Positioned reads of row ranges of some data files into reused buffers (double-buffered)."""

    def __init__(self, index, logicals: List[str], chunk: int):
        self.index, self.logicals, self.chunk = index, logicals, chunk
        self.fds = {k: index._files.fds[k] for k in logicals}  # the handle's snapshot (kept open by it)
        self.bufs = [
            {k: np.empty((chunk, *index.layout[k][1]), dtype=index.layout[k][0]) for k in logicals} for _ in range(2)
        ]

    def read(self, slot: int, s: int, e: int) -> Dict[str, np.ndarray]:
        out = {}
        for k in self.logicals:
            arr = self.bufs[slot][k][: e - s]
            view = memoryview(arr.reshape(-1).view(np.uint8))
            off, got = s * self.index.item_bytes[k], 0
            while got < len(view):
                n = os.preadv(self.fds[k], [view[got:]], off + got)
                if n <= 0:
                    from .format import IndexCorruptError

                    raise IndexCorruptError(f"index: {self.index.paths[k]} ended early while reading rows [{s}, {e})")
                got += n
            out[k] = arr
        return out

    def stream(self, start: int, end: int):
        """Yield (s, e, arrays) over [start, end), reading chunk i+1 while chunk i is used."""
        spans = [(s, min(end, s + self.chunk)) for s in range(start, end, self.chunk)]
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(self.read, 0, *spans[0]) if spans else None
            for i, (s, e) in enumerate(spans):
                cur = fut.result()
                fut = pool.submit(self.read, (i + 1) % 2, *spans[i + 1]) if i + 1 < len(spans) else None
                yield s, e, cur

    def close(self):
        self.fds = {}


def _dead(index, ids: np.ndarray, allow: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """Rows of a chunk that must not be returned: tombstoned, or (with a filter) not in ``allow``."""
    d = np.isin(ids, index.tombstones) if index.tombstones.size else np.zeros(ids.shape, dtype=bool)
    if allow is not None:
        pos = np.minimum(np.searchsorted(allow, ids), max(allow.size - 1, 0))
        d |= ~((allow[pos] == ids) if allow.size else np.zeros(ids.shape, dtype=bool))
    return d if d.any() else None


def _filter_rows(index, allow: np.ndarray, start: int, end: int) -> np.ndarray:
    """Row positions in [start, end) of the allowed (and not tombstoned) ids, ascending."""
    allow = np.setdiff1d(allow, index.tombstones, assume_unique=False) if index.tombstones.size else allow
    all_ids = np.asarray(index.ids())
    rows = np.searchsorted(all_ids, allow)
    ok = rows < index.count
    rows = rows[ok]
    rows = rows[all_ids[rows] == allow[ok]]
    return rows[(rows >= start) & (rows < end)]


def _read(index, names: List[str], rows: np.ndarray) -> Dict[str, np.ndarray]:
    return {k: index.read_rows(k, rows) for k in names}


def _chunk_candidates(index, w: torch.Tensor, a: Dict[str, np.ndarray], device=None):
    """Rows read from the index as prepared Candidates (views of the read buffers; no validation), or
    as `pecm.pq.PQCandidates` for a pq index."""
    masks = a["masks"]
    cm = None if masks.all() else torch.from_numpy(masks).view(torch.bool)  # stored 0/1 bytes
    if index.dtype == "pq":
        from ..pq import PQCandidates

        codes, scales = torch.from_numpy(a["prototypes"]), torch.from_numpy(a["scales"]).float()
        pooled = a["pooled"]
        if pooled.dtype == np.int8:  # decoded to unit float32 rows; float16 ones go to the kernels as stored
            pooled = pooled_values(pooled)
        pc = PQCandidates(codes, scales, torch.from_numpy(pooled), cm, w)
        return pc if device is None else pc.to(device)
    c = torch.from_numpy(a["prototypes"])
    if index.dtype == "int8":
        c = c.float() * torch.from_numpy(a["scales"]).unsqueeze(-1)
    cp = torch.from_numpy(a["pooled"])
    cp = cp if cp.dtype == c.dtype else cp.to(c.dtype)
    cs = Candidates.trusted(c, w, cm, cp, flags=3)
    return cs if device is None else cs.to(device)


def _names(index) -> List[str]:
    """The index's data files (`format.layout`: prototypes, pooled, masks, ids, and scales for int8 / pq)."""
    return list(index.layout)


def _topk(index, qs: Queries, cs, k: int, by, backend, cand=None):
    """`pecm.ops.pecm_topk` (cand None) / `pecm_rerank` of one chunk; a pq index scores the codes with the
    queries' lookup tables (`pecm.pq.pq_topk`, computed once per search and kept in the queries' cache)."""
    if index.dtype != "pq":
        if cand is None:
            return ops.pecm_topk(qs, cs, None, k, by=by, backend=backend)
        return ops.pecm_rerank(qs, cs, cand, None, k, by=by, backend=backend)
    from .. import pq

    table = qs._cache.get("pq_lut")
    if table is None:
        table = qs._cache["pq_lut"] = pq.lut(qs, index.codebook)
    return pq.pq_topk(qs, table, cs, k, by, cand=cand, backend=backend)


def _slice(qs: Queries, g0: int, g1: int) -> Queries:
    """Queries [g0, g1) keeping their pq lookup tables."""
    out = qs.slice(g0, g1)
    if "pq_lut" in qs._cache:
        out._cache["pq_lut"] = qs._cache["pq_lut"][g0:g1]
    return out


def _exhaustive(index, qs: Queries, k, by, chunk, backend, start, end, device=None, allow=None, sel=None):
    if device is not None:
        qs = qs.to(device)
    w = qs.weights  # the same tensor for the queries and every chunk: no weight comparison per call
    best = RunningTopK(qs.b, k)
    if sel is not None:  # a selective filter: score only the allowed rows, gathered chunk by chunk
        names = [n for n in _names(index) if n != "ids"]
        for s in range(0, sel.size, chunk):
            r = sel[s : s + chunk]
            cs = _chunk_candidates(index, w, _read(index, names, r), device)
            tv, ti = _topk(index, qs, cs, min(k, r.size), by, backend)
            ti = ti.cpu()
            best.add(tv.cpu().float(), torch.where(ti >= 0, torch.from_numpy(r)[ti.clamp(min=0)], ti))
        return best.result()
    reader = _ChunkReader(index, _names(index), chunk)
    try:
        for s, e, a in reader.stream(start, end):
            n = e - s
            cs = _chunk_candidates(index, w, a, device)  # e.g. a CUDA device: scored there (triton under "auto")
            dead = _dead(index, a["ids"], allow)
            kk = min(n, k + (0 if dead is None else int(dead.sum())))
            tv, ti = _topk(index, qs, cs, kk, by, backend)
            tv, ti = tv.cpu().float(), ti.cpu()
            if dead is not None:
                bad = torch.from_numpy(dead)[ti.clamp(min=0)] | (ti < 0)
                tv = tv.masked_fill(bad, float("-inf"))
                ti = ti.masked_fill(bad, -1)
            best.add(tv, torch.where(ti >= 0, ti + s, ti))
    finally:
        reader.close()
    return best.result()


def _pooled_topm(index, qp, m, chunk, start, end, allow=None, sel=None):
    best = RunningTopK(qp.shape[0], m)
    if sel is not None:  # a selective filter: the pooled vectors of the allowed rows only
        for s in range(0, sel.size, chunk):
            r = sel[s : s + chunk]
            best.add(qp @ torch.from_numpy(pooled_values(index.read_rows("pooled", r))).T, torch.from_numpy(r))
        return best.result()
    reader = _ChunkReader(index, ["pooled", "ids"], chunk)
    p32 = torch.empty((min(chunk, end - start), index.D))  # reused: no fresh pages per chunk
    try:
        for s, e, a in reader.stream(start, end):
            p = p32[: e - s]
            p.copy_(torch.from_numpy(a["pooled"]))
            if a["pooled"].dtype == np.int8:  # a pq index's int8 pooled rows: r / ||r||
                unit_int8_rows_(p)
            sim = qp @ p.T
            dead = _dead(index, a["ids"], allow)
            if dead is not None:
                sim[:, torch.from_numpy(dead)] = float("-inf")
            best.add(sim, offset=s)
    finally:
        reader.close()
    return best.result()


def _ann_topm(index, qp, m, chunk, start, end, allow, nprobe):
    """Top-m rows by pooled sim: the committed ANN over its rows (tombstones, the filter and the row range
    applied inside FAISS by a bitmap selector) merged with an exact scan of the rows added since."""
    from . import ann

    a = index.manifest.get("ann")
    fi = index.ann()
    if fi is None:
        raise ValueError("mode: 'ann' needs an ANN first stage; build one with build_ann() (pecm index build-ann)")
    arows = a["rows"]
    best = RunningTopK(qp.shape[0], m)
    lo, hi = start, min(end, arows)
    if hi > lo:
        selector = bits = None
        if lo > 0 or hi < arows or index.tombstones.size or allow is not None:
            ok = np.zeros(arows, dtype=bool)
            ok[lo:hi] = True
            dead = _dead(index, np.asarray(index.ids()[lo:hi]), allow)
            if dead is not None:
                ok[lo:hi] &= ~dead
            selector, bits = ann.bitmap_selector(ok)
        params = ann.search_params(a["kind"], a["params"], nprobe, selector)
        x = np.ascontiguousarray(qp.detach().cpu().numpy(), dtype=np.float32)
        dist, rows = fi.search(x, min(m, arows), params=params)
        del bits
        rows = torch.from_numpy(rows)
        best.add(torch.from_numpy(dist).float().masked_fill(rows < 0, float("-inf")), rows)
    if end > max(start, arows):  # rows appended since the build: exact pooled scan
        tv, ti = _pooled_topm(index, qp.cpu(), m, chunk, max(start, arows), end, allow)
        best.add(tv, ti)
    return best.result()


def _rerank_group(index, qs: Queries, cand, k, by, backend, device=None):
    valid = cand >= 0
    uniq = np.unique(cand[valid])
    if uniq.size == 0:
        return empty_topk(qs.b, k)
    local = np.where(valid, np.searchsorted(uniq, np.where(valid, cand, 0)), -1)
    if device is not None:
        qs = qs.to(device)
    rows = _read(index, [n for n in _names(index) if n != "ids"], uniq)
    cs = _chunk_candidates(index, qs.weights, rows, device)
    local = torch.from_numpy(local)
    if device is not None:
        local = local.to(device)
    tv, ti = _topk(index, qs, cs, k, by, backend, cand=local)
    ti = ti.cpu()
    rows = torch.where(ti >= 0, torch.from_numpy(uniq)[ti.clamp(min=0)], ti)
    return tv.cpu().float(), rows


def _two_stage(index, qs: Queries, k, by, m, backend, start, end, chunk, device, allow, sel, mode, nprobe):
    pchunk = max(chunk, POOLED_CHUNK)
    if mode == "ann" and sel is None:  # (a selective filter is scanned exactly instead)
        cand = _ann_topm(index, qs.qp, m, pchunk, start, end, allow, nprobe)[1].numpy()
    else:
        cand = _pooled_topm(index, qs.qp, m, pchunk, start, end, allow, sel)[1].numpy()
    # gather at most ~chunk candidate rows at a time: queries are reranked in groups
    group = max(1, chunk // max(1, cand.shape[1]))
    outs = [
        _rerank_group(index, _slice(qs, g, g + group), cand[g : g + group], k, by, backend, device)
        for g in range(0, qs.b, group)
    ]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def search(
    index,
    queries,
    k: int = 10,
    *,
    mode: str = "exhaustive",
    shortlist: Optional[int] = None,
    by: str = "score",
    q_mask=None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    device=None,
    rows: Optional[Tuple[int, int]] = None,
    with_metadata: bool = True,
    where: Optional[dict] = None,
    ids=None,
    nprobe: Optional[int] = None,
):
    """Top-k items of the index for each query.

    queries: [B, K, D] (or [K, D], treated as B = 1) float prototypes (need not be unit length);
    q_mask: bool [B, K]. ``mode="two_stage"`` shortlists ``shortlist`` items (default max(10k, 100))
    by pooled sim before reranking by ``by``. ``rows=(start, end)`` restricts the search to a row range
    (used by `pecm.distributed`). Returns ``(scores float32 [B, k], ids int64 [B, k], metadata)``
    as numpy arrays; metadata is a list per query of row dicts (None where the id is -1), or None when
    ``with_metadata=False``. ``device`` (e.g. "cuda:0") moves each chunk there before scoring (the data
    is read on the host). Missing results (k > live items) are (-inf, -1).

    ``where={"modality": "CT", "site": 2}`` (AND of equalities on metadata columns / extras keys) and
    ``ids=[...]`` (an allow-list) filter the items: the result is the exact top-k of the items that pass
    (in two_stage: of the shortlist of the items that pass). A selective filter (at most
    ``SPARSE_FILTER`` of the rows) gathers only the rows that pass; otherwise the streamed scan skips
    the others inside each chunk.

    ``mode="auto"`` uses the mode stored by `ArchiveIndex.tune` (exhaustive when none); ann / two_stage
    searches without ``shortlist`` / ``nprobe`` use the tuned values when there are any.

    ``mode="ann"``: the shortlist comes from the committed FAISS first stage (`build_ann`; rows added
    since are scanned exactly and merged), then the same re-rank as two_stage; ``nprobe`` overrides the
    ANN's stored nprobe (IVF) / efSearch (HNSW).
    """
    k = ops._check_k(k)  # an int in [1, ops.MAX_K], before anything is allocated
    tuned = index.manifest.get("search_defaults") or {}
    if mode == "auto":  # the mode chosen by `tune`, else exact
        mode = tuned.get("mode", "exhaustive")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES} or 'auto', got {mode!r}")
    if shortlist is None:
        shortlist = (tuned.get(mode) or {}).get("shortlist")
    if nprobe is None and mode == "ann":
        nprobe = (tuned.get("ann") or {}).get("nprobe")
    by = By.parse(by)
    chunk = DEFAULT_CHUNK if chunk_size is None else _check_int(chunk_size, "chunk_size")
    m = max(10 * k, 100) if shortlist is None else _check_int(shortlist, "shortlist")
    nprobe = None if nprobe is None else _check_int(nprobe, "nprobe")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda:0', got {device!r}") from e
    where, ids = filters.check_where(where), filters.check_ids(ids)
    q, qm = _queries(index, queries, q_mask)
    b = q.shape[0]
    start, end = (0, index.count) if rows is None else (max(0, int(rows[0])), min(index.count, int(rows[1])))
    ops._check_padding(k, b, max(0, end - start), "items in the searched rows")  # k = 10**9 on 1000 items
    allow = filters.allowed_ids(index, where, ids) if end > start else None
    sel = None
    if allow is not None:
        sel = _filter_rows(index, allow, start, end)
        if sel.size > SPARSE_FILTER * (end - start):
            sel = None  # most rows pass: the streamed scan with the filter inside each chunk
    if b == 0 or end <= start or (sel is not None and sel.size == 0):
        vals, r = empty_topk(b, k)
    else:
        qs = ops.prepare_queries(q, torch.from_numpy(index.weights), q_mask=qm)  # once for every chunk
        if mode == "exhaustive":
            vals, r = _exhaustive(index, qs, k, by, chunk, backend, start, end, device, allow, sel)
        else:
            vals, r = _two_stage(
                index, qs, k, by, max(m, k), backend, start, end, chunk, device, allow, sel, mode, nprobe
            )
    r = r.numpy()
    ids = np.full(r.shape, -1, dtype=np.int64)
    if (r >= 0).any():
        ids[r >= 0] = index.read_rows("ids", r[r >= 0])
    scores = vals.numpy().astype(np.float32)
    meta = [index.meta.rows(row.tolist()) for row in ids] if with_metadata else None
    return scores, ids, meta
