"""`pecm serve --distributed`: rank 0 serves HTTP, every rank searches its shard of each index (docs/serve.md,
"Sharded serving").

Every rank runs ``pecm serve INDEX ... --distributed`` with the same arguments (torchrun sets RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). Rank 0 opens the checkpoint and the indexes as a single-process server does (it is
the indexes' only writer) and runs uvicorn with a `ShardedSearch` as the micro-batcher's searcher; ranks > 0
open the indexes read-only, load no model, and run `follow` until rank 0 tells them to stop.

Messages, rank 0 to every rank with ``broadcast_object_list`` over the serving group (created with the
``--dist-timeout-s`` timeout), sent from rank 0's one search thread:

- ``("search", {index: commit key}, [(index, queries, q_mask, k, kw), ...])``, one per micro-batch (the
  queries already encoded on rank 0). Every rank opens the commit named by rank 0's key (a reader behind it
  refreshes), the ranks exchange the keys they hold (`pecm.distributed.agree_commits`), and an index some
  rank does not hold at that commit is searched by no rank (its tasks get a 503). Then, task by task,
  `pecm.distributed.shard_topk`: every rank searches its row shard of the commit with the fused ops and the
  top-k lists are merged exactly; rank 0 scores the hits (sim, conf) and reads their metadata from its
  snapshot of the same commit (`pecm.query.score_hits`), so a hit is scored like a single-process search's.
- ``("ping",)`` after ``heartbeat_s`` without a query, so that an idle rank's wait never reaches the timeout.
- ``("stop", reason)``: ranks > 0 leave `follow` (and exit 0).

A commit key is a digest of the index manifest (`pecm.distributed.commit_key`): equal keys mean the same
committed rows, tombstones, ANN and tuned defaults. Rank 0 holds the write lock of every index a batch
searches from taking its snapshot until all ranks reported the commit they opened, so no append or delete
commits in between: the shards merged into one result all come from one commit.

A failed collective (a rank died: gloo reports the closed connection at once; or it did not answer within the
timeout) is a `pecm.distributed.CollectiveError`: rank 0 answers that batch's queries with 503, marks the
searcher failed (`/health` answers 503), calls ``on_fatal`` (the command stops uvicorn) and exits 1; a rank
> 0 exits 1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import Dict, Optional

import torch
import torch.distributed as dist

from ..distributed import CollectiveError, ShardError, agree_commits, collective, commit_key, shard_topk
from ..query import score_hits
from .errors import APIError

log = logging.getLogger("pecm.serve")

SEARCH, PING, STOP = "search", "ping", "stop"
REFRESH_WAITS_S = (0.0, 0.05, 0.2, 0.5)  # a rank behind rank 0's commit re-reads the manifest after these waits


class _Keys:
    """`commit_key` of each index's current snapshot, computed once per manifest the handle loaded."""

    def __init__(self):
        self._seen: Dict[str, tuple] = {}

    def __call__(self, name: str, view) -> str:
        m = view.manifest
        hit = self._seen.get(name)
        if hit is None or hit[0] is not m:
            hit = self._seen[name] = (m, commit_key(view))
        return hit[1]


def _open_commit(reader, name: str, want: str, keys: _Keys):
    """(snapshot, key) of ``reader`` at the commit ``want`` when it can be reached (re-reading the manifest a
    few times: a shared file system may show a replaced manifest late), else at whatever commit it holds."""
    view = reader._current()
    for wait in REFRESH_WAITS_S:
        if keys(name, view) == want:
            break
        time.sleep(wait)
        reader.refresh()
        view = reader._current()
    return view, keys(name, view)


def _set_device(group) -> None:
    """NCCL collectives use the current CUDA device, which is per thread: this rank's (LOCAL_RANK) here."""
    if dist.get_backend(group) == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


