# Product-quantised (PQ) PECM candidates scored from their codes (asymmetric distance computation, ADC),
# fused with a running top-k: the best k candidates per query by score | sim | conf from the codes alone,
# without decoding a prototype and without writing a [B, N] matrix.
#
# Math: each candidate prototype c_{n,k} (D long) is stored as M codes, one per D/M-long subspace:
# c_{n,k} ~ scales[n, k] * [centroid_{k,1,codes[n,k,1]}, ..., centroid_{k,M,codes[n,k,M]}]. The caller
# folds the query into a look-up table lut[b, k, m, c] = w_k mq_{b,k} (q̂_{b,k} restricted to subspace m)
# . centroid_{k,m,c} (float32 [B, K, M, 256]), so per query b and candidate n:
#
#     num[b, n] = sum_k scales[n, k] * sum_m lut[b, k, m, codes[n, k, m]]     (K*M gathers)
#     den[b, n] = sum_k qden[b, k] * c_mask[n, k]   (= qsum[b] = sum_k qden[b, k] without a mask)
#     sim[b, n] = qp[b] . c_pooled[n]               (D long, float32 accumulation, no renormalisation)
#     conf = num / den if den > 0 else 0,  score = sim * conf
#
# Unlike `common._epilogue` there is no |conf| <= 1.5 overflow guard (`_pq_epilogue`): the look-up table
# and the scales are the caller's, and the value above is returned as it is; NaN is never ranked.
#
# Shape of the problem: per (query, candidate) a gather of K*M table entries (the table of one query,
# K*M*256*4 bytes, stays in L1/L2) + a D-long GEMV; no operand reuse for tl.dot. A program owns one
# query and a contiguous range of candidate positions: all N rows (exhaustive), or cand[b, :Mc] (the
# re-rank case: int64 row ids, -1 = padding; ids outside [-1, N) are never loaded and count as padding).
# Per tile of SUB = min(BLOCK_N, KT) candidates (`_pq_tile`): for each slot k the codes [SUB, BM] (BM =
# min(16, next_pow2(M)) wide chunks of the M subspaces, uint8 -> int32) are loaded and the table entries
# gathered at lut + ((b*K + k)*M + m)*256 + code, scaled by scales[n, k] and accumulated elementwise into
# a [SUB, BM] register tile (reduced once after the K loop); a zero scale skips the slot's loads (it
# contributes exactly 0, also against a non-finite table entry). sim
# accumulates [SUB, BD] chunks of c_pooled (float16 or float32, upcast) times qp the same way.
#
# Top-k: as `pecm_rerank` (one query per program): (value, id) packed into one int64 key ordered like
# the value (`common._pack_keys`, ties: larger id first), a running list of KT = max(64, next_pow2(k))
# keys (16 under the interpreter) merged with each tile by `common._merge_topk1` (bitonic merge; a
# SUB < KT tile meets only the last SUB entries of the list). Each program writes its KT keys to
# partials [B, S, KT]; the exact merge is one torch.topk over each query row of keys, then decoding.
# Returned ids are candidate row numbers (also with `cand`: rows, not positions in cand).
#
# k > MAX_KT (1024): with `cand`, every program gets a slice of exactly MAX_KT positions and keeps all
# of them (partials = every key, [B, Mc] int64, the size of cand itself; exact, like `pecm_rerank`).
# Exhaustive: `pq_scores` of FALLBACK_CHUNK-row chunks streamed through an exact running merge in torch
# (`_stream_topk`, the algorithm of `pecm.topk.RunningTopK`, written here because kernels/ never imports
# pecm); three [B, chunk] float32 tiles at a time.
#
# Optional inputs: c_mask and cand are None with the constexpr flags HAS_CM / HAS_CAND (never dummy pointers).
# Autotune: BLOCK_N, BLOCK_D and warps keyed on (K, M, D, KT, HAS_CM, HAS_CAND) + dtypes; one config under
# the interpreter. Pinned config (PECM_TRITON_CONFIG=pinned, kernels/common.py `config_mode`):
# `PINNED`, (meta dict, num_warps, num_stages); `pinned_config()` returns the one a launch uses.
# `_pq_topk_kernel` / `_pq_scores_kernel` are the autotuners (their `.fn` the @triton.jit functions).
#
# Grid: 1-D, min(B x S, common.MAX_GRID) programs with a grid stride over the (query, split) pairs
# (`pq_scores`: over the (query, BLOCK_N tile) pairs). Row offsets are int64.

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import (
    MAX_KT,
    _lane_keys,
    _merge_topk1,
    _pack_keys,
    bench_or_skip,
    configs,
    decode_keys,
    grid_1d,
    kt_floor,
    next_pow2,
    pinned_prune,
    target_programs,
)

