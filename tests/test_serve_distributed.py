"""`pecm serve --distributed` with 2 gloo ranks, each a `python -m pecm serve ... --distributed` process started
with the environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): the
same answers as a single-process `pecm.query` search for text, image, id and prototypes queries (exhaustive and
two-stage, by score / sim / conf, where filters, k beyond a shard's rows, sequential and concurrent), writes
through rank 0 seen by rank 1's shard, the world size in /health and /indexes, an idle spell longer than the
group timeout, SIGTERM of every rank (all exit 0), and a killed rank (503, rank 0 exits 1 instead of hanging)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serve_fixtures import REPORTS, b64, build_archive, second_index, wait_for_server  # noqa: E402

from pecm.index import ArchiveIndex  # noqa: E402
from pecm.query import encode, hits_json, search_hits  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 6  # --dist-timeout-s of the main cluster: its idle heartbeat is every 1.5 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Two ranks of `pecm serve --distributed` on the archive, started at once; `ready` waits for rank 0's
    /health and gives ``url``."""

    def __init__(self, arch, *extra):
        port = _free_port()
        cmd = [sys.executable, "-m", "pecm", "serve", arch["index"], arch["other"], "--checkpoint", arch["ckpt"]]
        cmd += ["--port", "0", "--distributed", *extra]
        self.logs = [tempfile.TemporaryFile("w+") for _ in range(2)]
        self.procs, self.url = [], None
        for rank in range(2):
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, RANK=str(rank), LOCAL_RANK=str(rank))
            env.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            out = subprocess.PIPE if rank == 0 else subprocess.DEVNULL
            self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=self.logs[rank], text=True, env=env))

    def ready(self) -> "Cluster":
        if self.url is None:
            try:
                self.url = wait_for_server(self.procs[0], timeout=90)
            except BaseException as e:
                self.close()
                logs = f"{self.stderr(0)[-3000:]} {self.stderr(1)[-3000:]}"
                raise AssertionError(f"the cluster did not start: {logs}") from e
        return self

    def stderr(self, rank: int) -> str:
        self.logs[rank].seek(0)
        return self.logs[rank].read()

    def wait(self, timeout: float):
        """Exit statuses of both ranks, waiting at most ``timeout`` seconds in all."""
        deadline = time.time() + timeout
        return [p.wait(timeout=max(0.1, deadline - time.time())) for p in self.procs]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_dist")
    a = build_archive(root)
    with ArchiveIndex.open(a["index"]) as ix:
        a["K"], a["D"] = ix.K, ix.D
    a["other"] = second_index(root / "other", a["K"], a["D"], n=60)
    return a


@pytest.fixture(scope="module")
def cluster(arch):
    c = Cluster(arch, "--dist-timeout-s", str(TIMEOUT_S)).ready()
    yield c
    c.close()


@pytest.fixture(scope="module")
def spare(arch, tmp_path_factory):
    """A second cluster for the killed-rank test (heartbeats every 30 s: a search meets the dead rank first),
    started by the first test that asks for it, so that it can start during the idle test's sleep. It serves
    copies of the indexes: the first cluster's rank 0 still holds their write lock while this one starts."""
    import shutil

    root = tmp_path_factory.mktemp("serve_dist_spare")
    own = dict(arch, index=str(root / "arch"), other=str(root / "other"))
    shutil.copytree(arch["index"], own["index"])
    shutil.copytree(arch["other"], own["other"])
    for d in (own["index"], own["other"]):
        lock = os.path.join(d, "write.lock")
        if os.path.exists(lock):
            os.remove(lock)
    c = Cluster(own, "--dist-timeout-s", "120")
    yield c
    c.close()


@pytest.fixture(scope="module")
def encoder(arch):
    from pecm.commands.index import load_encoder

    return load_encoder(arch["ckpt"])


