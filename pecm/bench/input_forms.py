"""Implementations that differ only in the *form of the candidates* a user hands to the ops.

The benchmark workload (`pecm.bench.workload`) holds unit prototypes; a user's one-shot call
usually passes raw, not unit-length prototypes. Every form here scores the same items:

- ``<be>:prepared``: `ops.prepare_candidates` once, outside the timed call; the call gets a
  `Candidates` (``w=None``): what an index hands the ops.
- ``<be>:raw``: raw prototypes (each prototype of the workload scaled by a random factor in
  [0.5, 2], stored in the storage dtype), no pooled vectors: the kernels normalise and pool Eq. 4 on
  the fly. The README's example.
- ``<be>:raw+pooled``: raw prototypes plus raw (not unit) pooled vectors.
- ``<be>:prepare-per-call``: `ops.prepare_candidates` inside every timed call, then the op: the cost
  of a separate normalisation pass (what every raw call paid before the fused on-the-fly path).
  Top-k only (a re-rank call would normalise all N rows for M of them).

The raw copies are made once per candidate set (cached with the workload's ``c`` itself). Re-rank
forms cycle through `RERANK_SETS` candidate id sets (`fresh_candidates`), so the gathered rows are
read from memory as in a two-stage search, not from the cache a repeated call would leave them in.
"""

from __future__ import annotations

import itertools
from typing import Callable, Dict, Tuple

import torch

from .. import ops
from .workload import Workload

_CACHE: Dict[str, object] = {}  # {"c": the workload's c, "raw": ..., "pooled": ..., "prepared": ...}


def raw_copy(wl: Workload) -> Tuple[torch.Tensor, torch.Tensor]:
    """(raw prototypes, raw pooled vectors) of the workload's candidates, made once per candidate set."""
    if _CACHE.get("c") is not wl.c:  # identity of the tensor itself (kept alive here), not an id()
        _CACHE.clear()
        n, k, d = wl.c.shape
        g = torch.Generator().manual_seed(7)
        raw = torch.empty_like(wl.c)
        for s in range(0, n, 8192):  # bounded float32 temporaries
            e = min(n, s + 8192)
            scale = torch.rand((e - s, k, 1), generator=g) * 1.5 + 0.5
            raw[s:e] = (wl.c[s:e].float() * scale.to(wl.c.device)).to(wl.c.dtype)
        pooled = (wl.cp.float() * (torch.rand((n, 1), generator=g) * 3 + 0.25).to(wl.c.device)).to(wl.c.dtype)
        _CACHE.update(c=wl.c, raw=raw, pooled=pooled)
    return _CACHE["raw"], _CACHE["pooled"]


def prepared(wl: Workload) -> ops.Candidates:
    raw, _ = raw_copy(wl)
    if "prepared" not in _CACHE:
        _CACHE["prepared"] = ops.prepare_candidates(raw, wl.w)
    return _CACHE["prepared"]


RERANK_SETS = 16  # candidate id sets a re-rank form cycles through (16 x 13.8 MB at B=1, M=1000: > any L3)


def fresh_candidates(wl: Workload):
    """The workload's candidate ids first (what the correctness check compares), then other random
    sets of the same shape: every timed re-rank call gathers rows the previous calls did not, as a
    two-stage search does (the same ids every call would re-read cache-resident rows)."""
    g = torch.Generator().manual_seed(11)
    n = wl.c.shape[0]
    extra = [torch.randint(0, n, tuple(wl.cand.shape), generator=g).to(wl.cand.device) for _ in range(RERANK_SETS - 1)]
    return [wl.cand] + extra


def make_form(backend: str, form: str) -> Callable:
    """A maker (op, workload) -> timed callable for one candidate form on one backend."""

    def maker(op: str, wl: Workload):
        raw, pooled = raw_copy(wl)
        if form == "prepared":
            cs = prepared(wl)
            c, w, kw = cs, None, {}
        elif form == "raw":
            c, w, kw = raw, wl.w, {}
        elif form == "raw+pooled":
            c, w, kw = raw, wl.w, {"c_pooled": pooled}
        elif form == "prepare-per-call":
            if op != "topk":
                raise ValueError("prepare-per-call: top-k only")
            return lambda: ops.pecm_topk(wl.q, ops.prepare_candidates(raw, wl.w), None, wl.topk, backend=backend)
        else:
            raise ValueError(f"form: unknown {form!r}")
        if op == "topk":
            return lambda: ops.pecm_topk(wl.q, c, w, wl.topk, backend=backend, **kw)
        if op == "rerank":
            sets = fresh_candidates(wl)
            it = itertools.cycle(sets)
            return lambda: ops.pecm_rerank(wl.q, c, next(it), w, wl.topk, backend=backend, **kw)
        return lambda: ops.pecm_scores(wl.q, c, w, backend=backend, **kw)[2]

    return maker


FORMS = ("prepared", "raw", "raw+pooled", "prepare-per-call")


def extra_peers(backend: str, op: str) -> Dict[str, Tuple[Callable, str]]:
    """{name: (maker, by)} for `pecm.bench.runner.run_benchmark(extra_peers=...)`."""
    forms = FORMS if op == "topk" else FORMS[:3]
    return {f"{backend}:{f}": (make_form(backend, f), "score") for f in forms}
