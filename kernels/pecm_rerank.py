# Fused PECM re-ranking: for each query b, score the candidate rows cand[b, :M] of c (int64 ids,
# -1 = padding) and keep the best k by score | sim | conf.
#
# Math: per (b, m) with id = cand[b, m] >= 0, the `pecm_scores` quantities of pair (b, id):
#     num = qw[b] . c[id],  den = qden[b] . cm[id] (or sum_k qden[b]),  sim = qp[b] . cp[id]
#     conf = num / den if den > 0 else 0,  score = sim * conf;  padding gets -inf and is never kept.
#
# Shape of the problem: a gather + batched GEMV (one query against its own M rows), so it is
# bandwidth-bound; there is no operand reuse for tl.dot. Each product is an exact float32 FMA of the
# float32 query chunk with the upcast candidate chunk (no precision trade-off needed).
#
# Grid: (B, S) with S splits of the M axis (S = 1 for M of a few hundred; up to ~4 programs per SM
# in total for M ~ 100,000). A program walks its slice of cand[b] in tiles of KT ids, gathers the
# [KT, BLOCK_KD] candidate chunks row by row (int64 offsets), and keeps a running top-KT list with
# the same packed-key bitonic merge as `pecm_topk` (see there). Partials [B, S, KT] int64 keys are
# merged exactly with torch.topk. Duplicate ids are scored once per occurrence (the contract).
#
# Raw rows (not prepared) are normalised on the fly as they are gathered (`_gather_raw`): per prototype
# the partial GEMV and the sum of squares of the same gathered chunks; Eq. 4 pooled on the fly with h
# [SUB, D_PAD] in registers (SUB <= KT ids per scored tile, merged into the list like `pecm_topk`) or in
# two steps. Prepared rows take the flat K*D loop as before.
#
# k > MAX_KT (1024): every program gets a slice of exactly MAX_KT ids and keeps all of them, so the
# partials hold every candidate's key ([B, M] int64, the size of `cand` itself) and the torch.topk
# merge is exact. A list of M ids with k >= M is simply fully sorted.
#
# Autotune: BLOCK_KD, STAGES and warps keyed on (K, D, KT, HAS_CM, NORM, POOL) + dtypes; one config under
# the interpreter. The gather loops hold no tl.dot, so they are `tl.range(..., num_stages=STAGES)` loops
# (the kernel-level num_stages pipelines only dot loops), and they accumulate elementwise into a
# [SUB, BLOCK_KD] register tile that is reduced once after the loop (no tl.sum per iteration).
#
# Pinned configs (PECM_TRITON_CONFIG=pinned, kernels/common.py `config_mode`): `PINNED` (prepared rows)
# and `PINNED_RAW` (raw rows), each (meta dict, num_warps, num_stages); `pinned_config(raw)` returns the
# one a launch uses. kernels/aot_check.py compiles exactly these. `_pecm_rerank_kernel` is the autotuner
# (its `.fn` the @triton.jit function).
#
# Grid: 1-D, min(B x S, common.MAX_GRID) programs with a grid stride over the (query, split) pairs. For
# small B the scored tile (SUB ids) shrinks down to 16 ids so that B x S reaches ~4 programs per SM
# (B = 1, M = 1000: 63 programs instead of 16); each program still keeps a KT-long list.
# Ids outside [-1, N) are never loaded (treated as padding) whatever the host-side check did.

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import (
    MAX_KT,
    _epilogue,
    _inv_h,
    _inv_norm,
    _inv_vec,
    _lane_keys,
    _merge_topk1,
    _pack_keys,
    bench_or_skip,
    cand_operands,
    configs,
    d_pad,
    decode_keys,
    grid_1d,
    kt_floor,
    next_pow2,
    pinned_prune,
    prepare_qsum,
    query_operands,
    raw_sub,
    target_programs,
)

_GPU_CONFIGS = [
    ({"BLOCK_KD": 16, "STAGES": 3}, 8, 3),
    ({"BLOCK_KD": 32, "STAGES": 3}, 4, 3),
    ({"BLOCK_KD": 64, "STAGES": 3}, 4, 3),
    ({"BLOCK_KD": 128, "STAGES": 2}, 4, 2),
    ({"BLOCK_KD": 64, "STAGES": 4}, 8, 4),
]
_INTERP_CONFIG = ({"BLOCK_KD": 64, "STAGES": 1}, 4, 1)
PINNED = _GPU_CONFIGS[0]
PINNED_RAW = _GPU_CONFIGS[0]  # raw rows: the same (4 gathered elements per thread at SUB 32, 8 warps)


