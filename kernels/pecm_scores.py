# Fused all-pairs PECM scores: (sim, conf, score) float32 [B, N] from `Queries` / `Candidates` operands.
#
# Math (see `pecm.backends.base`), per query b and candidate n, float32 accumulation:
#
#     num  = qw[b] . ĉ[n]          K*D-long dot  -> tiled over BLOCK_KD chunks with tl.dot
#     den  = qden[b] . cm[n]       K-long dot    (one BLOCK_K >= K chunk; sum_k qden[b] when cm is None)
#     sim  = qp[b] . ĉp[n]         D-long dot    (BLOCK_KD chunks)
#     conf = num / den if den > 0 else 0;   score = sim * conf
#
# Tiling: one program owns a [BLOCK_B queries x BLOCK_N candidates] tile and keeps the three float32
# accumulators in registers; the epilogue writes sim, conf and score once. The query operands stay
# float32; half-type candidate tiles are multiplied with a hi/lo split of the query tile (see
# `common.dot_mode`), float32 candidates use an IEEE float32 dot. Candidates that are not prepared are
# normalised (and Eq. 4 pooled) on the fly inside the same tile loop (`common._pecm_tile`, flags
# NORM / POOL): per-prototype partial dots scaled by inv_k = m_k / ||c_k|| (common.NORM_MIN), from the sums of
# squares of the same loaded tiles.
#
# Autotune: a small config set keyed on (K, D, B bucket, HAS_CM, NORM, POOL, MODE) plus the argument
# dtypes (Triton adds the dtype of every tensor argument to the key); raw candidates try their own
# configs (`_RAW_GPU_CONFIGS`); one config under TRITON_INTERPRET=1.
#
# Pinned configs (PECM_TRITON_CONFIG=pinned, kernels/common.py `config_mode`): `PINNED` (prepared
# candidates) and `PINNED_RAW` (raw candidates, NORM or POOL != 0), each (meta dict, num_warps,
# num_stages); `pinned_config(raw)` returns the one a launch uses. kernels/aot_check.py compiles exactly
# these. `_pecm_scores_kernel` is the autotuner (its `.fn` the @triton.jit function).
#
# Grid: 1-D, min(tiles, common.MAX_GRID) programs with a grid stride over the (query block, candidate
# block) tiles, query blocks fastest (programs that run together share a candidate tile in L2).
#
# Backward: `PecmScoresFn` (prepared tensors only) saves (sim, conf) and calls
# `pecm_scores_bwd.pecm_scores_backward`; `pecm.library` uses the backend's `scores_backward` instead.

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from . import common
from .common import (
    _epilogue,
    _pecm_tile,
    b_bucket,
    bench_or_skip,
    cand_operands,
    configs,
    d_pad,
    dot_mode,
    grid_1d,
    next_pow2,
    pinned_prune,
    prepare_qsum,
    prune_configs,
    query_operands,
)

_GPU_CONFIGS = [
    ({"BLOCK_B": 16, "BLOCK_N": 64, "BLOCK_KD": 64}, 4, 3),
    ({"BLOCK_B": 32, "BLOCK_N": 128, "BLOCK_KD": 64}, 4, 3),
    ({"BLOCK_B": 64, "BLOCK_N": 64, "BLOCK_KD": 64}, 4, 3),
    ({"BLOCK_B": 64, "BLOCK_N": 128, "BLOCK_KD": 32}, 4, 4),
    ({"BLOCK_B": 128, "BLOCK_N": 64, "BLOCK_KD": 32}, 8, 3),
    ({"BLOCK_B": 128, "BLOCK_N": 128, "BLOCK_KD": 32}, 8, 3),
]
# tried only for raw candidates (normalised on the fly): 8 warps, narrower candidate tiles (the h tile
# of Eq. 4 pooled on the fly, D_PAD x BLOCK_N float32, must stay in registers; aot_check figures in
# docs/triton.md)
_RAW_GPU_CONFIGS = [
    ({"BLOCK_B": 16, "BLOCK_N": 32, "BLOCK_KD": 32}, 8, 2),
    ({"BLOCK_B": 32, "BLOCK_N": 32, "BLOCK_KD": 32}, 8, 2),
    ({"BLOCK_B": 64, "BLOCK_N": 32, "BLOCK_KD": 32}, 8, 2),
    ({"BLOCK_B": 16, "BLOCK_N": 64, "BLOCK_KD": 32}, 8, 2),  # h in registers only for D <= 128
    ({"BLOCK_B": 16, "BLOCK_N": 16, "BLOCK_KD": 32}, 8, 2),  # h in registers up to D = 512
]
_INTERP_CONFIG = ({"BLOCK_B": 16, "BLOCK_N": 32, "BLOCK_KD": 64}, 4, 1)
PINNED = _GPU_CONFIGS[0]
PINNED_RAW = _RAW_GPU_CONFIGS[0]


def pinned_config(raw: bool = False):
    """The config of a pinned launch: (meta, num_warps, num_stages); the interpreter's under TRITON_INTERPRET=1."""
    if common.interpret():
        return _INTERP_CONFIG
    return PINNED_RAW if raw else PINNED


