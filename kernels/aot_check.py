"""Compile the PECM Triton kernels for a CUDA target without a GPU, specialised as the JIT would, and report
resource usage and the instructions the compiler chose.

    python kernels/aot_check.py [--quick | --pinned] [--kt 64] [--dtypes fp16] [--kernels topk]
        [--variants prep,raw] [--b 64 --n 1000000 --m 1000 --k 26 --d 256] [--timeout 300]
        [--json out.json] [--md out.md] [--spec-only]

How a variant is specialised: the real launcher (`pecm_topk`, `pecm_scores_fwd`, `pecm_rerank`,
`pecm_scores_backward`) is called on *meta* tensors of the benchmark shape (B, N or M, K, D), and the kernel
launch is intercepted; the captured arguments go through Triton's own JIT binder (`specialize_impl` of the
installed Triton) for the target, so each compile gets exactly the signature, constexprs and attributes a
launch on the GPU would get: every tensor pointer 16-byte aligned -> ``tt.divisibility = 16`` (fresh CUDA
allocations are 256-byte aligned; views keep their real storage offset), integer arguments divisible by 16
-> ``tt.divisibility = 16``, integers equal to 1 -> constexpr 1, ``None`` -> constexpr None, plus the
launcher's constexprs (MODE, KT, SUB, D_PAD, flags) and the config's meta-parameters, warps and stages.
(Earlier versions of this script compiled without the divisibility hints, i.e. unvectorised, unpipelined
kernels.) The split counts are those of an H200 (132 SMs, `--sms`).

Configs: all configs the autotuner would try after its pruning; ``--quick``: the first of them;
``--pinned``: the pinned config only, i.e. the module's ``PINNED`` attribute when the kernel module has one
(a ``triton.Config``, a ``(meta, num_warps, num_stages)`` tuple, a list of them, or a dict keyed by the
kernel's name; with ``PECM_TRITON_CONFIG=pinned`` set for the import, so a module that pins its autotune
list that way is honoured too), else the first config after pruning; the report says which
(``config_source``).

Per variant (kernel x dtype x prep/raw x KT x config) it reports the compile seconds (front end to ptxas),
registers, spill stores / loads and stack frame (the ptxas ``-v`` log), Triton's shared-memory plan
(``metadata.shared``: the dynamic shared memory of the launch; H100/H200 allow 232,448 B per block), and
from the TTGIR / PTX: ``ttng.warp_group_dot`` (wgmma) and ``mma.sync`` counts, 16-byte ``cp.async`` copies,
``cp.async.bulk`` (TMA) and 16-byte vector global loads (``ld.global...v4`` of 32-bit elements or ``.v2.b64``).
Each compile runs in a forked child with ``--timeout`` seconds (process group killed past it; reported as
``timeout``), so one slow ptxas does not eat the run. Nothing runs on a device: correctness and speed still
need ``bench/gpu_check.sh``. TRITON_INTERPRET must be unset (it is removed here); the Triton cache is a fresh
temporary directory and compiles are never served from a cache.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="pecm-aot-cache-")
if "--pinned" in sys.argv:
    os.environ["PECM_TRITON_CONFIG"] = "pinned"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import pecm.backends.triton_backend  # noqa: E402,F401  (makes pecm.kernels importable from a checkout)

# the package exports functions named like some modules (pecm.kernels.pecm_topk is a function there)
C, S, T, R, W = (
    importlib.import_module(f"pecm.kernels.{m}")
    for m in ("common", "pecm_scores", "pecm_topk", "pecm_rerank", "pecm_scores_bwd")
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (H100 / H200)
# Candidate variants (constexpr flags of `common.cand_operands`): prepared (the fast path), raw prototypes
# with Eq. 4 pooled on the fly, raw prototypes with raw pooled vectors.
VARIANTS = {
    "prep": dict(normalized=True, pooled=True, pooled_normalized=True),
    "raw": dict(normalized=False, pooled=False, pooled_normalized=False),
    "rawcp": dict(normalized=False, pooled=True, pooled_normalized=False),
}


# ----------------------------------------------------------------------------------------------- capture
class _Q:  # duck-typed pecm.operands.Queries
    def __init__(self, b, k, d):
        self.qw = torch.empty((b, k * d), dtype=torch.float32, device="meta")
        self.qden = torch.empty((b, k), dtype=torch.float32, device="meta")
        self.qp = torch.empty((b, d), dtype=torch.float32, device="meta")


class _Cands:  # duck-typed pecm.operands.Candidates
    def __init__(self, n, k, d, dtype, normalized, pooled, pooled_normalized, mask=True):
        self.prototypes = torch.empty((n, k, d), dtype=dtype, device="meta")
        self.mask = torch.empty((n, k), dtype=torch.bool, device="meta") if mask else None
        self.pooled = torch.empty((n, d), dtype=dtype, device="meta") if pooled else None
        self.weights = torch.empty((k,), dtype=torch.float32, device="meta")
        self.normalized, self.pooled_normalized, self.dtype = normalized, pooled_normalized, dtype


class _Launched(Exception):
    pass


def capture(launch, kernels, stop=True):
    """Run ``launch()`` with each of ``kernels`` (Autotuner or JITFunction) intercepted; returns the
    list of (kernel, args, kwargs) launches in order. ``stop``: abort the launcher at the first launch."""
    seen = []

    def make(kern):
        def run(*args, grid=None, warmup=False, **kwargs):
            seen.append((kern, args, kwargs))
            if stop:
                raise _Launched
            return None

        return run

    saved = {id(k): k.__dict__.get("run") for k in kernels}
    for k in kernels:
        k.run = make(k)
    try:
        launch()
    except _Launched:
        pass
    finally:
        for k in kernels:
            if saved[id(k)] is None:
                del k.run
            else:
                k.run = saved[id(k)]
    return seen


def _sms(n):
    return lambda device: 4 * n


def launches(kernel: str, dt: str, vname: str, kt: int, b: int, n: int, m: int, k: int, d: int, sms: int):
    """The (kernel object, args, kwargs) launches of one op at one shape, captured from its launcher."""
    dtype = DTYPES[dt]
    topk_k = kt if kt > 64 else min(kt, 10)  # k = 10 -> KT 64; KT > 64 -> k = KT (e.g. 1024 for k = 1000)
    T.target_programs = R.target_programs = _sms(sms)  # split counts of the target GPU (launcher arithmetic)
    if kernel == "bwd":
        qw, qden, qp = (torch.empty(s, dtype=torch.float32, device="meta") for s in ((b, k * d), (b, k), (b, d)))
        c = torch.empty((n, k * d), dtype=dtype, device="meta")
        cm = torch.empty((n, k), dtype=dtype, device="meta")
        cp = torch.empty((n, d), dtype=dtype, device="meta")
        outs = [torch.empty((b, n), dtype=torch.float32, device="meta") for _ in range(5)]
        return capture(lambda: W.pecm_scores_backward(qw, qden, qp, c, cm, cp, *outs), [W._mm_kernel,
                       W._grad_prologue_kernel], stop=False)  # fmt: skip
    qs, cs = _Q(b, k, d), _Cands(n, k, d, dtype, **VARIANTS[vname])
    if kernel == "scores":
        return capture(lambda: S.pecm_scores_fwd(qs, cs), [S._pecm_scores_kernel])
    if kernel == "topk":
        return capture(lambda: T.pecm_topk(qs, cs, topk_k, 0, None), [T._pecm_topk_kernel])
    if kernel == "rerank":
        cand = torch.empty((b, m), dtype=torch.int64, device="meta")
        return capture(lambda: R.pecm_rerank(qs, cs, cand, topk_k, 0), [R._pecm_rerank_kernel])
    raise ValueError(f"unknown kernel family {kernel!r}")


# ------------------------------------------------------------------------------------------ specialise
class FakePtr:
    """What the JIT binder sees of a tensor: its dtype and an address with the tensor's real offset from a
    256-byte-aligned allocation (``misalign`` adds bytes, for tests)."""

    def __init__(self, t, misalign=0):
        self.dtype = t.dtype
        self._ptr = (1 << 20) + t.storage_offset() * t.element_size() + misalign

    def data_ptr(self):
        return self._ptr


def _module_of(kern):
    fn = kern.fn if hasattr(kern, "configs") else kern
    return sys.modules[fn.fn.__module__], fn


def _as_config(x):
    if isinstance(x, triton.Config):
        return x
    meta, w, s = x
    return triton.Config(dict(meta), num_warps=w, num_stages=s)


def _same(a, b):
    return a.kwargs == b.kwargs and a.num_warps == b.num_warps and a.num_stages == b.num_stages


def configs_for(kern, args, kwargs, mode: str):
    """[(config or None, source)] to compile: ``all`` (after pruning), ``quick`` (first after pruning),
    ``pinned`` (the module's PINNED, else the first after pruning)."""
    if not hasattr(kern, "configs"):  # plain JITFunction: no autotuner
        return [(None, "fixed")]
    mod, fn = _module_of(kern)
    named = dict(zip(fn.arg_names, args))
    cfgs = list(kern.configs)
    prune = getattr(kern, "early_config_prune", None)
    if prune:
        cfgs = prune(cfgs, named, **kwargs)
    if mode == "all":
        return [(c, "autotune set after pruning") for c in cfgs]
    if mode == "pinned" and hasattr(mod, "pinned_config"):  # the launch's own choice (raw rows: PINNED_RAW)
        allargs = {**named, **kwargs}
        raw = bool(allargs.get("NORM", False)) or int(allargs.get("POOL", 0) or 0) != 0
        try:
            pin = mod.pinned_config(raw)
        except TypeError:  # pinned_config() without a raw argument (the backward GEMMs)
            pin = mod.pinned_config()
        pin = _as_config(pin)
        name = "PINNED_RAW" if raw and hasattr(mod, "PINNED_RAW") else "PINNED"
        return [(pin, f"{mod.__name__.rsplit('.', 1)[-1]}.{name}")]
    if mode == "pinned" and hasattr(mod, "PINNED"):
        pin = mod.PINNED
        if isinstance(pin, dict) and not (set(pin) & {"BLOCK_B", "BLOCK_N", "BLOCK_KD", "BLOCK_M"}):
            pin = pin.get(fn.fn.__name__, pin.get(fn.fn.__name__.strip("_"), None))
        if callable(pin) and not isinstance(pin, triton.Config):
            pin = pin({**named, **kwargs})
        if pin is not None:
            pins = [_as_config(p) for p in pin] if isinstance(pin, list) else [_as_config(pin)]
            match = [p for p in pins if any(_same(p, c) for c in cfgs)]
            return [((match or pins)[0], f"{mod.__name__.rsplit('.', 1)[-1]}.PINNED")]
    src = "first after pruning" + (" (no PINNED in the module)" if mode == "pinned" else "")
    return [(cfgs[0], src)]


def specialise(kern, args, kwargs, cfg, target, misalign=0):
    """(signature, constexprs, attrs, options) exactly as the installed Triton's JIT would build them."""
    fn = kern.fn if hasattr(kern, "configs") else kern
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw = dict(kwargs)
    if cfg is not None:
        kw.update(cfg.all_kwargs())
    fake = [FakePtr(a, misalign) if isinstance(a, torch.Tensor) else a for a in args]
    kw = {k: (FakePtr(v, misalign) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    bound, spec, opts = binder(*fake, **kw)
    opt_kw = {k: v for k, v in kw.items() if k not in fn.arg_names}
    options, signature, constexprs, attrs = fn._pack_args(backend, opt_kw, bound, spec, opts)
    return signature, constexprs, attrs, options


def spec_summary(fn, signature, constexprs, attrs):
    """Readable specialisation: which arguments are tt.divisibility=16 and which are constexpr ints."""
    div = [fn.arg_names[p[0]] for p, a in attrs.items() if any(x[0] == "tt.divisibility" for x in a)]
    ints = {fn.arg_names[p[0]]: v for p, v in constexprs.items() if not fn.params[p[0]].is_constexpr}
    return {"divisible_by_16": div, "specialised_constants": ints}


# ---------------------------------------------------------------------------------------------- compile
_PTXAS = {
    "regs": r"Used (\d+) registers",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "stack": r"(\d+) bytes stack frame",
}


def _widths(ptx: str, op: str) -> dict:
    """{bytes per access: count} of the global loads (``ld.global``) or async copies (``cp.async.ca/cg``)."""
    hist: dict = {}
    if op == "ld":
        for mods in re.findall(r"\bld\.global((?:\.[\w:]+)*)", ptx):
            vec = re.search(r"\.v(\d)", mods)
            bits = re.search(r"\.[bfus](\d+)\b", mods)
            width = (int(vec.group(1)) if vec else 1) * (int(bits.group(1)) // 8 if bits else 0)
            hist[width] = hist.get(width, 0) + 1
    else:
        pat = r"cp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-fA-F]+|\d+)"
        for size in re.findall(pat, ptx):
            width = int(size, 0)
            hist[width] = hist.get(width, 0) + 1
    return dict(sorted(hist.items()))


def inspect_asm(ttgir: str, ptx: str) -> dict:
    ld, cp = _widths(ptx, "ld"), _widths(ptx, "cp")
    return {
        "warp_group_dot": len(re.findall(r"ttng\.warp_group_dot\b", ttgir)),
        "wgmma_ptx": len(re.findall(r"wgmma\.mma_async", ptx)),
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
        "cp_async_16": cp.get(16, 0),
        "cp_async_widths": cp,
        "cp_async_bulk": len(re.findall(r"cp\.async\.bulk", ptx)),
        "ld_global_16B": ld.get(16, 0),
        "ld_global_widths": ld,
    }


def compile_variant(fn, signature, constexprs, attrs, options, target) -> dict:
    log = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(log):
        k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    out = {"status": "ok", "compile_s": round(time.time() - t0, 2), "shared_bytes": int(k.metadata.shared)}
    for name, pat in _PTXAS.items():
        m = re.search(pat, log.getvalue())
        out[name] = int(m.group(1)) if m else None
    out["n_spills"] = None if out["spill_stores"] is None else out["spill_stores"] // 4  # 32-bit words, like Triton's
    out["smem_ok"] = out["shared_bytes"] <= SMEM_LIMIT
    out.update(inspect_asm(k.asm.get("ttgir", ""), k.asm.get("ptx", "")))
    out["arch"] = re.search(r"\.target (sm_\w+)", k.asm.get("ptx", "")).group(1)
    return out


def _child(conn, job):
    os.setpgrp()  # its own process group: a timeout kills ptxas too
    try:
        conn.send(compile_variant(*job))
    except BaseException as e:  # report and go on: the point is to see every failure
        conn.send({"status": "fail", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"})
    conn.close()


def run_with_timeout(job, timeout: float) -> dict:
    ctx = multiprocessing.get_context("fork")
    rd, wr = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(wr, job))
    t0 = time.time()
    p.start()
    wr.close()
    res = None
    if rd.poll(timeout):
        try:
            res = rd.recv()
        except EOFError:
            res = None
    p.join(5)
    if p.is_alive() or res is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        p.join(5)
        if res is None:
            waited = round(time.time() - t0, 1)
            status = "timeout" if waited >= timeout else f"died (exit {p.exitcode})"
            res = {"status": status, "compile_s": waited, "error": f"no result after {waited} s"}
    return res


# ------------------------------------------------------------------------------------------------- main
def _cfg_label(cfg):
    if cfg is None:
        return "-"
    short = {"BLOCK_B": "B", "BLOCK_N": "N", "BLOCK_KD": "KD", "BLOCK_M": "M", "BLOCK_P": "P", "BLOCK_R": "R"}
    parts = [f"{short.get(k, k)}{v}" for k, v in cfg.kwargs.items()]
    return " ".join(parts + [f"w{cfg.num_warps}", f"s{cfg.num_stages}"])


def plan(args):
    """Every variant to compile: dicts with the launch, config and labels (nothing compiled yet)."""
    out = []
    kts = [int(x) for x in args.kt.split(",")]
    mode = "pinned" if args.pinned else ("quick" if args.quick else "all")
    for fam in args.kernels.split(","):
        for dt in args.dtypes.split(","):
            for vname in args.variants.split(",") if fam != "bwd" else ["prep"]:
                for kt in kts if fam in ("topk", "rerank") else [0]:
                    b = args.b_bwd if fam == "bwd" else args.b
                    n = args.n_bwd if fam == "bwd" else args.n
                    for kern, a, kw in launches(fam, dt, vname, kt, b, n, args.m, args.k, args.d, args.sms):
                        for cfg, src in configs_for(kern, a, kw, mode):
                            fn = kern.fn if hasattr(kern, "configs") else kern
                            what = "x".join(str(a[i]) for i in (3, 4, 5)) if fn.fn.__name__ == "_mm_kernel" else None
                            out.append(dict(launch=what, fam=fam, dtype=dt, variant=vname, kernel=fn.fn.__name__,
                                            cfg=cfg, config=_cfg_label(cfg), config_source=src, kern=kern,
                                            args=a, kwargs=kw, KT=kw.get("KT"), SUB=kw.get("SUB"),
                                            shape=dict(B=b, N=n, M=args.m if fam == "rerank" else None,
                                                       K=args.k, D=args.d)))  # fmt: skip
    return out


def _fmt_row(r):
    if r["status"] != "ok":
        return f"{r['status'].upper()} ({r.get('compile_s', '?')} s) {r.get('error', '')}"
    sp = f"{r['spill_stores']}/{r['spill_loads']} B" if r["spill_stores"] is not None else "?"
    return (
        f"{r['compile_s']:6.1f}s regs {r['regs']} spill {sp} stack {r['stack']} smem {r['shared_bytes']}"
        f" wgdot {r['warp_group_dot']} mma.sync {r['mma_sync']} cp.async16 {r['cp_async_16']}"
        f" bulk {r['cp_async_bulk']} ld16B {r['ld_global_16B']}"
    )


def markdown(rows, triton_version):
    head = (
        f"Triton {triton_version}, {rows[0]['arch'] if rows and 'arch' in rows[0] else 'sm_90'}; "
        "regs / spill stores (B) / shared memory plan (B); wgdot = `ttng.warp_group_dot` ops in the TTGIR; "
        "cp16 = 16-byte / all `cp.async` copies, bulk = `cp.async.bulk` (TMA), "
        "ld16 = 16-byte / all `ld.global` in the PTX.\n\n"
    )
    lines = [
        "| kernel | dtype | cand | KT/SUB | config | source | compile s | regs | spill B | smem B | wgdot | mma.sync |"
        " cp16 | bulk | ld16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kt = f"{r['KT']}/{r['SUB']}" if r.get("KT") else "-"
        name = r["kernel"].strip("_").replace("_kernel", "") + (f" {r['launch']}" if r.get("launch") else "")
        if r["status"] != "ok":
            cells = [f"**{r['status']}** after {r.get('compile_s', '?')} s"] + ["-"] * 8
        else:
            smem = f"{r['shared_bytes']}" + ("" if r["smem_ok"] else " (> limit)")
            cp = f"{r['cp_async_16']}/{sum(r['cp_async_widths'].values())}"
            ld = f"{r['ld_global_16B']}/{sum(r['ld_global_widths'].values())}"
            cells = [str(r["compile_s"]), str(r["regs"]), str(r["spill_stores"]), smem, str(r["warp_group_dot"]),
                     str(r["mma_sync"]), cp, str(r["cp_async_bulk"]), ld]  # fmt: skip
        lines.append(f"| {name} | {r['dtype']} | {r['variant']} | {kt} | {r['config']} | {r['config_source']} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return head + "\n".join(lines) + "\n"


def _cells(r):
    if r is None:
        return "-", "-"
    if r["status"] != "ok":
        return f"**{r['status']}** after {r.get('compile_s', '?')} s", "-"
    smem = f"{r['shared_bytes']}" + ("" if r["smem_ok"] else " (> limit)")
    cp = f"{r['cp_async_16']}/{sum(r['cp_async_widths'].values())}"
    ld = f"{r['ld_global_16B']}/{sum(r['ld_global_widths'].values())}"
    return (
        f"{r['compile_s']} / {r['regs']} / {r['spill_stores']} / {smem}",
        f"{r['warp_group_dot']} / {r['mma_sync']} / {cp} / {r['cp_async_bulk']} / {ld}",
    )


def combined_markdown(docs):
    """One table over several runs (e.g. Triton 3.6 and 3.8): a row per variant, two cells per run."""
    order, by_run = [], []
    for d in docs:
        m, seen = {}, {}
        for r in d["rows"]:
            k = (r["kernel"], r["dtype"], r["variant"], r.get("KT"), r.get("SUB"), r["config"], r.get("launch"))
            seen[k] = seen.get(k, 0) + 1
            k = k + (seen[k],)  # two launches of one shape label that specialise differently (strides)
            m[k] = r
            if k not in order:
                order.append(k)
        by_run.append(m)
    vers = [d["triton"] for d in docs]
    head = "| kernel | dtype | cand | KT/SUB | config | " + " | ".join(
        f"{v}: s / regs / spill B / smem B | {v}: wgdot / mma.sync / cp16 / bulk / ld16" for v in vers
    )
    lines = [head + " |", "|" + "---|" * (5 + 2 * len(docs))]
    for k in order:
        name = k[0].strip("_").replace("_kernel", "") + (f" {k[6]}" if k[6] else "")
        kt = f"{k[3]}/{k[4]}" if k[3] else "-"
        cells = [c for m in by_run for c in _cells(m.get(k))]
        lines.append(f"| {name} | {k[1]} | {k[2]} | {kt} | {k[5]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100/H200)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="first autotune config (after pruning) of each variant")
    g.add_argument("--pinned", action="store_true", help="the pinned config (module PINNED, else the first)")
    ap.add_argument("--kt", default="64", help="top-k list sizes to compile (comma-separated; 1024 = k 1000)")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16", help="storage dtypes (comma-separated)")
    ap.add_argument("--kernels", default="scores,topk,rerank,bwd", help="kernel families (comma-separated)")
    ap.add_argument("--variants", default="prep,raw", help=f"candidate variants ({','.join(VARIANTS)})")
    ap.add_argument("--b", type=int, default=64, help="queries B of the launch being specialised")
    ap.add_argument("--n", type=int, default=1_000_000, help="candidates N (scores / top-k)")
    ap.add_argument("--m", type=int, default=1000, help="shortlist length M (re-rank)")
    ap.add_argument("--b-bwd", type=int, default=256, help="B of the backward (B x N training batch)")
    ap.add_argument("--n-bwd", type=int, default=256, help="N of the backward")
    ap.add_argument("--k", type=int, default=26, help="prototypes K")
    ap.add_argument("--d", type=int, default=256, help="prototype dimension D (paper: K = 26, D = 256)")
    ap.add_argument("--sms", type=int, default=132, help="multiprocessors of the target (split counts; H200 132)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per compile before it is killed")
    ap.add_argument("--json", help="write the results (and the specialisation of each variant) as JSON here")
    ap.add_argument("--md", help="write the markdown table here")
    ap.add_argument("--spec-only", action="store_true", help="print each variant's specialisation; compile nothing")
    ap.add_argument("--from-json", help="comma-separated result JSONs: print one combined table, compile nothing")
    args = ap.parse_args(argv)
    if args.from_json:
        md = combined_markdown([json.loads(Path(p).read_text()) for p in args.from_json.split(",")])
        if args.md:
            Path(args.md).write_text(md)
        print(md)
        return 0
    target = GPUTarget("cuda", args.arch, 32)
    jobs = plan(args)
    print(f"triton {triton.__version__} ({Path(triton.__file__).parent}), target sm_{args.arch}, {len(jobs)} compiles"
          f", timeout {args.timeout:g} s each", flush=True)  # fmt: skip
    rows, ok, seen = [], True, set()
    for j in jobs:
        fn = j["kern"].fn if hasattr(j["kern"], "configs") else j["kern"]
        sig, consts, attrs, options = specialise(j["kern"], j["args"], j["kwargs"], j["cfg"], target)
        key = (j["kernel"], j["config"], str(sig), str(consts), str(attrs))
        if key in seen:  # the same compile as an earlier launch (e.g. two backward GEMMs of one shape)
            continue
        seen.add(key)
        row = {k: v for k, v in j.items() if k not in ("kern", "args", "kwargs", "cfg")}
        row["num_warps"], row["num_stages"] = options.num_warps, options.num_stages
        row["specialisation"] = spec_summary(fn, sig, consts, attrs)
        label = f"{j['kernel']} {j['dtype']} {j['variant']} KT={j['KT']} SUB={j['SUB']} [{j['config']}]"
        if args.spec_only:
            print(f"spec  {label}: {json.dumps(row['specialisation'])}", flush=True)
            rows.append(row)
            continue
        row.update(run_with_timeout((fn, sig, consts, attrs, options, target), args.timeout))
        ok &= row["status"] == "ok" and row.get("smem_ok", True)
        print(f"{'ok  ' if row['status'] == 'ok' else 'FAIL'}  {label}: {_fmt_row(row)}", flush=True)
        rows.append(row)
    doc = {
        "triton": triton.__version__,
        "target": f"cuda sm_{args.arch}",
        "torch": torch.__version__,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python kernels/aot_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "smem_limit_bytes": SMEM_LIMIT,
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    if not args.spec_only:
        md = markdown(rows, triton.__version__)
        if args.md:
            Path(args.md).write_text(md)
        print(md)
        print("all kernels compiled" if ok else "SOME KERNELS FAILED, TIMED OUT OR EXCEED SHARED MEMORY")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
