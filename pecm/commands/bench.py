"""`pecm bench`: benchmark the ops against peers and the measured hardware ceilings.

pecm bench topk   --sweep N=20000,200000,B=1,64 --out bench/results/topk_cpu
pecm bench rerank --sweep M=100,1000 --device cuda --backend torch,triton
pecm bench scores --sweep N=10000 --peers eager,gemm
pecm bench report DIR [DIR ...] --out DIR      # merge results.json files: Markdown + plots
pecm bench index [ARGS ...]                    # archive index benchmark (pecm.bench.index_bench; --help)
"""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_PEERS = "eager,gemm,compile,numpy,faiss"


def _split(s: str):
    return [x.strip() for x in s.split(",") if x.strip()]


def _run_op(args) -> int:
    from ..bench import runner

    if args.repeats < 1:
        raise ValueError(f"--repeats: expected >= 1, got {args.repeats}")
    if args.warmup < 0:
        raise ValueError(f"--warmup: expected >= 0, got {args.warmup}")
    if args.budget is not None and args.budget <= 0:
        raise ValueError(f"--budget: expected seconds > 0, got {args.budget}")
    if args.k < 1:
        raise ValueError(f"--k: expected >= 1, got {args.k}")
    backends = _split(args.backend)
    if args.device.startswith("cuda") and args.backend == "torch,cpp":
        backends = ["torch", "triton"]
    res = runner.run_benchmark(
        args.op,
        device=args.device,
        backends=backends,
        peers=_split(args.peers),
        sweep=runner.parse_sweep(" ".join(args.sweep or [])),
        dtype=args.dtype,
        repeats=args.repeats,
        warmup=args.warmup,
        topk=args.k,
        quick_ceilings=args.quick_ceilings,
        budget_s=args.budget,
        log=(lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr)),
    )
    path = runner.save(res, args.out)
    if not args.json:
        print(runner.format_table(res))
    if not args.no_plots:
        from ..bench.plots import all_plots  # matplotlib (the [bench] extra); not needed with --no-plots

        all_plots([res], args.out)
    if args.json:  # the saved results.json object, plus where it went
        print(json.dumps({**res, "path": path}))
    else:
        print(f"\nwrote {path}")
    return 0


def _run_report(args) -> int:
    from ..bench.report import make_report

    text = make_report(args.dirs, args.out)
    if args.json:
        import os

        print(json.dumps({"out": args.out, "report": os.path.join(args.out, "report.md"), "markdown": text}))
    else:
        print(text)
    return 0


def _run_index(args) -> int:
    from ..bench import index_bench

    rest = [a for a in args.rest if a != "--"]
    return index_bench.run(rest, prog="pecm bench index")  # bad input: ValueError -> one `pecm: error:` line, exit 2


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the scoring ops against peers and hardware ceilings")
    bsub = p.add_subparsers(dest="bench_command", metavar="WHAT")
    for op in ("topk", "rerank", "scores"):
        q = bsub.add_parser(op, help=f"benchmark pecm_{op} over a grid")
        q.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
        q.add_argument(
            "--backend", default="torch,cpp", help="comma list of pecm backends (cuda default: torch,triton)"
        )
        q.add_argument("--peers", default=DEFAULT_PEERS, help=f"comma list of peers (default {DEFAULT_PEERS})")
        q.add_argument("--sweep", nargs="*", help="grid, e.g. N=20000,200000,B=1,64,M=1000,K=26,D=256")
        q.add_argument("--dtype", default="float16", help="storage dtype: float16, bfloat16 or float32")
        q.add_argument("--repeats", type=int, default=5)
        q.add_argument("--warmup", type=int, default=1)
        q.add_argument(
            "--budget",
            type=float,
            default=None,
            metavar="SECONDS",
            help="per implementation and grid point: fewer repeats (at least 3) when the warm-up call shows "
            "--repeats calls would take longer",
        )
        q.add_argument("--k", type=int, default=10, help="top-k size")
        q.add_argument("--out", default="bench_out", help="directory for results.json and the plots")
        q.add_argument("--no-plots", action="store_true")
        q.add_argument("--quick-ceilings", action="store_true", help="small ceiling buffers (smoke runs only)")
        q.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
        q.add_argument("--json", action="store_true", help='print the results object (+ "path") as JSON, no table')
        q.set_defaults(func=_run_op, op=op)
    r = bsub.add_parser("report", help="merge results.json files into report.md + plots")
    r.add_argument("dirs", nargs="+", help="result directories or results.json files")
    r.add_argument("--out", default="bench_report")
    r.add_argument("--json", action="store_true", help='print {"out", "report", "markdown"} as JSON')
    r.set_defaults(func=_run_report)
    # prefix_chars="+": every argument (--n 1000, --help, ...) goes through to pecm.bench.index_bench
    i = bsub.add_parser(
        "index",
        help="archive index benchmark (pecm.bench.index_bench; --help shows its options)",
        prefix_chars="+",
        add_help=False,
    )
    i.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for pecm.bench.index_bench")
    i.set_defaults(func=_run_index)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
