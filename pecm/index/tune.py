"""`ArchiveIndex.tune` / `pecm index tune`: measure recall@k and latency of the approximate modes against
exhaustive search, and store the cheapest setting that reaches a target recall as the index's defaults.

Queries: the prototypes of ``queries`` stored items sampled at random (or the caller's query array).
Reference: exhaustive top-k by R (exact). Grid: ``two_stage`` over shortlist M, and ``ann`` (when an
ANN is built) over M × nprobe (IVF lists, or HNSW efSearch). Each setting is timed as one batch of
all queries (q/s) and as single queries (B = 1, median of up to 8). The chosen setting is the one
with the lowest B = 1 latency among those with recall@k >= target (ann preferred on a tie), written
to ``manifest["search_defaults"]`` = ``{"mode": m, m: {"shortlist": M, "nprobe": p}}`` in one
manifest commit; ``search(mode="auto")`` then uses that mode, and any ann / two_stage search without
an explicit shortlist / nprobe uses the stored values.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

import numpy as np

SHORTLIST_FACTORS = (2, 5, 10, 20, 50, 100)
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _recall(got: np.ndarray, want: np.ndarray) -> float:
    out = []
    for g, w in zip(got, want):
        w = set(w[w >= 0].tolist())
        if w:
            out.append(len(set(g[g >= 0].tolist()) & w) / len(w))
    return float(np.mean(out)) if out else 1.0


def _measure(index, q, q_mask, k: int, skw: dict):
    """(ids of the batch search, queries/s of the batch, median ms of single queries: up to 8)."""
    t0 = time.perf_counter()
    _, got, _ = index.search(q, k, q_mask=q_mask, **skw)
    qps = len(q) / (time.perf_counter() - t0)
    one = []
    for i in range(min(8, len(q))):
        t0 = time.perf_counter()
        index.search(q[i], k, q_mask=None if q_mask is None else q_mask[i], **skw)
        one.append(time.perf_counter() - t0)
    return got, qps, float(np.median(one)) * 1e3


def sample_queries(index, n: int, seed: int = 0):
    """Prototypes and masks of ``n`` random live items (the stored, unit prototypes)."""
    ids = np.asarray(index.ids())
    live = ids[~np.isin(ids, index.tombstones)]
    if live.size == 0:
        raise ValueError("index: tune needs at least one live item")
    pick = np.sort(np.random.default_rng(seed).choice(live, size=min(n, live.size), replace=False))
    rows = index.get(pick, vectors=True)
    return np.stack([r["prototypes"] for r in rows]), np.stack([r["mask"] for r in rows])


def grid(index, k: int) -> list:
    live = len(index)
    out = []
    ms = sorted({min(live, max(k, f * k)) for f in SHORTLIST_FACTORS})
    for m in ms:
        out.append(("two_stage", m, None))
    a = index.manifest.get("ann")
    if a:
        if a["kind"] == "flat":
            probes = [None]
        elif a["kind"] == "hnsw":
            probes = [p for p in NPROBES if p >= 8] + [512]
        else:
            probes = [p for p in NPROBES if p <= a["params"]["nlist"]]
        out += [("ann", m, p) for m in ms for p in probes]
    return out


def tune(
    index,
    target: float = 0.95,
    k: int = 10,
    queries=None,
    q_mask=None,
    n_queries: int = 64,
    seed: int = 0,
    backend: str = "auto",
    progress: Optional[bool] = None,
) -> dict:
    if not 0 < target <= 1:
        raise ValueError(f"target: expected a recall in (0, 1], got {target!r}")
    if queries is None:
        queries, q_mask = sample_queries(index, n_queries, seed)
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 2:
        q = q[None]
    kw = dict(with_metadata=False, backend=backend)
    _, exact, _ = index.search(q, k, q_mask=q_mask, **kw)
    settings = [("exhaustive", None, None)] + grid(index, k)
    rows = []
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else bool(progress)
    for mode, m, p in tqdm(settings, desc="pecm index tune", disable=not show):
        got, qps, ms = _measure(index, q, q_mask, k, dict(kw, mode=mode, shortlist=m, nprobe=p))
        rows.append({"mode": mode, "shortlist": m, "nprobe": p, "recall": _recall(got, exact), "qps": qps, "ms_b1": ms})
    ok = [r for r in rows[1:] if r["recall"] >= target]
    chosen = min(ok, key=lambda r: (r["ms_b1"], r["mode"] != "ann")) if ok else rows[0]
    return {"k": k, "target": target, "queries": int(len(q)), "table": rows, "chosen": chosen}


def defaults_entry(chosen: dict) -> dict:
    mode = chosen["mode"]
    if mode == "exhaustive":
        return {"mode": "exhaustive"}
    entry = {"shortlist": int(chosen["shortlist"])}
    if chosen.get("nprobe") is not None:
        entry["nprobe"] = int(chosen["nprobe"])
    return {"mode": mode, mode: entry}


def format_table(res: dict) -> str:
    lines = [
        f"recall@{res['k']} against exhaustive R, {res['queries']} queries (target {res['target']})",
        f"{'mode':10s} {'shortlist':>9s} {'nprobe':>6s} {'recall':>7s} {'q/s':>9s} {'ms (B=1)':>9s}",
    ]
    for r in res["table"]:
        mark = "  <- chosen" if r is res["chosen"] else ""
        lines.append(
            f"{r['mode']:10s} {str(r['shortlist'] or '-'):>9s} {str(r['nprobe'] or '-'):>6s} "
            f"{r['recall']:7.3f} {r['qps']:9.1f} {r['ms_b1']:9.2f}{mark}"
        )
    return "\n".join(lines)
