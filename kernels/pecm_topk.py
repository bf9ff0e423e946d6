# Fused exhaustive PECM top-k: the best k candidates per query by score | sim | conf, without ever
# writing a [B, N] matrix.
#
# Math: the value of pair (b, n) is the `by` quantity of `pecm_scores` (same tile code, same
# epilogue: conf = num/den or 0 when den <= 0, score = sim * conf).
#
# Algorithm (FAISS block-select, adapted to Triton's block programming model):
#   grid = (query blocks of BLOCK_B, S candidate splits). Program (i, s) streams its contiguous
#   candidate range in tiles of KT = max(64, next_pow2(k)) candidates (SUB < KT for raw candidates
#   pooled on the fly, see below). Each (value, id) is packed into
#   an int64 key ordered like the value (`common._pack_keys`), so one sort moves values and ids.
#   The program keeps a running list `best` [BLOCK_B, KT] sorted descending. For each tile:
#       if max(tile) <= min(best)   -> skip (exact: nothing in the tile can enter any row's list)
#       tile = sort(tile, ascending); best = sort(max(best, tile), descending)
#   max() of a descending and an ascending list of equal length holds exactly the KT largest of
#   their union (bitonic merge), so after the last tile `best` is the exact top-KT of the range.
#   The program writes its KT keys to partials [B, S, KT] (S * KT << N), and the exact merge is one
#   torch.topk over the keys of each query row ([B, S*KT] int64) followed by decoding.
#
# Raw candidates (not prepared) are normalised on the fly in the tile (`common._pecm_tile`). When Eq. 4
# is pooled on the fly the float32 h tile [D_PAD, SUB] must fit in registers, so the scored tile may be
# narrower than the list: SUB = the widest power of two <= KT with D_PAD * SUB <= the h budget
# (`common.raw_sub`); each SUB-wide tile is merged into the KT list by `common._merge_topk` (the
# ascending tile, padded in front with -inf, meets only the last SUB entries of the list).
#
# k > MAX_KT (1024) is not handled here: the Triton backend streams `pecm_scores_fwd` chunks through
# `pecm.topk.RunningTopK` instead (one [B, chunk] float32 tile at a time, bounded memory).
#
# Autotune: BLOCK_B, BLOCK_KD and warps keyed on (K, D, KT, B bucket, HAS_CM, NORM, POOL, MODE) + dtypes;
# raw candidates try `_RAW_GPU_CONFIGS`; one config under the interpreter. KT, SUB and the split count
# are chosen by the launcher. `_BIG_GPU_CONFIGS` (marked ``pecm_big``): 64- and 128-row query blocks with
# 3-4 stages (wgmma needs M >= 64) for large batches (B bucket > 16) and half-type storage only.
#
# Pinned configs (PECM_TRITON_CONFIG=pinned, kernels/common.py `config_mode`): `PINNED` (prepared
# candidates) and `PINNED_RAW` (raw candidates), each (meta dict, num_warps, num_stages);
# `pinned_config(raw)` returns the one a launch uses. kernels/aot_check.py compiles exactly these.
# `_pecm_topk_kernel` is the autotuner (its `.fn` the @triton.jit function).
#
# Grid: 1-D, min(query blocks x splits, common.MAX_GRID) programs with a grid stride over the
# (query block, split) pairs; the split count is a kernel argument (N_SPLIT), not a grid axis.
# Padded query rows (B not a multiple of BLOCK_B) and columns past the end carry the empty-lane key
# (-inf, `common._lane_keys`), so the per-row skip test of `_merge_topk` is not defeated by them.

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import common
from .common import (
    MAX_KT,
    _epilogue,
    _lane_keys,
    _merge_topk,
    _pack_keys,
    _pecm_tile,
    b_bucket,
    bench_or_skip,
    cand_operands,
    configs,
    d_pad,
    decode_keys,
    dot_mode,
    grid_1d,
    kt_floor,
    next_pow2,
    pinned_prune,
    prepare_qsum,
    prune_configs,
    query_operands,
    raw_sub,
    target_programs,
)

