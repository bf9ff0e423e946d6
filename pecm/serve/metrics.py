"""Prometheus text exposition (format 0.0.4) of `pecm serve`, written by hand (no client library).

- ``pecm_requests_total{route, method, status}``: counter; ``route`` is the route template
  (``/items/{item_id}``), ``unmatched`` for paths without a route, so the label set stays bounded.
- ``pecm_request_duration_seconds{route}``: histogram of the time from the request reaching the app to the
  end of its response.
- ``pecm_search_batch_size``: histogram of the number of ``/search`` queries per micro-batch.
- ``pecm_index_items{index}``: gauge, live items of each served index at scrape time.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Dict, Sequence, Tuple

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(d: Dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in d.items()) + "}" if d else ""


def _num(x: float) -> str:
    return repr(float(x)) if x != int(x) else str(int(x))


class Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: Dict[str, str]) -> list:
        out = []
        for b, c in zip(self.buckets, self.counts):
            out.append(f"{name}_bucket{_labels({**labels, 'le': _num(b)})} {c}")
        out.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {self.count}")
        out.append(f"{name}_sum{_labels(labels)} {self.sum!r}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Dict[Tuple[str, str, int], int] = defaultdict(int)
        self.latency: Dict[str, Histogram] = {}
        self.batch = Histogram(BATCH_BUCKETS)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, method, int(status))] += 1
            h = self.latency.get(route)
            if h is None:
                h = self.latency[route] = Histogram(LATENCY_BUCKETS)
            h.observe(seconds)

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self.batch.observe(size)

    def render(self, index_items: Dict[str, int]) -> str:
        with self._lock:
            out = [
                "# HELP pecm_requests_total HTTP requests by route template, method and status.",
                "# TYPE pecm_requests_total counter",
            ]
            for (route, method, status), n in sorted(self.requests.items()):
                lab = _labels({"route": route, "method": method, "status": str(status)})
                out.append(f"pecm_requests_total{lab} {n}")
            out += [
                "# HELP pecm_request_duration_seconds Request latency by route template.",
                "# TYPE pecm_request_duration_seconds histogram",
            ]
            for route, h in sorted(self.latency.items()):
                out += h.lines("pecm_request_duration_seconds", {"route": route})
            out += [
                "# HELP pecm_search_batch_size Search queries per micro-batch.",
                "# TYPE pecm_search_batch_size histogram",
            ]
            out += self.batch.lines("pecm_search_batch_size", {})
        out += ["# HELP pecm_index_items Live items per served index.", "# TYPE pecm_index_items gauge"]
        for name, n in sorted(index_items.items()):
            out.append(f"pecm_index_items{_labels({'index': name})} {n}")
        return "\n".join(out) + "\n"
