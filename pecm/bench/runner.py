"""Run an op over a grid for pecm backends and peers; build, print and save ``results.json``."""

from __future__ import annotations

import itertools
import json
import os
from typing import Dict, Iterable, List, Optional

import torch

from . import ceilings as ceil_mod
from . import peers as peers_mod
from .timing import environment, time_fn
from .workload import DTYPES, make_candidates, make_workload, work_model

OPS = ("topk", "rerank", "scores")
DEFAULT_SWEEP = {"N": [20000], "B": [1, 64], "M": [1000], "K": [26], "D": [256]}


def parse_sweep(text: Optional[str]) -> Dict[str, List[int]]:
    """``"N=1000,2000,B=1,64"`` (or space separated) -> {"N": [1000, 2000], "B": [1, 64]}."""
    out: Dict[str, List[int]] = {}
    if not text:
        return out
    key = None
    for tok in text.replace(" ", ",").replace(";", ",").split(","):
        tok = tok.strip()
        if not tok:
            continue
        if "=" in tok:
            key, tok = (s.strip() for s in tok.split("=", 1))
            key = key.upper()
            if key not in DEFAULT_SWEEP:
                raise ValueError(f"--sweep: unknown parameter {key!r}; expected one of N, B, M, K, D")
            out.setdefault(key, [])
        if key is None:
            raise ValueError(f"--sweep: expected KEY=v1,v2,... got {text!r}")
        try:
            v = int(float(tok))
        except ValueError:
            raise ValueError(f"--sweep: {key} values must be integers, got {tok!r}") from None
        if v < 1:
            raise ValueError(f"--sweep: {key} values must be >= 1, got {v}")
        out[key].append(v)
    return out


def _grid(op: str, sweep: Dict[str, List[int]]) -> List[Dict[str, int]]:
    full = {**DEFAULT_SWEEP, **sweep}
    keys = ["N", "K", "D", "B"] + (["M"] if op == "rerank" else [])
    return [dict(zip(keys, vals)) for vals in itertools.product(*(full[k] for k in keys))]


def _impls(op: str, device: str, backends: Iterable[str], peers: Iterable[str], extra: Optional[Dict] = None):
    from ..backends import KNOWN as KNOWN_BACKENDS
    from ..backends import available_backends, backend_errors

    avail, errs = available_backends(), backend_errors()
    out = []
    for b in backends:
        if b not in KNOWN_BACKENDS:
            raise ValueError(f"--backend: unknown backend {b!r}; expected some of {list(KNOWN_BACKENDS)}")
        if b not in avail:
            out.append((b, "backend", None, "score", f"backend not available: {errs.get(b, 'unknown')}"))
        elif b == "triton" and device == "cpu":
            out.append((b, "backend", None, "score", "triton on CPU is the interpreter; never benchmarked"))
        else:
            out.append((b, "backend", peers_mod.make_backend(b), "score", None))
    for p in peers:
        if p not in peers_mod.PEERS:
            raise ValueError(f"--peers: unknown peer {p!r}; expected some of {sorted(peers_mod.PEERS)}")
        maker, supported, by = peers_mod.PEERS[p]
        if op not in supported:
            continue  # e.g. faiss has no rerank / scores counterpart
        out.append((p, "peer", maker, by, peers_mod.unavailable_reason(p, device)))
    for name, (maker, by) in (extra or {}).items():
        out.append((name, "peer", maker, by, None))
    return out


