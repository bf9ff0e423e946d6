"""Archive index benchmark: add throughput, search latency/throughput, recall, sequential read, RSS.

    pecm bench index --n 1000000 --dir /data/scratch   # ~13.3 GB of float16 prototypes (K=26, D=256)
    pecm bench index --n 20000 --out /tmp/x.json       # quick smoke run
    python -m pecm.bench.index_bench ...               # the same; bench/bench_index.py in the source tree too

Builds a synthetic clustered index (items = cluster centre + noise; queries = noisy copies of
random items), measures ``ArchiveIndex.add`` throughput (data generation excluded), then in a fresh
child process (so ``ru_maxrss`` is the search's own peak) the time of one sequential read of
prototypes.bin and the exhaustive / two-stage / ann search latency at B = 1 and B = 64, cold and warm,
plus two-stage and ann recall@10 against exhaustive (the ANN is built after the adds: ``--ann``).

Side effects are limited to the benchmark's own files:

- the index is built in a fresh directory made by ``tempfile.mkdtemp`` under ``--dir`` (default: the
  system temporary directory, i.e. ``$TMPDIR`` or ``/tmp``), never in the source tree or the installed
  package, and that directory is removed at the end unless ``--keep``. Free space under it is checked
  before anything is built;
- "cold" reads are obtained by ``fsync`` + ``posix_fadvise(POSIX_FADV_DONTNEED)`` on each file of the
  benchmark's index, nothing else (no host-wide cache drop). Where the filesystem cannot evict
  (tmpfs, some overlay setups) the "cold" figures are warm ones: ``mincore`` measures the resident
  fraction of the index files after each eviction and the JSON records it (``cold_resident_fraction``,
  ``cold_is_warm``);
- the result JSON goes to ``--out`` (default ``./pecm-bench-index-<UTC time>.json``; ``--out -``: stdout
  only). An existing file is never overwritten without ``--force``.

Bad arguments raise ValueError naming the argument (``pecm bench index`` and the scripts: one
``error:`` line, exit code 2). Part of the installed package (``pecm bench index`` imports it); needs
only the base dependencies.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from .. import ops
from ..backends import get_backend
from ..index import ArchiveIndex
from ..index import format as fmt
from ..topk import RunningTopK
from .timing import cpu_model, git_commit

K, D = 26, 256
COLD_METHOD = "fsync + posix_fadvise(POSIX_FADV_DONTNEED) on each file of the benchmark's index"
WARM_RESIDENT = 0.5  # after an eviction, more than this fraction of the index pages resident: the "cold" run is warm


def _index_files(root: str) -> list:
    """Every regular file of the benchmark's own index directory."""
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.join(d, n) for n in sorted(names) if os.path.isfile(os.path.join(d, n))]
    return out


def _evict(paths) -> bool:
    """Write back and evict the given files (and only those) from the page cache; False without posix_fadvise."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):
        return None


def _resident_fraction(paths):
    """Fraction of the files' pages in the page cache (``mincore`` on a mapping that faults nothing in), or None."""
    libc = _libc()
    if libc is None:
        return None
    page = mmap.PAGESIZE
    total = resident = 0
    for p in paths:
        size = os.path.getsize(p)
        if size == 0:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                return None
            try:
                n = (size + page - 1) // page
                vec = np.zeros(n, dtype=np.uint8)
                if libc.mincore(addr, size, vec.ctypes.data) != 0:
                    return None
                resident += int(np.count_nonzero(vec & 1))
                total += n
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else None


