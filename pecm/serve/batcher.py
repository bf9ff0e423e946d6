"""Micro-batching of ``POST /search``: concurrent queries share one encoder forward and one index search.

The collector task takes the first waiting query, then keeps taking queries until ``max_batch`` are in hand
or ``max_wait_ms`` passed since the first, and hands the batch to one worker thread (batches run one at a
time, so queries arriving meanwhile wait in the queue and form the next batch). In the worker:

1. encode: every text query of the batch in one `Encoder.encode_texts` call, every image query in one
   `encode_images` call (if such a call fails, each of its queries is encoded alone, so one bad input fails
   only its own request); ``prototypes`` queries are used as given; ``id`` queries take the stored item's
   prototypes and mask (more like this);
2. group the queries by `Query.group` (index, mode, by, k, where, masked) into one `SearchTask` per group
   (the stacked queries) and hand the batch's tasks to the searcher: `LocalSearch` runs one
   `pecm.query.search_hits` per task; `pecm.serve.sharded.ShardedSearch` (``pecm serve --distributed``) has
   every rank search its shard of each task;
3. split the rows back to their requests.

A searcher with a ``heartbeat_s`` gets ``ping()`` called on the worker thread whenever no query arrived for
that long, and ``close()`` once when the batcher stops, after the last batch.

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
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from ..query import hits_json, search_hits
from .errors import APIError, bad, from_exception
from .parse import Query

log = logging.getLogger("pecm.serve")


@dataclass
class SearchTask:
    """One index search of a batch: the stacked queries of one `Query.group`."""

    served: object  # pecm.serve.state.ServedIndex
    queries: np.ndarray  # float32 [B, K, D]
    q_mask: Optional[np.ndarray]  # bool [B, K] or None
    k: int
    kw: dict  # mode, by and (when given) where


class LocalSearch:
    """Each task searched in this process on its index's reader handle (`pecm.query.search_hits`)."""

    heartbeat_s = None

    def search(self, tasks: List[SearchTask]) -> list:
        """Per task ``(scores, ids, metadata, sim, conf)`` or the exception its search raised."""
        out = []
        for t in tasks:
            try:
                out.append(search_hits(t.served.reader, t.queries, t.k, q_mask=t.q_mask, **t.kw))
            except Exception as e:
                out.append(e)
        return out

    def ping(self) -> None:
        pass

    def close(self) -> None:
        pass


class Batcher:
    def __init__(self, state, max_batch: int = 32, max_wait_ms: float = 5.0, on_batch=None, searcher=None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch: expected an int >= 1, got {max_batch!r}")
        if not isinstance(max_wait_ms, (int, float)) or not 0 <= max_wait_ms <= 10_000:
            raise ValueError(f"max_wait_ms: expected a number in [0, 10000], got {max_wait_ms!r}")
        self.state, self.max_batch, self.max_wait = state, max_batch, max_wait_ms / 1000.0
        self.on_batch = on_batch  # called with the size of each batch (metrics)
        self.searcher = LocalSearch() if searcher is None else searcher
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
            try:  # on the worker thread, after a batch still running there
                await asyncio.get_running_loop().run_in_executor(self._pool, self.searcher.close)
            except Exception:
                log.exception("pecm serve: closing the searcher failed")
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
        beat = self.searcher.heartbeat_s
        while True:
            if beat is None:
                batch = [await self._queue.get()]
            else:
                try:
                    batch = [await asyncio.wait_for(self._queue.get(), beat)]
                except asyncio.TimeoutError:  # idle: keep the searcher's peers waiting within their timeout
                    try:
                        await loop.run_in_executor(self._pool, self.searcher.ping)
                    except Exception:
                        log.exception("pecm serve: searcher heartbeat failed")
                    continue
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
        members = list(groups.values())
        tasks = [self._task_of(queries, m, vecs) for m in members]
        if tasks:
            for m, t, res in zip(members, tasks, self.searcher.search(tasks)):
                self._split(m, t, res, out)
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

    def _task_of(self, queries, members, vecs) -> SearchTask:
        q0 = queries[members[0]]
        qs = np.stack([vecs[i][0] for i in members]).astype(np.float32, copy=False)
        masked = vecs[members[0]][1] is not None
        qm = np.stack([vecs[i][1] for i in members]).astype(bool) if masked else None
        kw = {"mode": q0.mode, "by": q0.by}
        if q0.where:
            kw["where"] = q0.where
        return SearchTask(self.state.index_for(q0.index), qs, qm, q0.k, kw)

    def _split(self, members, task: SearchTask, res, out) -> None:
        """The rows of a task's result (or its error) to the task's queries."""
        if not isinstance(res, BaseException):
            try:
                rows = hits_json(*res)
            except Exception as e:
                res = e
        if isinstance(res, BaseException):
            err = self._error(res, None)
            for i in members:
                out[i] = err
            return
        for j, i in enumerate(members):
            out[i] = {"results": rows[j], "index": task.served.name}

    @staticmethod
    def _error(e: Exception, field):
        if isinstance(e, APIError):
            return e
        if isinstance(e, (ValueError, TypeError, KeyError)):
            return from_exception(e, field)
        log.error("pecm serve: search failed", exc_info=e)
        return e