_GPU_CONFIGS = [
    ({"BLOCK_B": 16, "BLOCK_KD": 16}, 8, 2),
    ({"BLOCK_B": 16, "BLOCK_KD": 32}, 4, 2),
    ({"BLOCK_B": 16, "BLOCK_KD": 64}, 8, 2),
    ({"BLOCK_B": 32, "BLOCK_KD": 32}, 8, 2),
    ({"BLOCK_B": 64, "BLOCK_KD": 32}, 8, 2),
]
# tried only for raw candidates (normalised on the fly): 8 warps, small query blocks (aot_check figures in
# docs/triton.md)
_RAW_GPU_CONFIGS = [
    ({"BLOCK_B": 16, "BLOCK_KD": 16}, 8, 2),
    ({"BLOCK_B": 16, "BLOCK_KD": 32}, 8, 2),
    ({"BLOCK_B": 32, "BLOCK_KD": 16}, 8, 2),
]
# large batches, half types (tensor-core tiles of M >= 64 rows, 3-4 stages); not measured on a device
_BIG_GPU_CONFIGS = [
    ({"BLOCK_B": 64, "BLOCK_KD": 64}, 8, 3),
    ({"BLOCK_B": 64, "BLOCK_KD": 32}, 8, 4),
    ({"BLOCK_B": 128, "BLOCK_KD": 32}, 8, 3),
]
# interpreter: BLOCK_B 4 (no tl.dot size limit there; its tl.sort cost grows with the tile size)
_INTERP_CONFIG = ({"BLOCK_B": 4, "BLOCK_KD": 64}, 4, 1)
FALLBACK_CHUNK = 8192
PINNED = _GPU_CONFIGS[0]
PINNED_RAW = _RAW_GPU_CONFIGS[0]


def pinned_config(raw: bool = False):
    """The config of a pinned launch: (meta, num_warps, num_stages); the interpreter's under TRITON_INTERPRET=1."""
    if common.interpret():
        return _INTERP_CONFIG
    return PINNED_RAW if raw else PINNED


def _prune(cfgs, named_args, **kwargs):
    """`common.prune_configs` for the regular configs; the big ones are kept only for half types (MODE != 0)
    and B bucket > 16, against the shared-memory budget alone (they are meant to exceed the per-thread
    work budget measured for the 2-stage tiles)."""
    allargs = {**named_args, **kwargs}
    big = [cfg for cfg in cfgs if getattr(cfg, "pecm_big", False)]
    rest = [cfg for cfg in cfgs if not getattr(cfg, "pecm_big", False)]
    kept = _prune_regular(rest, named_args, **kwargs)
    raw = bool(allargs.get("NORM", False)) or int(allargs.get("POOL", 0)) != 0
    if raw or int(allargs.get("MODE", 0)) == 0 or int(allargs.get("B_BUCKET", 16)) <= 16:
        return kept
    if int(allargs.get("KT", 0)) >= 512:
        return kept
    c = allargs.get("c_ptr")
    elt = c.element_size() if hasattr(c, "element_size") else 2
    sub = int(allargs.get("SUB", allargs.get("KT", 64)))
    for cfg in big:
        r, kd = cfg.kwargs["BLOCK_B"], cfg.kwargs["BLOCK_KD"]
        if cfg.num_stages * (r * kd * 4 + kd * sub * elt) <= common.SMEM_BUDGET:
            kept.append(cfg)
    return kept


_prune_regular = prune_configs("BLOCK_B", "SUB", f32_budget=256, half_budget=256)


def _all_configs():
    cfgs = configs(_GPU_CONFIGS, _INTERP_CONFIG, _RAW_GPU_CONFIGS)
    if not common.interpret():
        big = configs(_BIG_GPU_CONFIGS, _INTERP_CONFIG)
        for cfg in big:
            cfg.pecm_big = True
        cfgs = cfgs + big
    return cfgs


