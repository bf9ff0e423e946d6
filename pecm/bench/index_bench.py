"""Archive index benchmark: add throughput, search latency/throughput, recall, sequential read, RSS.

    pecm bench index --n 1000000                 # ~13.3 GB of float16 prototypes (K=26, D=256)
    pecm bench index --n 20000 --out /tmp/x.json # quick smoke run
    python -m pecm.bench.index_bench ...         # the same; bench/bench_index.py in the source tree too

Builds a synthetic clustered index (items = cluster centre + noise; queries = noisy copies of
random items), measures ``ArchiveIndex.add`` throughput (data generation excluded), then in a fresh
child process (so ``ru_maxrss`` is the search's own peak) the time of one sequential read of
prototypes.bin and the exhaustive / two-stage search latency at B = 1 and B = 64, cold (page cache of
the index files dropped with ``posix_fadvise(DONTNEED)``) and warm, plus two-stage recall@10 against
exhaustive. Writes JSON (device, CPU, versions, git commit, numbers) and deletes the index unless
``--keep``. Default paths are relative to the current directory (``bench/_index_bench_tmp``,
``bench/results/index_cpu.json``: from the repository root, the same files as ``bench/bench_index.py``).

Part of the installed package (``pecm bench index`` imports it); needs only the base dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from .. import ops
from ..backends import get_backend
from ..index import ArchiveIndex
from .timing import cpu_model, git_commit

K, D = 26, 256


def _drop_cache(paths) -> str:
    """Evict the index files from the page cache; returns the method that worked."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        pass
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise_dontneed"


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _sequential_read(path: str, block: int = 64 << 20) -> float:
    buf = bytearray(block)
    view = memoryview(buf)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return time.perf_counter() - t