def _cold(paths, fractions: list) -> None:
    """Evict ``paths`` and append the resident fraction measured afterwards to ``fractions``."""
    fractions.append(_resident_fraction(paths) if _evict(paths) else 1.0)


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
    pq_kw = (
        {
            "pq_m": args.pq_m,
            "pq_per_slot": args.pq_per_slot,
            "pq_coarse": args.pq_coarse,
            "pq_pooled": args.pq_pooled,
            "pq_scales": args.pq_scales,
        }
        if args.dtype == "pq"
        else {}
    )
    idx = ArchiveIndex.create(args.path, K, D, dtype=args.dtype, weights=w, **pq_kw)  # a fresh path
    add_s, gen_s, exact_s = 0.0, 0.0, 0.0
    qsrc = []
    qrng = np.random.default_rng(1)
    exact = qx = None
    for s in range(0, args.n, args.block):
        n = min(args.block, args.n - s)
        t = time.perf_counter()
        cid = torch.randint(0, args.clusters, (n,), generator=gen)
        x = torch.randn((n, K, D), generator=gen, out=noise[:n]).mul_(0.8).add_(centres[cid])
        if args.exact_recall and s == 0:  # every query from the first block, its noise from its own stream
            pick = qrng.integers(0, n, args.queries)
            qgen = torch.Generator().manual_seed(2)
            qx = (x[torch.from_numpy(pick)] + 0.3 * torch.randn((args.queries, K, D), generator=qgen)).numpy()
            qs = ops.prepare_queries(torch.from_numpy(qx), torch.from_numpy(w.astype(np.float32)))
            exact = RunningTopK(args.queries, args.k)
        elif not args.exact_recall:
            pick = qrng.integers(0, n, max(1, args.queries * args.block // max(args.n, 1) + 1))
            qsrc.append(x[torch.from_numpy(pick)].clone())
        gen_s += time.perf_counter() - t
        if exact is not None:  # exact float16 search of the same items (prototypes rounded to float16)
            t = time.perf_counter()
            cs = ops.prepare_candidates(x.half(), torch.from_numpy(w.astype(np.float32)))
            ev, ei = ops.pecm_topk(qs, cs, None, min(args.k, n))
            exact.add(ev, torch.where(ei >= 0, ei + s, ei))  # global row numbers (= ids: the index starts empty)
            exact_s += time.perf_counter() - t
        t = time.perf_counter()
        idx.add(x.numpy(), progress=False if args.no_progress else None)
        add_s += time.perf_counter() - t
    ann = None
    if args.ann == "auto":
        try:
            import faiss  # noqa: F401
        except ImportError:  # base install: no ANN (pip install "pecm[ann]")
            args.ann, ann = "none", {"skipped": "faiss is not installed (pip install 'pecm[ann]')"}
    if args.ann != "none":  # the FAISS first stage of mode="ann" over the pooled vectors
        t = time.perf_counter()
        entry = idx.build_ann(None if args.ann == "auto" else args.ann, progress=False if args.no_progress else None)
        ann = {"build_seconds": time.perf_counter() - t, **{k: entry[k] for k in ("kind", "params", "rows", "bytes")}}
    item_bytes = fmt.manifest_item_bytes(idx.manifest)
    idx.close()
    if exact is not None:
        q = qx
        np.save(args.query_file.replace(".npy", "_exact_ids.npy"), exact.result()[1].numpy())
    else:
        q = torch.cat(qsrc)[: args.queries]
        q = (q + 0.3 * torch.randn(q.shape, generator=gen)).numpy()
    np.save(args.query_file, q)
    size = os.path.getsize(os.path.join(args.path, "prototypes.bin"))
    disk = sum(os.path.getsize(p) for p in _index_files(args.path))
    return {
        "ann": ann,
        "index_bytes_on_disk": disk,
        "bytes_per_item_on_disk": disk / args.n,
        "data_bytes_per_item": {**item_bytes, "total": sum(item_bytes.values())},
        "n": args.n,
        "add_seconds": add_s,
        "add_items_per_s": args.n / add_s,
        "add_MB_per_s": size / add_s / 1e6,
        "synthetic_generation_seconds": gen_s,
        "exact_float16_reference_seconds": exact_s if exact is not None else None,
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
    q = np.load(args.query_file)
    exact_file = args.query_file.replace(".npy", "_exact_ids.npy")
    exact = np.load(exact_file) if os.path.exists(exact_file) else None
    files = _index_files(args.path)
    res = {"backend": get_backend("auto", torch.device("cpu"), torch.float16).name}
    res["cold"] = COLD_METHOD if hasattr(os, "posix_fadvise") else "none: no posix_fadvise on this platform"
    resident: list = []
    _cold(files, resident)
    t_read = _sequential_read(idx.paths["prototypes"])
    res["sequential_read_s"] = t_read
    res["sequential_read_GB_per_s"] = os.path.getsize(idx.paths["prototypes"]) / t_read / 1e9
    cs = args.chunk_size
    ex_b = [int(x) for x in args.exhaustive_batches.split(",") if x]
    for b in (1, 64):
        qb = q[:b]
        if b in ex_b:
            _cold(files, resident)
            t = time.perf_counter()
            idx.search(qb, args.k, chunk_size=cs, with_metadata=False)
            cold = time.perf_counter() - t
            warm, out = _timed(lambda qb=qb: idx.search(qb, args.k, chunk_size=cs, with_metadata=False), args.reps)
            res[f"exhaustive_B{b}"] = {"cold_s": cold, "warm_s": warm, "queries_per_s_warm": b / warm}
        else:  # not run (--exhaustive-batches): no exhaustive baseline at this batch size
            warm, out = float("nan"), None
        warm2, out2 = _timed(
            lambda qb=qb: idx.search(qb, args.k, mode="two_stage", shortlist=args.shortlist, with_metadata=False),
            args.reps,
        )
        res[f"two_stage_B{b}"] = {"warm_s": warm2, "queries_per_s_warm": b / warm2, "shortlist": args.shortlist}
        ex_ids, ts_ids = (None if out is None else out[1]), out2[1]
        if idx.manifest.get("ann"):
            ann_kw = dict(mode="ann", shortlist=args.shortlist, with_metadata=False)
            _cold(files, resident)
            t = time.perf_counter()
            idx.search(qb, args.k, **ann_kw)  # includes loading the ANN file (once per handle)
            cold_a = time.perf_counter() - t
            warm3, out3 = _timed(lambda qb=qb, kw=ann_kw: idx.search(qb, args.k, **kw), max(args.reps, 3))
            hits = [len(set(a.tolist()) & set(c.tolist())) for a, c in zip(ex_ids, out3[1])] if out else [np.nan]
            res[f"ann_B{b}"] = {
                "cold_s_incl_ann_load": cold_a,
                "warm_s": warm3,
                "queries_per_s_warm": b / warm3,
                "shortlist": args.shortlist,
                f"recall_at_{args.k}_vs_exhaustive": None if out is None else float(np.mean(hits) / args.k),
                "speedup_vs_exhaustive_warm": None if out is None else warm / warm3,
            }
    idx.close()
    # resident fraction of the index files right after each eviction (mincore); None where it cannot be measured
    res["cold_resident_fraction"] = None if None in resident else max(resident)
    res["cold_is_warm"] = None if None in resident else max(resident) > WARM_RESIDENT
    if "exhaustive_B1" in res:
        res["exhaustive_B1_over_sequential_read_cold"] = res["exhaustive_B1"]["cold_s"] / t_read
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ex_ids, ts_ids)] if ex_ids is not None else [np.nan]
    res["two_stage_recall_at_k_vs_exhaustive"] = None if ex_ids is None else float(np.mean(hits) / args.k)
    if exact is not None:  # --exact-recall: against exact float16 search of the same items (all queries)
        res[f"recall_at_{args.k}_vs_exact_float16"] = _recall_vs_exact(args, exact, q)
    res["queries"] = int(min(64, q.shape[0]))
    # VmHWM of this (exec'ed) process; ru_maxrss would include the parent's RSS at fork time on Linux
    res["peak_rss_MiB_search_process"] = _vm_hwm_mib()
    res["ru_maxrss_MiB_includes_parent_at_fork"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def _recall_vs_exact(args, exact: np.ndarray, q: np.ndarray) -> dict:
    idx = ArchiveIndex.open(args.path)
    out = {}
    modes = [("two_stage", {"shortlist": args.shortlist})]
    if "64" in args.exhaustive_batches.split(","):  # (exhaustive over all queries: as slow as its B = 64 run)
        modes.insert(0, ("exhaustive", {}))
    if idx.manifest.get("ann"):
        modes.append(("ann", {"shortlist": args.shortlist}))
    for mode, kw in modes:
        _, ids, _ = idx.search(q, args.k, mode=mode, with_metadata=False, **kw)
        hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, exact)]
        out[mode] = float(np.mean(hits) / args.k)
    idx.close()
    return out