class ShardedSearch:
    """Rank 0's searcher for `pecm.serve.batcher.Batcher`: every task of a batch searched by all ranks.

    ``state``: rank 0's `pecm.serve.state.State`; ``group``: the serving process group; ``timeout_s``: its
    timeout (the idle heartbeat is a quarter of it, at most 30 s); ``on_fatal``: called (on the search
    thread) once when a collective fails.
    """

    def __init__(self, state, group, timeout_s: float, on_fatal=None):
        self.state, self.group, self.on_fatal = state, group, on_fatal
        self.world = dist.get_world_size(group)
        self.heartbeat_s = min(30.0, timeout_s / 4.0)
        self.failed: Optional[str] = None
        self.closed = False
        self._keys = _Keys()

    def _down(self) -> APIError:
        return APIError(503, None, f"search: the distributed search group failed ({self.failed})")

    def _fail(self, e: CollectiveError) -> None:
        if self.failed is None:
            self.failed = str(e)
            log.error("pecm serve: %s; stopping", e)
            if self.on_fatal is not None:
                self.on_fatal()

    def _send(self, msg) -> None:
        _set_device(self.group)
        collective(dist.broadcast_object_list, [msg], src=0, group=self.group)

    def search(self, tasks) -> list:
        """Per task ``(scores, ids, metadata, sim, conf)`` or its exception (`LocalSearch.search`)."""
        if self.failed is not None or self.closed:
            return [self._down()] * len(tasks)
        names = sorted({t.served.name for t in tasks})
        try:
            with contextlib.ExitStack() as stack:  # no commit between rank 0's snapshot and the others'
                for n in names:
                    stack.enter_context(self.state.indexes[n].write_lock)
                try:
                    views = {n: self.state.indexes[n].reader._current() for n in names}
                    want = {n: self._keys(n, views[n]) for n in names}
                except Exception as e:  # nothing sent yet: the other ranks still wait for a message
                    return [e] * len(tasks)
                self._send((SEARCH, want, [(t.served.name, t.queries, t.q_mask, t.k, t.kw) for t in tasks]))
                bad = agree_commits(want, want, self.group)
            out = []
            for t in tasks:
                name = t.served.name
                if name in bad:
                    out.append(APIError(503, None, f"search: {bad[name]}"))
                    continue
                try:
                    scores, ids = shard_topk(views[name], t.queries, t.k, group=self.group, q_mask=t.q_mask, **t.kw)
                    out.append(score_hits(views[name], t.queries, t.q_mask, scores, ids))
                except (CollectiveError, APIError):
                    raise
                except ShardError as e:
                    out.append(APIError(503, None, f"search: {e}"))
                except Exception as e:  # this rank's own search error (every rank raised after the exchange)
                    out.append(e)
            return out
        except CollectiveError as e:
            self._fail(e)
            return [self._down()] * len(tasks)

    def ping(self) -> None:
        if self.failed is None and not self.closed:
            try:
                self._send((PING,))
            except CollectiveError as e:
                self._fail(e)

    def close(self, reason: str = "rank 0 stopped") -> None:
        """Tell ranks > 0 to stop (once; not after a failure)."""
        if self.closed:
            return
        self.closed = True
        if self.failed is None:
            try:
                self._send((STOP, reason))
            except CollectiveError as e:
                self._fail(e)


def follow(readers: dict, group, rank: int) -> None:
    """A rank > 0: answer rank 0's messages until ``stop``. ``readers``: ``{index name: ArchiveIndex}`` opened
    read-only. SIGTERM / SIGINT only log: the rank keeps searching until rank 0 (which drains its requests
    first) sends stop, or its group fails. Raises `CollectiveError` when a collective fails."""

    def hold(signum, frame):
        log.warning("pecm serve: rank %d got signal %d; it stops when rank 0 stops the group", rank, signum)

    old = {s: signal.signal(s, hold) for s in (signal.SIGTERM, signal.SIGINT)}
    keys = _Keys()
    try:
        while True:
            box = [None]
            collective(dist.broadcast_object_list, box, src=0, group=group)
            msg = box[0]
            if msg[0] == STOP:
                log.info("pecm serve: rank %d: %s", rank, msg[1])
                return
            if msg[0] != SEARCH:
                continue
            _, want, tasks = msg
            views, held = {}, {}
            for name, key in want.items():
                try:
                    views[name], held[name] = _open_commit(readers[name], name, key, keys)
                except Exception as e:  # e.g. the manifest cannot be read: rank 0 gets a 503 for this index
                    log.error("pecm serve: rank %d: index %r: %s", rank, name, e)
                    held[name] = None
            bad = agree_commits(held, want, group)
            for name, q, qm, k, kw in tasks:
                if name in bad:
                    continue
                try:
                    shard_topk(views[name], q, k, group=group, q_mask=qm, **kw)
                except CollectiveError:
                    raise
                except Exception:  # every rank raised it after the exchange; rank 0 answers the request
                    pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
