"""ArchiveIndex crash safety (SIGKILL during add), corruption detection and the single-writer lock."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sqlite3
import time

import numpy as np
import pytest

from pecm.index import ArchiveIndex, IndexCorruptError, IndexLockedError

K, D = 8, 64


def batch_size(first_id: int) -> int:
    return 200 + (first_id * 7919) % 2800


def expected(ids: np.ndarray) -> np.ndarray:
    """Deterministic prototypes of the given ids (so a reader can check every committed row)."""
    base = np.arange(K * D, dtype=np.float64).reshape(1, K, D) * 0.013
    return np.sin(ids[:, None, None] * 0.37 + base).astype(np.float32) + 1.5


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _writer(path: str, batches: int, opened=None, release=None) -> None:
    idx = ArchiveIndex.open(path, mode="a")
    if opened is not None:
        opened.set()
    for j in range(batches):
        if j == 1 and release is not None:
            release.wait(30)  # keep the lock until the parent has tried a second writer
        first = idx.manifest["next_id"]
        ids = np.arange(first, first + batch_size(first))
        idx.add(expected(ids), metadata=[{"text": f"item {i}"} for i in ids], progress=False)
    idx.close()


def _check_committed(path: str) -> int:
    idx = ArchiveIndex.open(path, verify=True)
    n = idx.count
    assert np.array_equal(np.asarray(idx.ids()), np.arange(n))
    start = 0
    for rec in idx.manifest["checksums"]:  # one record per committed add, of the size the writer used
        assert rec["start"] == start and rec["count"] == batch_size(start)
        start += rec["count"]
    assert start == n
    if n:
        np.testing.assert_allclose(
            np.asarray(idx.array("prototypes"), np.float32), _unit(expected(np.arange(n))), atol=1e-6
        )
        last = idx.get([n - 1])[0]
        assert last["text"] == f"item {n - 1}"
    idx.close()
    return n


def _ctx():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["pecm.index", "numpy"])
    return ctx


def test_sigkill_during_add_leaves_last_commit(tmp_path):
    path = str(tmp_path / "ix")
    ArchiveIndex.create(path, K, D, dtype="float32").close()
    ctx = _ctx()
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(12):
        opened = ctx.Event()
        p = ctx.Process(target=_writer, args=(path, 1000, opened))
        p.start()
        assert opened.wait(60)  # the writer holds the index: now kill it at a random point of its adds
        time.sleep(float(rng.uniform(0.0, 0.3)))
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        counts.append(_check_committed(path))
        # the next writer recovers: drops the uncommitted bytes and metadata rows
        with ArchiveIndex.open(path, mode="a") as idx:
            n = idx.count
            for logical, p_ in idx.paths.items():
                assert os.path.getsize(p_) == n * idx.item_bytes[logical]
        with sqlite3.connect(os.path.join(path, "meta.sqlite")) as db:
            assert db.execute("SELECT COUNT(*) FROM items WHERE id >= ?", (n,)).fetchone()[0] == 0
    assert counts == sorted(counts) and counts[-1] > 0  # progress was made and never lost


def _reader(path: str, seconds: float, q) -> None:
    idx = ArchiveIndex.open(path)
    seen, t0 = [], time.time()
    query = expected(np.array([3]))
    while time.time() - t0 < seconds:
        idx.refresh()
        n = idx.count
        s, ids, _ = idx.search(query, 3, chunk_size=1000)  # may see a later commit than n (it refreshes)
        assert n == 0 or ids[0, 0] == 3 or np.isclose(s[0, 0], 1.0, atol=1e-4)
        assert np.all(ids[ids >= 0] < idx.refresh().count)
        if n:
            rows = np.random.default_rng(n).integers(0, n, 5)
            np.testing.assert_allclose(np.asarray(idx.array("prototypes")[rows]), _unit(expected(rows)), atol=1e-6)
        seen.append(n)
    q.put(seen)


def test_readers_see_committed_prefix_while_writer_appends(tmp_path):
    path = str(tmp_path / "ix")
    ArchiveIndex.create(path, K, D, dtype="float32").close()
    ctx = _ctx()
    q = ctx.Queue()
    opened, release = ctx.Event(), ctx.Event()
    w = ctx.Process(target=_writer, args=(path, 25, opened, release))
    readers = [ctx.Process(target=_reader, args=(path, 2.0, q)) for _ in range(2)]
    w.start()
    for r in readers:
        r.start()
    assert opened.wait(30)
    with pytest.raises(IndexLockedError):  # a second writer is refused while the first holds the lock
        ArchiveIndex.open(path, mode="a")
    release.set()
    seen = [q.get(timeout=60) for _ in readers]
    for p in [w, *readers]:
        p.join(60)
        assert p.exitcode == 0
    boundaries = {0}
    n = 0
    while n < 10**6 and len(boundaries) < 26:
        n += batch_size(n)
        boundaries.add(n)
    for s in seen:
        assert s == sorted(s) and set(s) <= boundaries
    assert _check_committed(path) == max(boundaries)


def test_second_writer_refused_in_process(tmp_path):
    a = ArchiveIndex.create(tmp_path / "ix", K, D)
    with pytest.raises(IndexLockedError, match="open for writing"):
        ArchiveIndex.open(tmp_path / "ix", mode="a")
    a.close()
    ArchiveIndex.open(tmp_path / "ix", mode="a").close()  # released on close


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "ix"
    with ArchiveIndex.create(path, K, D) as idx:
        idx.add(expected(np.arange(300)))
        idx.add(expected(np.arange(300, 400)))
    return path


def test_flipped_byte_detected_by_verify(small):
    p = small / "prototypes.bin"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x40
    p.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match="checksum mismatch in prototypes.bin"):
        ArchiveIndex.open(small, verify=True)


@pytest.mark.parametrize("name", ["prototypes.bin", "pooled.bin", "masks.bin", "ids.bin"])
def test_truncated_or_missing_file_detected_on_open(small, name):
    p = small / name
    os.truncate(p, p.stat().st_size - 3)
    with pytest.raises(IndexCorruptError, match="truncated"):
        ArchiveIndex.open(small)
    p.unlink()
    with pytest.raises(IndexCorruptError, match="missing"):
        ArchiveIndex.open(small)


def test_bad_manifest_and_longer_files(small):
    with open(small / "pooled.bin", "ab") as f:  # an uncommitted tail is ignored by readers
        f.write(b"\0" * 999)
    idx = ArchiveIndex.open(small, verify=True)
    assert idx.count == 400
    idx.close()
    (small / "manifest.json").write_text("{not json")
    with pytest.raises(IndexCorruptError, match="unreadable"):
        ArchiveIndex.open(small)
    (small / "manifest.json").unlink()
    with pytest.raises(IndexCorruptError, match="manifest"):
        ArchiveIndex.open(small)
    with pytest.raises(FileNotFoundError):
        ArchiveIndex.open(small / "nope")
