# Backward of the fused PECM scores (training), without materialising [B, N, K].
#
# Math: with upstream gradients g_sim, g_conf, g_score [B, N] and the saved forward outputs,
#
#     score = sim * conf            -> d_sim  = g_sim  + g_score * conf
#                                      d_conf = g_conf + g_score * sim
#     conf  = num / den (den > 0)   -> d_num  = d_conf / den,  d_den = -d_conf * conf / den
#                                      (both 0 where den <= 0, where conf is the constant 0)
#     num = qw c^T, den = qden cm^T (qden 1^T without cm), sim = qp cp^T
#
#     grad_qw   = d_num @ c        [B, K*D]     grad_c  = d_num^T @ qw   [N, K*D]
#     grad_qp   = d_sim @ cp       [B, D]       grad_cp = d_sim^T @ qp   [N, D]
#     grad_qden = d_den @ cm       [B, K]       (rowsum(d_den) broadcast over K when cm is None)
#
# Only [B, N] tensors are materialised (the B x B training case): den (recomputed by the GEMM
# kernel from qden and cm rather than saved), d_sim, d_num, d_den (one elementwise Triton kernel).
# Every GEMM is `_mm_kernel`: out[M, P] = A[M, R] @ Bm[R, P] with arbitrary strides (transposes are
# free), A float32, Bm float32 or the storage dtype (same hi/lo split as the forward, `_dot_acc`),
# float32 accumulation. Gradients of c and cp are returned in their storage dtype. The one torch op
# is the rowsum for grad_qden without cm (a memory-bound [B, N] reduction; a kernel would not help).
#
# Autotune: the GEMM tiles, keyed on (M, P, R buckets, MODE, dtypes); one config under the interpreter.
#
# Pinned config (PECM_TRITON_CONFIG=pinned, kernels/common.py `config_mode`): `PINNED` = (meta dict,
# num_warps, num_stages) of `_mm_kernel` (`pinned_config()` returns the one a launch uses);
# kernels/aot_check.py compiles exactly it. `_mm_kernel` is the autotuner (its `.fn` the @triton.jit function).
# `_grad_prologue_kernel` has no config (BLOCK = 1024, 4 warps).
#
# Grids: 1-D with a grid stride (common.MAX_GRID): the den GEMM has P = N, so a 2-D grid's axis 1 would
# pass CUDA's 65,535 limit for N > ~4.2M.

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import _dot_acc, bench_or_skip, configs, dot_mode, grid_1d, pinned_prune

_GPU_MM_CONFIGS = [
    ({"BLOCK_M": 32, "BLOCK_P": 64, "BLOCK_R": 32}, 4, 3),
    ({"BLOCK_M": 64, "BLOCK_P": 64, "BLOCK_R": 32}, 4, 3),
    ({"BLOCK_M": 64, "BLOCK_P": 128, "BLOCK_R": 32}, 4, 4),
    ({"BLOCK_M": 128, "BLOCK_P": 128, "BLOCK_R": 32}, 8, 3),
]
_INTERP_MM_CONFIG = ({"BLOCK_M": 32, "BLOCK_P": 32, "BLOCK_R": 32}, 4, 1)
PINNED = _GPU_MM_CONFIGS[0]  # M32 P64 R32 w4 s3: 96 regs, no spills for float32 (aot_check, Triton 3.8)


def pinned_config():
    """The config of a pinned launch: (meta, num_warps, num_stages); the interpreter's under TRITON_INTERPRET=1."""
    return _INTERP_MM_CONFIG if common.interpret() else PINNED


def _bucket(x: int) -> int:
    return 1 << min(20, max(4, (int(x) - 1).bit_length()))


