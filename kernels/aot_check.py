"""Compile the PECM Triton kernels for a CUDA target without a GPU and report resource usage.

    python kernels/aot_check.py [--arch 90] [--quick] [--variants prep,raw,rawcp] [--k 26 --d 256]

Runs `triton.compile` (front end, TTGIR, LLVM, ptxas) for sm_<arch> on every kernel with its GPU
autotune configs (``--quick``: the first config only) and prints registers, stack (spill) bytes and
Triton's shared-memory plan per variant (prepared candidates, and raw ones normalised on the fly),
using the ``cuobjdump`` shipped with Triton. This catches
compile-time errors the interpreter cannot see (types across branches, tl.dot shape rules,
shared-memory overflow, spills). It does not run anything: correctness and speed on a GPU still
need ``pytest -m gpu`` and the benchmarks. TRITON_INTERPRET must be unset (it is removed here).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import pecm.backends.triton_backend  # noqa: E402,F401  (makes pecm.kernels importable from a checkout)

_MODULES = ("common", "pecm_scores", "pecm_topk", "pecm_rerank", "pecm_scores_bwd")
C, S, T, R, W = (importlib.import_module(f"pecm.kernels.{m}") for m in _MODULES)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QARGS = {"qw_ptr": "*fp32", "qden_ptr": "*fp32", "qsum_ptr": "*fp32", "qp_ptr": "*fp32"}


def compile_one(kernel, sig, consts, warps, stages, target, label):
    fn = kernel.fn if type(kernel).__name__ == "Autotuner" else kernel
    full = {a: ("constexpr" if a in consts else sig[a]) for a in fn.arg_names}
    t0 = time.time()
    try:
        opts = {"num_warps": warps, "num_stages": stages}
        k = triton.compile(ASTSource(fn, full, consts), target=target, options=opts)
    except Exception as e:  # report and go on: the point is to see every failure
        print(f"FAIL  {label}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
        return False
    usage = "?"
    if CUOBJDUMP.is_file():
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        m = re.search(r"REG:(\d+).*?STACK:(\d+)", out, re.S)
        usage = f"regs {m.group(1)} stack {m.group(2)}" if m else "?"
    print(f"ok    {label}: {usage} smem {k.metadata.shared} ({time.time() - t0:.1f}s)", flush=True)
    return True


# Candidate variants (constexpr flags of `common.cand_operands`): prepared (the fast path), raw prototypes
# with Eq. 4 pooled on the fly, raw prototypes with raw pooled vectors. Unused pointers are None.
VARIANTS = {
    "prep": dict(HAS_CM=True, NORM=False, POOL=0),
    "raw": dict(HAS_CM=True, NORM=True, POOL=2),
    "rawcp": dict(HAS_CM=True, NORM=True, POOL=1),
}


def _nones(flags):
    """Pointer arguments that are None (constexpr) for these flags."""
    out = {"qsum_ptr": None} if flags["HAS_CM"] else {"cm_ptr": None}
    out.update({"cp_ptr": None} if flags["POOL"] == 2 else {"w_ptr": None})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100/H200)")
    ap.add_argument("--quick", action="store_true", help="first autotune config of each kernel only")
    ap.add_argument("--kt", default="64,1024", help="top-k list sizes to compile (comma-separated)")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16", help="storage dtypes (comma-separated)")
    ap.add_argument("--kernels", default="scores,topk,rerank,bwd", help="kernel families (comma-separated)")
    ap.add_argument("--variants", default="prep,raw", help=f"candidate variants ({','.join(VARIANTS)})")
    ap.add_argument("--k", type=int, default=26, help="prototypes K (the raw variants' tile shapes depend on D)")
    ap.add_argument("--d", type=int, default=256, help="prototype dimension D (paper: K = 26, D = 256)")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    pick = (lambda cfgs: cfgs[:1]) if args.quick else (lambda cfgs: cfgs)
    kts = [int(x) for x in args.kt.split(",")]
    ok = True
    fams = set(args.kernels.split(","))
    block_k, dp = max(16, C.next_pow2(args.k)), C.d_pad(args.d)
    for dt in args.dtypes.split(","):
        mode = 0 if dt == "fp32" else 1
        cargs = {"c_ptr": f"*{dt}", "cm_ptr": "*u8", "cp_ptr": f"*{dt}", "w_ptr": "*fp32"}
        for vname in args.variants.split(","):
            flags = VARIANTS[vname]
            nones = _nones(flags)
            hb = C.H_ELEMS
            fixed = dict(D_PAD=dp, H_ELEMS=hb, **flags, **nones)
            sig = {**QARGS, **cargs, "sim_ptr": "*fp32", "conf_ptr": "*fp32", "score_ptr": "*fp32"}
            sig.update(B="i32", N="i32", K="i32", D="i32", B_BUCKET="i32")
            cfgs = S._pecm_scores_kernel.configs
            prune = S._pecm_scores_kernel.early_config_prune
            like = {"c_ptr": torch.empty(0, dtype=DTYPES[dt])}
            for cfg in pick(prune(cfgs, like, MODE=mode, **fixed)) if "scores" in fams else []:
                consts = dict(MODE=mode, BLOCK_K=block_k, **fixed, **cfg.kwargs)
                label = f"scores {dt} {vname} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"
                ok &= compile_one(S._pecm_scores_kernel, sig, consts, cfg.num_warps, cfg.num_stages, target, label)
            sig = {**QARGS, **cargs, "part_ptr": "*i64", "B": "i32", "N": "i32", "K": "i32", "D": "i32"}
            sig.update(per_prog="i32", B_BUCKET="i32")
            for kt in kts if "topk" in fams else []:
                sub = C.raw_sub(kt, args.d, flags, hb)
                cfgs = T._pecm_topk_kernel.configs
                prune = T._pecm_topk_kernel.early_config_prune
                for cfg in pick(prune(cfgs, like, KT=kt, SUB=sub, MODE=mode, **fixed)):
                    consts = dict(MODE=mode, BY=0, BLOCK_K=block_k, KT=kt, SUB=sub, **fixed, **cfg.kwargs)
                    label = f"topk {dt} {vname} KT={kt} SUB={sub} {cfg.kwargs} w{cfg.num_warps}"
                    ok &= compile_one(T._pecm_topk_kernel, sig, consts, cfg.num_warps, cfg.num_stages, target, label)
            sig = {**QARGS, **cargs, "cand_ptr": "*i64", "part_ptr": "*i64", "M": "i32", "K": "i32", "D": "i32"}
            sig.update(per_prog="i32")
            gfixed = fixed
            for kt in kts if "rerank" in fams else []:
                sub = C.raw_sub(kt, args.d, flags, hb)
                cfgs = [triton.Config(dict(m), num_warps=w, num_stages=s) for m, w, s in R._GPU_CONFIGS]
                for cfg in pick(R._prune_gather(cfgs, {}, KT=kt, SUB=sub, **gfixed)):
                    consts = dict(BY=0, BLOCK_K=block_k, KT=kt, SUB=sub, **gfixed, **cfg.kwargs)
                    label = f"rerank {dt} {vname} KT={kt} SUB={sub} {cfg.kwargs} w{cfg.num_warps}"
                    ok &= compile_one(R._pecm_rerank_kernel, sig, consts, cfg.num_warps, cfg.num_stages, target, label)
        sig = {"a_ptr": "*fp32", "b_ptr": f"*{dt}", "out_ptr": f"*{dt}", "M": "i32", "P": "i32", "R": "i32"}
        ints = ("s_am", "s_ar", "s_br", "s_bp", "s_om", "s_op", "M_BUCKET", "P_BUCKET", "R_BUCKET")
        sig.update({n: "i32" for n in ints})
        for meta, w, st in pick(W._GPU_MM_CONFIGS) if "bwd" in fams else []:
            ok &= compile_one(W._mm_kernel, sig, dict(MODE=mode, **meta), w, st, target, f"bwd-mm {dt} {meta} w{w}")
    sig = {n: "*fp32" for n in W._grad_prologue_kernel.arg_names if n not in ("total", "BLOCK")}
    if "bwd" in fams:
        sig["total"] = "i32"
        ok &= compile_one(W._grad_prologue_kernel, sig, {"BLOCK": 1024}, 4, 1, target, "bwd-prologue")
    print("all kernels compiled" if ok else "SOME KERNELS FAILED TO COMPILE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
