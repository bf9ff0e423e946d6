"""Correctness of the Triton backend on fresh data: triton vs the torch backend vs `pecm.reference` (float64).

    python bench/gpu_correctness.py [--device cuda] [--dtypes fp32,fp16,bf16] [--b 1,3,64] [--n 2000]
        [--k 26 --d 256] [--big | --no-big] [--json out.json] [--seed S]

Every case draws fresh random inputs (raw prototypes with masks, weights; a seed from os.urandom unless
``--seed``, recorded), and every tensor the ops allocate while the triton backend runs is pre-filled with
NaN (float) or a poison value (integers; `poisoned_outputs`), so an element a kernel never writes shows up
as NaN or an out-of-range id instead of passing by luck. Per storage dtype and B: `pecm_scores` (sim, conf,
score), `pecm_topk` (k = 10, tie-aware: the sorted values and each returned id's reference value) and
`pecm_rerank` (M ids with -1 padding and duplicates), on prepared candidates (`prepare_candidates`, the
benchmark's fast path) and, for one B, on raw candidates normalised on the fly. Errors are max |out - ref|
against float64 and against the torch backend, plus the relative norm error ||out - ref|| / ||ref||;
tolerances (absolute, against float64): 1e-5 float32, 2e-2 half types (docs/triton.md).

``--big`` (GPU only; skipped under the interpreter): a planted winner at N*K*D > 2**31 elements (the
candidate past the int32 offset range equals the query, so it must be the top-1 of `pecm_topk` and
`pecm_rerank` with score 1, and its `pecm_scores` entry must be 1), catching int32 offset overflow.

Exit code 0 when every case agrees, 1 otherwise; the report (JSON) lists every case.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pecm import ops, reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-5, "fp16": 2e-2, "bf16": 2e-2}
POISON_INT = -(2**62) + 12345  # decodes to no valid id / an absurd value


@contextlib.contextmanager
def poisoned_outputs():
    """Every ``torch.empty`` / ``empty_like`` / ``new_empty`` inside is pre-filled: NaN for floating
    tensors, `POISON_INT` for integer ones (bool untouched). Covers the kernels' outputs and partials."""
    orig_empty, orig_like, orig_new = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int64, torch.int32):
            t.fill_(POISON_INT if t.dtype == torch.int64 else -(2**31) + 7)
        return t

    torch.empty = lambda *a, **kw: poison(orig_empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(orig_like(*a, **kw))
    torch.Tensor.new_empty = lambda self, *a, **kw: poison(orig_new(self, *a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = orig_empty, orig_like, orig_new


def _f64(t) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _errs(out, ref64, peer) -> Dict[str, float]:
    o = _f64(out)
    nan = int(np.isnan(o).sum())
    diff = np.abs(o - ref64)
    denom = float(np.linalg.norm(ref64)) or 1.0
    return {
        "nan": nan,
        "max_abs_vs_f64": float(np.nanmax(diff)) if diff.size and nan < diff.size else float("nan"),
        "rel_norm_vs_f64": float(np.linalg.norm(np.nan_to_num(o - ref64, nan=1e30)) / denom),
        "max_abs_vs_torch": float(np.nanmax(np.abs(o - _f64(peer)))) if o.size and nan < o.size else float("nan"),
    }


def _topk_errs(vals, ids, ref_values, ref_v, n_ids, tol) -> Dict[str, object]:
    """Tie-aware: sorted values vs the reference top-k; each id unique, in range, with its reference value."""
    v, i = _f64(vals), ids.detach().cpu().numpy()
    bad_ids = int(((i < -1) | (i >= n_ids)).sum())
    nan = int(np.isnan(v).sum())
    with np.errstate(invalid="ignore"):  # -inf padding on both sides counts as equal
        dv = np.where(v == ref_v, 0.0, np.abs(v - ref_v))
    max_v = float(np.nanmax(dv)) if nan < v.size else float("nan")
    max_id = 0.0
    dup = 0
    for r in range(i.shape[0]):
        real = i[r][i[r] >= 0]
        dup += len(real) - len(set(real.tolist()))
        for j, idx in enumerate(i[r]):
            if 0 <= idx < n_ids and np.isfinite(v[r, j]):
                max_id = max(max_id, abs(float(ref_values[r, idx]) - float(v[r, j])))
    ok = nan == 0 and bad_ids == 0 and max_v <= tol and max_id <= tol
    return {
        "nan": nan,
        "bad_ids": bad_ids,
        "duplicates": dup,
        "max_abs_values": max_v,
        "max_abs_id_value": max_id,
        "ok": ok,
    }


def _inputs(b, n, k, d, dt, device, g):
    q = torch.randn((b, k, d), generator=g).to(device=device, dtype=dt)
    c = torch.randn((n, k, d), generator=g).to(device=device, dtype=dt)
    w = (torch.rand(k, generator=g) + 0.1).to(device)
    qm = torch.rand((b, k), generator=g) > 0.15
    cm = torch.rand((n, k), generator=g) > 0.15
    qm[:, 0] = True  # most pairs keep a shared prototype; a few rows get fully masked below
    cm[:, 0] = True
    if n > 4:
        cm[n // 2] = False  # a fully masked candidate: conf = score = 0
    src = torch.randint(0, n, (b,), generator=g)  # queries near some candidates (a meaningful top-k)
    q = (c[src.to(device)].float() + 0.7 * q.float()).to(dt)
    return q, c, w, qm.to(device), cm.to(device)


def check_case(dt: str, b: int, n: int, k: int, d: int, device: str, form: str, seed: int, m: int, log=print) -> List:
    """All three ops for one (dtype, B, form) on fresh data; returns the case dicts."""
    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[dt]
    q, c, w, qm, cm = _inputs(b, n, k, d, dtype, device, g)
    ref_sim, ref_conf, ref_score = reference.scores(q, c, w, q_mask=qm, c_mask=cm)
    cand = torch.randint(0, n, (b, m), generator=g)
    cand[:, -1] = -1  # padding
    if m > 3:
        cand[:, 1] = cand[:, 0]  # a duplicated id (scored once per occurrence)
    cand = cand.to(device)
    kk = 10
    tol = TOL[dt]
    if form == "prep":  # prepared operands (the benchmark's fast path)
        args, kw = (ops.prepare_queries(q, w, q_mask=qm), ops.prepare_candidates(c, w, c_mask=cm)), {}
    else:  # raw candidates, normalised and pooled on the fly by the kernels
        args, kw = (q, c, w), {"q_mask": qm, "c_mask": cm}
    cases = []

    def run(backend, poison):
        with poisoned_outputs() if poison else contextlib.nullcontext():
            sc = ops.pecm_scores(*args, **kw, backend=backend)
            tk = ops.pecm_topk(*args, k=kk, **kw, backend=backend)
            if form == "prep":
                rr = ops.pecm_rerank(args[0], args[1], cand, k=kk, **kw, backend=backend)
            else:
                rr = ops.pecm_rerank(q, c, cand, w, k=kk, **kw, backend=backend)
        return sc, tk, rr

    t0 = time.time()
    (sim, conf, score), (tv, ti), (rv, ri) = run("triton", True)
    t_triton = time.time() - t0
    (psim, pconf, pscore), _, _ = run("torch", False)
    base = dict(dtype=dt, B=b, N=n, K=k, D=d, form=form, seed=seed, tol=tol, device=device)
    for name, out, ref, peer in (
        ("sim", sim, ref_sim, psim),
        ("conf", conf, ref_conf, pconf),
        ("score", score, ref_score, pscore),
    ):
        e = _errs(out, ref, peer)
        cases.append({**base, "op": f"scores.{name}", **e, "ok": e["nan"] == 0 and e["max_abs_vs_f64"] <= tol})
    ref_tv, _ = reference.topk(ref_score, kk)
    e = _topk_errs(tv, ti, ref_score, ref_tv, n, tol)
    cases.append({**base, "op": "topk", "k": kk, **e})
    ref_rv, _ = reference.rerank(ref_score, cand.cpu().numpy(), kk)
    e = _topk_errs(rv, ri, ref_score, ref_rv, n, tol)
    cases.append({**base, "op": "rerank", "k": kk, "M": m, **e})
    for cs_ in cases:
        cs_["triton_s"] = round(t_triton, 2)
        flag = "ok  " if cs_["ok"] else "FAIL"
        err = cs_.get("max_abs_vs_f64", cs_.get("max_abs_values"))
        log(f"{flag} {dt} B={b} {form} {cs_['op']}: max|err| vs f64 {err:.3g} (tol {tol:g}), NaN {cs_['nan']}")
    return cases


def check_big(device: str, k: int, d: int, dt: str = "fp16", log=print) -> List:
    """Planted winner past the int32 element-offset range: N*K*D > 2**31."""
    dtype = DTYPES[dt]
    n = (2**31) // (k * d) + 4097
    win = n - 3  # its row starts at win*K*D > 2**31 elements
    log(f"big: N={n} (N*K*D = {n * k * d:.3e} > 2**31 = {2**31:.3e}), winner at {win}, {dt}")
    c = torch.empty((n, k, d), dtype=dtype, device=device)
    step = 16384
    for s in range(0, n, step):
        e = min(n, s + step)
        c[s:e] = torch.nn.functional.normalize(torch.randn((e - s, k, d), device=device), dim=-1).to(dtype)
    w = torch.rand(k, device=device) + 0.1
    q = c[win : win + 1].clone()
    cs = ops.prepare_candidates(c, w, normalized=False)
    qs = ops.prepare_queries(q, w)
    out = []
    with poisoned_outputs():
        tv, ti = ops.pecm_topk(qs, cs, k=5, backend="triton")
        sim, conf, score = ops.pecm_scores(qs, cs, backend="triton")
        cand = torch.randint(0, n, (1, 999), device=device)
        cand = torch.cat([cand, torch.tensor([[win]], device=device)], 1)
        rv, ri = ops.pecm_rerank(qs, cs, cand, k=5, backend="triton")
    tail = slice(n - 2048, n)
    _, _, pscore = ops.pecm_scores(qs, cs.slice(tail.start, tail.stop), backend="torch")
    tail_err = float((score[:, tail].double() - pscore.double()).abs().max())
    base = dict(dtype=dt, B=1, N=n, K=k, D=d, form="prep", device=device, tol=TOL[dt])
    out.append(
        {
            **base,
            "op": "big.topk",
            "top_id": int(ti[0, 0]),
            "top_value": float(tv[0, 0]),
            "ok": int(ti[0, 0]) == win and abs(float(tv[0, 0]) - 1) <= TOL[dt],
        }
    )
    out.append(
        {
            **base,
            "op": "big.rerank",
            "top_id": int(ri[0, 0]),
            "top_value": float(rv[0, 0]),
            "ok": int(ri[0, 0]) == win and abs(float(rv[0, 0]) - 1) <= TOL[dt],
        }
    )
    nan = int(torch.isnan(score).sum())
    out.append(
        {
            **base,
            "op": "big.scores",
            "winner_score": float(score[0, win]),
            "nan": nan,
            "max_abs_vs_torch_tail": tail_err,
            "ok": nan == 0 and abs(float(score[0, win]) - 1) <= TOL[dt] and tail_err <= TOL[dt],
        }
    )
    for r in out:
        log(
            f"{'ok  ' if r['ok'] else 'FAIL'} {r['op']}: "
            + ", ".join(f"{a}={r[a]}" for a in r if a.startswith(("top", "winner", "max", "nan")))
        )
    del c, cs
    return out


def run(
    device="cuda",
    dtypes=("fp32", "fp16", "bf16"),
    bs=(1, 3, 64),
    n=2000,
    k=26,
    d=256,
    m=300,
    big=True,
    raw_b: Optional[int] = 3,
    seed: Optional[int] = None,
    log=print,
) -> dict:
    """Every case; returns {"ok", "cases", "seed", ...}."""
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else int(seed)
    t0 = time.time()
    cases: List[dict] = []
    i = 0
    for dt in dtypes:
        for b in bs:
            forms = ["prep"] + (["raw"] if raw_b == b else [])
            for form in forms:
                i += 1
                try:
                    cases += check_case(dt, b, n, k, d, device, form, seed + i, m, log)
                except Exception as e:  # a crash is a failed case, and the other cases still run
                    cases.append(dict(dtype=dt, B=b, form=form, op="all", ok=False, error=f"{type(e).__name__}: {e}"))
                    log(f"FAIL {dt} B={b} {form}: {type(e).__name__}: {e}")
    if big and os.environ.get("TRITON_INTERPRET") != "1" and device.startswith("cuda"):
        try:
            cases += check_big(device, k, d, log=log)
        except Exception as e:
            cases.append(dict(op="big", ok=False, error=f"{type(e).__name__}: {e}"))
            log(f"FAIL big: {type(e).__name__}: {e}")
    else:
        cases.append(dict(op="big", ok=True, skipped="interpreter / no GPU: N*K*D > 2**31 needs a GPU"))
        log("skip big (N*K*D > 2**31): interpreter / no GPU")
    ok = all(c["ok"] for c in cases)
    return {
        "ok": ok,
        "seed": seed,
        "device": device,
        "wall_s": round(time.time() - t0, 1),
        "n_cases": len(cases),
        "n_failed": sum(not c["ok"] for c in cases),
        "cases": cases,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    ap.add_argument("--b", default="1,3,64", help="query batch sizes")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--k", type=int, default=26)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--m", type=int, default=300, help="re-rank shortlist length")
    ap.add_argument("--raw-b", type=int, default=3, help="B at which raw candidates are also checked (0: never)")
    ap.add_argument("--big", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    rep = run(
        a.device,
        a.dtypes.split(","),
        [int(x) for x in a.b.split(",")],
        a.n,
        a.k,
        a.d,
        a.m,
        a.big,
        a.raw_b or None,
        a.seed,
    )
    if a.json:
        Path(a.json).write_text(json.dumps(rep, indent=1) + "\n")
    print(
        f"correctness: {'ALL OK' if rep['ok'] else 'FAILED'} ({rep['n_failed']} of {rep['n_cases']} failed, "
        f"seed {rep['seed']}, {rep['wall_s']} s)"
    )
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
