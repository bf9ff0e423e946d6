"""Micro-batching of ``POST /search``: concurrent queries share one encoder forward and one index search.

The collector task takes the first waiting query, then keeps taking queries until ``max_batch`` are in hand
or ``max_wait_ms`` passed since the first, and hands the batch to one worker thread (batches run one at a
time, so queries arriving meanwhile wait in the queue and form the next batch). In the worker:

1. encode: every text query of the batch in one `Encoder.encode_texts` call, every image query in one
   `encode_images` call (if such a call fails, each of its queries is encoded alone, so one bad input fails
   only its own request); ``prototypes`` queries are used as given; ``id`` queries take the stored item's
   prototypes and mask (more like this);
2. group the queries by `Query.group` (index, mode, by, k, where, masked) and run one `pecm.query.search_hits`
   per group on the stacked queries;
3. split the rows back to their requests.

Equivalence: every query gets the ids, in the same order, that it gets alone, and its scores to float32
rounding: the encoder's batched forward differs from a one-query forward by about 1e-7 (other GEMM shapes),
and on the cpp backend a group of 12 or more queries takes the packed GEMM path (``kGemmMinQ``), which rounds
differently from the per-query dot-product path by up to ~1 ulp; smaller groups of ``prototypes`` / ``id``
queries are bit-identical (tests/test_serve_batching.py). Ties between items may order differently.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import List

import numpy as np

from ..query import hits_json, search_hits
from .errors import APIError, bad, from_exception
from .parse import Query

log = logging.getLogger("pecm.serve")


class Batcher:
    def __init__(self, state, max_batch: int = 32, max_wait_ms: float = 5.0, on_batch=None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch: expected an int >= 1, got {max_batch!r}")
        if not isinstance(max_wait_ms, (int, float)) or not 0 <= max_wait_ms <= 10_000:
            raise ValueError(f"max_wait_ms: expected a number in [0, 10000], got {max_wait_ms!r}")
        self.state, self.max_batch, self.max_wait = state, max_batch, max_wait_ms / 1000.0
        self.on_batch = on_batch  # called with the size of each batch (metrics)
        self._queue: asyncio.Queue = None
        self._task = None
        self._pool = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pecm-search")
        self._task = asyncio.create_task(self._collect())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    async def submit(self, query: Query) -> dict:
        """The query's ``{"results", "index"}``; raises its `APIError`."""
        if self._task is None or self._task.done():
            raise APIError(503, None, "the search worker is not running")
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((query, fut))
        return await fut

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            live = [(q, f) for q, f in batch if not f.done()]  # a cancelled request (client gone) is dropped
            if not live:
                continue
            if self.on_batch is not None:
                self.on_batch(len(live))
            try:
                results = await loop.run_in_executor(self._pool, self.run, [q for q, _ in live])
            except BaseException as e:  # run() returns per-query errors; this is a bug or a shutdown
                results = [e] * len(live)
                if isinstance(e, asyncio.CancelledError):
                    for _, f in live:
                        if not f.done():
                            f.set_exception(APIError(503, None, "the server is shutting down"))
                    raise
            for (_, f), r in zip(live, results):
                if f.done():
                    continue
                if isinstance(r, BaseException):
                    f.set_exception(r)
                else:
                    f.set_result(r)

    # ------------------------------------------------------------------ worker thread
    def run(self, queries: List[Query]) -> list:
        """Results (or the exception) of each query, in order."""
        out: list = [None] * len(queries)
        vecs: dict = {}
        for kind in ("text", "image"):
            pos = [i for i, q in enumerate(queries) if q.kind == kind]
            if pos:
                self._encode(queries, pos, kind, vecs, out)
        for i, q in enumerate(queries):
            if q.kind == "prototypes":
                vecs[i] = (q.payload, q.mask)
            elif q.kind == "id":
                try:
                    row = self.state.index_for(q.index).reader.get([q.payload], vectors=True)[0]
                    vecs[i] = (row["prototypes"], row["mask"])
                except KeyError:
                    out[i] = bad("id", f"unknown or deleted item {q.payload} in index {q.index!r}", 404)
                except Exception as e:
                    out[i] = self._error(e, "id")
        groups = defaultdict(list)
        for i in vecs:
            groups[queries[i].group()].append(i)
        for members in groups.values():
            self._search(queries, members, vecs, out)
        return out

    def _encode(self, queries, pos, kind, vecs, out) -> None:
        try:
            p, m = self.state.encode(kind, [queries[i].payload for i in pos], kind)
        except Exception as e:
            if len(pos) == 1:
                out[pos[0]] = self._error(e, kind)
            else:  # find the failing input(s): each query alone
                for i in pos:
                    self._encode(queries, [i], kind, vecs, out)
            return
        for j, i in enumerate(pos):
            vecs[i] = (p[j], m[j])

    def _search(self, queries, members, vecs, out) -> None:
        q0 = queries[members[0]]
        served = self.state.index_for(q0.index)
        qs = np.stack([vecs[i][0] for i in members]).astype(np.float32, copy=False)
        masked = vecs[members[0]][1] is not None
        qm = np.stack([vecs[i][1] for i in members]).astype(bool) if masked else None
        try:
            kw = {"mode": q0.mode, "by": q0.by}
            if q0.where:
                kw["where"] = q0.where
            scores, ids, meta, sim, conf = search_hits(served.reader, qs, q0.k, q_mask=qm, **kw)
            rows = hits_json(scores, ids, meta, sim, conf)
        except Exception as e:
            err = self._error(e, None)
            for i in members:
                out[i] = err
            return
        for j, i in enumerate(members):
            out[i] = {"results": rows[j], "index": served.name}

    @staticmethod
    def _error(e: Exception, field):
        if isinstance(e, APIError):
            return e
        if isinstance(e, (ValueError, TypeError, KeyError)):
            return from_exception(e, field)
        log.exception("pecm serve: search failed")
        return e