def pinned_config(raw: bool = False):
    """The config of a pinned launch: (meta, num_warps, num_stages); the interpreter's under TRITON_INTERPRET=1."""
    if common.interpret():
        return _INTERP_CONFIG
    return PINNED_RAW if raw else PINNED


GATHER_PER_THREAD = 16  # gathered elements per thread; above it the sm_90 compile spills (kernels/aot_check.py)
GATHER_PER_THREAD_RAW = 4  # the same for raw rows (more live registers: sums of squares, h; Triton 3.6 spills above)


def _prune_gather(cfgs, named_args, **kwargs):
    """Keep configs whose gathered [SUB, BLOCK_KD] chunk (and, for Eq. 4 pooled on the fly in registers,
    the h tile [SUB, D_PAD]) fits in registers (>= one config)."""
    allargs = {**named_args, **kwargs}
    kt = int(allargs.get("SUB", allargs.get("KT", 16)))
    raw = bool(allargs.get("NORM", False)) or int(allargs.get("POOL", 0)) != 0
    per_thread = GATHER_PER_THREAD_RAW if raw else GATHER_PER_THREAD
    h = kt * int(allargs.get("D_PAD", 0)) if int(allargs.get("POOL", 0)) == 2 else 0
    if h > int(allargs.get("H_ELEMS", common.H_ELEMS)):
        h = 0  # two-step scheme: no h tile
    kept = [
        cfg
        for cfg in cfgs
        if kt * cfg.kwargs["BLOCK_KD"] <= per_thread * 32 * cfg.num_warps
        and h <= common.H_PER_THREAD * 32 * cfg.num_warps
    ]
    return kept or [min(cfgs, key=lambda cfg: (cfg.kwargs["BLOCK_KD"], -cfg.num_warps))]


