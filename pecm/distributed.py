"""`pecm.distributed`: search an `ArchiveIndex` sharded across the ranks of `torch.distributed`.

Rank r of W searches the contiguous row shard ``[r*N//W, (r+1)*N//W)`` of the committed rows with the
same fused ops as `ArchiveIndex.search`; the per-rank top-k lists (global ids) are gathered with
``all_gather_object`` and merged exactly, so the exhaustive result equals a single-process search
(up to the order of exact ties). In ``two_stage`` mode the shortlist M applies per shard, so the
merged result is at least as good as a single-process two-stage search with the same M.

Every rank needs the index directory: shared storage (NFS, Lustre, ...) mounted at the same path,
or a copy per node (each rank reads only its shard's byte ranges, so a node may also hold only the
shards of its ranks as long as the manifest and file sizes match). Start with ``torchrun``::

    torchrun --nproc-per-node 2 -m pecm search INDEX --query-file q.npy -k 10 --distributed --json
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr HOST --master-port 29500 \\
        -m pecm search INDEX --query-file q.npy -k 10 --distributed --json

Backend: gloo on CPU, NCCL when CUDA is available (`init_from_env`). Results are gathered as Python
objects (small: B x k per rank), so NCCL and gloo behave the same.

`shard_topk` is the collective step both `sharded_search` (``pecm search --distributed``) and
``pecm serve --distributed`` (`pecm.serve.sharded`) use: search this rank's shard of one snapshot, exchange,
merge. A search error on one rank is raised on every rank (`ShardError` on the others), and a failed exchange
(a rank died or timed out) is a `CollectiveError`, so no rank waits for a partner that will not come.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist


def shard_range(n: int, rank: int, world: int) -> Tuple[int, int]:
    """Rows ``[rank*n//world, (rank+1)*n//world)`` of an index of n rows."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank: expected 0 <= rank < world={world}, got {rank}")
    return rank * n // world, (rank + 1) * n // world


def init_from_env(backend: Optional[str] = None, timeout_s: Optional[float] = None) -> Tuple[int, int]:
    """Initialise the default process group from the torchrun environment; returns (rank, world).

    ``timeout_s``: the group's collective timeout (torch's default, 30 minutes for gloo, when None)."""
    if not dist.is_available():
        raise ValueError("distributed: torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError("distributed: RANK/WORLD_SIZE are not set; start the command with torchrun")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group(backend=backend, **kw)
        _OWNED.add(id(dist.group.WORLD))
    return dist.get_rank(), dist.get_world_size()


_OWNED: set = set()  # default groups that init_from_env created (and so shutdown() may destroy)


def shutdown(sync: bool = True) -> None:
    """Synchronise the ranks (``sync``) and destroy the default process group if `init_from_env` created it.

    Exiting with a live gloo group can abort the process ("terminate called without an active exception")
    when its worker threads are torn down during interpreter exit, so commands call this in ``finally``.
    A group the caller created itself is left alone. ``sync=False`` skips the barrier: after a
    `CollectiveError` (a rank died or timed out) a barrier would fail or wait for the group's timeout.
    """
    if not (dist.is_available() and dist.is_initialized()) or id(dist.group.WORLD) not in _OWNED:
        return
    _OWNED.discard(id(dist.group.WORLD))
    try:
        if sync:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def merge_results(parts, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Exact merge of per-shard (scores [B, k_i], ids [B, k_i]) into the best k, descending.

    Ties are broken by the smaller id, so the result does not depend on the number of shards.
    """
    scores = np.concatenate([np.asarray(p[0], dtype=np.float32) for p in parts], axis=1)
    ids = np.concatenate([np.asarray(p[1], dtype=np.int64) for p in parts], axis=1)
    b = scores.shape[0]
    out_s = np.full((b, k), -np.inf, dtype=np.float32)
    out_i = np.full((b, k), -1, dtype=np.int64)
    for i in range(b):
        valid = ids[i] >= 0
        s, d = scores[i][valid], ids[i][valid]
        order = np.lexsort((d, -s.astype(np.float64)))[:k]
        out_s[i, : order.size] = s[order]
        out_i[i, : order.size] = d[order]
    return out_s, out_i


class ShardError(RuntimeError):
    """A collective search failed on another rank (the message names the rank and its error)."""


class CollectiveError(RuntimeError):
    """A collective call itself failed: a rank died, did not answer within the group's timeout, or the group
    is already broken. The process group cannot be used any more."""


def collective(fn, *args, **kw):
    """``fn(*args, **kw)`` (a `torch.distributed` collective); its failure raised as `CollectiveError`."""
    try:
        return fn(*args, **kw)
    except Exception as e:  # gloo: RuntimeError "Connection closed by peer" / "Timed out waiting ..."
        raise CollectiveError(f"distributed: {fn.__name__} failed: {str(e).splitlines()[0][:300]}") from e


def shard_topk(view, queries, k: int, *, n: Optional[int] = None, group=None, **search_kw):
    """This rank's top-k of its shard of the first ``n`` rows (default: all) of ``view`` (one snapshot of an
    index: `ArchiveIndex._current()`), merged with every rank's by `merge_results`: ``(scores [B, k],
    ids [B, k])`` on every rank. A collective call: every rank passes the same queries, k, n and arguments
    (those of `pecm.index.search.search`).

    A search that raises on some rank raises on every rank after the exchange, so no rank is left waiting:
    its own exception where it failed, `ShardError` naming the first failed rank elsewhere. A failed
    exchange is a `CollectiveError`.
    """
    from .index.search import search

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    start, end = shard_range(int(view.count) if n is None else int(n), rank, world)
    if "device" not in search_kw and dist.get_backend(group) == "nccl":
        search_kw["device"] = torch.device("cuda", torch.cuda.current_device())  # NCCL: score on this rank's GPU
    err = None
    try:
        scores, ids, _ = search(view, queries, k, rows=(start, end), with_metadata=False, **search_kw)
        part = {"ok": (scores, ids)}
    except Exception as e:
        err, part = e, {"error": f"{type(e).__name__}: {e}"}
    parts = [None] * world
    collective(dist.all_gather_object, parts, part, group=group)
    if err is not None:
        raise err
    for r, p in enumerate(parts):
        if "error" in p:
            raise ShardError(f"rank {r}: {p['error']}")
    return merge_results([p["ok"] for p in parts], k)


def sharded_search(index, queries, k: int = 10, *, group=None, with_metadata: bool = True, **search_kw):
    """Search this rank's shard of ``index`` and merge all ranks' results (a collective call).

    Every rank must call it with the same queries and arguments. Returns
    ``(scores [B, k], ids [B, k], metadata)`` on every rank (metadata looked up locally; None when
    ``with_metadata=False``). ``search_kw`` are the arguments of `ArchiveIndex.search`
    (mode, shortlist, by, q_mask, chunk_size, backend). Ranks that opened different commits search the
    rows they have in common (the smallest count); `shard_topk` describes the errors.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed: no process group; call init_from_env() (or start with torchrun) first")
    view = index._current()
    counts = [None] * dist.get_world_size(group)
    collective(dist.all_gather_object, counts, int(view.count), group=group)
    scores, ids = shard_topk(view, queries, k, n=min(counts), group=group, **search_kw)
    meta = [view.meta.rows(row.tolist()) for row in ids] if with_metadata else None
    return scores, ids, meta


def commit_key(view) -> str:
    """A digest of the manifest of ``view`` (an index handle or snapshot): equal on two ranks exactly when they
    hold the same commit."""
    raw = json.dumps(view.manifest, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:32]


def agree_commits(held: dict, want: dict, group) -> Dict[str, str]:
    """Exchange every rank's ``{index: key}`` (a collective); ``{index: reason}`` of the indexes that some rank
    does not hold at rank 0's commit ``want``. Every rank gets the same answer."""
    every: List[Optional[dict]] = [None] * dist.get_world_size(group)
    collective(dist.all_gather_object, every, held, group=group)
    bad: Dict[str, str] = {}
    for r, h in enumerate(every):
        for name, key in want.items():
            if name not in bad and h.get(name) != key:
                bad[name] = (
                    f"index {name!r}: rank {r} does not see rank 0's commit of it (is the index directory "
                    "the same one, on shared storage, on every node?)"
                )
    return bad


def check_start(error: Optional[BaseException], held: dict, group=None) -> None:
    """The start-up exchange (a collective on every rank): each rank's start-up error (None when it opened
    everything) and ``{index: commit key}``. Raises on every rank when some rank failed (its own error there,
    `ShardError` elsewhere) or holds other indexes or commits than rank 0."""
    world = dist.get_world_size(group)
    every: List[Optional[dict]] = [None] * world
    mine = {"error": None if error is None else f"{type(error).__name__}: {error}", "keys": held}
    collective(dist.all_gather_object, every, mine, group=group)
    if error is not None:
        raise error
    for r, got in enumerate(every):
        if got["error"] is not None:
            raise ShardError(f"rank {r} failed to start: {got['error']}")
    want = every[0]["keys"]
    for r, got in enumerate(every[1:], 1):
        if sorted(got["keys"]) != sorted(want):
            raise ShardError(f"rank {r} serves indexes {sorted(got['keys'])}, rank 0 {sorted(want)}")
        for name, key in want.items():
            if got["keys"][name] != key:
                raise ShardError(
                    f"index {name!r}: rank {r} opened a different commit than rank 0 (is INDEX the same "
                    "directory, on shared storage or an identical copy, on every node?)"
                )
