"""Sections of `bench/gpu_check.sh` that need Python (one process each, so one crash stops one section).

    python bench/gpu_check.py env       --json F
    python bench/gpu_check.py ceilings  --json F [--dry]
    python bench/gpu_check.py timings   --json F [--regs-json R] [--ceilings F] [--dry]
    python bench/gpu_check.py k1000     --json F [--dry]
    python bench/gpu_check.py summary   --work DIR --out DIR

Reuses `pecm.bench` (timing.environment / time_fn, ceilings.measure, peers.make_gemm, workload.work_model).
Timings (float16 storage, prepared candidates, K = 26, D = 256, top-10; ``--dry``: toy sizes under the
interpreter, for a rehearsal only): kernel-only (the `pecm.kernels` launcher on prepared operands: fused kernel
+ the tiny partial merge; `triton.testing.do_bench`, median, L2 flushed between calls) and op-level (the public
`pecm.ops` call with ``backend="triton"``: validation + dispatch + kernel; CUDA events via `time_fn`), with the
GEMM-formulated torch peer (`pecm.bench.peers.make_gemm`) at the same point. Re-rank draws fresh random ids for
every call (a pool of id sets cycled through, none reused within a measurement's first pass). After the timings
the same process dumps, for every compiled kernel in the JIT caches, registers, spills and shared memory as the
driver reports them (``--regs-json``) and the config each autotuner picked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

K, D, TOPK = 26, 256, 10
GPU = {
    "topk_n": 1_000_000,
    "topk_b": (1, 1024),
    "topk_n_b1024": 32768,
    "rerank_b": (1, 64),
    "rerank_m": 1000,
    "bwd_b": 256,
    "bwd_n": 256,
    "k1000_n": 200_000,
}
DRY = {
    "topk_n": 96,
    "topk_b": (1, 8),
    "topk_n_b1024": 64,
    "rerank_b": (1, 4),
    "rerank_m": 24,
    "bwd_b": 8,
    "bwd_n": 8,
    "k1000_n": 40,
}
DRY_K, DRY_D = 3, 16


def _device(dry: bool) -> str:
    return "cpu" if dry else "cuda"


def _write(path, obj):
    Path(path).write_text(json.dumps(obj, indent=1, default=str) + "\n")


def cmd_env(a):
    from pecm.bench.timing import environment

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment(dev)
    env["cuda_available"] = torch.cuda.is_available()
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "")
    env["pecm_triton_config"] = os.environ.get("PECM_TRITON_CONFIG", "")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": p.name,
            "sms": p.multi_processor_count,
            "mem_GiB": round(p.total_memory / 2**30, 1),
            "capability": f"{p.major}.{p.minor}",
            "cuda": torch.version.cuda,
        }
    print(json.dumps(env, indent=1, default=str))
    _write(a.json, env)
    return 0


def cmd_ceilings(a):
    from pecm.bench import ceilings

    dev = _device(a.dry)
    t0 = time.time()
    c = ceilings.measure(dev, quick=a.dry)
    c["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(c, indent=1))
    _write(a.json, c)
    return 0


def make_prepared(n, k, d, dtype, device, seed):
    """Unit prototypes and unit pooled vectors drawn on the device (fresh data, no host round trip)."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.rand(k, generator=g, device=device) + 0.1
    c = torch.empty((n, k, d), dtype=dtype, device=device)
    cp = torch.empty((n, d), dtype=dtype, device=device)
    step = 16384
    for s in range(0, n, step):
        e = min(n, s + step)
        x = torch.nn.functional.normalize(torch.randn((e - s, k, d), generator=g, device=device), dim=-1)
        c[s:e] = x.to(dtype)
        cp[s:e] = torch.nn.functional.normalize((x * w.view(1, k, 1)).sum(1), dim=-1).to(dtype)
    return c, cp, w


def _bench_kernel(fn, device, dry):
    """Kernel-only time (s): do_bench's median on a GPU (L2 flushed between calls); time_fn on the CPU."""
    from pecm.bench.timing import time_fn

    if dry:
        return time_fn(fn, device, warmup=1, repeats=2)["median_s"]
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")) / 1e3


