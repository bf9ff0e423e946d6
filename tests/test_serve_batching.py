"""`pecm serve` micro-batching (batched == one query at a time), concurrent ingest + search (a search sees all of
a committed append or none of it), and SIGTERM of a real `pecm serve` process (drains, exits 0)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from serve_fixtures import REPORTS, b64, build_archive, second_index, wait_for_server  # noqa: E402

from pecm.serve.app import create_app  # noqa: E402
from pecm.serve.batcher import Batcher  # noqa: E402
from pecm.serve.parse import parse_search  # noqa: E402
from pecm.serve.state import State  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_b")
    a = build_archive(root)
    a["copy"] = str(root / "arch_copy")
    shutil.copytree(a["index"], a["copy"])  # for the subprocess (the in-process state holds the writer lock)
    from pecm.index import ArchiveIndex

    with ArchiveIndex.open(a["index"]) as ix:
        a["K"], a["D"] = ix.K, ix.D
    a["live"] = second_index(root / "live", a["K"], a["D"], n=5)
    return a


@pytest.fixture(scope="module")
def state(arch):
    st = State.open([arch["index"], arch["live"]], arch["ckpt"])
    yield st
    st.close()


def _queries(arch, state):
    rng = np.random.default_rng(3)
    bodies = [{"text": REPORTS[i]} for i in (0, 3, 5)]
    bodies += [{"image": b64(open(arch["images"][i], "rb").read())} for i in (1, 4)]
    bodies += [{"prototypes": rng.standard_normal((arch["K"], arch["D"])).tolist()} for _ in range(2)]
    bodies += [{"prototypes": rng.standard_normal((arch["K"], arch["D"])).tolist(), "mask": [True, False] + [True] * 3}]
    bodies += [{"id": 2}, {"id": 11}]
    bodies += [
        {"text": REPORTS[2], "k": 3},
        {"id": 5, "by": "conf"},
        {"text": REPORTS[4], "where": {"modality": "image"}},
    ]
    return [parse_search({"index": "arch", "k": 6, **b}, state, 100) for b in bodies]


def _close(a: dict, b: dict, exact: bool) -> None:
    assert [h["id"] for h in a["results"]] == [h["id"] for h in b["results"]]
    assert [h["metadata"] for h in a["results"]] == [h["metadata"] for h in b["results"]]
    for key in ("score", "sim", "conf"):
        x, y = (np.array([h[key] for h in r["results"]], dtype=np.float64) for r in (a, b))
        if exact:
            assert np.array_equal(x, y), key
        else:  # the batched encoder forward / the GEMM path of many queries: float32 rounding
            np.testing.assert_allclose(x, y, rtol=0, atol=2e-6)


def test_one_batch_equals_one_query_at_a_time(arch, state):
    """Groups of < 12 queries (the cpp backend's kGemmMinQ): the search of a stacked row is bit-identical."""
    qs = _queries(arch, state)
    assert max(sum(q.group() == g.group() for q in qs) for g in qs) < 12
    b = Batcher(state)
    together = b.run(qs)
    for q, got in zip(qs, together):
        assert not isinstance(got, BaseException), got
        _close(got, b.run([q])[0], exact=q.kind in ("prototypes", "id"))


def test_a_bad_query_fails_only_itself(arch, state):
    qs = _queries(arch, state)[:4]
    broken = parse_search({"index": "arch", "image": b64(open(arch["images"][0], "rb").read())}, state, 100)
    broken.payload = b"\x89PNG\r\n\x1a\n garbage"  # passes no decoder (parse_search would refuse it)
    gone = parse_search({"index": "arch", "id": 10**5}, state, 100)
    out = Batcher(state).run([qs[0], broken, qs[3], gone, qs[1]])
    assert out[1].status == 422 and out[1].field == "image"
    assert out[3].status == 404 and out[3].field == "id"
    for i, q in ((0, qs[0]), (2, qs[3]), (4, qs[1])):
        _close(out[i], Batcher(state).run([q])[0], exact=q.kind == "prototypes")


def test_concurrent_requests_are_batched_with_the_same_results(arch, state):
    bodies = [{"index": "arch", "k": 6, "text": REPORTS[i]} for i in range(6)]
    bodies += [{"index": "arch", "k": 6, "id": i} for i in range(6)]
    with TestClient(create_app(state, max_batch=1), raise_server_exceptions=False) as one:
        alone = [one.post("/search", json=b).json() for b in bodies]
    app = create_app(state, max_batch=16, max_wait_ms=400)
    with TestClient(app, raise_server_exceptions=False) as c:
        with ThreadPoolExecutor(len(bodies)) as pool:
            res = list(pool.map(lambda b: c.post("/search", json=b), bodies))
        batch = app.state.metrics.batch
    assert all(r.status_code == 200 for r in res)
    assert batch.count < len(bodies) and batch.sum == len(bodies)  # fewer batches than requests
    for r, a in zip(res, alone):  # a group of >= 12 queries takes the cpp GEMM path: not bit for bit
        _close(r.json(), a, exact=False)


def test_concurrent_ingest_and_search_see_whole_commits(arch, state):
    K, D = arch["K"], arch["D"]
    rng = np.random.default_rng(11)
    q = rng.standard_normal((K, D)).tolist()
    errors, seen = [], []
    stop = threading.Event()
    with TestClient(create_app(state, max_wait_ms=1), raise_server_exceptions=False) as c:

        def search():
            while not stop.is_set():
                r = c.post("/search", json={"index": "live", "prototypes": q, "k": 500})
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                hits = r.json()["results"]
                by_batch = {}
                for h in hits:
                    b = h["metadata"].get("batch")
                    if h["id"] >= 5 and b is None:  # an item without its metadata: a half-visible commit
                        errors.append(f"item {h['id']} without metadata")
                    if b is not None:
                        by_batch.setdefault(b, []).append(h["id"])
                for b, ids in by_batch.items():
                    if sorted(ids) != list(range(5 + 4 * b, 9 + 4 * b)):
                        errors.append(f"batch {b} partly visible: {sorted(ids)}")
                seen.append(len(hits))

        readers = [threading.Thread(target=search) for _ in range(2)]
        for t in readers:
            t.start()
        for b in range(8):
            items = [{"prototypes": rng.standard_normal((K, D)).tolist(), "metadata": {"batch": b}} for _ in range(4)]
            r = c.post("/items", json={"index": "live", "items": items})
            assert r.status_code == 201, r.text
            assert r.json()["ids"] == list(range(5 + 4 * b, 9 + 4 * b))
        stop.set()
        for t in readers:
            t.join()
        final = c.post("/search", json={"index": "live", "prototypes": q, "k": 500}).json()["results"]
    assert not errors, errors[:3]
    assert len(seen) > 2 and len(final) == 5 + 32
    assert all((n - 5) % 4 == 0 for n in seen)


def test_sigterm_drains_and_exits_zero(arch, tmp_path):
    token = tmp_path / "token"
    token.write_text("tok-" + "x" * 20 + "\n")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [
        sys.executable,
        "-m",
        "pecm",
        "serve",
        arch["copy"],
        "--checkpoint",
        arch["ckpt"],
        "--port",
        "0",
        "--token-file",
        str(token),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = wait_for_server(proc)
        headers = {"Authorization": "Bearer tok-" + "x" * 20}
        r = httpx.post(url + "/search", json={"text": REPORTS[0], "k": 2}, headers=headers, timeout=30)
        assert r.status_code == 200 and len(r.json()["results"]) == 2
        assert httpx.post(url + "/search", json={"text": REPORTS[0]}, timeout=30).status_code == 401
        with httpx.Client(timeout=30) as slow:  # a request in flight when SIGTERM arrives finishes
            pool = ThreadPoolExecutor(1)
            fut = pool.submit(slow.post, url + "/search", json={"text": REPORTS[1], "k": 3}, headers=headers)
            time.sleep(0.05)
            t0 = time.time()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=15)
            took = time.time() - t0
            try:
                inflight = fut.result().status_code
            except httpx.TransportError:
                inflight = None  # it had not reached the server yet: refused, never half-answered
            pool.shutdown()
        assert rc == 0, proc.stderr.read()
        assert took < 8 and inflight in (200, None)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    from pecm.index import ArchiveIndex

    ArchiveIndex.open(arch["copy"], mode="a").close()  # the writer lock was released


def test_served_connections_get_tcp_nodelay():
    """The socket `pecm serve` listens on: asyncio turns TCP_NODELAY on for the connections it accepts (without
    it a keep-alive client waits for the delayed ACK, ~40 ms, on every request after its first)."""
    import asyncio
    import socket

    from pecm.commands.serve import _listen_socket

    sock = _listen_socket("127.0.0.1", 0)
    got = []

    async def run():
        def accepted(reader, writer):
            got.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=sock)
        reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        assert await reader.read() == b""  # the server closed it after looking
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(run())
    assert len(got) == 1 and got[0] != 0