@triton.autotune(
    configs=configs(_GPU_MM_CONFIGS, _INTERP_MM_CONFIG),
    key=["M_BUCKET", "P_BUCKET", "R_BUCKET", "MODE"],
    prune_configs_by={"early_config_prune": pinned_prune(None, PINNED)},
    do_bench=bench_or_skip,
)
@triton.jit
def _mm_kernel(
    a_ptr, b_ptr, out_ptr, M, P, R,
    s_am, s_ar, s_br, s_bp, s_om, s_op, M_BUCKET, P_BUCKET, R_BUCKET,
    MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    nm = tl.cdiv(M, BLOCK_M)
    for tile in range(tl.program_id(0), nm * tl.cdiv(P, BLOCK_P), tl.num_programs(0)):
        om = (tile % nm) * BLOCK_M + tl.arange(0, BLOCK_M)
        op = (tile // nm) * BLOCK_P + tl.arange(0, BLOCK_P)
        mm = om < M
        mp = op < P
        rm = om.to(tl.int64)
        rp = op.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
        for s in range(0, R, BLOCK_R):
            rr = s + tl.arange(0, BLOCK_R)
            mr = rr < R
            rr64 = rr.to(tl.int64)
            a = tl.load(a_ptr + rm[:, None] * s_am + rr64[None, :] * s_ar, mask=mm[:, None] & mr[None, :], other=0.0)
            bt = tl.load(b_ptr + rr64[:, None] * s_br + rp[None, :] * s_bp, mask=mr[:, None] & mp[None, :], other=0.0)
            acc = _dot_acc(acc, a, bt, MODE)
        out = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rm[:, None] * s_om + rp[None, :] * s_op, out, mask=mm[:, None] & mp[None, :])


def mm(a: torch.Tensor, bm: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a [M, R] float32 (any strides) @ bm [R, P] (float32/f16/bf16, any strides) -> [M, P] out_dtype."""
    if a.dtype != torch.float32:
        raise TypeError(f"a: expected float32, got {a.dtype}")
    m, r = a.shape
    r2, p = bm.shape
    if r != r2:
        raise ValueError(f"bm: expected {r} rows to match a's columns, got {r2}")
    out = torch.empty((m, p), dtype=out_dtype, device=a.device)
    if m == 0 or p == 0:
        return out
    if r == 0:
        return out.zero_()
    grid = lambda meta: grid_1d(triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(p, meta["BLOCK_P"]))
    common.config_mode()  # validates PECM_TRITON_CONFIG
    _mm_kernel[grid](
        a, bm, out, m, p, r,
        a.stride(0), a.stride(1), bm.stride(0), bm.stride(1), out.stride(0), out.stride(1),
        _bucket(m), _bucket(p), _bucket(r), MODE=dot_mode(bm.dtype, fast=False),  # gradients: always exact
    )  # fmt: skip
    return out


@triton.jit
def _grad_prologue_kernel(
    g_sim_ptr, g_conf_ptr, g_score_ptr, sim_ptr, conf_ptr, den_ptr, d_sim_ptr, d_num_ptr, d_den_ptr,
    total, BLOCK: tl.constexpr,
):  # fmt: skip
    for blk in range(tl.program_id(0), tl.cdiv(total, BLOCK), tl.num_programs(0)):
        offs = (tl.zeros((BLOCK,), dtype=tl.int64) + blk) * BLOCK + tl.arange(0, BLOCK)  # int64: B * N > 2**31
        m = offs < total
        gs = tl.load(g_sim_ptr + offs, mask=m, other=0.0)
        gc = tl.load(g_conf_ptr + offs, mask=m, other=0.0)
        gr = tl.load(g_score_ptr + offs, mask=m, other=0.0)
        sim = tl.load(sim_ptr + offs, mask=m, other=0.0)
        conf = tl.load(conf_ptr + offs, mask=m, other=0.0)
        den = tl.load(den_ptr + offs, mask=m, other=0.0)
        d_conf = gc + gr * sim
        pos = den > 0
        safe = tl.where(pos, den, 1.0)
        tl.store(d_sim_ptr + offs, gs + gr * conf, mask=m)
        tl.store(d_num_ptr + offs, tl.where(pos, d_conf / safe, 0.0), mask=m)
        tl.store(d_den_ptr + offs, tl.where(pos, -d_conf * conf / safe, 0.0), mask=m)


def _grad_or_zeros(g, like):
    return torch.zeros_like(like) if g is None else g.to(torch.float32).contiguous()


def pecm_scores_backward(
    qw, qden, qp, c, cm, cp, sim, conf, g_sim, g_conf, g_score,
    need_qw=True, need_qden=True, need_qp=True, need_c=True, need_cp=True,
):  # fmt: skip
    """(grad_qw, grad_qden, grad_qp, grad_c, grad_cp); None for the ones not needed."""
    b, n = sim.shape
    g_sim, g_conf, g_score = (_grad_or_zeros(g, sim) for g in (g_sim, g_conf, g_score))
    if cm is None:
        den = qden.sum(1, keepdim=True).expand(b, n).contiguous()
    else:
        den = mm(qden, cm.t())
    d_sim = torch.empty_like(sim)
    d_num = torch.empty_like(sim)
    d_den = torch.empty_like(sim)
    total = b * n
    block = 1024
    _grad_prologue_kernel[grid_1d(triton.cdiv(total, block))](
        g_sim, g_conf, g_score, sim, conf, den, d_sim, d_num, d_den, total, BLOCK=block
    )
    g_qw = mm(d_num, c) if need_qw else None
    g_c = mm(d_num.t(), qw, out_dtype=c.dtype) if need_c else None
    g_qp = mm(d_sim, cp) if need_qp else None
    g_cp = mm(d_sim.t(), qp, out_dtype=cp.dtype) if need_cp else None
    g_qden = None
    if need_qden:
        if cm is None:
            g_qden = d_den.sum(1, keepdim=True).expand_as(qden).contiguous()
        else:
            g_qden = mm(d_den, cm)
    return g_qw, g_qden, g_qp, g_c, g_cp
