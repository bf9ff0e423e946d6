"""ANN first stage (`build_ann`, ``mode="ann"``): recall against exhaustive R on clustered data, currency after
`add`, deletes, filters, `compact`, crash safety at every step, readers during rebuilds, hostile ANN entries."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time

import numpy as np
import pytest
from index_faults import Fault, build_base, inject, protos, run_op, snapshot

from pecm.cli import main as cli
from pecm.index import ArchiveIndex, IndexCorruptError

K, D = 4, 32


def clustered(n, centres=40, seed=0, spread=0.35):
    """Items drawn around shared centres (each prototype = its item's centre part + noise), so pooled sim
    and R agree as they do for trained models; queries are perturbed items."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, K, D)).astype(np.float32)
    lab = rng.integers(0, centres, n)
    x = c[lab] + spread * rng.standard_normal((n, K, D)).astype(np.float32)
    return x, lab


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    x, _ = clustered(6000)
    path = tmp_path_factory.mktemp("ann") / "ix"
    with ArchiveIndex.create(path, K, D) as idx:
        idx.add(x, metadata=[{"site": i % 3} for i in range(len(x))], progress=False)
    rng = np.random.default_rng(1)
    q = x[rng.choice(len(x), 40, replace=False)] + 0.3 * rng.standard_normal((40, K, D)).astype(np.float32)
    return path, x, q


def _recall(got, want):
    return np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want)])


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "ivf_pq", "hnsw"])
def test_default_recall_on_clustered_data(big, tmp_path, kind):
    path, x, q = big
    p = tmp_path / "ix"
    shutil.copytree(path, p)
    with ArchiveIndex.open(p, mode="a") as idx:
        entry = idx.build_ann(kind, progress=False)
        assert entry["kind"] == kind and entry["rows"] == len(x)
    with ArchiveIndex.open(p, verify=True) as idx:
        _, exact, _ = idx.search(q, 10, with_metadata=False)
        s, got, _ = idx.search(q, 10, mode="ann", with_metadata=False)
    r = _recall(got, exact)
    assert r >= 0.95, f"{kind}: recall@10 {r:.3f}"
    assert np.all(np.diff(s, axis=1) <= 1e-6)


def test_kind_chosen_from_n_and_bad_params(big, tmp_path):
    path, x, q = big
    p = tmp_path / "ix"
    shutil.copytree(path, p)
    with ArchiveIndex.open(p, mode="a") as idx:
        assert idx.build_ann(progress=False)["kind"] == "flat"  # 6000 < 20000
        for kw, pat in [({"kind": "kd"}, "kind"), ({"nlist": 0}, "nlist"), ({"bogus": 1}, "bogus"),
                        ({"kind": "ivf_flat", "nlist": 10**6}, "nlist"), ({"kind": "ivf_pq", "m": 5}, "m")]:
            kind = kw.pop("kind", "ivf_flat")
            with pytest.raises(ValueError, match=pat):
                idx.build_ann(kind, progress=False, **kw)
    with ArchiveIndex.open(p) as idx:
        assert idx.stats()["ann"]["kind"] == "flat"