def run_benchmark(
    op: str,
    device: str = "cpu",
    backends: Iterable[str] = ("torch", "cpp"),
    peers: Iterable[str] = ("eager", "gemm", "compile", "numpy", "faiss"),
    sweep: Optional[Dict[str, List[int]]] = None,
    dtype: str = "float16",
    repeats: int = 5,
    warmup: int = 1,
    topk: int = 10,
    quick_ceilings: bool = False,
    extra_peers: Optional[Dict] = None,
    budget_s: Optional[float] = None,
    log=print,
) -> dict:
    """Measure ``op`` over the grid; returns the results dict (see `pecm.bench.schema`)."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device: {device} requested but CUDA is not available on this host")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device: expected cpu or cuda[:i], got {device!r}")
    env = environment(device)
    if repeats < 1:
        raise ValueError(f"--repeats: expected >= 1, got {repeats}")
    backends, peers = list(backends), list(peers)
    if not backends and not peers and not extra_peers:
        raise ValueError("--backend/--peers: nothing to benchmark")
    log(f"# {op} on {env['device_name']} ({env['cpu_count']} cores, load {env['loadavg_1min_start']:.2f})")
    ceil = ceil_mod.measure(device, quick=quick_ceilings)
    log(f"# ceilings: copy {ceil['copy_GBps']:.1f} GB/s (read+write), matmul {ceil['matmul_GFLOPs']:.1f} GFLOP/s")
    impls = _impls(op, device, backends, peers, extra_peers)
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    checks, measurements = {}, []
    for name, kind, maker, by, reason in impls:
        if reason is None:
            ok, msg = peers_mod.check(maker, op, by, dtype, device)
            checks[name] = {"kind": kind, "ok": ok, "detail": msg, "compared_on": by}
            log(f"# check {name:8s} {'ok  ' if ok else 'FAIL'} {msg}")
        else:
            checks[name] = {"kind": kind, "ok": False, "detail": reason, "compared_on": by, "skipped": True}
            log(f"# skip  {name:8s} {reason}")
    cand_cache = {}
    for pt in _grid(op, sweep or {}):
        key = (pt["N"], pt["K"], pt["D"])
        if key not in cand_cache:
            cand_cache.clear()
            cand_cache[key] = make_candidates(*key, dtype=dtype, device=device)
        wl = make_workload(
            pt["B"], *key, m=pt.get("M"), dtype=dtype, device=device, topk=topk, candidates=cand_cache[key]
        )
        model = work_model(op, pt, itemsize)
        for name, kind, maker, by, _ in impls:
            m_i = model
            if name == "faiss":  # float32 pooled vectors only: its own (smaller) work
                m_i = {
                    "pairs": model["pairs"],
                    "bytes": 4.0 * pt["N"] * pt["D"],
                    "flops": 2.0 * model["pairs"] * pt["D"],
                }
            rec = {"op": op, "impl": name, "kind": kind, "shape": dict(pt), "dtype": dtype, "by": by, **m_i}
            chk = checks[name]
            if not chk["ok"]:
                rec.update(status="skipped" if chk.get("skipped") else "failed", reason=chk["detail"])
            else:
                try:
                    with torch.no_grad():
                        t = time_fn(maker(op, wl), device, warmup, repeats, budget_s=budget_s)
                except Exception as e:  # recorded, never silently dropped
                    rec.update(status="failed", reason=f"{type(e).__name__}: {e}"[:300])
                else:
                    med = t["median_s"]
                    rec.update(status="ok", **t)
                    rec["pairs_per_s"] = m_i["pairs"] / med
                    rec["GBps"] = m_i["bytes"] / med / 1e9
                    rec["GFLOPs"] = m_i["flops"] / med / 1e9
                    rec["frac_bw"] = rec["GBps"] / ceil["copy_GBps"]
                    rec["frac_flops"] = rec["GFLOPs"] / ceil["matmul_GFLOPs"]
            measurements.append(rec)
            if rec["status"] == "ok":
                log(f"  {op} {pt} {name:8s} {rec['median_s'] * 1e3:10.2f} ms  {rec['GBps']:7.2f} GB/s")
        del wl
    _add_ratios(measurements)
    try:
        env["loadavg_1min_end"] = float(os.getloadavg()[0])
    except OSError:
        env["loadavg_1min_end"] = -1.0
    return {
        "schema_version": 1,
        "op": op,
        "environment": env,
        "ceilings": ceil,
        "checks": checks,
        "settings": {
            "repeats": repeats,
            "warmup": warmup,
            "budget_s": budget_s,
            "topk": topk,
            "dtype": dtype,
            "chunk_peers": peers_mod.CHUNK,
        },
        "measurements": measurements,
    }


def _add_ratios(measurements: List[dict]) -> None:
    """speedup_vs[peer] = t_peer / t_row for every exact peer timed at the same point; the
    fastest *exact* peer (faiss does less work, so it is reported but not "the fastest peer")."""
    groups: Dict[str, List[dict]] = {}
    for r in measurements:
        groups.setdefault(json.dumps([r["op"], r["shape"]], sort_keys=True), []).append(r)
    for rows in groups.values():
        peer_t = {r["impl"]: r["median_s"] for r in rows if r["kind"] == "peer" and r["status"] == "ok"}
        exact = {k: v for k, v in peer_t.items() if k != "faiss"}
        fastest = min(exact, key=exact.get) if exact else None
        for r in rows:
            if r["status"] != "ok":
                continue
            r["speedup_vs"] = {p: t / r["median_s"] for p, t in peer_t.items()}
            r["fastest_peer"] = fastest
            r["ratio_vs_fastest_peer"] = exact[fastest] / r["median_s"] if fastest else None


def format_table(res: dict) -> str:
    peers_seen = sorted({r["impl"] for r in res["measurements"] if r["kind"] == "peer"})
    hdr = ["op", "shape", "impl", "median ms", "IQR ms", "Mpairs/s", "GB/s", "%bw", "%flop", "x fastest"]
    hdr += [f"x {p}" for p in peers_seen]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in res["measurements"]:
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
        if r["status"] != "ok":
            lines.append(f"| {r['op']} | {shape} | {r['impl']} | {r['status']}: {r.get('reason', '')[:60]} |")
            continue
        f = r.get("ratio_vs_fastest_peer")
        row = [
            r["op"],
            shape,
            r["impl"],
            f"{r['median_s'] * 1e3:.2f}",
            f"{r['iqr_s'] * 1e3:.2f}",
            f"{r['pairs_per_s'] / 1e6:.2f}",
            f"{r['GBps']:.2f}",
            f"{100 * r['frac_bw']:.0f}",
            f"{100 * r['frac_flops']:.0f}",
            "-" if f is None else f"{f:.2f}",
        ]
        row += [f"{r['speedup_vs'][p]:.2f}" if p in r.get("speedup_vs", {}) else "-" for p in peers_seen]
        lines.append("| " + " | ".join(row) + " |")
    env, ce = res["environment"], res["ceilings"]
    lines.append("")
    lines.append(
        f"{env['device_name']}, {env['cpu_count']} cores, load1 {env['loadavg_1min_start']:.2f}"
        f"{_end_load(env)}; "
        f"ceilings: copy {ce['copy_GBps']:.1f} GB/s, matmul {ce['matmul_GFLOPs']:.1f} GFLOP/s; "
        f"commit {env['git_commit'][:12]}. x P = time(P) / time(row): > 1 means the row is faster."
    )
    return "\n".join(lines)


def _end_load(env: dict) -> str:
    end = env.get("loadavg_1min_end")
    return "" if end is None else f" -> {end:.2f}"


def save(res: dict, out_dir: str, name: str = "results.json") -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    return path