def build(args) -> dict:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn((args.clusters, K, D), generator=gen)
    noise = torch.empty((args.block, K, D))
    w = torch.softmax(torch.randn(K, generator=gen), 0).numpy() * K
    idx = ArchiveIndex.create(args.path, K, D, dtype=args.dtype, weights=w, overwrite=True)
    add_s, gen_s = 0.0, 0.0
    qsrc = []
    qrng = np.random.default_rng(1)
    for s in range(0, args.n, args.block):
        n = min(args.block, args.n - s)
        t = time.perf_counter()
        cid = torch.randint(0, args.clusters, (n,), generator=gen)
        x = torch.randn((n, K, D), generator=gen, out=noise[:n]).mul_(0.8).add_(centres[cid])
        pick = qrng.integers(0, n, max(1, args.queries * args.block // max(args.n, 1) + 1))
        qsrc.append(x[torch.from_numpy(pick)].clone())
        gen_s += time.perf_counter() - t
        t = time.perf_counter()
        idx.add(x.numpy(), progress=not args.no_progress)
        add_s += time.perf_counter() - t
    idx.close()
    q = torch.cat(qsrc)[: args.queries]
    q = (q + 0.3 * torch.randn(q.shape, generator=gen)).numpy()
    np.save(os.path.join(args.path, "bench_queries.npy"), q)
    size = os.path.getsize(os.path.join(args.path, "prototypes.bin"))
    return {
        "n": args.n,
        "add_seconds": add_s,
        "add_items_per_s": args.n / add_s,
        "add_MB_per_s": size / add_s / 1e6,
        "synthetic_generation_seconds": gen_s,
        "prototypes_bytes": size,
    }


def _timed(fn, reps: int):
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def search_phase(args) -> dict:
    idx = ArchiveIndex.open(args.path)
    q = np.load(os.path.join(args.path, "bench_queries.npy"))
    files = [idx.paths[k] for k in ("prototypes", "pooled", "masks", "ids")]
    res = {"backend": get_backend("auto", torch.device("cpu"), torch.float16).name}
    res["drop_cache_method"] = _drop_cache(files)
    t_read = _sequential_read(idx.paths["prototypes"])
    res["sequential_read_s"] = t_read
    res["sequential_read_GB_per_s"] = os.path.getsize(idx.paths["prototypes"]) / t_read / 1e9
    cs = args.chunk_size
    for b in (1, 64):
        qb = q[:b]
        _drop_cache(files)
        t = time.perf_counter()
        idx.search(qb, args.k, chunk_size=cs, with_metadata=False)
        cold = time.perf_counter() - t
        warm, out = _timed(lambda qb=qb: idx.search(qb, args.k, chunk_size=cs, with_metadata=False), args.reps)
        res[f"exhaustive_B{b}"] = {"cold_s": cold, "warm_s": warm, "queries_per_s_warm": b / warm}
        warm2, out2 = _timed(
            lambda qb=qb: idx.search(qb, args.k, mode="two_stage", shortlist=args.shortlist, with_metadata=False),
            args.reps,
        )
        res[f"two_stage_B{b}"] = {"warm_s": warm2, "queries_per_s_warm": b / warm2, "shortlist": args.shortlist}
        ex_ids, ts_ids = out[1], out2[1]
    res["exhaustive_B1_over_sequential_read_cold"] = res["exhaustive_B1"]["cold_s"] / t_read
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ex_ids, ts_ids)]
    res["two_stage_recall_at_k_vs_exhaustive"] = float(np.mean(hits) / args.k)
    res["queries"] = int(min(64, q.shape[0]))
    # VmHWM of this (exec'ed) process; ru_maxrss would include the parent's RSS at fork time on Linux
    res["peak_rss_MiB_search_process"] = _vm_hwm_mib()
    res["ru_maxrss_MiB_includes_parent_at_fork"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def _child_command(args) -> list:
    """The search phase in a fresh interpreter that imports this same pecm (not one the child's cwd would shadow)."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = f"import sys; sys.path[0] = {pkg_parent!r}; from pecm.bench.index_bench import main; sys.exit(main())"
    cmd = [sys.executable, "-c", code, "--phase", "search", "--path", args.path, "--k", str(args.k)]
    cmd += ["--shortlist", str(args.shortlist), "--reps", str(args.reps)]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    return cmd


def main(argv=None, root=None, prog=None) -> int:
    """Run the benchmark; ``root`` (default: the current directory) anchors the default --path and --out."""
    root = os.getcwd() if root is None else root
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="items in the synthetic index")
    ap.add_argument(
        "--path", default=os.path.join(root, "bench", "_index_bench_tmp"), help="index directory (deleted afterwards)"
    )
    ap.add_argument("--dtype", default="float16", choices=("float16", "float32", "int8"))
    ap.add_argument("--block", type=int, default=65536, help="items per add() call")
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--shortlist", type=int, default=1000)
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(root, "bench", "results", "index_cpu.json"), help="result JSON")
    ap.add_argument("--keep", action="store_true", help="keep the index directory afterwards")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--phase", choices=("all", "search"), default="all", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase == "search":
        print(json.dumps(search_phase(args)))
        return 0
    parent = os.path.dirname(os.path.abspath(args.path))
    existing = parent
    while not os.path.isdir(existing):  # the default bench/ folder need not exist outside the source tree
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    need = args.n * (K * D * 2 + D * 2 + K + 8) * 1.05
    if need > free:
        raise SystemExit(f"--n {args.n}: needs ~{need / 1e9:.1f} GB, only {free / 1e9:.1f} GB free")
    result = {
        "benchmark": "pecm.bench.index_bench",
        "device": "cpu",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "available_backends": ops.available_backends(),
        "git_commit": git_commit(),
        "K": K,
        "D": D,
        "dtype": args.dtype,
        "k": args.k,
        "argv": sys.argv[1:] if argv is None else argv,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        result["add"] = build(args)
        print(json.dumps(result["add"]), flush=True)
        child = subprocess.run(_child_command(args), capture_output=True, text=True)
        if child.returncode != 0:
            raise RuntimeError(
                f"index bench: the search phase failed (exit {child.returncode}):\n{child.stderr[-4000:]}"
            )
        out = child.stdout
        result["search"] = json.loads(out.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(args.path, ignore_errors=True)
            if existing != parent:  # remove the folders this run created for the index, if empty
                try:
                    os.removedirs(parent)
                except OSError:
                    pass
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m pecm.bench.index_bench"))