def _reference(arch, encoder, body) -> list:
    """One process: the body's query encoded (or read) here and searched with `pecm.query.search_hits`."""
    path = arch["index"] if body["index"] == "arch" else arch["other"]
    with ArchiveIndex.open(path) as ix:
        if "text" in body:
            q, m = encode(encoder, "text", [body["text"]])
        elif "image" in body:
            q, m = encode(encoder, "image", [body["_path"]])
        elif "id" in body:
            row = ix.get([body["id"]], vectors=True)[0]
            q, m = row["prototypes"][None], row["mask"][None]
        else:
            q = np.asarray(body["prototypes"], dtype=np.float32)[None]
            m = None if "mask" not in body else np.asarray(body["mask"], dtype=bool)[None]
        kw = {k: body[k] for k in ("mode", "by", "where") if k in body}
        return hits_json(*search_hits(ix, q, body.get("k", 10), q_mask=m, **kw))[0]


def _same(got: dict, ref: list, tol: float = 1e-5) -> None:
    hits = got["results"]
    assert [h["id"] for h in hits] == [h["id"] for h in ref]
    assert [h["metadata"] for h in hits] == [h["metadata"] for h in ref]
    for key in ("score", "sim", "conf"):  # a batched encoder forward differs from one query's by ~1e-7
        np.testing.assert_allclose([h[key] for h in hits], [h[key] for h in ref], rtol=tol, atol=tol)


def _bodies(arch) -> list:
    rng = np.random.default_rng(5)
    K, D = arch["K"], arch["D"]
    img = arch["images"][3]
    mask = [True, False] + [True] * (K - 2)
    out = [
        {"index": "arch", "text": REPORTS[1], "k": 5},
        {"index": "arch", "text": REPORTS[4], "k": 10, "by": "sim"},  # k > the 7 rows of a shard
        {"index": "arch", "text": REPORTS[0], "k": 3, "where": {"modality": "image"}},
        {"index": "arch", "image": b64(open(img, "rb").read()), "_path": img, "k": 6},
        {"index": "arch", "id": 2, "k": 6, "by": "conf"},
        {"index": "other", "id": 41, "k": 8},
        {"index": "other", "prototypes": rng.standard_normal((K, D)).tolist(), "k": 7},
        {"index": "other", "prototypes": rng.standard_normal((K, D)).tolist(), "mask": mask},
        {"index": "other", "prototypes": rng.standard_normal((K, D)).tolist(), "k": 9, "where": {"site": 1}},
        {"index": "other", "prototypes": rng.standard_normal((K, D)).tolist(), "k": 5, "mode": "two_stage"},
    ]
    return out


def _post(url, body):
    return httpx.post(url + "/search", json={k: v for k, v in body.items() if not k.startswith("_")}, timeout=60)


def test_batcher_heartbeats_when_idle_and_closes_its_searcher_last():
    """The searcher's collectives all run on the batcher's one worker thread: pings while idle, close at stop."""
    import asyncio
    import threading

    from pecm.serve.batcher import Batcher

    calls = []

    class Searcher:
        heartbeat_s = 0.05

        def ping(self):
            calls.append(("ping", threading.current_thread().name))

        def close(self):
            calls.append(("close", threading.current_thread().name))

    async def main():
        b = Batcher(None, searcher=Searcher())
        await b.start()
        await asyncio.sleep(0.5)
        await b.stop()

    asyncio.run(main())
    assert [c for c, _ in calls].count("ping") >= 3 and calls[-1][0] == "close"
    assert [c for c, _ in calls].count("close") == 1
    assert len({t for _, t in calls}) == 1 and calls[0][1].startswith("pecm-search")


