"""Fault injection: ENOSPC at every write step and SIGKILL at every step of add / delete / compact, a real
full disk, readers racing compact. After each fault the index opens with ``verify=True`` holding exactly the
state before or after the operation, the next writer (and the failed handle itself) works, and no later
append inherits the metadata of a failed one."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
from index_faults import Fault, applied, apply, build_base, inject, protos, run_op, snapshot, states

from pecm.index import ArchiveIndex

OPS = ("add", "delete", "compact")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "ix"
    build_base(path)
    return path


def _steps(base, tmp_path, op):
    path = tmp_path / "count"
    shutil.copytree(base, path)
    log = []
    with ArchiveIndex.open(path, mode="a") as idx, inject(log=log):
        run_op(idx, op)
    return log


def _later_append_is_clean(path, state):
    """A later append without metadata gets fresh rows: nothing inherited from a failed append."""
    with ArchiveIndex.open(path, mode="a") as idx:
        first = idx.manifest["next_id"]
        new = idx.add(protos(range(first, first + 3)), progress=False)
        assert [r.get("text") for r in idx.get(new)] == [None, None, None]
    got = snapshot(path)
    assert got == {**state, **{int(i): None for i in new}}


@pytest.mark.parametrize("op", OPS)
def test_enospc_at_every_write_step(base, tmp_path, op):
    steps = _steps(base, tmp_path, op)
    assert len(steps) >= 4  # delete: the manifest write (write, fsync, replace, fsync of the directory)
    before, after = states(op)
    for at in range(1, len(steps) + 1):
        path = tmp_path / f"{op}{at}"
        shutil.copytree(base, path)
        with ArchiveIndex.open(path, mode="a") as idx:
            with inject(at), pytest.raises(OSError):
                run_op(idx, op)
            got = snapshot(path)  # what another process sees right after the failure
            assert got in (before, after), f"{op}: step {at} ({steps[at - 1]}) left {got}"
            if got == before:  # the same handle retries and succeeds
                run_op(idx, op)
            assert snapshot(path) == after, f"{op}: retry after step {at} ({steps[at - 1]})"
        _later_append_is_clean(path, after)


def test_failed_add_after_metadata_commit_does_not_leak_rows(base, tmp_path):
    """Issue 15 item 1: the manifest write fails after the metadata transaction committed."""
    path = tmp_path / "ix"
    shutil.copytree(base, path)
    steps = _steps(base, tmp_path, "add")
    at = steps.index("replace_from:after") + 2  # the first manifest write step after the metadata commit
    with ArchiveIndex.open(path, mode="a") as idx:
        with inject(at), pytest.raises(Fault):
            run_op(idx, "add")
        ids = idx.add(protos(range(30, 33)), progress=False)  # same handle, no metadata
        assert ids.tolist() == [30, 31, 32] and [r.get("text") for r in idx.get(ids)] == [None] * 3
    with ArchiveIndex.open(path, mode="a") as idx:  # a new writer neither
        assert [r.get("text") for r in idx.get([30, 31, 32])] == [None] * 3
        assert snapshot(path)[31] is None


def _killed_child(path, op, at):
    idx = ArchiveIndex.open(path, mode="a")
    with inject(at, action="kill"):
        run_op(idx, op)
    os._exit(3)  # not killed: the step number was past the end


def _ctx():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["pecm.index", "numpy"])
    return ctx


@pytest.mark.parametrize("op", OPS)
def test_sigkill_at_every_step(base, tmp_path, op):
    steps = _steps(base, tmp_path, op)
    before, after = states(op)
    ctx = _ctx()
    outcomes = []
    for at in range(1, len(steps) + 1):
        path = tmp_path / f"{op}{at}"
        shutil.copytree(base, path)
        p = ctx.Process(target=_killed_child, args=(str(path), op, at))
        p.start()
        p.join(60)
        assert p.exitcode == -9, f"{op}: step {at} did not kill (exit {p.exitcode})"
        got = snapshot(path)
        assert got in (before, after), f"{op}: SIGKILL at step {at} ({steps[at - 1]}) left {got}"
        outcomes.append(got == after)
        with ArchiveIndex.open(path, mode="a") as idx:  # the next writer recovers and can redo the operation
            if got == before:
                run_op(idx, op)
        assert snapshot(path) == after
        _later_append_is_clean(path, after)
    if before != after:  # killed at the first step: nothing committed; at the last: committed
        assert not outcomes[0] and outcomes[-1]


# ---------------------------------------------------------------------------------------- real full disk
def _tmpfs(path, size) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    os.makedirs(path)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode == 0


def test_real_enospc_on_a_full_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    if not _tmpfs(mnt, "600k"):
        pytest.skip("needs root and tmpfs mounts for a real full disk (the injected ENOSPC test covers every step)")
    try:
        path = mnt / "ix"
        build_base(path)
        committed = dict(snapshot(path))
        failures = 0
        for j in range(100):  # append until the disk is full, then keep trying
            first = 30 + 40 * j
            ids = list(range(first, first + 40))
            try:
                with ArchiveIndex.open(path, mode="a") as idx:
                    new = idx.add(protos(ids), metadata=[{"text": f"f{i}"} for i in ids], progress=False)
                committed.update({int(i): f"f{i}" for i in new})
            except OSError:
                failures += 1
                if failures >= 3:
                    break
        assert failures >= 1, "the tmpfs never filled up"
        assert snapshot(path) == committed
        with ArchiveIndex.open(path, mode="a") as idx:  # delete + compact on the full disk: all or nothing
            gone = sorted(committed)[:5]
            try:
                idx.delete(gone)
                for i in gone:
                    committed.pop(i)
                idx.compact(progress=False)
            except OSError:
                pass
        assert snapshot(path) == committed
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


# ---------------------------------------------------------------------------------------- readers vs compact
def _churn(path, rounds):
    with ArchiveIndex.open(path, mode="a") as idx:
        for _ in range(rounds):
            first = idx.manifest["next_id"]
            ids = list(range(first, first + 30))
            idx.add(protos(ids), metadata=[{"text": f"t{i}"} for i in ids], progress=False)
            live = np.asarray(idx.ids())[~np.isin(idx.ids(), idx.tombstones)]
            idx.delete(live[::3][:10])
            idx.compact(progress=False)


def _race_reader(path, seconds, q):
    errors, n = [], 0
    idx = ArchiveIndex.open(path)
    t0 = time.time()
    while time.time() - t0 < seconds:
        try:
            live = len(idx)
            s, ids, meta = idx.search(protos([5])[0], 5, chunk_size=16)
            for row in meta[0]:
                if row is not None:
                    assert row.get("text") in (None, f"t{row['id']}"), row
            if n % 5 == 0:
                ArchiveIndex.open(path, verify=True).close()
            assert live >= 0
            n += 1
        except Exception as e:  # any exception is a failure of the test
            errors.append(f"{type(e).__name__}: {e}")
    idx.close()
    q.put((n, errors))


def test_readers_across_compact(base, tmp_path):
    path = tmp_path / "ix"
    shutil.copytree(base, path)
    ctx = _ctx()
    q = ctx.Queue()
    w = ctx.Process(target=_churn, args=(str(path), 12))
    readers = [ctx.Process(target=_race_reader, args=(str(path), 4.0, q)) for _ in range(2)]
    for p in [w, *readers]:
        p.start()
    results = [q.get(timeout=120) for _ in readers]
    for p in [w, *readers]:
        p.join(120)
    assert w.exitcode == 0
    for n, errors in results:
        assert errors == [] and n > 5
    snapshot(path)


def test_handle_opened_before_delete_and_compact(base, tmp_path):
    path = tmp_path / "ix"
    shutil.copytree(base, path)
    reader = ArchiveIndex.open(path)
    assert len(reader) == 29
    with ArchiveIndex.open(path, mode="a") as w:
        w.delete([10, 11])
        assert len(reader) == 27
        with pytest.raises(KeyError):
            reader.get([10])
        w.compact(progress=False)
    assert len(reader) == 27 and reader.get([12])[0]["text"] == "t12"
    _, ids, _ = reader.search(protos([10])[0], 29)
    assert 10 not in ids and 11 not in ids and (ids >= 0).sum() == 27
    reader.close()


def _soak_child(path, op, arg, at, action):
    idx = ArchiveIndex.open(path, mode="a")
    try:
        with inject(at, action=action):
            apply(idx, op, arg)
    except Fault:
        os._exit(4)
    os._exit(3)


@pytest.mark.slow
def test_soak_random_faults(tmp_path):
    """300 random operations on one evolving index, each SIGKILLed or failed (ENOSPC) at a random step."""
    path = tmp_path / "ix"
    build_base(path)
    state = snapshot(path)
    rng = np.random.default_rng(15)
    ctx = _ctx()
    tally = {"kill": 0, "enospc": 0, "completed": 0, "rolled_back": 0}
    for _ in range(300):
        with ArchiveIndex.open(path) as idx:
            next_id = idx.manifest["next_id"]
        op = rng.choice(["add", "add", "delete", "compact"])
        live = sorted(state)
        if op == "delete" and len(live) < 5:
            op = "add"
        arg = None
        if op == "add":
            arg = int(rng.integers(1, 40))
        elif op == "delete":
            arg = [int(i) for i in rng.choice(live, size=int(rng.integers(1, 4)), replace=False)]
        action = str(rng.choice(["kill", "enospc"]))
        p = ctx.Process(target=_soak_child, args=(str(path), op, arg, int(rng.integers(1, 26)), action))
        p.start()
        p.join(60)
        assert p.exitcode in (-9, 3, 4), p.exitcode
        tally[{-9: "kill", 3: "completed", 4: "enospc"}[p.exitcode]] += 1
        after = applied(state, next_id, op, arg)
        got = snapshot(path)
        assert got in (state, after), f"{op} {arg} ({action}) left a state that is neither before nor after"
        tally["rolled_back"] += got == state and state != after
        state = got
        with ArchiveIndex.open(path, mode="a"):  # recovery by the next writer
            pass
        assert snapshot(path) == state
    assert tally["kill"] > 50 and tally["enospc"] > 50 and tally["completed"] > 10
    print("soak:", tally)