def test_ann_is_current_after_add_and_honours_deletes_and_filters(big, tmp_path):
    path, x, q = big
    p = tmp_path / "ix"
    shutil.copytree(path, p)
    with ArchiveIndex.open(p, mode="a") as idx:
        idx.build_ann("ivf_flat", progress=False)
        new = np.random.default_rng(5).standard_normal((3, K, D)).astype(np.float32) * 4
        ids = idx.add(new, metadata=[{"site": 7}] * 3, progress=False)
        _, got, _ = idx.search(new, 1, mode="ann")
        assert got[:, 0].tolist() == ids.tolist()  # the exact tail: found at once
        _, top, _ = idx.search(q[:5], 1, mode="ann")
        idx.delete(top[:, 0])
        _, again, _ = idx.search(q[:5], 10, mode="ann")
        assert not set(again.ravel()) & set(top[:, 0])
        s, f, meta = idx.search(q[:8], 10, mode="ann", where={"site": 1})
        assert all(m is None or m["site"] == 1 for row in meta for m in row) and (f >= 0).all()
        _, exact, _ = idx.search(q[:8], 10, where={"site": 1})
        assert _recall(f, exact) >= 0.95
        s, f, _ = idx.search(new, 3, mode="ann", where={"site": 7})  # selective: exact over its rows
        assert set(f[:, 0]) == set(ids.tolist())
        idx.compact(progress=False)
        a = idx.manifest["ann"]
        assert a["rows"] == idx.count and a["file"].startswith(f"ann.g{idx.manifest['generation']}.")
        _, exact, _ = idx.search(q, 10)
        _, got, _ = idx.search(q, 10, mode="ann")
        assert _recall(got, exact) >= 0.95
    assert sorted(n for n in os.listdir(p) if n.endswith(".faiss")) == [a["file"]]
    snapshot_ok = ArchiveIndex.open(p, verify=True)
    snapshot_ok.close()


def test_ann_mode_without_ann_and_cli(big, tmp_path, capsys):
    path, x, q = big
    p = tmp_path / "ix"
    shutil.copytree(path, p)
    with ArchiveIndex.open(p) as idx, pytest.raises(ValueError, match="build_ann"):
        idx.search(q[:1], 3, mode="ann")
    assert cli(["index", "build-ann", str(p), "--kind", "ivf_flat", "--nlist", "16", "--nprobe", "16",
                "--json", "--no-progress"]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["params"]["nlist"] == 16
    np.save(tmp_path / "q.npy", q[:2])
    args = ["search", str(p), "--query-file", str(tmp_path / "q.npy"), "--mode", "ann", "--json", "-k", "4"]
    assert cli([*args, "--nprobe", "4"]) == 0
    assert len(json.loads(capsys.readouterr().out)["ids"][0]) == 4
    assert cli(["index", "build-ann", str(p), "--kind", "ivf_flat", "--nlist", "0"]) == 2


# ---------------------------------------------------------------------------------------- crash safety
@pytest.fixture(scope="module")
def base_ann(tmp_path_factory):
    path = tmp_path_factory.mktemp("base_ann") / "ix"
    build_base(path)
    with ArchiveIndex.open(path, mode="a") as idx:
        idx.build_ann("flat", progress=False)
    return path


def _killed(path, op, at):
    idx = ArchiveIndex.open(path, mode="a")
    with inject(at, action="kill"):
        run_op(idx, op)
    os._exit(3)


@pytest.mark.parametrize("op", ["build_ann", "add", "compact"])
@pytest.mark.parametrize("action", ["enospc", "kill"])
def test_faults_at_every_step_with_an_ann(base_ann, tmp_path, op, action):
    count = tmp_path / "count"
    shutil.copytree(base_ann, count)
    log = []
    with ArchiveIndex.open(count, mode="a") as idx, inject(log=log):
        run_op(idx, op)
    before = snapshot(base_ann)
    failed = 0
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["pecm.index", "numpy"])
    for at in range(1, len(log) + 1):
        path = tmp_path / f"{op}{at}"
        shutil.copytree(base_ann, path)
        if action == "kill":
            p = ctx.Process(target=_killed, args=(str(path), op, at))
            p.start()
            p.join(60)
            assert p.exitcode == -9
        else:
            try:
                with ArchiveIndex.open(path, mode="a") as idx, inject(at):
                    run_op(idx, op)
            except Fault:
                failed += 1
            else:  # only the removal of a replaced file after the commit may fail without an error
                assert log[at - 1] == "remove", f"{op}: ENOSPC at step {at} ({log[at - 1]}) was swallowed"
        got = snapshot(path)  # verify=True, incl. the ANN's CRC, and ann searches agree with the data
        assert got == before or (op == "add" and set(got) - set(before) == set(range(30, 36)))
        with ArchiveIndex.open(path, mode="a") as idx:
            if op != "add" or got == before:  # redo (build_ann and compact are idempotent)
                run_op(idx, op)
        snapshot(path)
        with ArchiveIndex.open(path) as idx:
            assert idx.manifest["ann"] is not None
            names = {n for n in os.listdir(path) if n.endswith(".faiss")}
        with ArchiveIndex.open(path, mode="a"):  # recovery removes any stray ANN file
            pass
        assert {n for n in os.listdir(path) if n.endswith(".faiss")} <= names
        assert len({n for n in os.listdir(path) if n.endswith(".faiss")}) == 1
    assert action == "kill" or failed >= len(log) - 4