def _bench_op(fn, device, dry, budget_s=3.0):
    from pecm.bench.timing import time_fn

    r = time_fn(fn, device, warmup=1 if dry else 2, repeats=2 if dry else 15, budget_s=None if dry else budget_s)
    return r["median_s"], r["iqr_s"], len(r["samples_s"])


def _row(op, b, n, m, impl, level, t, model, ceil, extra=None):
    gbps = model["bytes"] / t / 1e9 if t else None
    row = {
        "op": op,
        "B": b,
        "N": n,
        "M": m,
        "impl": impl,
        "level": level,
        "median_ms": round(t * 1e3, 4),
        "GBps": round(gbps, 1) if gbps else None,
        "TFLOPs": round(model["flops"] / t / 1e12, 2) if t else None,
    }
    if ceil and gbps:
        row["frac_copy_bw"] = round(gbps / ceil["copy_GBps"], 3)
    row.update(extra or {})
    print(f"{op:8s} B={b:<5d} {impl:8s} {level:7s} {row['median_ms']:10.3f} ms  {row['GBps']} GB/s", flush=True)
    return row


def cmd_timings(a):
    from pecm import ops
    from pecm.backends import triton_backend as tb
    from pecm.bench import peers
    from pecm.bench.workload import Workload, work_model

    sz = DRY if a.dry else GPU
    k, d = (DRY_K, DRY_D) if a.dry else (K, D)
    dev = _device(a.dry)
    kern = tb.kernels
    ceil = json.loads(Path(a.ceilings).read_text()) if a.ceilings and Path(a.ceilings).is_file() else None
    rows, t_start = [], time.time()
    dtype = torch.float16
    seed = int.from_bytes(os.urandom(4), "little")

    # top-k: B = 1 over N, B = 1024 over a smaller N (the same kernel, compute-bound there)
    for b in sz["topk_b"]:
        n = sz["topk_n"] if b == 1 else sz["topk_n_b1024"]
        c, cp, w = make_prepared(n, k, d, dtype, dev, seed + b)
        q = c[torch.randint(0, n, (b,), device=dev)].float() + 0.3 * torch.randn((b, k, d), device=dev)
        q = q.to(dtype)
        qs, cs = ops.prepare_queries(q, w), ops.prepare_candidates(c, w, c_pooled=cp, normalized=True)
        model = work_model("topk", {"B": b, "N": n, "K": k, "D": d}, 2)
        tk = _bench_kernel(lambda qs=qs, cs=cs: kern.pecm_topk(qs, cs, TOPK, 0, None), dev, a.dry)
        rows.append(_row("topk", b, n, None, "triton", "kernel", tk, model, ceil))
        to, iqr, reps = _bench_op(lambda qs=qs, cs=cs: ops.pecm_topk(qs, cs, k=TOPK, backend="triton"), dev, a.dry)
        rows.append(_row("topk", b, n, None, "triton", "op", to, model, ceil, {"iqr_ms": iqr * 1e3, "repeats": reps}))
        wl = Workload(q=q, c=c, cp=cp, w=w, cand=None, topk=TOPK)
        tg, iqr, reps = _bench_op(peers.make_gemm("topk", wl), dev, a.dry, budget_s=5.0)
        rows.append(_row("topk", b, n, None, "gemm", "peer", tg, model, ceil, {"iqr_ms": iqr * 1e3, "repeats": reps}))
        del c, cp, qs, cs, wl

    # re-rank: fresh ids on every call, from one archive of topk_n rows
    n = sz["topk_n"]
    c, cp, w = make_prepared(n, k, d, dtype, dev, seed + 7)
    cs = ops.prepare_candidates(c, w, c_pooled=cp, normalized=True)
    m = sz["rerank_m"]
    for b in sz["rerank_b"]:
        q = torch.nn.functional.normalize(torch.randn((b, k, d), device=dev), dim=-1).to(dtype)
        qs = ops.prepare_queries(q, w)
        pool = [torch.randint(0, n, (b, m), device=dev) for _ in range(8 if a.dry else 64)]
        state = {"i": 0}

        def fresh(pool=pool, state=state):
            state["i"] += 1
            return pool[state["i"] % len(pool)]

        model = work_model("rerank", {"B": b, "N": n, "K": k, "D": d, "M": m}, 2)
        tk = _bench_kernel(lambda qs=qs: kern.pecm_rerank(qs, cs, fresh(), TOPK, 0), dev, a.dry)
        rows.append(_row("rerank", b, n, m, "triton", "kernel", tk, model, ceil, {"fresh_ids": len(pool)}))
        to, iqr, reps = _bench_op(lambda qs=qs: ops.pecm_rerank(qs, cs, fresh(), k=TOPK, backend="triton"), dev, a.dry)
        rows.append(_row("rerank", b, n, m, "triton", "op", to, model, ceil, {"iqr_ms": iqr * 1e3, "repeats": reps}))
        wl = Workload(q=q, c=c, cp=cp, w=w, cand=pool[0], topk=TOPK)
        peer = peers.make_gemm("rerank", wl)

        def peer_fresh(wl=wl, peer=peer):
            wl.cand = fresh()
            return peer()

        tg, iqr, reps = _bench_op(peer_fresh, dev, a.dry)
        rows.append(_row("rerank", b, n, m, "gemm", "peer", tg, model, ceil, {"iqr_ms": iqr * 1e3, "repeats": reps}))
    del c, cp, cs

    # backward of pecm_scores, B x N training batch (raw operands, gradients to q and c)
    b, n = sz["bwd_b"], sz["bwd_n"]
    qr = torch.randn((b, k, d), device=dev).to(dtype).requires_grad_(True)
    cr = torch.randn((n, k, d), device=dev).to(dtype).requires_grad_(True)
    w = torch.rand(k, device=dev) + 0.1

    def step(backend):
        def f():
            qr.grad = cr.grad = None
            _, conf, score = ops.pecm_scores(qr, cr, w, backend=backend)
            (score.float().square().sum() + conf.float().sum()).backward()

        return f

    bwd_model = {"bytes": float((b + n) * k * d * 2 * 2), "flops": float(3 * 2 * 2 * b * n * (k * d + d))}
    to, iqr, reps = _bench_op(step("triton"), dev, a.dry)
    rows.append(_row("bwd", b, n, None, "triton", "op", to, bwd_model, ceil, {"iqr_ms": iqr * 1e3, "what": "fwd+bwd"}))
    tg, iqr, reps = _bench_op(step("torch"), dev, a.dry)
    rows.append(_row("bwd", b, n, None, "torch", "peer", tg, bwd_model, ceil, {"iqr_ms": iqr * 1e3, "what": "fwd+bwd"}))
    # kernel-only backward: the Triton backward GEMMs on saved prepared operands
    qs = ops.prepare_queries(qr.detach(), w)
    cs = ops.prepare_candidates(cr.detach(), w)
    sim, conf, _ = kern.pecm_scores_fwd(qs, cs)
    gs = [torch.randn_like(sim) for _ in range(3)]
    cflat = cs.prototypes.reshape(n, -1)
    tk = _bench_kernel(
        lambda: kern.pecm_scores_backward(qs.qw, qs.qden, qs.qp, cflat, None, cs.pooled, sim, conf, *gs), dev, a.dry
    )
    rows.append(_row("bwd", b, n, None, "triton", "kernel", tk, bwd_model, ceil, {"what": "backward GEMMs only"}))
    out = {
        "dry": a.dry,
        "dtype": "float16",
        "K": k,
        "D": d,
        "topk": TOPK,
        "rows": rows,
        "wall_s": round(time.time() - t_start, 1),
    }
    _write(a.json, out)
    if a.regs_json:
        _write(a.regs_json, dump_jit_caches())
    return 0


