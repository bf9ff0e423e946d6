"""bench/serve_load.py: a short run against a tiny `pecm serve` it starts itself (every phase, the writer phase
with its consistency checks, the JSON it writes), its error accounting against a fake server that fails every
search, and the checker flagging half-visible writes. Nothing here asserts a speed."""

from __future__ import annotations

import importlib.util
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from serve_fixtures import build_archive  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("pecm_bench_serve_load", os.path.join(ROOT, "bench", "serve_load.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    return build_archive(tmp_path_factory.mktemp("serve_load"))


def _check_phase(p: dict) -> None:
    assert p["errors"] == 0 and p["requests"] == p["ok"] > 0, p["error_samples"]
    assert p["qps"] > 0 and p["wall_s"] > 0
    lat = p["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert sum(p["requests_per_client"]) == p["ok"] and len(p["requests_per_client"]) == p["clients"]
    b = p["batches"]  # the server's batch-size histogram moved by exactly these searches
    assert b["queries"] >= p["ok"] and sum(b["sizes"].values()) == b["batches"] > 0
    assert b["mean_size"] == pytest.approx(b["queries"] / b["batches"], abs=1e-3)


def test_short_run_against_a_started_server(arch, tmp_path):
    out = tmp_path / "load.json"
    argv = ["--index", arch["index"], "--checkpoint", arch["ckpt"], "--duration", "1.5", "--clients", "4"]
    argv += ["--query", "text,prototypes", "--writer", "--writer-kind", "text", "--writer-pause", "0.1"]
    argv += ["--writer-data", os.path.join(arch["root"], "reports.txt"), "--out", str(out)]
    assert _script().main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["ok"] and doc["errors"] == 0 and doc["violations"] == 0
    assert doc["server"]["started_here"] and doc["server"]["exit_code"] == 0  # SIGTERM: drained, exit 0
    env = doc["environment"]
    assert env["cpu_model"] and env["git_commit"] and env["versions"]["torch"]
    for kind in ("text", "prototypes"):
        r = doc["runs"][kind]
        one, many = r["one_at_a_time"], r["concurrent"]
        _check_phase(one)
        _check_phase(many)
        assert one["clients"] == 1 and many["clients"] == 4
        assert one["server_cpu_s"] > 0 and many["server_cores"] > 0  # /proc of the started server
        assert one["batches"]["mean_size"] == 1.0  # one client: nothing to coalesce
        assert one["batches"]["queries"] == one["ok"] and many["batches"]["queries"] == many["ok"]
        assert r["ratio"] == pytest.approx(many["qps"] / one["qps"], rel=1e-2)
    wp = doc["writer_phase"]
    _check_phase(wp)
    w = wp["writer"]
    assert w["errors"] == 0 and w["violations"] == 0, w["violation_samples"]
    assert w["items"] > 0 and w["items"] == w["batches"] * w["batch_items"]
    assert w["count_after"] == w["count_before"] + w["items"]
    assert w["checks"]["writer_gets"] == w["items"] and w["checks"]["where_searches"] > 1
    assert w["checks"]["hits"] > 0 and w["checks"]["counts"] > 0
    after = {ix["name"]: ix["count"] for ix in doc["indexes_after"]}
    assert after[os.path.basename(arch["index"])] == w["count_after"]


class _FailingSearch(BaseHTTPRequestHandler):
    """/indexes, /metrics and /items/0 like pecm serve; every POST /search answers 500."""

    def _send(self, status: int, body: bytes, ctype="application/json"):
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/indexes":
            ix = {"name": "x", "K": 2, "D": 3, "dtype": "float32", "count": 1, "modalities": {}}
            self._send(200, json.dumps({"indexes": [ix]}).encode())
        elif self.path == "/metrics":
            self._send(200, b"pecm_search_batch_size_sum 0\npecm_search_batch_size_count 0\n", "text/plain")
        elif self.path.startswith("/items/0"):
            self._send(200, json.dumps({"id": 0, "index": "x", "metadata": {"id": 0}}).encode())
        elif self.path == "/health":
            self._send(200, b'{"status": "ok"}')
        else:
            self._send(404, b'{"error": "no"}')

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self._send(500, b'{"error": "internal error: boom"}')

    def log_message(self, *args):
        pass


def test_failed_requests_are_counted_and_fail_the_run(tmp_path):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FailingSearch)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "bad.json"
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        argv = ["--url", url, "--query", "id", "--duration", "0.5", "--clients", "2", "--warmup", "0"]
        assert _script().main([*argv, "--out", str(out)]) == 1
    finally:
        srv.shutdown()
        srv.server_close()
    doc = json.loads(out.read_text())
    r = doc["runs"]["id"]
    for p in (r["one_at_a_time"], r["concurrent"]):
        assert p["requests"] == p["errors"] > 0 and p["ok"] == 0 and p["qps"] == 0
        assert "500" in p["error_samples"][0]
    assert doc["errors"] == r["one_at_a_time"]["errors"] + r["concurrent"]["errors"] and not doc["ok"]


def test_checker_flags_half_visible_writes():
    mod = _script()

    class A:
        writer_batch, max_k, seed, timeout = 4, 1000, 0, 5.0

    phase = mod.Phase("http://127.0.0.1:9", {}, [b"{}"], 1, 1.0, 5.0)
    w = mod.Writer(A(), "http://127.0.0.1:9", {}, {"name": "x", "count": 10}, phase, "text", [])

    def hit(i, batch, run=w.run_tag):
        return {"id": i, "metadata": {"id": i, "load_run": run, "load_batch": batch}}

    whole = [hit(10 + j, 0) for j in range(4)]
    shown = w._check_visible(whole, 1, set())
    assert w.n_violations == 0 and shown == set(range(10, 14))
    w._check_visible(whole + [hit(14, 1)], 1, shown)  # batch 1: one item of four
    assert w.n_violations == 1 and "partly visible" in w.violations[0]
    w._check_visible(whole[:0], 0, shown)  # items shown before are gone
    assert w.n_violations == 2 and "gone" in w.violations[1]
    w._check_visible(whole, 2, shown)  # two batches had been committed, one is visible
    assert w.n_violations == 3 and "committed before" in w.violations[2]
    w.on_hits([{"id": 5, "metadata": None}, {"id": 6, "metadata": {"id": 7}}, hit(12, 0)])
    assert w.n_violations == 5 and w.seen_writer_hits == {12: 0} and list(w.pending_hits) == [12]
