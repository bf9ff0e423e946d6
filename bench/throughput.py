"""Throughput of pecm_topk / pecm_rerank (and optionally pecm_scores) for every backend against peers.

The issue-3 measurement, a thin wrapper over `pecm.bench` (the engine of `pecm bench`):

    python bench/throughput.py                     # topk + rerank, B=1,64, N=200000, K=26, D=256, float16, M=1000
    python bench/throughput.py --ops topk,rerank,scores --readme   # + rewrite the tables in bench/README.md
    python bench/throughput.py --from bench/results/ops_cpu.json --readme   # tables from a saved run, no timing
    python bench/throughput.py --device cuda       # GPU: backends torch,triton -> bench/results/ops_cuda.json

Peers measured in the same run (each checked against `pecm.reference` before it gets a time):
(a) ``eager`` the obvious code ([B, chunk, K] cosines per chunk, then torch.topk), (b) ``gemm`` the
weights folded into one GEMM over K*D plus one over D, then torch.topk, plus ``compile``
(torch.compile of (a)) and ``faiss`` (flat inner product over the pooled vectors: a lower bound with
K+1 times less work); ``--peers ...,numpy`` adds the NumPy peer (left out by default: it is the
slowest and adds minutes). Slow calls get fewer repeats (>= 3, ``--budget``). The hardware
ceilings (copy bandwidth, float32 GEMM rate) are measured in each op's run; every row prints its
fraction of them. The issue-3 targets are printed as met / not met. Writes one JSON (a bundle of
`pecm.bench` results, each valid against `pecm.bench.schema`) and PNG plots. On a shared machine
run it under the heavy-run lock: ``flock /tmp/pecm-heavy.lock python bench/throughput.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pecm.bench import runner  # noqa: E402
from pecm.bench.plots import all_plots  # noqa: E402
from pecm.bench.report import load_bundle, replace_marked_block  # noqa: E402
from pecm.bench.schema import validate  # noqa: E402

README = os.path.join(ROOT, "bench", "README.md")


def markers(device: str):
    """The README block of one device kind: <!-- throughput:cpu:begin --> ... <!-- throughput:cpu:end -->."""
    dev = device.split(":")[0]
    return f"<!-- throughput:{dev}:begin -->", f"<!-- throughput:{dev}:end -->"


# issue 3, for the cpp backend on the CPU: (op, B, peer or "bw", minimum)
TARGETS = [
    ("topk", 1, "eager", 5.0),
    ("topk", 1, "gemm", 1.0),
    ("topk", 1, "bw", 0.5),
    ("topk", 64, "eager", 2.0),
    ("topk", 64, "gemm", 0.8),
    ("rerank", 1, "bw", 0.5),
    ("rerank", 64, "bw", 0.5),
]


def _row(runs, op, b, impl):
    for res in runs:
        for r in res["measurements"]:
            if r["op"] == op and r["shape"]["B"] == b and r["impl"] == impl and r["status"] == "ok":
                return r
    return None


def targets(runs, backend="cpp"):
    """[(description, measured, target, met or None)] for the issue-3 targets."""
    out = []
    for op, b, what, need in TARGETS:
        r = _row(runs, op, b, backend)
        if what == "bw":
            desc = f"{backend} {op} B={b}: fraction of copy bandwidth >= {need:.0%}"
            got = None if r is None else r["frac_bw"]
        else:
            desc = f"{backend} {op} B={b}: speed vs peer ({what}) >= {need:g}x"
            got = None if r is None else r.get("speedup_vs", {}).get(what)
        out.append((desc, got, need, None if got is None else got >= need))
    return out


def targets_table(runs, backend="cpp") -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for desc, got, _need, met in targets(runs, backend):
        shown = "not measured" if got is None else (f"{got:.0%}" if "fraction" in desc else f"{got:.2f}x")
        lines.append(f"| {desc} | {shown} | {'-' if met is None else ('yes' if met else 'NO')} |")
    return "\n".join(lines)


def issue_table(runs) -> str:
    """The issue-3 view: per op and B, each implementation's pairs/s, GB/s, GFLOP/s, fractions of the
    ceilings and the speed relative to peers (a) eager and (b) gemm and to the fastest exact peer."""
    hdr = "| op | B | impl | ms (IQR) | Mpairs/s | GB/s | GFLOP/s | % bw | % flop | x (a) eager | x (b) gemm "
    hdr += "| x fastest |"
    lines = [hdr, "|" + "---|" * 12]
    for res in runs:
        for r in res["measurements"]:
            b = r["shape"]["B"] if "M" not in r["shape"] else f"{r['shape']['B']} (M={r['shape']['M']})"
            if r["status"] != "ok":
                lines.append(f"| {r['op']} | {b} | {r['impl']} | {r['status']}: {r.get('reason', '')[:60]} |")
                continue
            sv = r.get("speedup_vs", {})
            f = r.get("ratio_vs_fastest_peer")
            cells = [
                r["op"], b, r["impl"], f"{r['median_s'] * 1e3:.1f} ({r['iqr_s'] * 1e3:.1f})",
                f"{r['pairs_per_s'] / 1e6:.2f}",
                f"{r['GBps']:.2f}", f"{r['GFLOPs']:.1f}", f"{100 * r['frac_bw']:.0f}", f"{100 * r['frac_flops']:.0f}",
                f"{sv['eager']:.2f}" if "eager" in sv else "-", f"{sv['gemm']:.2f}" if "gemm" in sv else "-",
                "-" if f is None else f"{f:.2f} ({r['fastest_peer']})",
            ]  # fmt: skip
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def readme_block(bundle) -> str:
    runs = bundle["runs"]
    env = runs[0]["environment"]
    begin, end = markers(env["device"])
    loads = ", ".join(
        f"{r['op']} {r['environment']['loadavg_1min_start']:.2f} -> {r['environment'].get('loadavg_1min_end', -1):.2f}"
        for r in runs
    )
    ceils = ", ".join(
        f"{r['op']} {r['ceilings']['copy_GBps']:.1f} GB/s / {r['ceilings']['matmul_GFLOPs']:.1f} GFLOP/s" for r in runs
    )
    s = runs[0]["settings"]
    parts = [
        begin,
        f"Measured {env['time_utc']} on {env['device_name']} ({env['cpu_count']} cores, device {env['device']}), "
        f"commit `{env['git_commit'][:12]}`, torch {env['versions']['torch']}, {s['dtype']} storage, top-{s['topk']}, "
        f"{s['repeats']} repeats after {s['warmup']} warm-up"
        + (f" (>= 3 when slower than a {s['budget_s']:g} s budget). " if s.get("budget_s") else ". ")
        + f"Command: `{bundle['command']}` ({bundle['wall_s'] / 60:.1f} min).",
        "",
        f"1-minute load average (start -> end of each op): {loads}. Ceilings measured in each op's run "
        f"(copy bandwidth / fp32 GEMM): {ceils}.",
        "",
        "x P = time of peer P / time of the row (> 1: the row is faster); x fastest: against the fastest exact "
        "peer (faiss does K+1 times less work and is not counted); % bw / % flop: fractions of the ceilings.",
        "",
        issue_table(runs),
        "",
        "Targets (issue 3, cpp backend):",
        "",
        targets_table(runs),
        end,
    ]
    return "\n".join(parts)


def update_readme(bundle, path=None) -> None:
    begin, end = markers(bundle["runs"][0]["environment"]["device"])
    replace_marked_block(path or README, begin, end, readme_block(bundle))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", default="topk,rerank", help="comma list of topk, rerank, scores")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default=None, help="comma list (default torch,cpp on cpu; torch,triton on cuda)")
    ap.add_argument(
        "--peers",
        default="eager,gemm,compile,faiss",
        help="comma list; numpy (the slowest peer here, +3 min at N=200000) is left out unless named",
    )
    ap.add_argument("--n", default="200000", help="N values (comma list)")
    ap.add_argument("--b", default="1,64", help="B values (comma list)")
    ap.add_argument("--m", default="1000", help="M values for rerank (comma list)")
    ap.add_argument("--kp", type=int, default=26, help="prototypes per item (K)")
    ap.add_argument("--d", type=int, default=256, help="prototype dimension (D)")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds per implementation and point (>= 3 repeats)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/ops_<device>.json)")
    ap.add_argument("--plots", default=None, help="plot directory (default bench/results/plots_<device>)")
    ap.add_argument("--from", dest="from_json", default=None, help="print/regenerate from a saved JSON, no timing")
    ap.add_argument("--readme", action="store_true", help="rewrite this device's block of bench/README.md")
    ap.add_argument("--quick-ceilings", action="store_true", help="small ceiling buffers (smoke runs only)")
    args = ap.parse_args(argv)
    dev = args.device.split(":")[0]
    out = args.out or os.path.join(ROOT, "bench", "results", f"ops_{dev}.json")
    plots = args.plots or os.path.join(ROOT, "bench", "results", f"plots_{dev}")
    if args.from_json:
        bundle = load_bundle(args.from_json)
    else:
        backends = args.backend or ("torch,cpp" if dev == "cpu" else "torch,triton")
        sweep = runner.parse_sweep(f"N={args.n} B={args.b} M={args.m} K={args.kp} D={args.d}")
        t0 = time.time()
        runs = []
        for op in [o.strip() for o in args.ops.split(",") if o.strip()]:
            runs.append(
                runner.run_benchmark(
                    op, device=args.device, backends=backends.split(","), peers=args.peers.split(","), sweep=sweep,
                    dtype=args.dtype, repeats=args.repeats, warmup=args.warmup, topk=args.topk, budget_s=args.budget,
                    quick_ceilings=args.quick_ceilings, log=lambda *a: print(*a, file=sys.stderr, flush=True),
                )
            )  # fmt: skip
        cmd = "python bench/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
        bundle = {"kind": "pecm-throughput", "command": cmd.strip(), "wall_s": time.time() - t0, "runs": runs}
        for res in runs:
            errs = validate(res)
            if errs:
                raise SystemExit(f"results do not match the schema: {errs[:3]}")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(bundle, f, indent=1)
        print(f"wrote {out}", file=sys.stderr)
        for p in all_plots(runs, plots):
            print(f"wrote {p}", file=sys.stderr)
    runs = bundle["runs"]
    ce = runs[0]["ceilings"]
    print(f"# ceilings: copy {ce['copy_GBps']:.1f} GB/s (read+write; read-only sum {ce['read_sum_GBps']:.1f} GB/s), "
          f"float32 GEMM {ce['matmul_GFLOPs']:.1f} GFLOP/s")  # fmt: skip
    print(issue_table(runs))
    print()
    print(targets_table(runs))
    if args.readme:
        update_readme(bundle)
        print(f"updated {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