@triton.jit
def _gather_sim(
    b, rid, valid, qp_ptr, cp_ptr, D, POOL: tl.constexpr, SUB: tl.constexpr, BLOCK_KD: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    """sim [SUB] from given pooled rows; POOL 1 scales by 1/||cp|| (`common._inv_vec`)."""
    acc = tl.zeros((SUB, BLOCK_KD), dtype=tl.float32)
    if POOL == 1:
        ss = tl.zeros((SUB, BLOCK_KD), dtype=tl.float64)
    for t in tl.range(0, D, BLOCK_KD, num_stages=STAGES):
        dd = t + tl.arange(0, BLOCK_KD)
        md = dd < D
        qv = tl.load(qp_ptr + b * D + dd, mask=md, other=0.0)
        cv = tl.load(cp_ptr + rid[:, None] * D + dd[None, :], mask=valid[:, None] & md[None, :], other=0.0)
        acc += cv.to(tl.float32) * qv[None, :]
        if POOL == 1:
            cd = cv.to(tl.float64)
            ss += cd * cd
    sim = tl.sum(acc, axis=1)
    if POOL == 1:
        sim = sim * _inv_vec(tl.sum(ss, axis=1))
    return sim


@triton.jit
def _gather_live(cm_ptr, rid, valid, K, t, HAS_CM: tl.constexpr):
    if HAS_CM:
        return valid & (tl.load(cm_ptr + rid * K + t, mask=valid, other=0) != 0)
    else:
        return valid


@triton.jit
def _gather_raw(
    b, rid, valid, qw_ptr, qp_ptr, c_ptr, cm_ptr, cp_ptr, w_ptr, K, D,
    HAS_CM: tl.constexpr, NORM: tl.constexpr, POOL: tl.constexpr, SUB: tl.constexpr, BLOCK_KD: tl.constexpr,
    BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, H_ELEMS: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """(num, sim) [SUB] of gathered rows that are not prepared, normalised on the fly (GEMV form of
    `common._pecm_tile`): per prototype t the partial dot and the sum of squares of the same gathered
    BD-wide chunks, num += inv_t * partial. Pooled on the fly (POOL 2): with h [SUB, D_PAD] float32 in
    registers when D_PAD * SUB <= H_ELEMS (h += w_t inv_t c_t from a second gather of prototype t,
    which its chunks have just brought into L1/L2), else in two steps (a2d = w_t inv_t, then a second
    gather of the rows with the prototype loop inner, as `common._pool_two_step`)."""
    kd_total = K * D
    BD: tl.constexpr = BLOCK_KD if BLOCK_KD < D_PAD else D_PAD
    H_REGS: tl.constexpr = POOL == 2 and D_PAD * SUB <= H_ELEMS
    num = tl.zeros((SUB,), dtype=tl.float32)
    if H_REGS:
        dh = tl.arange(0, D_PAD)
        mh = dh < D
        h = tl.zeros((SUB, D_PAD), dtype=tl.float32)
    elif POOL == 2:
        kq = tl.arange(0, BLOCK_K)
        a2d = tl.zeros((SUB, BLOCK_K), dtype=tl.float32)
    for t in range(0, K):
        live = _gather_live(cm_ptr, rid, valid, K, t, HAS_CM)
        part = tl.zeros((SUB, BD), dtype=tl.float32)
        ss = tl.zeros((SUB, BD), dtype=tl.float64)
        for s in tl.range(0, D, BD, num_stages=STAGES):
            dd = s + tl.arange(0, BD)
            md = dd < D
            qv = tl.load(qw_ptr + b * kd_total + t * D + dd, mask=md, other=0.0)
            cv = tl.load(
                c_ptr + rid[:, None] * kd_total + t * D + dd[None, :], mask=live[:, None] & md[None, :], other=0.0
            )
            part += cv.to(tl.float32) * qv[None, :]
            if NORM:
                cd = cv.to(tl.float64)
                ss += cd * cd
        inv = _inv_norm(tl.sum(ss, axis=1), live, NORM)
        num += tl.sum(part, axis=1) * inv
        if H_REGS:
            a = tl.load(w_ptr + t) * inv
            lm = (valid & (a != 0.0))[:, None] & mh[None, :]
            cv = tl.load(c_ptr + rid[:, None] * kd_total + t * D + dh[None, :], mask=lm, other=0.0)
            h += cv.to(tl.float32) * a[:, None]
        elif POOL == 2:
            a2d = tl.where(kq[None, :] == t, (tl.load(w_ptr + t) * inv)[:, None], a2d)
    if H_REGS:
        qv = tl.load(qp_ptr + b * D + dh, mask=mh, other=0.0)
        sim = tl.sum(h * qv[None, :], axis=1) * _inv_h(tl.sum(h * h, axis=1))
    elif POOL == 2:
        sim = tl.zeros((SUB,), dtype=tl.float32)
        hh = tl.zeros((SUB,), dtype=tl.float32)
        for s in range(0, D, BD):
            dd = s + tl.arange(0, BD)
            md = dd < D
            hc = tl.zeros((SUB, BD), dtype=tl.float32)
            for t in range(0, K):
                at = tl.sum(tl.where(kq[None, :] == t, a2d, 0.0), axis=1)
                lm = (valid & (at != 0.0))[:, None] & md[None, :]
                cv = tl.load(c_ptr + rid[:, None] * kd_total + t * D + dd[None, :], mask=lm, other=0.0)
                hc += cv.to(tl.float32) * at[:, None]
            hh += tl.sum(hc * hc, axis=1)
            qv = tl.load(qp_ptr + b * D + dd, mask=md, other=0.0)
            sim += tl.sum(hc * qv[None, :], axis=1)
        sim = sim * _inv_h(hh)
    else:
        sim = _gather_sim(b, rid, valid, qp_ptr, cp_ptr, D, POOL, SUB, BLOCK_KD, STAGES)
    return num, sim


@triton.autotune(
    configs=configs(_GPU_CONFIGS, _INTERP_CONFIG),
    key=["K", "D", "KT", "HAS_CM", "NORM", "POOL"],
    prune_configs_by={"early_config_prune": pinned_prune(_prune_gather, PINNED, PINNED_RAW)},
    do_bench=bench_or_skip,
)
@triton.jit
def _pecm_rerank_kernel(
    qw_ptr, qden_ptr, qsum_ptr, qp_ptr, c_ptr, cm_ptr, cp_ptr, w_ptr, cand_ptr, part_ptr,
    B, N, M, K, D, per_prog, N_SPLIT,
    HAS_CM: tl.constexpr, NORM: tl.constexpr, POOL: tl.constexpr, BY: tl.constexpr, BLOCK_K: tl.constexpr,
    KT: tl.constexpr, SUB: tl.constexpr, D_PAD: tl.constexpr, H_ELEMS: tl.constexpr, BLOCK_KD: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    cols = tl.arange(0, KT)
    sub = tl.arange(0, SUB)
    kd_total = K * D
    for tile in range(tl.program_id(0), B * N_SPLIT, tl.num_programs(0)):
        b = (tile // N_SPLIT).to(tl.int64)
        pid_s = tile % N_SPLIT
        start = pid_s * per_prog
        end = tl.minimum(start + per_prog, M)
        best = _pack_keys(tl.full((KT,), float("-inf"), dtype=tl.float32), cols)
        for s in range(start, end, SUB):
            pos = s + sub
            ids = tl.load(cand_ptr + b * M + pos, mask=pos < end, other=-1)
            valid = (ids >= 0) & (ids < N)  # out-of-range ids are never loaded (padding)
            rid = tl.where(valid, ids, 0).to(tl.int64)
            if NORM or POOL == 2:
                num, sim = _gather_raw(
                    b, rid, valid, qw_ptr, qp_ptr, c_ptr, cm_ptr, cp_ptr, w_ptr, K, D,
                    HAS_CM, NORM, POOL, SUB, BLOCK_KD, BLOCK_K, D_PAD, H_ELEMS, STAGES,
                )  # fmt: skip
            else:
                acc = tl.zeros((SUB, BLOCK_KD), dtype=tl.float32)
                for t in tl.range(0, kd_total, BLOCK_KD, num_stages=STAGES):
                    kk = t + tl.arange(0, BLOCK_KD)
                    mk = kk < kd_total
                    qv = tl.load(qw_ptr + b * kd_total + kk, mask=mk, other=0.0)
                    cv = tl.load(
                        c_ptr + rid[:, None] * kd_total + kk[None, :], mask=valid[:, None] & mk[None, :], other=0.0
                    )
                    acc += cv.to(tl.float32) * qv[None, :]
                num = tl.sum(acc, axis=1)
                sim = _gather_sim(b, rid, valid, qp_ptr, cp_ptr, D, POOL, SUB, BLOCK_KD, STAGES)
            if HAS_CM:
                kq = tl.arange(0, BLOCK_K)
                mk = kq < K
                qv = tl.load(qden_ptr + b * K + kq, mask=mk, other=0.0)
                cv = tl.load(cm_ptr + rid[:, None] * K + kq[None, :], mask=valid[:, None] & mk[None, :], other=0)
                den = tl.sum(cv.to(tl.float32) * qv[None, :], axis=1)
            else:
                den = tl.load(qsum_ptr + b) + tl.zeros((SUB,), dtype=tl.float32)
            val = _epilogue(sim, num, den, BY)
            key = _lane_keys(val, rid.to(tl.int32), valid)
            best = _merge_topk1(best, key, KT, SUB)
        tl.store(part_ptr + (b * N_SPLIT + pid_s) * KT + cols, best)


MIN_SUB = 16  # narrowest scored tile when small batches split M finely (more programs)


def pecm_rerank(qs, cs, cand, k: int, by: int = 0):
    """Best k of each query's candidate ids by `by` (0 score, 1 sim, 2 conf): (values f32 [B, k'], ids
    int64 [B, k']) with k' = min(k, kept keys), sorted descending, -inf/-1 for padding; the caller pads
    to k. `qs` / `cs`: duck-typed `Queries` / `Candidates` (kernels/common.py); raw rows are normalised
    (and pooled) on the fly as they are gathered. Ids are trusted (in [-1, N)); no checks here.
    """
    qw, qden, qp = query_operands(qs)
    c, cm, cp, w, flags = cand_operands(cs)
    cand = cand.contiguous()
    b, kq = qden.shape
    n, _, d = cs.prototypes.shape
    m = cand.shape[1]
    if n >= 2**31:
        raise ValueError(f"c: at most {2**31 - 1} rows for rerank (int32 ids in the keys), got N={n}")
    kt = max(kt_floor(), next_pow2(min(k, max(m, 1))))
    budget = common.H_ELEMS
    if kt > MAX_KT:  # k > MAX_KT: every program keeps its whole slice of MAX_KT ids (exact)
        kt = per_prog = MAX_KT
        sub = raw_sub(kt, d, flags, budget)
    else:
        sub = raw_sub(kt, d, flags, budget)
        target = target_programs(qw.device)
        while sub > MIN_SUB and b * triton.cdiv(m, sub) < target:  # small B: narrower slices, more programs
            sub //= 2
        n_split = max(1, min(triton.cdiv(m, sub), target // b))
        per_prog = triton.cdiv(triton.cdiv(m, n_split), sub) * sub
    n_split = triton.cdiv(m, per_prog)
    part = torch.empty((b, n_split, kt), dtype=torch.int64, device=qw.device)
    common.config_mode()  # validates PECM_TRITON_CONFIG
    _pecm_rerank_kernel[grid_1d(b * n_split)](
        qw, qden, prepare_qsum(qden, cm), qp, c, cm, cp, w, cand, part,
        b, n, m, kq, d, per_prog, n_split,
        BY=int(by), BLOCK_K=next_pow2(kq), KT=kt, SUB=sub, D_PAD=d_pad(d), H_ELEMS=budget,
        **flags,
    )  # fmt: skip
    keys = torch.topk(part.view(b, -1), min(k, n_split * kt), dim=1, largest=True, sorted=True).values
    return decode_keys(keys)
