"""Fault injection for the ArchiveIndex tests: fail (ENOSPC) or SIGKILL the process at the n-th write step.

A *step* is one call of a function through which the index changes its directory: ``os.pwrite``,
``os.write``, ``os.fsync``, ``os.replace``, ``os.ftruncate``, ``os.remove``, or a metadata transaction
(`MetaStore.replace_from` / `MetaStore.delete`, counted before and after it commits). Counting is on
only inside `inject` and only for regular files and paths, so the harness's own writes and pipes
are not steps.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat

import numpy as np

from pecm.index import ArchiveIndex
from pecm.index.meta import MetaStore

K, D = 4, 32
OS_STEPS = ("pwrite", "write", "fsync", "replace", "ftruncate", "remove")
META_STEPS = ("replace_from", "delete")


class Fault(OSError):
    def __init__(self, step):
        super().__init__(errno.ENOSPC, f"injected ENOSPC at {step}")


@contextlib.contextmanager
def inject(at: int = 0, action: str = "enospc", log=None):
    """Steps are counted from 1; the ``at``-th one fails (``action="enospc"``) or kills the process
    (``"kill"``); ``at=0`` only counts (into ``log``, a list of step names)."""
    count = [0]
    saved = {}

    def hit(name):
        count[0] += 1
        if log is not None:
            log.append(name)
        if count[0] == at:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise Fault(name)

    def wrap_os(name, fn):
        def f(*a, **kw):
            mode = os.fstat(a[0]).st_mode if isinstance(a[0], int) else stat.S_IFREG
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode):  # files and directories, not pipes or ttys
                hit(name)
            return fn(*a, **kw)

        return f

    def wrap_meta(name, fn):
        def f(self, *a, **kw):
            hit(name + ":before")
            out = fn(self, *a, **kw)
            hit(name + ":after")
            return out

        return f

    for n in OS_STEPS:
        saved[("os", n)] = getattr(os, n)
        setattr(os, n, wrap_os(n, saved[("os", n)]))
    for n in META_STEPS:
        if not hasattr(MetaStore, n):
            continue
        saved[("meta", n)] = getattr(MetaStore, n)
        setattr(MetaStore, n, wrap_meta(n, saved[("meta", n)]))
    try:
        yield count
    finally:
        for (where, n), fn in saved.items():
            setattr(os if where == "os" else MetaStore, n, fn)


def protos(ids) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.float64)
    base = np.arange(K * D, dtype=np.float64).reshape(1, K, D) * 0.07
    return (np.cos(ids[:, None, None] * 0.61 + base) + 1.2).astype(np.float32)


def build_base(path) -> None:
    """30 items (ids 0..29, text "t{id}") in two appends, item 4 deleted (not compacted)."""
    with ArchiveIndex.create(path, K, D) as idx:
        idx.add(protos(range(20)), metadata=[{"text": f"t{i}"} for i in range(20)], progress=False)
        idx.add(protos(range(20, 30)), metadata=[{"text": f"t{i}"} for i in range(20, 30)], progress=False)
        idx.delete([4])


def run_op(idx, op: str) -> None:
    """The operation under test, on a writer handle of the base index."""
    if op == "add":
        idx.add(protos(range(30, 36)), metadata=[{"text": f"new{i}"} for i in range(30, 36)], progress=False)
    elif op == "delete":
        idx.delete([7, 8])
    elif op == "compact":
        idx.compact(progress=False)
    elif op == "build_ann":
        idx.build_ann("ivf_flat", progress=False, nlist=2, nprobe=2)
    else:
        raise ValueError(op)


def states(op: str):
    """(live ids with their text) of the base index before and after ``op``."""
    before = {i: f"t{i}" for i in range(30) if i != 4}
    after = dict(before)
    if op == "add":
        after.update({i: f"new{i}" for i in range(30, 36)})
    elif op == "delete":
        del after[7], after[8]
    return before, after


def snapshot(path) -> dict:
    """Open with verify=True and read every live item back: {id: text}; also checks the prototypes."""
    with ArchiveIndex.open(path, verify=True) as idx:
        ids = np.asarray(idx.ids())
        live = ids[~np.isin(ids, idx.tombstones)]
        rows = idx.get(live, vectors=True) if live.size else []
        for r in rows:
            want = protos([r["id"]])[0]
            want /= np.linalg.norm(want, axis=-1, keepdims=True)
            np.testing.assert_allclose(r["prototypes"], want, atol=2e-3)
        assert len(idx) == live.size
        if live.size:
            modes = ["exhaustive"] + (["ann"] if idx.manifest.get("ann") else [])
            for mode in modes:  # the item itself (or a twin) scores 1
                s, top, meta = idx.search(protos([live[0]])[0], 3, mode=mode)
                assert abs(s[0, 0] - 1) < 2e-3 and top[0, 0] in live and meta[0][0]["id"] == top[0, 0]
            if idx.manifest.get("ann"):  # the committed ANN agrees with the data: every live row is found
                _, got, _ = idx.search(protos(live[:8]), 1, mode="ann", shortlist=live.size, nprobe=64)
                assert got[:, 0].tolist() == live[:8].tolist()
        return {int(r["id"]): r.get("text") for r in rows}


def apply(idx, op: str, arg) -> None:
    """A parametrised operation of the soak test: ("add", n), ("delete", ids) or ("compact", None)."""
    if op == "add":
        first = idx.manifest["next_id"]
        ids = range(first, first + arg)
        idx.add(protos(ids), metadata=[{"text": f"s{i}"} for i in ids], progress=False)
    elif op == "delete":
        idx.delete(arg)
    else:
        idx.compact(progress=False)


def applied(state: dict, next_id: int, op: str, arg) -> dict:
    out = dict(state)
    if op == "add":
        out.update({i: f"s{i}" for i in range(next_id, next_id + arg)})
    elif op == "delete":
        for i in arg:
            out.pop(i)
    return out