def dump_jit_caches():
    """Every kernel the JIT compiled in this process: registers, spills, shared memory (driver figures) and
    the autotuner's pick per key. Empty under the interpreter (nothing is compiled)."""
    import importlib

    from pecm.backends import triton_backend  # noqa: F401  (loads pecm.kernels)

    out = {"interpreter": os.environ.get("TRITON_INTERPRET") == "1", "kernels": [], "autotune_picks": []}
    for mod, names in (
        ("pecm_scores", ["_pecm_scores_kernel"]),
        ("pecm_topk", ["_pecm_topk_kernel"]),
        ("pecm_rerank", ["_pecm_rerank_kernel"]),
        ("pecm_scores_bwd", ["_mm_kernel", "_grad_prologue_kernel"]),
    ):
        m = importlib.import_module(f"pecm.kernels.{mod}")
        for name in names:
            kern = getattr(m, name)
            fn = kern.fn if hasattr(kern, "configs") else kern
            for key, cfg in getattr(kern, "cache", {}).items():
                out["autotune_picks"].append({"kernel": name, "key": str(key), "config": str(cfg)})
            for dev_cache in getattr(fn, "device_caches", {}).values():
                for ck in dev_cache[0].values():
                    try:
                        ck._init_handles()
                        md = ck.metadata
                        out["kernels"].append(
                            {
                                "kernel": name,
                                "n_regs": ck.n_regs,
                                "n_spills": ck.n_spills,
                                "shared": md.shared,
                                "num_warps": md.num_warps,
                                "num_stages": md.num_stages,
                                "hash": md.hash[:12],
                            }
                        )
                    except Exception as e:  # a kernel that never loaded: record why
                        out["kernels"].append({"kernel": name, "error": f"{type(e).__name__}: {e}"})
    for r in out["kernels"]:
        print(r)
    return out


