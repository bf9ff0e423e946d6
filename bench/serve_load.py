"""Load test of `pecm serve` (issue 13 items 2 and 5): N clients for T seconds on loopback, q/s and latency.

Starts ``pecm serve --port 0`` itself (``--index DIR ... --checkpoint CKPT``; the first line it prints gives the
URL, then it waits for ``/health``; SIGTERM at the end, which must exit 0; ``--server-path DIR`` runs it from
another pecm source tree, for before / after comparisons) or targets ``--url`` of a running server
(``--token-file`` for its token). For each query kind in ``--query`` (``text``, ``prototypes``, ``id``):

1. **one at a time**: one client, sequential ``POST /search`` for ``--duration`` s;
2. **concurrent**: ``--clients`` clients (default 16) for ``--duration`` s;

then, with ``--writer``, 3. **writer**: the concurrent phase of the first query kind again while a writer
``POST /items`` batches of ``--writer-batch`` reports or images (ROCO pairs from ``--writer-data``, default the
shared ROCO data else the shipped sample) into the searched index, and a checker watches what readers see.

Clients are threads, each with its own `httpx.Client` (one keep-alive connection); request bodies are encoded to
bytes before the clock starts and cycled over a pool of ``--pool`` distinct queries (text: the stored ``text`` of
the served items, or ``--texts FILE``; prototypes: stored items' prototypes and masks from
``GET /items/{id}?vectors=true``, or random unit vectors with ``--random-prototypes``; id: the stored item ids).
A request is an error when it raises or its status is not 200 (or 201 for ``POST /items``). Per phase: requests,
errors, q/s (completed requests / wall time from the start until the last client finished), latency
p50 / p95 / p99 / max, the client process's CPU seconds and, when the script started the server, the server's
(``/proc/PID/stat``), and the ``pecm_search_batch_size`` histogram delta from ``/metrics`` (mean batch size).
``ratio`` = concurrent q/s / one-at-a-time q/s.

Consistency (writer phase), counted as violations: a search hit without its metadata row or with another id in
it; a hit or ``GET`` of a writer item whose ``load_batch`` differs from what the writer was told; a hit id that
``GET /items/{id}`` does not find (the checker fetches reader hits; nothing is deleted during the test); the
index ``count`` of ``GET /indexes`` going down or not being the start count plus whole writer batches; a
``where={"load_run": RUN}`` search (every writer item so far) showing part of a batch, losing an item it showed
before, or missing a batch whose ``POST`` had returned before the search started; a returned id that ``GET``
does not find right after its ``POST``; at the end, the final count or the where-search differing from the
ids the writer got. Exit status 1 when there were errors, violations or the server did not exit 0.

    nice -n 0 python bench/serve_load.py --index /tmp/idx/images /tmp/idx/reports \\
        --checkpoint /work/demo_run/checkpoint --query text,prototypes --writer
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

from pecm.bench.timing import environment  # noqa: E402

QUERY_KINDS = ("text", "prototypes", "id")
OK_SEARCH, OK_INGEST = 200, 201


def cpu_tag() -> str:
    """Short name of this CPU for result file names: the AMD Zen generation from /proc/cpuinfo's family / model,
    else "cpu"."""
    fam = mod = None
    vendor = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k, v = k.strip(), v.strip()
                if k == "vendor_id":
                    vendor = v
                elif k == "cpu family" and fam is None:
                    fam = int(v)
                elif k == "model" and mod is None:
                    mod = int(v)
                if fam is not None and mod is not None and vendor:
                    break
    except (OSError, ValueError):
        return "cpu"
    if vendor != "AuthenticAMD" or fam is None or mod is None:
        return "cpu"
    if fam == 23:
        return "zen2" if mod >= 0x30 else "zen1"
    if fam == 25:
        return "zen4" if 0x10 <= mod <= 0x1F or 0x60 <= mod <= 0x7F or 0xA0 <= mod <= 0xAF else "zen3"
    if fam == 26:
        return "zen5"
    return "cpu"


def percentiles(lat_s: List[float]) -> Dict[str, Optional[float]]:
    """p50 / p95 / p99 / max / mean in milliseconds (numpy's linear interpolation); None without samples."""
    if not lat_s:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    a = np.asarray(lat_s, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {
        k: round(float(v), 3)
        for k, v in (("p50", p50), ("p95", p95), ("p99", p99), ("max", a.max()), ("mean", a.mean()))
    }


# ---------------------------------------------------------------------------------------------- the server
class Server:
    """A `pecm serve --port 0` subprocess: its URL (first printed line), stderr in a temporary file, CPU time."""

    def __init__(self, cmd: List[str], startup_s: float, path: str = HERE):
        self.cmd = cmd
        self.err = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, PYTHONPATH=path)  # the pecm source tree the server runs from
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.err, text=True, env=env)
        line = self.proc.stdout.readline()
        if not line.startswith("pecm serve: http://"):
            self.proc.wait(timeout=30)
            raise RuntimeError(f"pecm serve did not start (exit {self.proc.returncode}): {line!r} {self.stderr()}")
        self.url = line.split()[2]
        self._drain = threading.Thread(target=self.proc.stdout.read, daemon=True)  # keeps the pipe from filling
        self._drain.start()
        import httpx

        deadline = time.perf_counter() + startup_s
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"pecm serve at {self.url}: /health did not answer: {self.stderr()}")
            time.sleep(0.1)
        self.startup_s = time.perf_counter() - t0

    def cpu_s(self) -> Optional[float]:
        """User + system CPU seconds of the server process so far (all its threads), from /proc/PID/stat."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()[-4000:]

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """SIGTERM, then the exit status (None after a kill because it did not exit within ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode


# ---------------------------------------------------------------------------------------------- HTTP helpers
def scrape_batches(client) -> Dict[str, float]:
    """The ``pecm_search_batch_size`` histogram of ``/metrics``: cumulative bucket counts by ``le``, sum, count."""
    r = client.get("/metrics")
    r.raise_for_status()
    out: Dict[str, float] = {}
    for line in r.text.splitlines():
        m = re.match(r'pecm_search_batch_size_bucket\{le="([^"]+)"\} (\S+)$', line)
        if m:
            out["le=" + m.group(1)] = float(m.group(2))
        elif line.startswith("pecm_search_batch_size_sum "):
            out["sum"] = float(line.split()[1])
        elif line.startswith("pecm_search_batch_size_count "):
            out["count"] = float(line.split()[1])
    return out


def batch_delta(before: Dict[str, float], after: Dict[str, float]) -> dict:
    """Batches, queries and mean batch size between two scrapes, and the batches per bucket (not cumulative)."""
    n = after.get("count", 0) - before.get("count", 0)
    q = after.get("sum", 0) - before.get("sum", 0)
    hist, prev = {}, 0.0
    for key in after:
        if key.startswith("le="):
            cum = after[key] - before.get(key, 0.0)
            hist[key[3:]] = int(round(cum - prev))
            prev = cum
    return {"batches": int(n), "queries": int(q), "mean_size": round(q / n, 3) if n else None, "sizes": hist}


def stored_items(client, name: str, count: int, want: int, vectors: bool) -> List[dict]:
    """Up to ``want`` live items of index ``name`` (``GET /items/{id}`` for ids 0, 1, ...; ``count`` = its live
    items: the scan stops after finding them all, or after 1000 unknown / deleted ids)."""
    out: List[dict] = []
    i, misses = 0, 0
    while len(out) < min(want, count) and misses < 1000:
        r = client.get(f"/items/{i}", params={"index": name, "vectors": "true" if vectors else "false"})
        if r.status_code == 200:
            out.append(r.json())
        elif r.status_code == 404:
            misses += 1
        else:
            raise RuntimeError(f"GET /items/{i}?index={name}: {r.status_code} {r.text[:200]}")
        i += 1
    return out


def query_bodies(client, a, indexes: List[dict], search: dict, kind: str) -> List[bytes]:
    """The pool of ``POST /search`` bodies (JSON bytes) of one query kind, against index ``search``."""
    base = {"index": search["name"], "k": a.k}
    rng = np.random.default_rng(a.seed)
    if kind == "text":
        if a.texts:
            with open(a.texts, encoding="utf-8") as f:
                texts = [ln.strip() for ln in f if ln.strip()]
        else:  # the reports stored in the served indexes (in the demo: the held-out test captions)
            texts = []
            for ix in indexes:
                for it in stored_items(client, ix["name"], ix["count"], a.pool, False):
                    t = it["metadata"].get("text")
                    if isinstance(t, str) and t.strip() and t not in texts:
                        texts.append(t)
                if len(texts) >= a.pool:
                    break
        if not texts:
            raise ValueError("--query text: no served item has a text; give --texts FILE (one report per line)")
        bodies = [{**base, "text": t} for t in texts[: a.pool]]
    elif kind == "prototypes":
        K, D = search["K"], search["D"]
        items = [] if a.random_prototypes else stored_items(client, search["name"], search["count"], a.pool, True)
        if items:
            bodies = [{**base, "prototypes": it["prototypes"], "mask": it["mask"]} for it in items]
        else:
            q = rng.standard_normal((a.pool, K, D)).astype(np.float32)
            q /= np.linalg.norm(q, axis=-1, keepdims=True)
            bodies = [{**base, "prototypes": p.tolist()} for p in q]
    elif kind == "id":
        items = stored_items(client, search["name"], search["count"], a.pool, False)
        if not items:
            raise ValueError(f"--query id: index {search['name']!r} has no items")
        bodies = [{**base, "id": it["id"]} for it in items]
    else:
        raise ValueError(f"--query: unknown kind {kind!r} (expected some of {list(QUERY_KINDS)})")
    order = list(range(len(bodies)))
    random.Random(a.seed).shuffle(order)
    return [json.dumps(bodies[i]).encode() for i in order]


# ---------------------------------------------------------------------------------------------- the phases
class Phase:
    """``clients`` threads posting ``bodies`` to /search until ``duration`` s after a common start."""

    def __init__(self, url, headers, bodies, clients, duration, timeout, on_hits=None):
        self.url, self.headers, self.bodies = url, headers, bodies
        self.clients, self.duration, self.timeout = clients, duration, timeout
        self.on_hits = on_hits  # called with each successful response's results (writer phase checks)
        self.lat: List[List[float]] = [[] for _ in range(clients)]
        self.errors: List[str] = []
        self.n_errors = 0
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(clients + 1, action=self._go)  # _go runs once, before any is released
        self.start = self.deadline = 0.0
        self.started = threading.Event()  # set once ``deadline`` is (writer and checker threads wait for it)
        self.ends = [0.0] * clients

    def _error(self, msg: str) -> None:
        with self.lock:
            self.n_errors += 1
            if len(self.errors) < 10:
                self.errors.append(msg[:300])

    def _client(self, cid: int) -> None:
        import httpx

        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        hdr = {**self.headers, "content-type": "application/json"}
        with httpx.Client(base_url=self.url, headers=hdr, timeout=self.timeout, limits=limits) as c:
            try:
                c.get("/health")  # opens the keep-alive connection before the clock starts
            except Exception as e:
                self._error(f"GET /health: {type(e).__name__}: {e}")
            finally:
                self.barrier.wait()
            i, lat = cid, self.lat[cid]
            while True:
                t0 = time.perf_counter()
                if t0 >= self.deadline:
                    break
                body = self.bodies[i % len(self.bodies)]
                i += self.clients
                try:
                    r = c.post("/search", content=body)
                    if r.status_code != OK_SEARCH:
                        self._error(f"POST /search: {r.status_code} {r.text[:200]}")
                        continue
                    results = r.json()["results"]
                    lat.append(time.perf_counter() - t0)
                    if self.on_hits is not None:
                        self.on_hits(results)
                except Exception as e:  # a transport error, a bad body: an error of this request
                    self._error(f"POST /search: {type(e).__name__}: {e}")
            self.ends[cid] = time.perf_counter()

    def _go(self) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + self.duration
        self.started.set()

    def run(self) -> None:
        threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for t in threads:
            t.start()
        self.barrier.wait()
        for t in threads:
            t.join()

    def summary(self) -> dict:
        lat = [x for per in self.lat for x in per]
        wall = max(self.ends) - self.start
        return {
            "clients": self.clients,
            "wall_s": round(wall, 3),
            "requests": len(lat) + self.n_errors,
            "ok": len(lat),
            "errors": self.n_errors,
            "error_samples": self.errors,
            "qps": round(len(lat) / wall, 3) if wall > 0 else None,
            "latency_ms": percentiles(lat),
            "requests_per_client": [len(per) for per in self.lat],
        }


def measured(phase: Phase, client, server: Optional[Server], extra=None) -> dict:
    """Runs ``phase`` (and ``extra``: threads started with it, joined after) and adds the CPU and batch numbers."""
    m0, cpu0 = scrape_batches(client), time.process_time()
    s0 = server.cpu_s() if server else None
    load0 = os.getloadavg()[0]
    threads = [threading.Thread(target=fn, daemon=True) for fn in extra or ()]
    for t in threads:
        t.start()
    phase.run()
    for t in threads:
        t.join()
    out = phase.summary()
    s1 = server.cpu_s() if server else None
    cpu = time.process_time() - cpu0
    out["client_cpu_s"] = round(cpu, 3)
    out["server_cpu_s"] = round(s1 - s0, 3) if s0 is not None and s1 is not None else None
    wall = out["wall_s"] or 1.0
    out["client_cores"] = round(cpu / wall, 3)  # CPU seconds per wall second: 2.0 = both cores of this machine
    out["server_cores"] = round(out["server_cpu_s"] / wall, 3) if out["server_cpu_s"] is not None else None
    out["batches"] = batch_delta(m0, scrape_batches(client))
    out["loadavg_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    return out


# ---------------------------------------------------------------------------------------------- writer phase
def writer_pairs(path: str, kind: str) -> List[dict]:
    """ROCO pairs of ``--writer-data`` (a folder with pairs.jsonl, a pairs.jsonl, or a text file of reports)."""
    if os.path.isdir(path):
        path = os.path.join(path, "pairs.jsonl")
    root = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                p = json.loads(line)
                out.append(
                    {"pair_id": p.get("id", str(n)), "text": p.get("caption"), "image": os.path.join(root, p["image"])}
                )
            else:
                out.append({"pair_id": str(n), "text": line.strip(), "image": None})
    out = [p for p in out if (p["text"] or "").strip()] if kind == "text" else [p for p in out if p["image"]]
    if not out:
        raise ValueError(f"--writer-data {path!r}: no {'reports' if kind == 'text' else 'images'} in it")
    return out


class Writer:
    """The writer and the consistency checker of the writer phase (module docstring)."""

    def __init__(self, a, url, headers, search: dict, phase: Phase, kind: str, pairs: List[dict]):
        self.a, self.url, self.headers, self.search, self.phase = a, url, headers, search, phase
        self.name, self.kind, self.pairs = search["name"], kind, pairs
        self.run_tag = f"serve_load-{os.getpid()}-{int(time.time())}"
        self.count0 = search["count"]
        self.batch_of: Dict[int, int] = {}  # writer id -> its batch number
        self.committed_batches = 0  # batches whose POST returned (checker: must all be visible after)
        self.lat: List[float] = []
        self.errors: List[str] = []
        self.n_errors = 0
        self.violations: List[str] = []
        self.n_violations = 0
        self.checks = {"where_searches": 0, "counts": 0, "hit_gets": 0, "writer_gets": 0, "hits": 0}
        self.lock = threading.Lock()
        self.pending_hits: Dict[int, None] = {}  # reader hit ids the checker has not fetched yet (insertion order)
        self.fetched: set = set()
        self.seen_writer_hits: Dict[int, object] = {}  # writer-item hits seen by readers -> their load_batch
        self.rng = random.Random(a.seed)

    def violation(self, msg: str) -> None:
        with self.lock:
            self.n_violations += 1
            if len(self.violations) < 20:
                self.violations.append(msg[:300])

    def _error(self, msg: str) -> None:
        with self.lock:
            self.n_errors += 1
            if len(self.errors) < 10:
                self.errors.append(msg[:300])

    def client(self):
        import httpx

        return httpx.Client(base_url=self.url, headers=self.headers, timeout=self.a.timeout)

    # --- readers' hits
    def on_hits(self, results: list) -> None:
        for h in results:
            md = h.get("metadata")
            if not isinstance(md, dict) or md.get("id") != h["id"]:
                self.violation(f"hit {h['id']}: metadata {md!r} (half-committed?)")
                continue
            with self.lock:
                self.checks["hits"] += 1
                if md.get("load_run") == self.run_tag:
                    self.seen_writer_hits[h["id"]] = md.get("load_batch")
                if h["id"] not in self.fetched and len(self.pending_hits) < 10_000:
                    self.pending_hits[h["id"]] = None

    # --- the writer
    def write(self) -> None:
        a, b, n = self.a, 0, 0
        with self.client() as c:
            self.phase.started.wait()
            while time.perf_counter() < self.phase.deadline:
                items = []
                for _ in range(a.writer_batch):
                    p = self.pairs[n % len(self.pairs)]
                    n += 1
                    md = {"load_run": self.run_tag, "load_batch": b, "pair_id": p["pair_id"]}
                    if self.kind == "text":
                        items.append({"text": p["text"], "metadata": md})
                    else:
                        with open(p["image"], "rb") as f:
                            items.append({"image": base64.b64encode(f.read()).decode(), "metadata": md})
                body = json.dumps({"index": self.name, "items": items}).encode()
                t0 = time.perf_counter()
                try:
                    r = c.post("/items", content=body, headers={"content-type": "application/json"})
                except Exception as e:
                    self._error(f"POST /items: {type(e).__name__}: {e}")
                    continue
                if r.status_code != OK_INGEST:
                    self._error(f"POST /items: {r.status_code} {r.text[:200]}")
                    continue
                self.lat.append(time.perf_counter() - t0)
                ids = r.json()["ids"]
                if len(ids) != len(items):
                    self.violation(f"POST /items: {len(items)} items, ids {ids}")
                with self.lock:
                    for i in ids:
                        self.batch_of[int(i)] = b
                    self.committed_batches = b + 1
                for i in ids:  # committed before the response: GET must find it now
                    g = c.get(f"/items/{i}", params={"index": self.name})
                    self.checks["writer_gets"] += 1
                    if g.status_code != 200 or g.json()["metadata"].get("load_batch") != b:
                        self.violation(f"GET /items/{i} right after its POST: {g.status_code} {g.text[:150]}")
                b += 1
                if a.writer_pause > 0:
                    time.sleep(a.writer_pause)

    # --- the checker
    def _where_search(self, c, probe_id: int) -> Optional[List[dict]]:
        body = {"index": self.name, "id": probe_id, "k": self.a.max_k, "where": {"load_run": self.run_tag}}
        r = c.post("/search", json=body)
        self.checks["where_searches"] += 1
        if r.status_code != OK_SEARCH:
            self._error(f"checker POST /search where: {r.status_code} {r.text[:200]}")
            return None
        return r.json()["results"]

    def _check_visible(self, hits: List[dict], before: int, shown: set) -> set:
        by_batch: Dict[object, list] = {}
        for h in hits:
            by_batch.setdefault(h["metadata"].get("load_batch"), []).append(h["id"])
        for bt, ids in by_batch.items():
            if len(ids) != self.a.writer_batch:
                self.violation(f"where-search: batch {bt} partly visible ({len(ids)} of {self.a.writer_batch})")
        now = {h["id"] for h in hits}
        if not shown <= now:
            self.violation(f"where-search: items {sorted(shown - now)[:5]} visible before, gone now")
        if len(by_batch) < before:
            self.violation(f"where-search: {len(by_batch)} batches visible, {before} had been committed before")
        return now

    def check(self) -> None:
        shown: set = set()
        last_count = self.count0
        with self.client() as c:
            probe = self.phase.bodies and json.loads(self.phase.bodies[0]).get("id")
            if not isinstance(probe, int):
                probe = stored_items(c, self.name, self.count0, 1, False)[0]["id"]
            self.phase.started.wait()
            while time.perf_counter() < self.phase.deadline:
                with self.lock:
                    before = self.committed_batches
                r = c.get("/indexes")
                self.checks["counts"] += 1
                if r.status_code != 200:
                    self._error(f"checker GET /indexes: {r.status_code}")
                else:
                    n = next(ix["count"] for ix in r.json()["indexes"] if ix["name"] == self.name)
                    if n < last_count:
                        self.violation(f"/indexes count went down: {last_count} -> {n}")
                    if (n - self.count0) % self.a.writer_batch:
                        self.violation(
                            f"/indexes count {n}: not {self.count0} + whole batches of {self.a.writer_batch}"
                        )
                    last_count = max(last_count, n)
                hits = self._where_search(c, probe)
                if hits is not None and len(hits) < self.a.max_k:  # k = max_k hits: maybe not all writer items
                    shown = self._check_visible(hits, before, shown)
                with self.lock:
                    todo = list(self.pending_hits)[: self.a.check_gets]
                    for i in todo:
                        del self.pending_hits[i]
                for i in todo:
                    g = c.get(f"/items/{i}", params={"index": self.name})
                    self.checks["hit_gets"] += 1
                    if g.status_code != 200 or g.json()["metadata"].get("id") != i:
                        self.violation(f"reader hit {i}: GET /items/{i} -> {g.status_code} {g.text[:150]}")
                    self.fetched.add(i)
                time.sleep(self.a.check_interval)

    def final(self, c) -> dict:
        """End checks once every thread stopped; the phase's consistency record."""
        r = c.get("/indexes")
        n = next(ix["count"] for ix in r.json()["indexes"] if ix["name"] == self.name)
        if n != self.count0 + len(self.batch_of):
            self.violation(f"final count {n} != {self.count0} + {len(self.batch_of)} written")
        for i in self.batch_of:
            g = c.get(f"/items/{i}", params={"index": self.name})
            if g.status_code != 200:
                self.violation(f"final GET /items/{i}: {g.status_code}")
        if len(self.batch_of) <= self.a.max_k:
            probe = stored_items(c, self.name, self.count0, 1, False)[0]["id"]
            hits = self._where_search(c, probe) or []
            if {h["id"] for h in hits} != set(self.batch_of):
                self.violation(f"final where-search: {len(hits)} hits, {len(self.batch_of)} items written")
        for i, bt in self.seen_writer_hits.items():
            if self.batch_of.get(i) != bt:
                self.violation(f"reader hit {i} (load_batch {bt}): the writer got {self.batch_of.get(i)} for it")
        return {
            "kind": self.kind,
            "batch_items": self.a.writer_batch,
            "pause_s": self.a.writer_pause,
            "batches": len(set(self.batch_of.values())),
            "items": len(self.batch_of),
            "errors": self.n_errors,
            "error_samples": self.errors,
            "ingest_latency_ms": percentiles(self.lat),
            "items_per_s": round(len(self.batch_of) / self.phase.duration, 3),
            "count_before": self.count0,
            "count_after": n,
            "checks": dict(self.checks),
            "violations": self.n_violations,
            "violation_samples": self.violations,
        }


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bench/serve_load.py", description=__doc__.split("\n")[0])
    src = ap.add_argument_group("server")
    src.add_argument("--index", nargs="+", metavar="DIR", help="start `pecm serve DIR ...` (with --checkpoint)")
    src.add_argument("--checkpoint", help="the served checkpoint (with --index)")
    src.add_argument("--url", help="a running server instead (e.g. http://127.0.0.1:8000)")
    src.add_argument("--token-file", help="the server's bearer token (passed to the server when it is started here)")
    src.add_argument("--max-batch", type=int, default=32, help="pecm serve --max-batch (default 32)")
    src.add_argument("--max-wait-ms", type=float, default=5.0, help="pecm serve --max-wait-ms (default 5)")
    src.add_argument("--max-k", type=int, default=1000, help="pecm serve --max-k (default 1000; the checker's k)")
    src.add_argument("--server-arg", action="append", default=[], help="more `pecm serve` arguments (repeatable)")
    src.add_argument("--server-path", default=HERE, help="pecm source tree the server runs from (default: this one)")
    src.add_argument("--startup-s", type=float, default=180.0, help="seconds to wait for /health (default 180)")
    ld = ap.add_argument_group("load")
    ld.add_argument("--duration", type=float, default=20.0, help="seconds per phase (default 20)")
    ld.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    ld.add_argument("--query", default="text", help="query kinds, comma separated: text, prototypes, id")
    ld.add_argument("--search-index", help="index name searched (default: the first served)")
    ld.add_argument("--k", type=int, default=10, help="k of each search (default 10)")
    ld.add_argument("--pool", type=int, default=64, help="distinct queries per kind, cycled (default 64)")
    ld.add_argument("--texts", help="text queries: a file of reports, one per line (default: the stored texts)")
    ld.add_argument("--random-prototypes", action="store_true", help="prototypes queries: random unit vectors")
    ld.add_argument("--warmup", type=int, default=8, help="untimed sequential requests per kind first (default 8)")
    ld.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds (default 120)")
    ld.add_argument("--seed", type=int, default=0)
    wr = ap.add_argument_group("writer phase")
    wr.add_argument("--writer", action="store_true", help="add the phase with a writer ingesting meanwhile")
    wr.add_argument("--writer-kind", default="auto", choices=("auto", "text", "image"), help="what it ingests")
    wr.add_argument("--writer-data", help="ROCO folder / pairs.jsonl / reports file (default: the ROCO data)")
    wr.add_argument("--writer-batch", type=int, default=4, help="items per POST /items (default 4)")
    wr.add_argument("--writer-pause", type=float, default=0.5, help="seconds between its POSTs (default 0.5)")
    wr.add_argument("--check-interval", type=float, default=0.2, help="seconds between checker rounds")
    wr.add_argument("--check-gets", type=int, default=20, help="reader hits the checker fetches per round")
    ap.add_argument(
        "--out", help="result JSON (default bench/results/serve_load_cpu_<zen4 etc.>.json; '-': stdout only)"
    )
    a = ap.parse_args(argv)
    if (a.url is None) == (a.index is None):
        ap.error("give either --index DIR ... --checkpoint CKPT (the script starts pecm serve) or --url")
    if a.index and not a.checkpoint:
        ap.error("--index needs --checkpoint")
    kinds = [k.strip() for k in a.query.split(",") if k.strip()]
    bad = [k for k in kinds if k not in QUERY_KINDS]
    if not kinds or bad or len(set(kinds)) != len(kinds):
        ap.error(f"--query: expected distinct kinds among {list(QUERY_KINDS)}, got {a.query!r}")
    a.kinds = kinds
    for name in ("clients", "k", "pool", "writer_batch", "max_batch", "max_k", "check_gets"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(a, name)}")
    if a.duration <= 0 or a.warmup < 0 or a.writer_pause < 0 or a.check_interval < 0:
        ap.error("--duration must be > 0; --warmup, --writer-pause, --check-interval >= 0")
    return a


def run(a) -> dict:
    import httpx

    headers = {}
    token = None
    if a.token_file:
        with open(a.token_file, encoding="utf-8") as f:
            token = f.read().strip()
        headers["Authorization"] = f"Bearer {token}"
    server = None
    cmd = None
    if a.index:
        cmd = [sys.executable, "-m", "pecm", "serve", *a.index, "--checkpoint", a.checkpoint, "--port", "0"]
        cmd += ["--max-batch", str(a.max_batch), "--max-wait-ms", str(a.max_wait_ms), "--max-k", str(a.max_k)]
        if a.token_file:
            cmd += ["--token-file", a.token_file]
        cmd += a.server_arg
        server = Server(cmd, a.startup_s, a.server_path)
        url = server.url
    else:
        url = a.url.rstrip("/")
    t_start = time.perf_counter()
    out: dict = {}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=a.timeout) as c:
            r = c.get("/indexes")
            r.raise_for_status()
            indexes = r.json()["indexes"]
            names = [ix["name"] for ix in indexes]
            search = next((ix for ix in indexes if ix["name"] == (a.search_index or names[0])), None)
            if search is None:
                raise ValueError(f"--search-index {a.search_index!r}: not served (served: {names})")
            runs, pools = {}, {}
            for kind in a.kinds:
                t0 = time.perf_counter()
                bodies = pools[kind] = query_bodies(c, a, indexes, search, kind)
                log(f"{kind}: {len(bodies)} distinct queries prepared in {time.perf_counter() - t0:.1f} s")
                for body in bodies[: a.warmup]:  # untimed: first calls of the encoder and the search
                    w = c.post("/search", content=body, headers={"content-type": "application/json"})
                    if w.status_code != OK_SEARCH:
                        raise RuntimeError(f"warm-up POST /search ({kind}): {w.status_code} {w.text[:300]}")
                one = measured(Phase(url, headers, bodies, 1, a.duration, a.timeout), c, server)
                log(f"{kind}: one at a time {one['qps']} q/s, p50 {one['latency_ms']['p50']} ms")
                many = measured(Phase(url, headers, bodies, a.clients, a.duration, a.timeout), c, server)
                ratio = round(many["qps"] / one["qps"], 3) if one["qps"] and many["qps"] else None
                log(
                    f"{kind}: {a.clients} clients {many['qps']} q/s, p50 {many['latency_ms']['p50']} ms, "
                    f"mean batch {many['batches']['mean_size']}; ratio {ratio}"
                )
                runs[kind] = {"queries": len(bodies), "one_at_a_time": one, "concurrent": many, "ratio": ratio}
            out["runs"] = runs
            if a.writer:
                kind = a.kinds[0]
                wkind = a.writer_kind
                if wkind == "auto":
                    mods = search.get("modalities") or {}
                    wkind = "image" if mods and max(mods, key=mods.get) == "image" else "text"
                from pecm.data.layouts import default_data_dir

                pairs = writer_pairs(a.writer_data or default_data_dir(), wkind)
                phase = Phase(url, headers, pools[kind], a.clients, a.duration, a.timeout)
                w = Writer(a, url, headers, search, phase, wkind, pairs)
                phase.on_hits = w.on_hits
                res = measured(phase, c, server, extra=(w.write, w.check))
                res["query"] = kind
                res["writer"] = w.final(c)
                conc = runs[kind]["concurrent"]["qps"]
                res["qps_vs_concurrent"] = round(res["qps"] / conc, 3) if conc and res["qps"] else None
                log(
                    f"writer ({wkind}): readers {res['qps']} q/s, {res['writer']['items']} items ingested, "
                    f"violations {res['writer']['violations']}"
                )
                out["writer_phase"] = res
            out["indexes_after"] = c.get("/indexes").json()["indexes"]
    finally:
        out["phases_wall_s"] = round(time.perf_counter() - t_start, 3)
        if server is not None:
            rc = server.stop()
            out["server"] = {
                "started_here": True,
                "command": ["python" if x == sys.executable else x for x in cmd],
                "startup_s": round(server.startup_s, 3),
                "pecm_path": a.server_path,
                "exit_code": rc,
            }
            if rc != 0:
                out["server"]["stderr_tail"] = server.stderr()
        else:
            out["server"] = {"started_here": False, "url": url}
    return out


def log(msg: str) -> None:
    print(f"serve_load: {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    a = parse_args(argv)
    env = environment("cpu")
    env["cpu_tag"] = cpu_tag()
    env["nice"] = os.nice(0)
    env["client"] = "threads, one httpx.Client (one keep-alive connection) each, in this process"
    env["thread_env"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    import httpx

    try:
        res = run(a)
    except (httpx.HTTPError, OSError, RuntimeError, ValueError) as e:
        print(f"bench/serve_load.py: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    env["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    errors = sum(p[ph]["errors"] for p in res.get("runs", {}).values() for ph in ("one_at_a_time", "concurrent"))
    violations = 0
    if "writer_phase" in res:
        wp = res["writer_phase"]
        errors += wp["errors"] + wp["writer"]["errors"]
        violations = wp["writer"]["violations"]
    ok = errors == 0 and violations == 0 and res["server"].get("exit_code", 0) == 0
    settings = {
        k: getattr(a, k)
        for k in (
            "duration",
            "clients",
            "kinds",
            "search_index",
            "k",
            "pool",
            "warmup",
            "max_batch",
            "max_wait_ms",
            "max_k",
            "writer",
            "writer_kind",
            "writer_batch",
            "writer_pause",
            "random_prototypes",
        )
    }
    doc = {
        "benchmark": "bench/serve_load.py",
        "argv": list(sys.argv[1:] if argv is None else argv),
        "environment": env,
        "settings": settings,
        **res,
        "errors": errors,
        "violations": violations,
        "ok": ok,
    }
    text = json.dumps(doc, indent=1)
    out = a.out or os.path.join(HERE, "bench", "results", f"serve_load_cpu_{cpu_tag()}.json")
    if out == "-":
        print(text)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
        log(f"wrote {out}")
    for kind, r in res.get("runs", {}).items():
        o, m = r["one_at_a_time"], r["concurrent"]
        print(
            f"{kind:10s} one-at-a-time {o['qps']} q/s (p50 {o['latency_ms']['p50']} ms) | {a.clients} clients "
            f"{m['qps']} q/s (p50/p95/p99 {m['latency_ms']['p50']}/{m['latency_ms']['p95']}/"
            f"{m['latency_ms']['p99']} ms, mean batch {m['batches']['mean_size']}) | ratio {r['ratio']}"
        )
    if not ok:
        log(f"FAILED: {errors} errors, {violations} violations, server exit {res['server'].get('exit_code')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
