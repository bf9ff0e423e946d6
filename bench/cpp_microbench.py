"""Micro-benchmark of the C++ CPU backend (`pecm._C`) on canonical operands.

Compares, at K=26, D=256 (defaults) and fp16 storage:
  * memory bandwidth of this machine (large torch copy: read + write bytes / time, and a read-only sum),
  * cpp exhaustive top-k at B=1 (bandwidth-bound) and B=64 (compute-bound),
  * the torch backend (eager, chunked) and a chunked GEMM formulation `(qw @ c[s:e].float().T)` + topk,
  * cpp rerank over M gathered candidates per query.

Usage: python bench/cpp_microbench.py [--n 200000] [--batches 1 64] [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from pecm import _C
from pecm.backends.cpp_backend import CppBackend
from pecm.backends.torch_backend import TorchBackend


def best_of(fn, repeat):
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def bandwidth(gib=2.0, repeat=3):
    n = int(gib * 2**30 / 4)
    a = torch.ones(n)
    b = torch.empty(n)
    t_copy = best_of(lambda: b.copy_(a), repeat)
    t_sum = best_of(lambda: a.sum(), repeat)
    return {"copy_GBps": 2 * n * 4 / t_copy / 1e9, "read_sum_GBps": n * 4 / t_sum / 1e9}


def gemm_topk(qw, qden, qp, c, cm, cp, k, chunk=8192):
    """The obvious fast torch formulation: per chunk, fp16 -> fp32 then GEMMs, epilogue, topk, merge."""
    vals = ids = None
    qsum = qden.sum(1, keepdim=True)
    for s in range(0, c.shape[0], chunk):
        e = min(c.shape[0], s + chunk)
        num = qw @ c[s:e].float().T
        sim = qp @ cp[s:e].float().T
        conf = torch.where(qsum > 0, num / qsum, torch.zeros_like(num))
        v, i = torch.topk(sim * conf, min(k, e - s), dim=1)
        i = i + s
        if vals is not None:
            v, pos = torch.topk(torch.cat([vals, v], 1), min(k, vals.shape[1] + v.shape[1]), dim=1)
            i = torch.gather(torch.cat([ids, i], 1), 1, pos)
        vals, ids = v, i
    return vals, ids


def make(n, b, k, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.empty(n, k * d, dtype=dtype)
    for s in range(0, n, 8192):  # unit prototypes, generated in chunks
        x = torch.randn(min(8192, n - s), k, d, generator=g)
        c[s : s + 8192] = torch.nn.functional.normalize(x, dim=-1).reshape(-1, k * d).to(dtype)
    cp = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1).to(dtype)
    q = torch.nn.functional.normalize(torch.randn(b, k, d, generator=g), dim=-1)
    w = torch.ones(k)
    qw = (q * w.view(1, k, 1)).reshape(b, k * d)
    qden = w.expand(b, k).contiguous()
    qp = torch.nn.functional.normalize(q.sum(1), dim=-1)
    return qw, qden, qp, c, None, cp


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--k-protos", type=int, default=26)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--m", type=int, default=1000, help="candidates per query for rerank")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-eager", action="store_true", help="skip the slow eager torch backend timing")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    res = {
        "machine": platform.processor() or platform.machine(),
        "threads": _C.max_threads(),
        "torch_threads": torch.get_num_threads(),
        "simd": _C.simd_level(),
        "bandwidth": bandwidth(repeat=a.repeat),
        "runs": [],
    }
    print(res)
    cpp, eager = CppBackend(), TorchBackend()
    bmax = max(a.batches)
    ops_all = make(a.n, bmax, a.k_protos, a.d, torch.float16)
    c_bytes = ops_all[3].numel() * 2 + ops_all[5].numel() * 2
    for b in a.batches:
        qw, qden, qp, c, cm, cp = ops_all
        ops = (qw[:b].contiguous(), qden[:b].contiguous(), qp[:b].contiguous(), c, cm, cp)
        row = {"B": b, "N": a.n, "bytes_GB": c_bytes / 1e9}
        row["cpp_s"] = best_of(lambda ops=ops: cpp.topk(*ops, a.topk, "score", None), a.repeat)
        row["cpp_GBps"] = c_bytes / row["cpp_s"] / 1e9
        row["gemm_s"] = best_of(lambda ops=ops: gemm_topk(*ops, a.topk), a.repeat)
        if not a.skip_eager:
            row["eager_s"] = best_of(lambda ops=ops: eager.topk(*ops, a.topk, "score", None), 1)
        v1, i1 = cpp.topk(*ops, a.topk, "score", None)
        v2, _ = gemm_topk(*ops, a.topk)
        row["max_abs_diff_vs_gemm"] = float((v1 - v2).abs().max())
        print(row)
        res["runs"].append(row)
    # rerank: M random candidate rows per query
    for b in a.batches:
        qw, qden, qp, c, cm, cp = ops_all
        ops = (qw[:b].contiguous(), qden[:b].contiguous(), qp[:b].contiguous(), c, cm, cp)
        # fresh random ids every call, so the gathered rows are not already in the last-level cache
        t = best_of(lambda ops=ops, b=b: cpp.rerank(*ops, torch.randint(0, a.n, (b, a.m)), a.topk, "score"), a.repeat)
        gathered = b * a.m * (c.shape[1] + cp.shape[1]) * 2
        row = {"rerank_B": b, "M": a.m, "cpp_s": t, "gathered_GBps": gathered / t / 1e9}
        print(row)
        res["runs"].append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