@triton.autotune(
    configs=configs(_GPU_CONFIGS, _INTERP_CONFIG, _RAW_GPU_CONFIGS),
    key=["K", "D", "B_BUCKET", "HAS_CM", "NORM", "POOL", "MODE"],
    prune_configs_by={
        "early_config_prune": pinned_prune(
            prune_configs("BLOCK_B", "BLOCK_N", f32_budget=1024, half_budget=1024), PINNED, PINNED_RAW
        )
    },
    do_bench=bench_or_skip,
)
@triton.jit
def _pecm_scores_kernel(
    qw_ptr, qden_ptr, qsum_ptr, qp_ptr, c_ptr, cm_ptr, cp_ptr, w_ptr, sim_ptr, conf_ptr, score_ptr,
    B, N, K, D, B_BUCKET,
    HAS_CM: tl.constexpr, NORM: tl.constexpr, POOL: tl.constexpr, MODE: tl.constexpr, BLOCK_K: tl.constexpr,
    D_PAD: tl.constexpr, H_ELEMS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KD: tl.constexpr,
):  # fmt: skip
    nb = tl.cdiv(B, BLOCK_B)
    tiles = nb * tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
        offs_b = (tile % nb) * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_n = (tile // nb) * BLOCK_N + tl.arange(0, BLOCK_N)
        sim, num, den = _pecm_tile(
            qw_ptr, qden_ptr, qsum_ptr, qp_ptr, c_ptr, cm_ptr, cp_ptr, w_ptr, offs_b, offs_n, B, N, K, D,
            HAS_CM, NORM, POOL, MODE, BLOCK_B, BLOCK_N, BLOCK_KD, BLOCK_K, D_PAD, H_ELEMS,
        )  # fmt: skip
        conf = _epilogue(sim, num, den, 2)
        score = sim * conf
        out = offs_b.to(tl.int64)[:, None] * N + offs_n[None, :]
        m = (offs_b < B)[:, None] & (offs_n < N)[None, :]
        tl.store(sim_ptr + out, sim, mask=m)
        tl.store(conf_ptr + out, conf, mask=m)
        tl.store(score_ptr + out, score, mask=m)


def pecm_scores_fwd(qs, cs) -> Tuple[torch.Tensor, ...]:
    """Launch the fused forward on duck-typed `Queries` / `Candidates` (see kernels/common.py):
    (sim, conf, score) float32 [B, N]. No autograd. Raw candidates are normalised (and pooled) on the fly."""
    qw, qden, qp = query_operands(qs)
    c, cm, cp, w, flags = cand_operands(cs)
    b, k = qden.shape
    n, _, d = cs.prototypes.shape
    sim = torch.empty((b, n), dtype=torch.float32, device=qw.device)
    conf = torch.empty_like(sim)
    score = torch.empty_like(sim)
    grid = lambda meta: grid_1d(triton.cdiv(b, meta["BLOCK_B"]) * triton.cdiv(n, meta["BLOCK_N"]))
    common.config_mode()  # validates PECM_TRITON_CONFIG
    _pecm_scores_kernel[grid](
        qw, qden, prepare_qsum(qden, cm), qp, c, cm, cp, w, sim, conf, score,
        b, n, k, d, b_bucket(b),
        MODE=dot_mode(c.dtype), BLOCK_K=max(16, next_pow2(k)), D_PAD=d_pad(d), H_ELEMS=common.H_ELEMS, **flags,
    )  # fmt: skip
    return sim, conf, score


class _Prepared:
    """Prepared candidates from loose tensors (c [N, K*D] unit, masked rows zero; cm bool or None; cp unit)."""

    normalized = pooled_normalized = True

    def __init__(self, c, cm, cp):
        n, d = cp.shape
        self.prototypes = c.reshape(n, -1, d)
        self.mask = None if cm is None else cm != 0
        self.pooled = cp
        self.weights = None
        self.dtype = c.dtype


class _Q:
    def __init__(self, qw, qden, qp):
        self.qw, self.qden, self.qp = qw, qden, qp


class PecmScoresFn(torch.autograd.Function):
    """Differentiable fused scores w.r.t. qw, qden, qp, c and cp (cm is a constant mask)."""

    @staticmethod
    def forward(ctx, qw, qden, qp, c, cm, cp):
        sim, conf, score = pecm_scores_fwd(_Q(qw, qden, qp), _Prepared(c, cm, cp))
        ctx.save_for_backward(qw, qden, qp, c, cm, cp, sim, conf)
        return sim, conf, score

    @staticmethod
    def backward(ctx, g_sim, g_conf, g_score):
        from .pecm_scores_bwd import pecm_scores_backward

        qw, qden, qp, c, cm, cp, sim, conf = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = pecm_scores_backward(
            qw, qden, qp, c, cm, cp, sim, conf, g_sim, g_conf, g_score,
            need_qw=need[0], need_qden=need[1], need_qp=need[2], need_c=need[3], need_cp=need[5],
        )  # fmt: skip
        g_qw, g_qden, g_qp, g_c, g_cp = grads
        return g_qw, g_qden, g_qp, g_c, None, g_cp


def pecm_scores(qw, qden, qp, c, cm, cp):
    """Functional entry point on prepared tensors (c [N, K*D] unit with masked-out prototypes zero, cm [N, K]
    or None, cp [N, D] unit): fused (sim, conf, score), differentiable when an input requires grad."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (qw, qden, qp, c, cp)):
        return PecmScoresFn.apply(qw, qden, qp, c, cm, cp)
    return pecm_scores_fwd(_Q(qw, qden, qp), _Prepared(c, cm, cp))