def cmd_k1000(a):
    """k = 1000 (KT = 1024 list: the longest compile) for top-k, B = 1, against the torch backend."""
    from pecm import ops

    dev = _device(a.dry)
    k, d = (DRY_K, DRY_D) if a.dry else (K, D)
    n = (DRY if a.dry else GPU)["k1000_n"]
    kk = 1000 if not a.dry else 30
    c, cp, w = make_prepared(n, k, d, torch.float16, dev, 11)
    qs = ops.prepare_queries(c[3:4].clone(), w)
    cs = ops.prepare_candidates(c, w, c_pooled=cp, normalized=True)
    t0 = time.time()
    tv, ti = ops.pecm_topk(qs, cs, k=kk, backend="triton")
    if dev == "cuda":
        torch.cuda.synchronize()
    first = time.time() - t0
    pv, _ = ops.pecm_topk(qs, cs, k=kk, backend="torch")
    err = float((tv.double() - pv.double()).abs().max())
    from pecm.bench.timing import time_fn

    t = time_fn(lambda: ops.pecm_topk(qs, cs, k=kk, backend="triton"), dev, warmup=1, repeats=5)["median_s"]
    ok = err <= 2e-2 and int(ti[0, 0]) == 3 and bool(torch.isfinite(tv).all())
    res = {
        "k": kk,
        "N": n,
        "first_call_s": round(first, 1),
        "median_ms": round(t * 1e3, 3),
        "max_abs_vs_torch": err,
        "top_id": int(ti[0, 0]),
        "ok": ok,
    }
    print(res)
    _write(a.json, res)
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------------ summary
def _load(p):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, ValueError):
        return None