@triton.autotune(
    configs=_all_configs(),
    key=["K", "D", "KT", "B_BUCKET", "HAS_CM", "NORM", "POOL", "MODE"],
    prune_configs_by={"early_config_prune": pinned_prune(_prune, PINNED, PINNED_RAW)},
    do_bench=bench_or_skip,
)
@triton.jit
def _pecm_topk_kernel(
    qw_ptr, qden_ptr, qsum_ptr, qp_ptr, c_ptr, cm_ptr, cp_ptr, w_ptr, part_ptr,
    B, N, K, D, per_prog, N_SPLIT, B_BUCKET,
    HAS_CM: tl.constexpr, NORM: tl.constexpr, POOL: tl.constexpr, MODE: tl.constexpr, BY: tl.constexpr,
    BLOCK_K: tl.constexpr, KT: tl.constexpr, SUB: tl.constexpr, D_PAD: tl.constexpr, H_ELEMS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_KD: tl.constexpr,
):  # fmt: skip
    nb = tl.cdiv(B, BLOCK_B)
    cols = tl.arange(0, KT)
    sub = tl.arange(0, SUB)
    for tile in range(tl.program_id(0), nb * N_SPLIT, tl.num_programs(0)):
        pid_b = tile % nb
        pid_s = tile // nb
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        mb = offs_b < B
        start = pid_s * per_prog
        end = tl.minimum(start + per_prog, N)
        neg = tl.full((BLOCK_B, KT), float("-inf"), dtype=tl.float32)
        best = _pack_keys(neg, cols[None, :] + tl.zeros((BLOCK_B, KT), dtype=tl.int32))
        for s in range(start, end, SUB):
            offs_n = s + sub
            sim, num, den = _pecm_tile(
                qw_ptr, qden_ptr, qsum_ptr, qp_ptr, c_ptr, cm_ptr, cp_ptr, w_ptr, offs_b, offs_n, B, end, K, D,
                HAS_CM, NORM, POOL, MODE, BLOCK_B, SUB, BLOCK_KD, BLOCK_K, D_PAD, H_ELEMS,
            )  # fmt: skip
            val = _epilogue(sim, num, den, BY)
            valid = mb[:, None] & (offs_n < end)[None, :]
            key = _lane_keys(val, offs_n[None, :] + tl.zeros((BLOCK_B, SUB), dtype=tl.int32), valid)
            best = _merge_topk(best, key, BLOCK_B, KT, SUB)
        rows = offs_b.to(tl.int64)[:, None] * N_SPLIT + pid_s
        tl.store(part_ptr + rows * KT + cols[None, :], best, mask=mb[:, None])


def _splits(b: int, n: int, kt: int, chunk_size: Optional[int], device: torch.device) -> int:
    tiles = triton.cdiv(n, kt)
    if chunk_size:
        return min(tiles, triton.cdiv(n, triton.cdiv(int(chunk_size), kt) * kt))
    want = max(1, target_programs(device) // triton.cdiv(b, 16))  # ~16-row query blocks
    return max(1, min(tiles, want))


def pecm_topk(qs, cs, k: int, by: int = 0, chunk_size: Optional[int] = None):
    """Exact top-k of the `by` quantity (0 score, 1 sim, 2 conf) over all N candidates, 1 <= k <= MAX_KT.

    `qs` / `cs`: duck-typed `Queries` / `Candidates` (attributes: kernels/common.py); raw candidates are
    normalised (and pooled) on the fly. Returns (values f32 [B, min(k, N)], ids int64 [B, min(k, N)])
    sorted descending; the caller pads to k with (-inf, -1). Operands are trusted (no checks here).
    """
    qw, qden, qp = query_operands(qs)
    c, cm, cp, w, flags = cand_operands(cs)
    b, kq = qden.shape
    n, _, d = cs.prototypes.shape
    if n >= 2**31 - MAX_KT:
        raise ValueError(f"c: at most {2**31 - MAX_KT - 1} candidates per call (int32 ids), got N={n}")
    if k > MAX_KT:
        raise ValueError(f"k: the fused top-k keeps at most {MAX_KT} per program, got {k}")
    kt = max(kt_floor(), next_pow2(k))
    n_split = _splits(b, n, kt, chunk_size, qw.device)
    per_prog = triton.cdiv(triton.cdiv(n, n_split), kt) * kt
    n_split = triton.cdiv(n, per_prog)
    part = torch.empty((b, n_split, kt), dtype=torch.int64, device=qw.device)
    grid = lambda meta: grid_1d(triton.cdiv(b, meta["BLOCK_B"]) * n_split)
    hb = common.H_ELEMS
    common.config_mode()  # validates PECM_TRITON_CONFIG
    _pecm_topk_kernel[grid](
        qw, qden, prepare_qsum(qden, cm), qp, c, cm, cp, w, part,
        b, n, kq, d, per_prog, n_split, b_bucket(b),
        MODE=dot_mode(c.dtype), BY=int(by), BLOCK_K=max(16, next_pow2(kq)), KT=kt,
        SUB=raw_sub(kt, d, flags, hb), D_PAD=d_pad(d), H_ELEMS=hb, **flags,
    )  # fmt: skip
    kk = min(k, n)
    keys = torch.topk(part.view(b, -1), kk, dim=1, largest=True, sorted=True).values
    return decode_keys(keys)
