"""Raw vs prepared candidates: what a one-shot call with raw prototypes costs (issue 11).

    python bench/raw_inputs.py                       # N=200000, K=26, D=256, float16, B=1,64, M=1000, cpp
    python bench/raw_inputs.py --n 20000 --repeats 3 # a quick look
    python bench/raw_inputs.py --readme              # + rewrite the raw-inputs table in bench/README.md

For each op (top-k, re-rank) and B, the cpp backend is timed on the same items in the candidate forms
of `pecm.bench.input_forms` (prepared once / raw / raw + raw pooled / prepare inside every call),
next to the ``gemm`` peer (the weights folded into one torch GEMM over the prepared prototypes, then
torch.topk) measured in the same run; every implementation is first checked against
`pecm.reference`. Re-rank forms gather another candidate id set on every call (16 sets in turn; the
gemm peer re-uses one set, so its re-rank rows are partly cache-resident and "x gemm" flatters it).
The target: raw-input calls within 1.3x of the prepared path. Writes one JSON
bundle (each run valid against `pecm.bench.schema`, plus a ``ratios`` summary) to
bench/results/raw_inputs_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pecm.bench import input_forms, runner  # noqa: E402
from pecm.bench.report import replace_marked_block  # noqa: E402
from pecm.bench.schema import validate  # noqa: E402

README = os.path.join(ROOT, "bench", "README.md")
BEGIN, END = "<!-- raw-inputs:cpu:begin -->", "<!-- raw-inputs:cpu:end -->"
TARGET = 1.3


def ratios(runs, backend: str):
    """[{op, B, form, ms, prepared_ms, ratio, met}] for every non-prepared form."""
    out = []
    for res in runs:
        rows = {}
        for r in res["measurements"]:
            if r["status"] == "ok" and r["impl"].startswith(backend + ":"):
                rows[(r["shape"]["B"], r["impl"].split(":", 1)[1])] = r["median_s"]
        for (b, form), t in sorted(rows.items()):
            base = rows.get((b, "prepared"))
            if form == "prepared" or base is None:
                continue
            ratio = t / base
            met = ratio <= TARGET if form != "prepare-per-call" else None
            out.append(dict(op=res["op"], B=b, form=form, ms=t * 1e3, prepared_ms=base * 1e3, ratio=ratio, met=met))
    return out


def interleaved(n: int, bs, m: int, dtype: str, backend: str, budget_s: float = 20.0):
    """A/B/C timing robust to drift: the forms take turns call by call (round robin), so a change of
    load or clock hits them alike. -> [{op, B, form, ms, prepared_ms, ratio, calls}]."""
    import time as _t

    import numpy as np
    import torch

    from pecm.bench.workload import make_candidates, make_workload

    cands = make_candidates(n, 26, 256, dtype)
    out = []
    for op in ("topk", "rerank"):
        for b in bs:
            wl = make_workload(b, n, 26, 256, m=m if op == "rerank" else None, dtype=dtype, candidates=cands)
            fns = {f: input_forms.make_form(backend, f)(op, wl) for f in ("prepared", "raw", "raw+pooled")}
            for f in fns.values():
                f()  # warm-up
            times = {f: [] for f in fns}
            t0 = _t.perf_counter()
            while _t.perf_counter() - t0 < budget_s or min(len(v) for v in times.values()) < 5:
                for f, fn in fns.items():
                    s0 = _t.perf_counter()
                    with torch.no_grad():
                        fn()
                    times[f].append(_t.perf_counter() - s0)
            base = float(np.median(times["prepared"]))
            for f, v in times.items():
                if f != "prepared":
                    med = float(np.median(v))
                    out.append(
                        dict(op=op, B=b, form=f, ms=med * 1e3, prepared_ms=base * 1e3, ratio=med / base, calls=len(v))
                    )
    return out


def table(bundle) -> str:
    lines = ["| op | B | form | ms | prepared ms | x prepared | within 1.3x |", "|---|---|---|---|---|---|---|"]
    for r in bundle["ratios"]:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        cells = [r["op"], r["B"], r["form"], f"{r['ms']:.2f}", f"{r['prepared_ms']:.2f}", f"{r['ratio']:.2f}", met]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    gem = []
    for res in bundle["runs"]:
        for r in res["measurements"]:
            if r["status"] == "ok" and r["impl"].endswith(":raw") and "gemm" in r.get("speedup_vs", {}):
                gem.append(f"{res['op']} B={r['shape']['B']}: {r['speedup_vs']['gemm']:.2f}x")
    env = bundle["runs"][0]["environment"]
    ab = ["| op | B | form | ms | prepared ms | x prepared | calls each |", "|---|---|---|---|---|---|---|"]
    for r in bundle.get("interleaved", []):
        cells = [
            r["op"],
            r["B"],
            r["form"],
            f"{r['ms']:.2f}",
            f"{r['prepared_ms']:.2f}",
            f"{r['ratio']:.2f}",
            r["calls"],
        ]
        ab.append("| " + " | ".join(str(x) for x in cells) + " |")
    return "\n".join(
        [
            BEGIN,
            f"Measured {env['time_utc']} on {env['device_name']} ({env['cpu_count']} cores, cpp SIMD path "
            f"`{env.get('cpp_simd', '?')}`), commit `{env['git_commit'][:12]}`, command `{bundle['command']}`; "
            f"1-min load {env['loadavg_1min_start']:.2f} at the start.",
            "",
            "Runner (each form timed in turn per grid point, median of the repeats):",
            "",
            *lines,
            "",
            "Interleaved (the forms take turns call by call for ~20 s per point, median; drift hits them alike):",
            "",
            *ab,
            "",
            "Raw input vs the torch GEMM peer on prepared prototypes (same run, > 1: raw pecm is faster): "
            + ", ".join(gem)
            + ".",
            END,
        ]
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", default="200000")
    ap.add_argument("--b", default="1,64")
    ap.add_argument("--m", default="1000")
    ap.add_argument("--backend", default="cpp")
    ap.add_argument("--ops", default="topk,rerank")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/raw_inputs_<device>.json)")
    ap.add_argument("--readme", action="store_true", help="rewrite the raw-inputs block of bench/README.md")
    ap.add_argument("--no-interleaved", action="store_true", help="skip the interleaved (round-robin) timing")
    args = ap.parse_args(argv)
    sweep = runner.parse_sweep(f"N={args.n},B={args.b},M={args.m}")
    t0 = time.time()
    runs = []
    for op in [o.strip() for o in args.ops.split(",") if o.strip()]:
        res = runner.run_benchmark(
            op,
            device="cpu",
            backends=(),
            peers=("gemm",),
            sweep=sweep,
            dtype=args.dtype,
            repeats=args.repeats,
            extra_peers=input_forms.extra_peers(args.backend, op),
        )
        validate(res)
        runs.append(res)
        print(runner.format_table(res))
    bundle = {
        "command": "python bench/raw_inputs.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "wall_s": time.time() - t0,
        "target_ratio": TARGET,
        "runs": runs,
    }
    bundle["ratios"] = ratios(runs, args.backend)
    if not args.no_interleaved:
        bs = [int(x) for x in args.b.split(",")]
        bundle["interleaved"] = interleaved(
            int(args.n.split(",")[0]), bs, int(args.m.split(",")[0]), args.dtype, args.backend
        )
    bundle["wall_s"] = time.time() - t0
    out = args.out or os.path.join(ROOT, "bench", "results", "raw_inputs_cpu.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(bundle, f, indent=1)
    print(table(bundle))
    print(f"# wrote {out}")
    if args.readme:
        replace_marked_block(README, BEGIN, END, table(bundle), "## Raw vs prepared candidates (issue 11)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
