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
# k > MAX_KT (1024): every program gets a slice of exactly MAX_KT ids and keeps all of them, so the
# partials hold every candidate's key ([B, M] int64, the size of `cand` itself) and the torch.topk
# merge is exact. A list of M ids with k >= M is simply fully sorted.
#
# Autotune: BLOCK_KD and warps keyed on (K, D, KT) + dtypes; one config under the interpreter.

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    MAX_KT,
    _epilogue,
    _pack_keys,
    configs,
    decode_keys,
    kt_floor,
    next_pow2,
    prepare_qsum,
    target_programs,
)

_GPU_CONFIGS = [
    ({"BLOCK_KD": 16}, 8, 2),
    ({"BLOCK_KD": 32}, 4, 2),
    ({"BLOCK_KD": 64}, 4, 2),
    ({"BLOCK_KD": 128}, 4, 2),
    ({"BLOCK_KD": 64}, 8, 2),
]
_INTERP_CONFIG = ({"BLOCK_KD": 64}, 4, 1)


GATHER_PER_THREAD = 16  # gathered elements per thread; above it the sm_90 compile spills (kernels/aot_check.py)


def _prune_gather(cfgs, named_args, **kwargs):
    """Keep configs whose gathered [KT, BLOCK_KD] chunk fits in registers (>= one config)."""
    kt = int(kwargs.get("KT", named_args.get("KT", 16)))
    kept = [cfg for cfg in cfgs if kt * cfg.kwargs["BLOCK_KD"] <= GATHER_PER_THREAD * 32 * cfg.num_warps]
    return kept or [min(cfgs, key=lambda cfg: (cfg.kwargs["BLOCK_KD"], -cfg.num_warps))]


@triton.autotune(
    configs=configs(_GPU_CONFIGS, _INTERP_CONFIG),
    key=["K", "D", "KT", "HAS_CM"],
    prune_configs_by={"early_config_prune": _prune_gather},
)
@triton.jit
def _pecm_rerank_kernel(
    qw_ptr, qden_ptr, qsum_ptr, qp_ptr, c_ptr, cm_ptr, cp_ptr, cand_ptr, part_ptr,
    M, K, D, per_prog,
    HAS_CM: tl.constexpr, BY: tl.constexpr, BLOCK_K: tl.constexpr, KT: tl.constexpr, BLOCK_KD: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    cols = tl.arange(0, KT)
    start = pid_s * per_prog
    end = tl.minimum(start + per_prog, M)
    kd_total = K * D
    best = _pack_keys(tl.full((KT,), float("-inf"), dtype=tl.float32), cols)
    for s in range(start, end, KT):
        pos = s + cols
        ids = tl.load(cand_ptr + b * M + pos, mask=pos < end, other=-1)
        valid = ids >= 0
        rid = tl.where(valid, ids, 0).to(tl.int64)
        num = tl.zeros((KT,), dtype=tl.float32)
        for t in range(0, kd_total, BLOCK_KD):
            kk = t + tl.arange(0, BLOCK_KD)
            mk = kk < kd_total
            qv = tl.load(qw_ptr + b * kd_total + kk, mask=mk, other=0.0)
            cv = tl.load(c_ptr + rid[:, None] * kd_total + kk[None, :], mask=valid[:, None] & mk[None, :], other=0.0)
            num += tl.sum(cv.to(tl.float32) * qv[None, :], axis=1)
        sim = tl.zeros((KT,), dtype=tl.float32)
        for t in range(0, D, BLOCK_KD):
            dd = t + tl.arange(0, BLOCK_KD)
            md = dd < D
            qv = tl.load(qp_ptr + b * D + dd, mask=md, other=0.0)
            cv = tl.load(cp_ptr + rid[:, None] * D + dd[None, :], mask=valid[:, None] & md[None, :], other=0.0)
            sim += tl.sum(cv.to(tl.float32) * qv[None, :], axis=1)
        if HAS_CM:
            kq = tl.arange(0, BLOCK_K)
            mk = kq < K
            qv = tl.load(qden_ptr + b * K + kq, mask=mk, other=0.0)
            cv = tl.load(cm_ptr + rid[:, None] * K + kq[None, :], mask=valid[:, None] & mk[None, :], other=0.0)
            den = tl.sum(cv.to(tl.float32) * qv[None, :], axis=1)
        else:
            den = tl.load(qsum_ptr + b) + tl.zeros((KT,), dtype=tl.float32)
        val = _epilogue(sim, num, den, BY)
        val = tl.where(valid, val, float("-inf"))
        key = _pack_keys(val, rid.to(tl.int32))
        if tl.max(key, 0) > tl.min(best, 0):
            key = tl.sort(key)
            best = tl.sort(tl.maximum(best, key), descending=True)
    tl.store(part_ptr + (b * n_split + pid_s) * KT + cols, best)


def pecm_rerank(qw, qden, qp, c, cm, cp, cand, k: int, by: int = 0):
    """Best k of each query's candidate ids by `by` (0 score, 1 sim, 2 conf): (values f32 [B, k'], ids
    int64 [B, k']) with k' = min(k, kept keys), sorted descending, -inf/-1 for padding; the caller pads
    to k. Arguments are the validated canonical operands (ids in [-1, N)); no checks here.
    """
    qw, qden, qp, c, cp, cand = (t.contiguous() for t in (qw, qden, qp, c, cp, cand))
    cm = None if cm is None else cm.contiguous()
    b, kq = qden.shape
    n, d = cp.shape
    m = cand.shape[1]
    if n >= 2**31:
        raise ValueError(f"c: at most {2**31 - 1} rows for rerank (int32 ids in the keys), got N={n}")
    kt = max(kt_floor(), next_pow2(min(k, max(m, 1))))
    if kt > MAX_KT:  # k > MAX_KT: every program keeps its whole slice of MAX_KT ids (exact)
        kt = per_prog = MAX_KT
    else:
        n_split = max(1, min(triton.cdiv(m, kt), target_programs(qw.device) // b))
        per_prog = triton.cdiv(triton.cdiv(m, n_split), kt) * kt
    n_split = triton.cdiv(m, per_prog)
    part = torch.empty((b, n_split, kt), dtype=torch.int64, device=qw.device)
    _pecm_rerank_kernel[(b, n_split)](
        qw, qden, prepare_qsum(qden, cm), qp, c, qden if cm is None else cm, cp, cand, part,
        m, kq, d, per_prog,
        HAS_CM=cm is not None, BY=int(by), BLOCK_K=next_pow2(kq), KT=kt,
    )  # fmt: skip
    keys = torch.topk(part.view(b, -1), min(k, n_split * kt), dim=1, largest=True, sorted=True).values
    return decode_keys(keys)
