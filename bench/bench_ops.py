"""pytest-benchmark benchmarks of the three ops for every CPU backend and the two issue-3 peers.

    .venv/bin/python -m pytest bench/bench_ops.py --benchmark-only                 # small: N=20000
    PECM_BENCH_FULL=1 .venv/bin/python -m pytest bench/bench_ops.py --benchmark-only   # N=200000 (issue 3)
    PECM_BENCH_N=50000 .venv/bin/python -m pytest bench/bench_ops.py --benchmark-only -k topk

Sizes: K=26, D=256, float16 storage, B in {1, 64}, M=1000 for rerank, top-10. Every implementation
is first checked against `pecm.reference` (`pecm.bench.peers.check`); a wrong one fails its test
instead of being timed. Each benchmark reports candidate pairs/s and GB/s of the op's work model in
``extra_info`` (shown with ``--benchmark-columns`` / saved with ``--benchmark-json``). These files are
not part of the default test run (pyproject testpaths = tests). bench/throughput.py is the script
that compares against the measured hardware ceilings and prints the issue-3 table.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pecm.backends import available_backends  # noqa: E402
from pecm.bench import peers  # noqa: E402
from pecm.bench.workload import make_candidates, make_workload, work_model  # noqa: E402

N = int(os.environ.get("PECM_BENCH_N", "200000" if os.environ.get("PECM_BENCH_FULL") == "1" else "20000"))
K, D, M, TOPK, DTYPE = 26, 256, 1000, 10, "float16"
IMPLS = [b for b in available_backends() if b != "triton"] + ["eager", "gemm"]


def _maker(name):
    return peers.PEERS[name][0] if name in peers.PEERS else peers.make_backend(name)


@pytest.fixture(scope="module")
def candidates():
    return make_candidates(N, K, D, dtype=DTYPE)


@pytest.fixture(scope="module")
def checked():
    """name -> (ok, message) of the reference check, computed once per implementation and op."""
    return {}


@pytest.mark.parametrize("b", [1, 64])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["topk", "rerank", "scores"])
def test_op(benchmark, candidates, checked, op, impl, b):
    key = (impl, op)
    if key not in checked:
        checked[key] = peers.check(_maker(impl), op, dtype=DTYPE)
    ok, msg = checked[key]
    assert ok, f"{impl} {op} disagrees with pecm.reference: {msg}"
    wl = make_workload(b, N, K, D, m=M if op == "rerank" else None, dtype=DTYPE, topk=TOPK, candidates=candidates)
    fn = _maker(impl)(op, wl)
    shape = {"B": b, "N": N, "K": K, "D": D, **({"M": M} if op == "rerank" else {})}
    model = work_model(op, shape, torch.empty((), dtype=torch.float16).element_size())
    benchmark.group = f"{op} B={b} N={N}"
    rounds = 3 if N >= 100000 else 5
    with torch.no_grad():
        out = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    assert out is not None
    if benchmark.stats is None:  # --benchmark-disable: the function ran once, nothing was timed
        return
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(shape=shape, pairs_per_s=model["pairs"] / t, GBps=model["bytes"] / t / 1e9)
