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
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist


def shard_range(n: int, rank: int, world: int) -> Tuple[int, int]:
    """Rows ``[rank*n//world, (rank+1)*n//world)`` of an index of n rows."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank: expected 0 <= rank < world={world}, got {rank}")
    return rank * n // world, (rank + 1) * n // world


def init_from_env(backend: Optional[str] = None) -> Tuple[int, int]:
    """Initialise the default process group from the torchrun environment; returns (rank, world)."""
    if not dist.is_available():
        raise ValueError("distributed: torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError("distributed: RANK/WORLD_SIZE are not set; start the command with torchrun")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        _OWNED.add(id(dist.group.WORLD))
    return dist.get_rank(), dist.get_world_size()


_OWNED: set = set()  # default groups that init_from_env created (and so shutdown() may destroy)


def shutdown() -> None:
    """Synchronise the ranks and destroy the default process group if `init_from_env` created it.

    Exiting with a live gloo group can abort the process ("terminate called without an active exception")
    when its worker threads are torn down during interpreter exit, so commands call this in ``finally``.
    A group the caller created itself is left alone.
    """
    if not (dist.is_available() and dist.is_initialized()) or id(dist.group.WORLD) not in _OWNED:
        return
    _OWNED.discard(id(dist.group.WORLD))
    try:
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


def sharded_search(index, queries, k: int = 10, *, group=None, with_metadata: bool = True, **search_kw):
    """Search this rank's shard of ``index`` and merge all ranks' results (a collective call).

    Every rank must call it with the same queries and arguments. Returns
    ``(scores [B, k], ids [B, k], metadata)`` on every rank (metadata looked up locally; None when
    ``with_metadata=False``). ``search_kw`` are the arguments of `ArchiveIndex.search`
    (mode, shortlist, by, q_mask, chunk_size, backend).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed: no process group; call init_from_env() (or start with torchrun) first")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    counts = [None] * world  # ranks may have opened different commits: shard the common prefix
    dist.all_gather_object(counts, int(index.count), group=group)
    start, end = shard_range(min(counts), rank, world)
    if "device" not in search_kw and dist.get_backend(group) == "nccl":
        search_kw["device"] = torch.device("cuda", torch.cuda.current_device())  # NCCL: score on this rank's GPU
    scores, ids, _ = index.search(queries, k, rows=(start, end), with_metadata=False, **search_kw)
    parts = [None] * world
    dist.all_gather_object(parts, (scores, ids), group=group)
    scores, ids = merge_results(parts, k)
    meta = [index.meta.rows(row.tolist()) for row in ids] if with_metadata else None
    return scores, ids, meta