def cmd_summary(a):
    work, out = Path(a.work), Path(a.out)
    sections = []
    if (work / "sections.tsv").is_file():
        for line in (work / "sections.tsv").read_text().splitlines():
            name, rc, secs = line.split("\t")[:3]
            sections.append({"section": name, "rc": int(rc), "seconds": int(secs)})
    env, corr, ceil = _load(work / "env.json"), _load(work / "correctness.json"), _load(work / "ceilings.json")
    tim, regs, k1000 = _load(work / "timings.json"), _load(work / "regs.json"), _load(work / "k1000.json")
    pytest_line = ""
    if (work / "pytest.log").is_file():
        tail = [ln for ln in (work / "pytest.log").read_text().splitlines() if ln.strip()]
        pytest_line = tail[-1].strip("= ") if tail else ""
    md = ["# gpu_check summary", ""]
    if env:
        v = env.get("versions", {})
        md.append(
            f"{env.get('device_name')} | torch {v.get('torch')} | triton {v.get('triton')} | commit "
            f"{str(env.get('git_commit'))[:12]} | {env.get('time_utc')} | interpreter "
            f"{env.get('triton_interpret') == '1'} | PECM_TRITON_CONFIG={env.get('pecm_triton_config')}"
        )
        md.append("")
    md += ["| section | rc | seconds |", "|---|---|---|"]
    md += [f"| {s['section']} | {s['rc']} | {s['seconds']} |" for s in sections]
    md.append(f"| total | | {sum(s['seconds'] for s in sections)} |")
    md.append("")
    if corr:
        md.append(
            f"correctness: {'ALL OK' if corr['ok'] else 'FAILED'} ({corr['n_failed']} of {corr['n_cases']} "
            f"cases failed, seed {corr['seed']})"
        )
        worst = {}
        for c in corr["cases"]:
            if "dtype" in c and "op" in c:
                e = c.get("max_abs_vs_f64", c.get("max_abs_values"))
                key = (c["dtype"], c["op"].split(".")[0])
                if e is not None and (key not in worst or e > worst[key]):
                    worst[key] = e
        md.append("worst max|err| vs float64: " + ", ".join(f"{k[0]} {k[1]} {v:.2g}" for k, v in sorted(worst.items())))
        for c in corr["cases"]:
            if not c["ok"]:
                md.append(f"- FAILED: {json.dumps(c)[:300]}")
            if c.get("op", "").startswith("big.") or c.get("skipped"):
                state = "SKIPPED: " + c["skipped"] if c.get("skipped") else ("ok" if c["ok"] else "FAILED")
                md.append(f"- {c.get('op')}: {state}{' top ' + str(c.get('top_id')) if 'top_id' in c else ''}")
        md.append("")
    if pytest_line:
        md += [f"pytest -m 'gpu and not slow': {pytest_line}", ""]
    if ceil:
        mm = {k[3:].split("_")[0]: round(v / 1e3, 2) for k, v in ceil.items() if k.startswith("mm_")}
        md += [f"ceilings: copy {ceil.get('copy_GBps', 0):.0f} GB/s, GEMM TFLOP/s {mm}", ""]
    if regs:
        ks = regs.get("kernels", [])
        spill = [r for r in ks if r.get("n_spills")]
        md += [
            f"compiled kernels: {len(ks)} (interpreter: {regs.get('interpreter')}), with spills: {len(spill)}"
            + "".join(f"; {r['kernel']} {r['n_regs']} regs {r['n_spills']} spills" for r in spill),
            "",
        ]
    if k1000:
        md += [
            f"k = 1000: {'ok' if k1000.get('ok') else 'FAILED'}, first call {k1000.get('first_call_s')} s, "
            f"median {k1000.get('median_ms')} ms, max|err| vs torch {k1000.get('max_abs_vs_torch'):.2g}",
            "",
        ]
    if tim:
        md += [
            f"timings ({'DRY RUN, toy sizes under the interpreter: not performance' if tim.get('dry') else 'H200'}"
            f", {tim['dtype']}, K={tim['K']}, D={tim['D']}, top-{tim['topk']}):",
            "",
            "| op | B | N | M | impl | level | median ms | GB/s | TFLOP/s | x gemm peer |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        peer = {(r["op"], r["B"]): r["median_ms"] for r in tim["rows"] if r["level"] == "peer"}
        for r in tim["rows"]:
            p = peer.get((r["op"], r["B"]))
            x = f"{p / r['median_ms']:.2f}" if p and r["level"] != "peer" and r["median_ms"] else "-"
            md.append(
                f"| {r['op']} | {r['B']} | {r['N']} | {r['M'] or '-'} | {r['impl']} | {r['level']} | "
                f"{r['median_ms']} | {r['GBps']} | {r['TFLOPs']} | {x} |"
            )
        md.append("")
    text = "\n".join(md) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text)
    _write(
        out / "summary.json",
        {
            "sections": sections,
            "env": env,
            "correctness_ok": corr and corr["ok"],
            "pytest": pytest_line,
            "ceilings": ceil,
            "timings": tim,
            "k1000": k1000,
            "regs": regs,
        },
    )
    print(text)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("env", "ceilings", "timings", "k1000"):
        p = sub.add_parser(name)
        p.add_argument("--json", required=True)
        p.add_argument("--dry", action="store_true")
        if name == "timings":
            p.add_argument("--regs-json")
            p.add_argument("--ceilings")
    p = sub.add_parser("summary")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    return {
        "env": cmd_env,
        "ceilings": cmd_ceilings,
        "timings": cmd_timings,
        "k1000": cmd_k1000,
        "summary": cmd_summary,
    }[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
