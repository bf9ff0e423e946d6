# Fused exhaustive PECM top-k: the best k candidates per query by score | sim | conf, without ever
# writing a [B, N] matrix.
#
# Math: the value of pair (b, n) is the `by` quantity of `pecm_scores` (same tile code, same
# epilogue: conf = num/den or 0 when den <= 0, score = sim * conf).
#
# Algorithm (FAISS block-select, adapted to Triton's block programming model):
#   grid = (query blocks of BLOCK_B, S candidate splits). Program (i, s) streams its contiguous
#   candidate range in tiles of KT = max(64, next_pow2(k)) candidates. Each (value, id) is packed into
#   an int64 key ordered like the value (`common._pack_keys`), so one sort moves values and ids.
#   The program keeps a running list `best` [BLOCK_B, KT] sorted descending. For each tile:
#       if max(tile) <= min(best)   -> skip (exact: nothing in the tile can enter any row's list)
#       tile = sort(tile, ascending); best = sort(max(best, tile), descending)
#   max() of a descending and an ascending list of equal length holds exactly the KT largest of
#   their union (bitonic merge), so after the last tile `best` is the exact top-KT of the range.
#   The program writes its KT keys to partials [B, S, KT] (S * KT << N), and the exact merge is one
#   torch.topk over the keys of each query row ([B, S*KT] int64) followed by decoding.
#
# k > MAX_KT (1024) is not handled here: the Triton backend streams `pecm_scores_fwd` chunks through
# `pecm.topk.RunningTopK` instead (one [B, chunk] float32 tile at a time, bounded memory).
#
# Autotune: BLOCK_B, BLOCK_KD and warps keyed on (K, D, KT, B bucket) + dtypes; one config under
# the interpreter. KT and the split count are chosen by the launcher.

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import (
    MAX_KT,
    _epilogue,
    _pack_keys,
    _pecm_tile,
    b_bucket,
    configs,
    decode_keys,
    dot_mode,
    kt_floor,
    next_pow2,
    prepare_qsum,
    prune_configs,
    target_programs,
)

_GPU_CONFIGS = [
    ({"BLOCK_B": 16, "BLOCK_KD": 16}, 8, 2),
    ({"BLOCK_B": 16, "BLOCK_KD": 32}, 4, 2),
    ({"BLOCK_B": 16, "BLOCK_KD": 64}, 8, 2),
    ({"BLOCK_B": 32, "BLOCK_KD": 32}, 8, 2),
    ({"BLOCK_B": 64, "BLOCK_KD": 32}, 8, 2),
]
# interpreter: BLOCK_B 4 (no tl.dot size limit there; its tl.sort cost grows with the tile size)
_INTERP_CONFIG = ({"BLOCK_B": 4, "BLOCK_KD": 64}, 4, 1)
FALLBACK_CHUNK = 8192


@triton.autotune(
    configs=configs(_GPU_CONFIGS, _INTERP_CONFIG),
    key=["K", "D", "KT", "B_BUCKET", "HAS_CM", "MODE"],
    prune_configs_by={"early_config_prune": prune_configs("BLOCK_B", "KT", f32_budget=256, half_budget=256)},
)
@triton.jit
def _pecm_topk_kernel(
    qw_ptr, qden_ptr, qsum_ptr, qp_ptr, c_ptr, cm_ptr, cp_ptr, part_ptr,
    B, N, K, D, per_prog, B_BUCKET,
    HAS_CM: tl.constexpr, MODE: tl.constexpr, BY: tl.constexpr, BLOCK_K: tl.constexpr, KT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_KD: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, KT)
    start = pid_s * per_prog
    end = tl.minimum(start + per_prog, N)
    neg = tl.full((BLOCK_B, KT), float("-inf"), dtype=tl.float32)
    best = _pack_keys(neg, cols[None, :] + tl.zeros((BLOCK_B, KT), dtype=tl.int32))
    for s in range(start, end, KT):
        offs_n = s + cols
        sim, num, den = _pecm_tile(
            qw_ptr, qden_ptr, qsum_ptr, qp_ptr, c_ptr, cm_ptr, cp_ptr, offs_b, offs_n, B, end, K, D,
            HAS_CM, MODE, BLOCK_B, KT, BLOCK_KD, BLOCK_K,
        )  # fmt: skip
        val = _epilogue(sim, num, den, BY)
        val = tl.where((offs_n < end)[None, :], val, float("-inf"))
        key = _pack_keys(val, offs_n[None, :] + tl.zeros((BLOCK_B, KT), dtype=tl.int32))
        if tl.max(tl.max(key, 1), 0) > tl.min(tl.min(best, 1), 0):
            key = tl.sort(key, dim=1)
            best = tl.sort(tl.maximum(best, key), dim=1, descending=True)
    rows = offs_b.to(tl.int64)[:, None] * n_split + pid_s
    tl.store(part_ptr + rows * KT + cols[None, :], best, mask=(offs_b < B)[:, None])


def _splits(b: int, n: int, kt: int, chunk_size: Optional[int], device: torch.device) -> int:
    tiles = triton.cdiv(n, kt)
    if chunk_size:
        return min(tiles, triton.cdiv(n, triton.cdiv(int(chunk_size), kt) * kt))
    want = max(1, target_programs(device) // triton.cdiv(b, 16))  # ~16-row query blocks
    return max(1, min(tiles, want))


def pecm_topk(qw, qden, qp, c, cm, cp, k: int, by: int = 0, chunk_size: Optional[int] = None):
    """Exact top-k of the `by` quantity (0 score, 1 sim, 2 conf) over all N candidates, 1 <= k <= MAX_KT.

    Returns (values f32 [B, min(k, N)], ids int64 [B, min(k, N)]) sorted descending; the caller pads
    to k with (-inf, -1). Arguments are the validated canonical operands (no checks here).
    """
    qw, qden, qp, c, cp = (t.contiguous() for t in (qw, qden, qp, c, cp))
    cm = None if cm is None else cm.contiguous()
    b, kq = qden.shape
    n, d = cp.shape
    if n >= 2**31 - MAX_KT:
        raise ValueError(f"c: at most {2**31 - MAX_KT - 1} candidates per call (int32 ids), got N={n}")
    if k > MAX_KT:
        raise ValueError(f"k: the fused top-k keeps at most {MAX_KT} per program, got {k}")
    kt = max(kt_floor(), next_pow2(k))
    n_split = _splits(b, n, kt, chunk_size, qw.device)
    per_prog = triton.cdiv(triton.cdiv(n, n_split), kt) * kt
    n_split = triton.cdiv(n, per_prog)
    part = torch.empty((b, n_split, kt), dtype=torch.int64, device=qw.device)
    grid = lambda meta: (triton.cdiv(b, meta["BLOCK_B"]), n_split)
    _pecm_topk_kernel[grid](
        qw, qden, prepare_qsum(qden, cm), qp, c, qden if cm is None else cm, cp, part,
        b, n, kq, d, per_prog, b_bucket(b),
        HAS_CM=cm is not None, MODE=dot_mode(c.dtype), BY=int(by), BLOCK_K=max(16, next_pow2(kq)), KT=kt,
    )  # fmt: skip
    kk = min(k, n)
    keys = torch.topk(part.view(b, -1), kk, dim=1, largest=True, sorted=True).values
    return decode_keys(keys)
