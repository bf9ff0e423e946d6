"""pecm.distributed: 2 CPU ranks (gloo) search their shards; the merged result equals one process; a search or
start-up error on one rank is raised on every rank; commit agreement names the rank that differs."""

from __future__ import annotations

import pickle
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from pecm.distributed import merge_results, shard_range
from pecm.index import ArchiveIndex

K, D, N = 6, 16, 301


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raised(fn, *args, **kw):
    """(exception type name, message) of ``fn(*args, **kw)``, or None when it returned."""
    try:
        fn(*args, **kw)
    except Exception as e:
        return type(e).__name__, str(e)
    return None


def _rank(rank: int, world: int, port: int, path: str, out: str) -> None:
    from pecm.distributed import agree_commits, check_start, commit_key, sharded_search

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        q = np.random.default_rng(9).standard_normal((3, K, D)).astype(np.float32)
        res = {}
        with ArchiveIndex.open(path) as idx:
            for mode, by in (("exhaustive", "score"), ("exhaustive", "conf"), ("two_stage", "score")):
                s, i, meta = sharded_search(idx, q, 8, mode=mode, by=by, shortlist=N, chunk_size=40)
                res[(mode, by)] = (s, i, [[None if r is None else r["id"] for r in row] for row in meta])
            # only rank 1 fails (no ANN): both ranks raise instead of rank 0 waiting for rank 1's result
            res["error"] = _raised(sharded_search, idx, q, 4, mode="ann" if rank == 1 else "exhaustive")
            key = commit_key(idx)
            res["agree"] = agree_commits({"ix": key, "other": f"stale{rank}"}, {"ix": key, "other": "stale0"}, None)
            res["start_ok"] = _raised(check_start, None, {"ix": key})
            res["start_stale"] = _raised(check_start, None, {"ix": key if rank == 0 else "old"})
            mine = FileNotFoundError("INDEX: no such directory 'x'") if rank == 1 else None
            res["start_failed"] = _raised(check_start, mine, {"ix": key})
            res["after"] = sharded_search(idx, q, 4)[1]  # the ranks are still in step
        with open(f"{out}.{rank}", "wb") as f:
            pickle.dump(res, f)
    finally:
        dist.destroy_process_group()


def test_shard_range_covers_all_rows():
    for n in (0, 1, 7, 301):
        for w in (1, 2, 3, 5):
            spans = [shard_range(n, r, w) for r in range(w)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    with pytest.raises(ValueError, match="rank"):
        shard_range(10, 2, 2)


def test_merge_results_exact_and_tie_order():
    a = (np.array([[0.9, 0.5, -np.inf]]), np.array([[4, 2, -1]]))
    b = (np.array([[0.7, 0.5]]), np.array([[9, 1]]))
    s, i = merge_results([a, b], 4)
    assert i.tolist() == [[4, 9, 1, 2]]
    np.testing.assert_allclose(s, [[0.9, 0.7, 0.5, 0.5]], rtol=1e-6)
    s, i = merge_results([a, b], 7)
    assert i[0, 5:].tolist() == [-1, -1] and np.isneginf(s[0, 5:]).all()


def test_two_gloo_ranks_equal_single_process_and_fail_together(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, K, D)).astype(np.float32)
    m = rng.random((N, K)) > 0.25
    path = str(tmp_path / "ix")
    with ArchiveIndex.create(path, K, D, dtype="float32", weights=rng.uniform(0.5, 1.5, K)) as idx:
        idx.add(x[:150], m[:150], metadata=[{"text": str(i)} for i in range(150)])
        idx.add(x[150:], m[150:])
        idx.delete([3, 200])
    out = str(tmp_path / "res")
    tmp.spawn(_rank, args=(2, _free_port(), path, out), nprocs=2, join=True)
    q = np.random.default_rng(9).standard_normal((3, K, D)).astype(np.float32)
    with ArchiveIndex.open(path) as idx:
        for rank in (0, 1):
            with open(f"{out}.{rank}", "rb") as f:
                res = pickle.load(f)
            for key in [k for k in res if isinstance(k, tuple)]:
                (_mode, by), (s, i, meta_ids) = key, res[key]
                ref_s, ref_i, _ = idx.search(q, 8, mode="exhaustive", by=by)
                np.testing.assert_array_equal(i, ref_i)
                np.testing.assert_allclose(s, ref_s, atol=1e-6)
                assert meta_ids == i.tolist() and not {3, 200} & set(i.ravel().tolist())
            assert res["after"].tolist() == idx.search(q, 4)[1].tolist()
            if rank == 1:  # its own error
                assert res["error"][0] == "ValueError" and "ann" in res["error"][1]
            else:  # rank 1's, named
                assert res["error"][0] == "ShardError" and res["error"][1].startswith("rank 1: ValueError")
            assert list(res["agree"]) == ["other"] and "rank 1" in res["agree"]["other"]
            assert res["start_ok"] is None
            assert res["start_stale"][0] == "ShardError" and "rank 1 opened a different commit" in res["start_stale"][1]
            if rank == 1:
                assert res["start_failed"][0] == "FileNotFoundError"
            else:
                assert res["start_failed"] == (
                    "ShardError",
                    "rank 1 failed to start: FileNotFoundError: " + "INDEX: no such directory 'x'",
                )


def test_shutdown_destroys_only_the_group_init_from_env_created(monkeypatch):
    from pecm.distributed import init_from_env, shutdown

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    assert init_from_env("gloo") == (0, 1)
    shutdown()
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        shutdown()  # a group the caller made stays up
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    shutdown()  # no group: a no-op
