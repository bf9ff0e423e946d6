"""Exhaustive pq scan throughput of the cpp backend (`pecm.pq.pq_topk`, top-10 by score) in pairs per second,
at B = 1 and B = 64 queries per call, on random unit prototypes coded with the default pq index settings
(K = 26, D = 256, M = 64, one coarse stage, shared codebook). Candidates are in memory: this times the
kernel, not the disk (`pecm bench index` times whole searches).

    python bench/pq_scan.py [--n 20000] [--out bench/results/pq_scan_cpu_zen4.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pecm import ops, pq  # noqa: E402
from pecm.bench.timing import cpu_model, git_commit  # noqa: E402

K, D = 26, 256


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "pq_scan_cpu_zen4.json"))
    a = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((a.n, K, D), generator=g)
    x = (x / x.norm(dim=-1, keepdim=True)).numpy()
    cb = pq.train(x[: min(a.n, 4000)], None, a.m, False, coarse=pq.DEFAULT_COARSE)
    codes, scales = pq.encode(x, None, cb)
    pooled = torch.nn.functional.normalize(torch.from_numpy(x).sum(1), dim=-1)
    w = torch.ones(K)
    cs = pq.PQCandidates(torch.from_numpy(codes), torch.from_numpy(scales), pooled, None, w)
    res = {
        "benchmark": "bench/pq_scan.py",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "n": a.n,
        "K": K,
        "D": D,
        "codes_per_prototype": cb.codes,
        "table_bytes_per_query": 4 * K * cb.codes * pq.KSUB,
        "runs": [],
    }
    for b in (1, 64):
        qs = ops.prepare_queries(torch.randn((b, K, D), generator=g), w)
        table = pq.lut(qs, cb)
        pq.pq_topk(qs, table, cs, 10, backend="cpp")  # warm-up
        best = min(_time(lambda qs=qs, t=table: pq.pq_topk(qs, t, cs, 10, backend="cpp")) for _ in range(a.reps))
        run = {
            "B": b,
            "seconds": best,
            "pairs_per_s": b * a.n / best,
            "table_gathers_per_s": b * a.n * K * cb.codes / best,
        }
        res["runs"].append(run)
        print(f"B = {b}: {best * 1e3:.1f} ms, {run['pairs_per_s'] / 1e6:.2f} M pairs/s", flush=True)
    with open(a.out, "w") as f:
        f.write(json.dumps(res, indent=1) + "\n")
    print(f"pq_scan: wrote {a.out}", file=sys.stderr)
    return 0


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    sys.exit(main())