def test_health_and_indexes_report_the_world_size(cluster, arch):
    h = httpx.get(cluster.url + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["world_size"] == 2
    got = httpx.get(cluster.url + "/indexes", timeout=10).json()
    assert got["world_size"] == 2
    with ArchiveIndex.open(arch["other"]) as ix:
        assert {d["name"]: d["count"] for d in got["indexes"]}["other"] == len(ix)


def test_sharded_search_equals_one_process(cluster, arch, encoder):
    bodies = _bodies(arch)
    refs = [_reference(arch, encoder, b) for b in bodies]
    assert all(refs) and any(len(r) == 10 for r in refs)
    for b, ref in zip(bodies, refs):  # one request at a time
        r = _post(cluster.url, b)
        assert r.status_code == 200, r.text
        _same(r.json(), ref)
    with ThreadPoolExecutor(len(bodies)) as pool:  # together: batches of several groups and both indexes
        res = list(pool.map(lambda b: _post(cluster.url, b), bodies))
    for r, ref in zip(res, refs):
        assert r.status_code == 200, r.text
        _same(r.json(), ref)


def test_bad_input_is_a_4xx_naming_the_field(cluster):
    r = httpx.post(cluster.url + "/search", json={"index": "other", "id": 3, "k": 0}, timeout=30)
    assert r.status_code == 422 and r.json()["field"] == "k"
    r = httpx.post(cluster.url + "/search", json={"index": "other", "id": 3, "mode": "ann"}, timeout=30)
    assert r.status_code == 422 and "ann" in r.json()["error"]  # raised by every rank's search, answered once
    r = httpx.post(cluster.url + "/search", json={"index": "other", "id": 3, "k": 2}, timeout=30)
    assert r.status_code == 200 and len(r.json()["results"]) == 2  # the ranks are still in step


def test_writes_through_rank0_reach_every_shard(cluster, arch, encoder):
    K, D = arch["K"], arch["D"]
    p = np.random.default_rng(8).standard_normal((K, D)).tolist()
    r = httpx.post(cluster.url + "/items", json={"index": "other", "items": [{"prototypes": p}]}, timeout=30)
    assert r.status_code == 201, r.text
    new = r.json()["ids"][0]
    with ArchiveIndex.open(arch["other"]) as ix:
        assert int(ix.rows_of([new])[0]) >= ix.count // 2  # the new row is in rank 1's shard
    body = {"index": "other", "prototypes": p, "k": 5}
    got = _post(cluster.url, body).json()
    assert got["results"][0]["id"] == new
    _same(got, _reference(arch, encoder, body))
    gone = got["results"][1]["id"]
    assert httpx.delete(f"{cluster.url}/items/{gone}?index=other", timeout=30).status_code == 200
    got = _post(cluster.url, body).json()
    assert gone not in [h["id"] for h in got["results"]]
    _same(got, _reference(arch, encoder, body))


def test_an_idle_spell_longer_than_the_group_timeout(cluster, spare):
    time.sleep(TIMEOUT_S + 1.0)  # rank 0's heartbeats keep rank 1's wait for the next batch short
    r = httpx.post(cluster.url + "/search", json={"index": "other", "id": 7, "k": 3}, timeout=30)
    assert r.status_code == 200 and len(r.json()["results"]) == 3
    assert all(p.poll() is None for p in cluster.procs)


def test_sigterm_stops_every_rank_with_status_zero(cluster, arch):
    """torchrun passes its SIGTERM to every worker: rank 1 keeps searching until rank 0 drained and stopped it."""
    cluster.procs[1].send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert cluster.procs[1].poll() is None
    r = httpx.post(cluster.url + "/search", json={"index": "other", "id": 7, "k": 3}, timeout=30)
    assert r.status_code == 200 and len(r.json()["results"]) == 3
    cluster.procs[0].send_signal(signal.SIGTERM)
    assert cluster.wait(timeout=45) == [0, 0], cluster.stderr(0)[-2000:] + cluster.stderr(1)[-2000:]
    assert "rank 0 stopped" in cluster.stderr(1)  # rank 1 left on rank 0's stop message
    ArchiveIndex.open(arch["other"], mode="a").close()  # rank 0 released the writer lock


def test_a_killed_rank_fails_the_server_instead_of_hanging(spare):
    c = spare.ready()
    assert httpx.get(c.url + "/health", timeout=10).json()["status"] == "ok"
    c.procs[1].kill()
    c.procs[1].wait()
    r = httpx.post(c.url + "/search", json={"index": "other", "id": 7, "k": 3}, timeout=30)
    assert r.status_code == 503 and "distributed" in r.json()["error"], r.text
    assert c.procs[0].wait(timeout=20) == 1  # rank 0 stops serving and exits
    assert "CollectiveError" in c.stderr(0)