def _child_command(args) -> list:
    """The search phase in a fresh interpreter that imports this same pecm (not one the child's cwd would shadow)."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = f"import sys; sys.path[0] = {pkg_parent!r}; from pecm.bench.index_bench import main; sys.exit(main())"
    cmd = [sys.executable, "-c", code, "--phase", "search", "--path", args.path, "--query-file", args.query_file]
    cmd += ["--k", str(args.k), "--shortlist", str(args.shortlist), "--reps", str(args.reps)]
    cmd += ["--exhaustive-batches", args.exhaustive_batches]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    return cmd


def _fs_type(path: str) -> str:
    """Filesystem type of the mount holding ``path`` (from /proc/self/mounts), or "unknown"."""
    best, kind = "", "unknown"
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


class _Parser(argparse.ArgumentParser):
    """Bad arguments raise ValueError (one line, naming the argument) instead of printing usage and exiting."""

    def error(self, message):
        raise ValueError(message)


def _parser(prog) -> argparse.ArgumentParser:
    ap = _Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="items in the synthetic index (default 1000000)")
    ap.add_argument(
        "--dir",
        default=None,
        help="existing directory in which the run makes (and removes, unless --keep) its own fresh index folder "
        "(default: the system temporary directory, $TMPDIR or /tmp)",
    )
    ap.add_argument("--dtype", default="float16", choices=fmt.DTYPES)
    ap.add_argument("--pq-m", type=int, default=None, help="dtype pq: codes per prototype (default D/4)")
    ap.add_argument("--pq-pooled", choices=fmt.PQ_POOLED, default=None, help="dtype pq: pooled storage (default int8)")
    ap.add_argument("--pq-scales", choices=fmt.PQ_SCALES, default=None, help="dtype pq: scales (default float16)")
    ap.add_argument("--pq-per-slot", action="store_true", help="dtype pq: one codebook per slot")
    ap.add_argument("--pq-coarse", type=int, default=None, help="dtype pq: residual stages before the PQ codes")
    ap.add_argument(
        "--exact-recall",
        action="store_true",
        help="also measure recall@k against exact float16 search of the same items (queries from the first block)",
    )
    ap.add_argument("--block", type=int, default=65536, help="items per add() call")
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--shortlist", type=int, default=1000)
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument(
        "--ann",
        default="auto",
        choices=("auto", "none", "flat", "ivf_flat", "ivf_pq", "hnsw"),
        help="ANN first stage built after the adds (auto: kind chosen from N, skipped without faiss; none: no ann)",
    )
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument(
        "--exhaustive-batches",
        default="1,64",
        help="batch sizes whose exhaustive search is timed (default 1,64; the others run once, for recall)",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="result JSON (default ./pecm-bench-index-<UTC time>.json; '-': stdout only); never overwritten "
        "without --force",
    )
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    ap.add_argument("--keep", action="store_true", help="keep the index folder afterwards (its path is printed)")
    ap.add_argument(
        "--no-progress", action="store_true", help="no progress bars (default: only when stderr is a terminal)"
    )
    ap.add_argument("--phase", choices=("all", "search"), default="all", help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)  # the search phase's index (set by the parent)
    ap.add_argument("--query-file", default=None, help=argparse.SUPPRESS)
    return ap


def _check_args(args) -> None:
    if args.path is not None or args.query_file is not None:
        raise ValueError("--path: no longer an option; --dir DIR chooses where the run makes its own index folder")
    for name in ("n", "block", "clusters", "queries", "k", "shortlist", "reps", "chunk_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {v}")
    if args.dir is not None and not os.path.isdir(args.dir):
        raise ValueError(f"--dir: {args.dir!r} is not an existing directory")


def _out_path(args):
    """The result file (None: stdout only), checked before anything is built."""
    if args.out == "-":
        return None
    out = args.out or time.strftime("pecm-bench-index-%Y%m%dT%H%M%SZ.json", time.gmtime())
    out = os.path.abspath(out)
    if os.path.isdir(out):
        raise ValueError(f"--out: {out!r} is a directory; give a file name")
    if os.path.lexists(out) and not args.force:
        raise FileExistsError(f"--out: {out!r} already exists; pass --force to overwrite it or choose another --out")
    existing = os.path.dirname(out)
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK):
        raise ValueError(f"--out: cannot create {out!r} ({existing!r} is not writable)")
    return out


def bytes_needed(n: int, dtype: str, queries: int, pq_m=None, pq_coarse=None, pq_pooled=None, pq_scales=None) -> int:
    """Disk space one run needs: the index files plus 5% and a little for the manifest, metadata and queries."""
    m, store = 0, {}
    if dtype == "pq":
        from .. import pq

        m = (pq.default_m(D) if pq_m is None else pq_m) + (pq.DEFAULT_COARSE if pq_coarse is None else pq_coarse)
        store = {"pq_pooled": pq_pooled or fmt.PQ_POOLED[0], "pq_scales": pq_scales or fmt.PQ_SCALES[0]}
    per_item = sum(fmt.item_bytes(K, D, dtype, m, **store).values())
    return int(n * per_item * 1.05) + queries * K * D * 4 + (16 << 20)


def _check_space(args, base: str) -> None:
    need = bytes_needed(args.n, args.dtype, args.queries, args.pq_m, args.pq_coarse, args.pq_pooled, args.pq_scales)
    free = shutil.disk_usage(base).free
    if need > free:
        where = "--dir" if args.dir is not None else "the temporary directory; --dir chooses another"
        raise ValueError(
            f"--n {args.n}: the index needs ~{need / 1e9:.2f} GB but {base!r} ({where}) has {free / 1e9:.2f} GB "
            "free; use a smaller --n or a --dir with more space"
        )


def run(argv=None, prog=None) -> int:
    """Run the benchmark; bad arguments raise ValueError / FileExistsError naming the argument."""
    args = _parser(prog).parse_args(argv)
    if args.phase == "search":
        print(json.dumps(search_phase(args)))
        return 0
    _check_args(args)
    out = _out_path(args)
    base = os.path.abspath(args.dir if args.dir is not None else tempfile.gettempdir())
    _check_space(args, base)
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
        "argv": sys.argv[1:] if argv is None else list(argv),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "index_fs_type": _fs_type(base),
    }
    work = tempfile.mkdtemp(prefix="pecm-bench-index-", dir=base)
    args.path, args.query_file = os.path.join(work, "index"), os.path.join(work, "queries.npy")
    try:
        result["add"] = build(args)
        print(json.dumps(result["add"]), flush=True)
        child = subprocess.run(_child_command(args), capture_output=True, text=True)
        if child.returncode != 0:
            raise RuntimeError(
                f"index bench: the search phase failed (exit {child.returncode}):\n{child.stderr[-4000:]}"
            )
        result["search"] = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        if args.keep:
            print(f"index bench: kept the index at {args.path}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.keep:
        result["kept_index"] = args.path
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if out is not None:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w" if args.force else "x") as f:
            f.write(text + "\n")
        print(f"index bench: wrote {out}", file=sys.stderr)
    return 0


def main(argv=None, prog=None) -> int:
    """`run` for the command-line entry points: bad input prints one ``error:`` line and returns 2."""
    prog = prog or "python -m pecm.bench.index_bench"
    try:
        return run(argv, prog=prog)
    except (ValueError, TypeError, FileExistsError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