def _rebuilder(path, rounds):
    with ArchiveIndex.open(path, mode="a") as idx:
        for r in range(rounds):
            first = idx.manifest["next_id"]
            idx.add(protos(range(first, first + 20)), metadata=[{"text": f"t{i}"} for i in range(first, first + 20)],
                    progress=False)
            idx.build_ann("ivf_flat" if r % 2 else "flat", progress=False, **({"nlist": 4} if r % 2 else {}))
            if r % 3 == 2:
                idx.delete([first, first + 1])
                idx.compact(progress=False)


def _ann_reader(path, seconds, q):
    errors, n = [], 0
    idx = ArchiveIndex.open(path)
    t0 = time.time()
    while time.time() - t0 < seconds:
        try:
            s, ids, meta = idx.search(protos([12])[0], 5, mode="ann", nprobe=4)
            assert ids[0, 0] == 12 and abs(s[0, 0] - 1) < 2e-3
            for row in meta[0]:
                assert row is None or row.get("text") == f"t{row['id']}"
            n += 1
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
    q.put((n, errors))


def test_readers_while_the_ann_is_rebuilt(base_ann, tmp_path):
    path = tmp_path / "ix"
    shutil.copytree(base_ann, path)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["pecm.index", "numpy"])
    q = ctx.Queue()
    w = ctx.Process(target=_rebuilder, args=(str(path), 10))
    rs = [ctx.Process(target=_ann_reader, args=(str(path), 3.0, q)) for _ in range(2)]
    for p in [w, *rs]:
        p.start()
    out = [q.get(timeout=120) for _ in rs]
    for p in [w, *rs]:
        p.join(120)
    assert w.exitcode == 0
    for n, errors in out:
        assert errors == [] and n > 5


# ---------------------------------------------------------------------------------------- hostile
def test_hostile_or_damaged_ann_entries(base_ann, tmp_path):
    for case in ("traversal", "other_gen", "rows", "flipped", "garbage"):
        p = tmp_path / case
        shutil.copytree(base_ann, p)
        mpath = p / "manifest.json"
        m = json.loads(mpath.read_text())
        name = m["ann"]["file"]
        if case == "traversal":
            m["ann"]["file"] = "../ann.g0.s1.faiss"
        elif case == "other_gen":
            m["ann"]["file"] = "ann.g7.s1.faiss"
        elif case == "rows":
            m["ann"]["rows"] = m["count"] + 1
        mpath.write_text(json.dumps(m))
        data = bytearray((p / name).read_bytes())
        if case == "flipped":
            data[len(data) // 2] ^= 1
            (p / name).write_bytes(bytes(data))
        if case == "garbage":
            junk = b"\x00" * len(data)
            (p / name).write_bytes(junk)
            m["ann"]["crc32"] = __import__("zlib").crc32(junk)
            mpath.write_text(json.dumps(m))
        if case in ("traversal", "other_gen", "rows"):
            with pytest.raises(IndexCorruptError, match="'ann'"):
                ArchiveIndex.open(p)
            continue
        if case == "flipped":
            with pytest.raises(IndexCorruptError, match="checksum mismatch in ann"):
                ArchiveIndex.open(p, verify=True)
        with ArchiveIndex.open(p) as idx, pytest.raises(IndexCorruptError, match="ann"):
            idx.search(protos([3])[0], 3, mode="ann")