# The loops hold no tl.dot (gathers and elementwise FMAs), so num_stages does not pipeline anything here.
_GPU_CONFIGS = [
    ({"BLOCK_N": 64, "BLOCK_D": 64}, 4, 1),
    ({"BLOCK_N": 128, "BLOCK_D": 32}, 4, 1),
    ({"BLOCK_N": 128, "BLOCK_D": 64}, 8, 1),
    ({"BLOCK_N": 256, "BLOCK_D": 32}, 8, 1),
]
_INTERP_CONFIG = ({"BLOCK_N": 64, "BLOCK_D": 64}, 4, 1)
PINNED = _GPU_CONFIGS[0]
FALLBACK_CHUNK = 8192  # candidate rows per `pq_scores` chunk of the exhaustive k > MAX_KT path
BM_MAX = 16  # widest chunk of the M subspaces gathered at once
TILE_PER_THREAD = 32  # register-tile elements per thread ([SUB, BM] gathers, [SUB, BD] pooled chunk)


def pinned_config():
    """The config of a pinned launch: (meta, num_warps, num_stages); the interpreter's under TRITON_INTERPRET=1."""
    return _INTERP_CONFIG if common.interpret() else PINNED


def _prune(cfgs, named_args, **kwargs):
    """Keep configs whose [SUB, BM] gather tile and [SUB, BD] pooled chunk fit the per-thread budget, with
    SUB = min(BLOCK_N, KT) (no KT for `pq_scores`: BLOCK_N); at least the smallest config."""
    allargs = {**named_args, **kwargs}
    kt = int(allargs.get("KT", 1 << 30))
    bm = min(BM_MAX, int(allargs.get("M_PAD", BM_MAX)))
    dp = int(allargs.get("D_PAD", 64))
    kept = []
    for cfg in cfgs:
        sub = min(cfg.kwargs["BLOCK_N"], kt)
        bd = min(cfg.kwargs["BLOCK_D"], dp)
        if sub * max(bm, bd) <= TILE_PER_THREAD * 32 * cfg.num_warps:
            kept.append(cfg)
    return kept or [min(cfgs, key=lambda cfg: (cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_D"], -cfg.num_warps))]


@triton.jit
def _pq_tile(
    b, rid, valid, lut_ptr, codes_ptr, sc_ptr, cm_ptr, qden_ptr, qsum_ptr, qp_ptr, cp_ptr, K, M, D,
    HAS_CM: tl.constexpr, SUB: tl.constexpr, M_PAD: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """(sim, num, den) [SUB] of query b (int64) against the rows rid (int64, [SUB]) where `valid`."""
    BM: tl.constexpr = M_PAD if M_PAD < 16 else 16
    BD: tl.constexpr = BLOCK_D if BLOCK_D < D_PAD else D_PAD
    acc = tl.zeros((SUB, BM), dtype=tl.float32)
    for kk in range(0, K):
        sc = tl.load(sc_ptr + rid * K + kk, mask=valid, other=0.0)
        live = valid & (sc != 0.0)  # a zero scale (masked-out prototype) contributes nothing: skip its loads
        row = (rid * K + kk) * M  # [SUB] int64 offset of the codes of (n, k)
        lrow = ((b * K + kk) * M) * 256  # int64 offset of the table of (b, k)
        for m0 in range(0, M, BM):
            mm = m0 + tl.arange(0, BM)
            lm = live[:, None] & (mm < M)[None, :]
            code = tl.load(codes_ptr + row[:, None] + mm[None, :], mask=lm, other=0).to(tl.int32)
            v = tl.load(lut_ptr + lrow + mm[None, :] * 256 + code, mask=lm, other=0.0)
            acc += v * sc[:, None]
    num = tl.sum(acc, axis=1)
    if HAS_CM:
        kq = tl.arange(0, BLOCK_K)
        mk = kq < K
        qd = tl.load(qden_ptr + b * K + kq, mask=mk, other=0.0)
        cmv = tl.load(cm_ptr + rid[:, None] * K + kq[None, :], mask=valid[:, None] & mk[None, :], other=0)
        den = tl.sum(cmv.to(tl.float32) * qd[None, :], axis=1)
    else:
        den = tl.load(qsum_ptr + b) + tl.zeros((SUB,), dtype=tl.float32)
    sacc = tl.zeros((SUB, BD), dtype=tl.float32)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        md = dd < D
        qv = tl.load(qp_ptr + b * D + dd, mask=md, other=0.0)
        cv = tl.load(cp_ptr + rid[:, None] * D + dd[None, :], mask=valid[:, None] & md[None, :], other=0.0)
        sacc += cv.to(tl.float32) * qv[None, :]
    sim = tl.sum(sacc, axis=1)
    return sim, num, den


@triton.jit
def _pq_conf(num, den):
    pos = den > 0
    return tl.where(pos, num / tl.where(pos, den, 1.0), 0.0)


@triton.jit
def _pq_epilogue(sim, num, den, BY: tl.constexpr):
    """BY 0: score, 1: sim, 2: conf (`common.BY_SCORE` / `BY_SIM` / `BY_CONF`); no overflow guard (see top)."""
    if BY == 1:
        out = sim
    elif BY == 2:
        out = _pq_conf(num, den)
    else:
        out = sim * _pq_conf(num, den)
    return out


@triton.autotune(
    configs=configs(_GPU_CONFIGS, _INTERP_CONFIG),
    key=["K", "M", "D", "KT", "HAS_CM", "HAS_CAND"],
    prune_configs_by={"early_config_prune": pinned_prune(_prune, PINNED)},
    do_bench=bench_or_skip,
)
@triton.jit
def _pq_topk_kernel(
    lut_ptr, codes_ptr, sc_ptr, cm_ptr, qden_ptr, qsum_ptr, qp_ptr, cp_ptr, cand_ptr, part_ptr,
    B, N, L, K, M, D, per_prog, N_SPLIT,
    HAS_CM: tl.constexpr, HAS_CAND: tl.constexpr, BY: tl.constexpr, KT: tl.constexpr, M_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    SUB: tl.constexpr = BLOCK_N if BLOCK_N < KT else KT
    cols = tl.arange(0, KT)
    sub = tl.arange(0, SUB)
    for tile in range(tl.program_id(0), B * N_SPLIT, tl.num_programs(0)):
        b = (tile // N_SPLIT).to(tl.int64)
        pid_s = tile % N_SPLIT
        start = pid_s * per_prog
        end = tl.minimum(start + per_prog, L)
        best = _pack_keys(tl.full((KT,), float("-inf"), dtype=tl.float32), cols)
        for s in range(start, end, SUB):
            pos = s + sub
            if HAS_CAND:
                ids = tl.load(cand_ptr + b * L + pos, mask=pos < end, other=-1)
                valid = (ids >= 0) & (ids < N)  # out-of-range ids are never loaded (padding)
                rid = tl.where(valid, ids, 0).to(tl.int64)
            else:
                valid = pos < end
                rid = tl.where(valid, pos, 0).to(tl.int64)
            sim, num, den = _pq_tile(
                b, rid, valid, lut_ptr, codes_ptr, sc_ptr, cm_ptr, qden_ptr, qsum_ptr, qp_ptr, cp_ptr, K, M, D,
                HAS_CM, SUB, M_PAD, BLOCK_K, D_PAD, BLOCK_D,
            )  # fmt: skip
            key = _lane_keys(_pq_epilogue(sim, num, den, BY), rid.to(tl.int32), valid)
            best = _merge_topk1(best, key, KT, SUB)
        tl.store(part_ptr + (b * N_SPLIT + pid_s) * KT + cols, best)


@triton.autotune(
    configs=configs(_GPU_CONFIGS, _INTERP_CONFIG),
    key=["K", "M", "D", "HAS_CM"],
    prune_configs_by={"early_config_prune": pinned_prune(_prune, PINNED)},
    do_bench=bench_or_skip,
)
@triton.jit
def _pq_scores_kernel(
    lut_ptr, codes_ptr, sc_ptr, cm_ptr, qden_ptr, qsum_ptr, qp_ptr, cp_ptr, sim_ptr, conf_ptr, score_ptr,
    B, N, K, M, D,
    HAS_CM: tl.constexpr, M_PAD: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    nt = tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), B * nt, tl.num_programs(0)):
        b = (tile // nt).to(tl.int64)
        offs = (tile % nt) * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = offs < N
        rid = tl.where(valid, offs, 0).to(tl.int64)
        sim, num, den = _pq_tile(
            b, rid, valid, lut_ptr, codes_ptr, sc_ptr, cm_ptr, qden_ptr, qsum_ptr, qp_ptr, cp_ptr, K, M, D,
            HAS_CM, BLOCK_N, M_PAD, BLOCK_K, D_PAD, BLOCK_D,
        )  # fmt: skip
        conf = _pq_conf(num, den)
        out = b * N + rid
        tl.store(sim_ptr + out, sim, mask=valid)
        tl.store(conf_ptr + out, conf, mask=valid)
        tl.store(score_ptr + out, sim * conf, mask=valid)


def _operands(lut, codes, scales, c_mask, qden, qsum, qp, c_pooled):
    """Contiguous kernel operands and the shapes (b, n, K, M, D); the bool/uint8 mask read as bytes."""
    b, kq, m, ncode = lut.shape
    n = codes.shape[0]
    d = qp.shape[1]
    if ncode != 256 or tuple(codes.shape[1:]) != (kq, m) or codes.dtype != torch.uint8:
        raise ValueError(f"lut [B, K, M, 256] / codes uint8 [N, K, M]: got {tuple(lut.shape)} / {tuple(codes.shape)}")
    cm = None if c_mask is None else c_mask.contiguous().view(torch.uint8)
    ops = tuple(t.contiguous() for t in (lut, codes, scales, qden, qsum, qp, c_pooled))
    return ops[:3] + (cm,) + ops[3:], (b, n, kq, m, d)


def _meta(kq: int, m: int, d: int):
    return dict(M_PAD=next_pow2(m), BLOCK_K=next_pow2(kq), D_PAD=max(16, next_pow2(d)))


def pq_scores(lut, codes, scales, c_mask, qden, qsum, qp, c_pooled):
    """(sim, conf, score) float32 [B, N] each of every (query, PQ candidate) pair (math at the top of
    kernels/pq_topk.py). The unfused values: for tests, small problems and the k > MAX_KT fallback."""
    (lut, codes, sc, cm, qden, qsum, qp, cp), (b, n, kq, m, d) = _operands(
        lut, codes, scales, c_mask, qden, qsum, qp, c_pooled
    )
    outs = [torch.empty((b, n), dtype=torch.float32, device=lut.device) for _ in range(3)]
    if b == 0 or n == 0:
        return tuple(outs)
    common.config_mode()  # validates PECM_TRITON_CONFIG
    grid = lambda meta: grid_1d(b * triton.cdiv(n, meta["BLOCK_N"]))
    _pq_scores_kernel[grid](
        lut, codes, sc, cm, qden, qsum, qp, cp, *outs, b, n, kq, m, d, HAS_CM=cm is not None, **_meta(kq, m, d)
    )
    return tuple(outs)


def _pad(vals: torch.Tensor, ids: torch.Tensor, k: int):
    """[B, k'] -> [B, k] with the (-inf, -1) tail; ids of -inf values are -1."""
    b, kk = vals.shape
    if kk < k:
        vals = torch.cat([vals, torch.full((b, k - kk), float("-inf"), dtype=vals.dtype, device=vals.device)], 1)
        ids = torch.cat([ids, torch.full((b, k - kk), -1, dtype=ids.dtype, device=ids.device)], 1)
    return vals[:, :k], torch.where(vals[:, :k] == float("-inf"), torch.full_like(ids[:, :k], -1), ids[:, :k])


def _stream_topk(lut, codes, scales, c_mask, qden, qsum, qp, c_pooled, k: int, by: int, chunk: int):
    """Exhaustive k > MAX_KT: `pq_scores` of row chunks through an exact running merge (NaN never ranked)."""
    b, n = lut.shape[0], codes.shape[0]
    vals = torch.empty((b, 0), dtype=torch.float32, device=lut.device)
    ids = torch.empty((b, 0), dtype=torch.int64, device=lut.device)
    pick = {0: 2, 1: 0, 2: 1}[int(by)]  # position of the `by` quantity in (sim, conf, score)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        cmk = None if c_mask is None else c_mask[s:e]
        v = pq_scores(lut, codes[s:e], scales[s:e], cmk, qden, qsum, qp, c_pooled[s:e])[pick]
        v = torch.where(torch.isnan(v), float("-inf"), v)
        vals = torch.cat([vals, v], 1)
        ids = torch.cat([ids, torch.arange(s, e, device=lut.device).expand(b, e - s)], 1)
        top, pos = torch.topk(vals, min(k, vals.shape[1]), dim=1, largest=True, sorted=True)
        vals, ids = top, torch.gather(ids, 1, pos)
    return _pad(vals, ids, k)


def pq_topk(lut, codes, scales, c_mask, qden, qsum, qp, c_pooled, k: int, by: int = 0, cand=None):
    """Best k PQ candidates per query by `by` (0 score, 1 sim, 2 conf): (values float32 [B, k], ids int64
    [B, k]) sorted descending, (-inf, -1) past the valid candidates; NaN is never ranked; ties in any order.

    Operands (math and shapes at the top of kernels/pq_topk.py): lut f32 [B, K, M, 256], codes uint8
    [N, K, M], scales f32 [N, K], c_mask [N, K] 0/1 (uint8 or bool) or None, qden f32 [B, K], qsum f32 [B],
    qp f32 [B, D], c_pooled f16/f32 [N, D]; `cand` int64 [B, Mc] row ids (-1 = padding) restricts query b
    to those rows (returned ids are rows). Operands are trusted beyond their shapes (no value checks).
    """
    k = int(k)
    if k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k}")
    (lut, codes, sc, cm, qden, qsum, qp, cp), (b, n, kq, m, d) = _operands(
        lut, codes, scales, c_mask, qden, qsum, qp, c_pooled
    )
    if n >= 2**31:
        raise ValueError(f"codes: at most {2**31 - 1} candidates per call (int32 ids in the keys), got N={n}")
    if cand is not None:
        cand = cand.contiguous()
        if cand.dtype != torch.int64 or cand.ndim != 2 or cand.shape[0] != b:
            raise ValueError(f"cand: expected int64 [B={b}, Mc], got {cand.dtype} {tuple(cand.shape)}")
    length = n if cand is None else cand.shape[1]
    if b == 0 or length == 0 or n == 0:  # nothing to score: all padding
        none = torch.empty((b, 0), dtype=torch.int64, device=lut.device)
        return _pad(none.to(torch.float32), none, k)
    if k > MAX_KT and cand is None:
        return _stream_topk(lut, codes, sc, cm, qden, qsum, qp, cp, k, by, FALLBACK_CHUNK)
    kt = max(kt_floor(), next_pow2(min(k, length)))
    if kt > MAX_KT:  # with cand: every program keeps its whole slice of MAX_KT positions (exact)
        kt = per_prog = MAX_KT
    else:
        n_split = max(1, min(triton.cdiv(length, kt), target_programs(lut.device) // b))
        per_prog = triton.cdiv(triton.cdiv(length, n_split), kt) * kt
    n_split = triton.cdiv(length, per_prog)
    part = torch.empty((b, n_split, kt), dtype=torch.int64, device=lut.device)
    common.config_mode()  # validates PECM_TRITON_CONFIG
    _pq_topk_kernel[grid_1d(b * n_split)](
        lut, codes, sc, cm, qden, qsum, qp, cp, cand, part,
        b, n, length, kq, m, d, per_prog, n_split,
        HAS_CM=cm is not None, HAS_CAND=cand is not None, BY=int(by), KT=kt, **_meta(kq, m, d),
    )  # fmt: skip
    keys = torch.topk(part.view(b, -1), min(k, n_split * kt), dim=1, largest=True, sorted=True).values
    return _pad(*decode_keys(keys), k)
