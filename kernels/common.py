# Shared pieces of the PECM Triton kernels (installed as `pecm.kernels.common`).
#
# Operands (duck-typed: kernels/ imports only torch, triton and itself, never `pecm`). The launchers
# `pecm_scores_fwd(qs, cs)`, `pecm_topk(qs, cs, k, by, chunk_size)` and `pecm_rerank(qs, cs, cand, k, by)`
# read exactly these attributes (`pecm.operands.Queries` / `Candidates` have them):
#
#     qs.qw    float32 [B, K*D]  w_k mq_k q̂_k (the query prototypes with weights and mask folded in)
#     qs.qden  float32 [B, K]    w_k mq_k
#     qs.qp    float32 [B, D]    unit pooled query
#     cs.prototypes  [N, K, D]   storage dtype T (float32 / float16 / bfloat16)
#     cs.mask        bool [N, K] or None (all valid); read as bytes (a zero-copy uint8 view)
#     cs.pooled      [N, D] in T or None (then Eq. 4 is pooled on the fly)
#     cs.weights     float32 [K] (read only when the pooled vectors are pooled on the fly)
#     cs.normalized         bool: prototypes are unit and masked-out prototypes exactly zero
#     cs.pooled_normalized  bool: pooled vectors are unit
#     cs.dtype              T
#
# `cand_operands(cs)` turns them into the kernel arguments and the constexpr flags
#     HAS_CM  a mask is given (else cm_ptr is None and qsum_ptr carries sum_k qden per query)
#     NORM    prototypes are raw: per-prototype inverse norms on the fly (not cs.normalized)
#     POOL    0 pooled given and unit, 1 pooled given but raw (scaled by 1/||cp||),
#             2 pooled absent: h = normalize(sum_k w_k inv_k c_k) pooled on the fly (w_ptr set)
# Prepared candidates (NORM = 0, POOL = 0) take exactly the code they took before on-the-fly
# normalisation existed (no extra loads, no extra arithmetic); see docs/triton.md.
#
# Math of one (query b, candidate n) pair, with inv_k = m_k / ||c_k|| (1 for unit prototypes; see NORM_MIN):
#
#     num[b, n] = sum_k inv_k (qw[b, k] . c[n, k])   (K*D long: confidence numerator)
#     den[b, n] = qden[b, :] . cm[n, :]              (K long; = sum_k qden[b, k] when cm is None)
#     sim[b, n] = qp[b, :] . ĉp[n, :]                (D long: pooled cosine)
#     conf = num / den if den > 0 else 0,  score = sim * conf
#
# This is `pecm.operands.normalize_block` + `pecm.backends.base` in float32 (no eps: zero stays zero).
#
# Precision of the dots (`dot_mode`): the query operands are float32, the candidate operands are in
# the storage dtype T. MODE 0 casts the T tile up to float32 and uses an IEEE float32 `tl.dot`
# (exact float32 FMA accumulation; used for T = float32). MODE 1 keeps the tensor cores: the float32
# query tile is split into hi = round_T(q) and lo = round_T(q - hi) and accumulated as
# hi.c + lo.c in float32. The candidate tile is exact in T, so only the residual rounding of lo is
# lost (~2^-22 relative for float16, ~2^-16 for bfloat16) -- far below the half-type tolerance and
# far better than casting q to T once. MODE 2 (PECM_TRITON_PRECISION=fast, half types only) is that
# cast: the query tile is rounded once to T and one tensor-core dot is run (half the MMAs of MODE 1;
# within the 2e-2 half-type tolerance of DESIGN §2, see docs/triton.md). Under TRITON_INTERPRET=1 a
# bfloat16 `tl.dot` returns garbage (the interpreter has no numpy bfloat16), so there the split is
# computed exactly as on the GPU and the two products are run as IEEE float32 dots of the upcast
# bfloat16 operands (`_EMU_BF16`; mathematically the tensor-core product with float32
# accumulation). Raw prototypes are never rounded: the per-prototype partial dot of the stored c_k is
# scaled by inv_k in float32.
#
# Configs: PECM_TRITON_CONFIG=autotune (default) autotunes each kernel over its small `_GPU_CONFIGS`
# set; PECM_TRITON_CONFIG=pinned makes the autotuner keep exactly one config per kernel (the module's
# `PINNED` / `PINNED_RAW`, `pinned_prune`) and time nothing (`bench_or_skip`), so a test run compiles once
# per specialisation. Validated at every launch (`config_mode`; any other value is a ValueError naming
# the variable); it applies to the autotune keys first launched after it is set (set it before).
#
# Grids: every kernel has a 1-D grid of at most MAX_GRID programs and walks its tiles with a grid
# stride (`for t in range(program_id, tiles, num_programs)`): CUDA caps grid axes 1 and 2 at 65,535,
# axis 0 at 2^31 - 1 (tests lower MAX_GRID to run the looped path).
#
# Top-k keys (`_pack_keys` / `decode_keys`): a float32 value and a 32-bit candidate id are packed
# into one int64 whose signed order is the order of the value (ties: larger id first). Sorting,
# `tl.maximum` and `torch.topk` on keys therefore select (value, id) pairs together.

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

MAX_KT = 1024  # largest per-program top-k list (power of two) the fused top-k/rerank kernels keep
EPS = tl.constexpr(1e-12)  # = pecm.operands.EPS; kept for importers only: no norm is clamped to it any more
# On-the-fly norms (docs/cpp.md, "Numerics"): sums of squares accumulate in float64 (exact for every
# float32 / bfloat16 / float16 value), and 1/||x|| is used as one float32 scale of the stored values.
# That is exact while NORM_MIN <= ||x|| <= NORM_MAX (1.2e-38 ... 1.3e36: the scale is a normal float32 and,
# for weights up to 256, w * ||x|| cannot overflow the float32 partial dots; `_epilogue` turns a conf or sim
# outside [-1.5, 1.5], i.e. an overflow with larger weights, into NaN too); a prototype or pooled vector
# outside it (and one holding NaN/inf) gets a NaN scale, so its scores are NaN (never ranked) instead of
# silently wrong. An exactly zero vector stays zero. Prepare such candidates first
# (pecm.ops.prepare_candidates is exact for every finite value); the kernels then read unit prototypes.
NORM_MIN = tl.constexpr(2.0**-126)
NORM_MAX = tl.constexpr(2.0**120)
# Register budget (float32 elements per program) of the Eq. 4 pooled vector h when it is pooled on the
# fly: h^T [D_PAD, tile width] stays in registers when D_PAD * width <= H_ELEMS (the paper's D = 256:
# 32-wide tiles), else the two-step scheme. 8192 = 32 registers per thread at 8 warps: 64-wide h tiles at
# D = 256 spill with Triton 3.6 (aot_check, docs/triton.md). A module attribute read at every launch
# (tests lower it to reach every scheme).
H_ELEMS = 8192
# Largest 1-D grid a launcher uses (CUDA's grid axis 0 limit); more tiles are walked with a grid stride.
# A module attribute read at every launch (tests lower it to run the looped path at small sizes).
MAX_GRID = 2**31 - 1
CONFIG_ENV = "PECM_TRITON_CONFIG"
PRECISION_ENV = "PECM_TRITON_PRECISION"


def interpret() -> bool:
    """True when kernels run on the CPU through the Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# `triton.jit` decides interpreted vs compiled when the kernels are *defined* (module import), so a
# process must set TRITON_INTERPRET before importing pecm.kernels; this records what was seen.
INTERPRET_AT_IMPORT = interpret()
_EMU_BF16 = tl.constexpr(INTERPRET_AT_IMPORT)  # bfloat16 products as float32 dots (interpreter only, see above)


def config_mode() -> str:
    """`PECM_TRITON_CONFIG`: "autotune" (default) or "pinned" (one fixed config per kernel)."""
    v = os.environ.get(CONFIG_ENV, "autotune").strip().lower() or "autotune"
    if v not in ("autotune", "pinned"):
        raise ValueError(f"{CONFIG_ENV}: expected 'autotune' or 'pinned', got {os.environ.get(CONFIG_ENV)!r}")
    return v


def precision_mode() -> str:
    """`PECM_TRITON_PRECISION`: "exact" (default: hi/lo split, docs/triton.md) or "fast" (the query rounded
    once to the half storage type, one tensor-core dot; float32 storage is unaffected)."""
    v = os.environ.get(PRECISION_ENV, "exact").strip().lower() or "exact"
    if v not in ("exact", "fast"):
        raise ValueError(f"{PRECISION_ENV}: expected 'exact' or 'fast', got {os.environ.get(PRECISION_ENV)!r}")
    return v


def grid_1d(tiles: int):
    """The 1-D grid for `tiles` program tiles: min(tiles, MAX_GRID) programs (a grid stride covers the rest)."""
    return (max(1, min(int(tiles), int(MAX_GRID))),)


def _same_config(cfg, entry) -> bool:
    meta, warps, stages = entry
    return cfg.kwargs == dict(meta) and cfg.num_warps == warps and cfg.num_stages == stages


def pinned_prune(prune, pinned, pinned_raw=None):
    """`early_config_prune` of an autotuned kernel: `prune` (or all configs when None) with
    PECM_TRITON_CONFIG=autotune; with =pinned exactly the config equal to `pinned` (`pinned_raw` for raw
    candidates, NORM or POOL != 0), so the autotuner compiles one config and (`bench_or_skip`) times nothing."""

    def run(cfgs, named_args, **kwargs):
        if config_mode() == "pinned":
            allargs = {**named_args, **kwargs}
            raw = bool(allargs.get("NORM", False)) or int(allargs.get("POOL", 0)) != 0
            entry = pinned_raw if raw and pinned_raw is not None else pinned
            got = [cfg for cfg in cfgs if _same_config(cfg, entry)]
            if got:
                return got[:1]
        return prune(cfgs, named_args, **kwargs) if prune is not None else cfgs

    return run


def bench_or_skip(fn, quantiles=(0.5, 0.2, 0.8)):
    """The autotuner's timing function: no timing with PECM_TRITON_CONFIG=pinned (one config is left)."""
    if config_mode() == "pinned":
        return [0.0] * len(quantiles)
    from triton.testing import do_bench

    return do_bench(fn, quantiles=quantiles)


def kt_floor() -> int:
    """Smallest top-k list / candidate tile of the top-k and rerank kernels (GPU: 64-wide tiles keep the
    dot and the gathers efficient for small k; interpreter: 16, its tl.sort cost grows with the width)."""
    return 16 if interpret() else 64


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def b_bucket(b: int) -> int:
    """Coarse query-batch bucket used as an autotune key (1-16, 17-128, more)."""
    return 16 if b <= 16 else (128 if b <= 128 else 1024)


def dot_mode(dtype: torch.dtype, fast: Optional[bool] = None) -> int:
    """0: float32 IEEE dot on upcast tiles (float32 storage); 1: hi/lo split of the float32 operand into
    `dtype`; 2: the float32 operand rounded once to `dtype` (`fast`, default: PECM_TRITON_PRECISION=fast)."""
    if dtype == torch.float32:
        return 0
    if fast is None:
        fast = precision_mode() == "fast"
    return 2 if fast else 1


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs keep the device busy (4 per SM on a GPU; 2 under the interpreter)."""
    if device.type != "cuda":
        return 2
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def configs(gpu, interp, raw=()):
    """Autotune config list: the GPU set (+ the `raw` configs, marked ``pecm_raw`` and tried only for
    candidates that are not prepared, see `prune_configs`), or the single interpreter config under
    TRITON_INTERPRET=1.

    Each entry is (meta-parameter dict, num_warps, num_stages).
    """
    mk = lambda entries: [triton.Config(dict(meta), num_warps=w, num_stages=s) for meta, w, s in entries]
    if interpret():
        return mk([interp])
    extra = mk(raw)
    for cfg in extra:
        cfg.pecm_raw = True
    return mk(gpu) + extra


def _is_raw(cfg) -> bool:
    return bool(getattr(cfg, "pecm_raw", False))


SMEM_BUDGET = 160 * 1024  # bytes of shared memory a pipelined config may plan for (H100: 227 KB max)
REG_TILE_BUDGET = 64 * 1024  # elements of the per-program register tiles (accumulator / gathered chunk)
H_PER_THREAD = 32  # float32 registers per thread the h tile may take (measured with aot_check, Triton 3.6 / 3.8)


def prune_configs(rows: str, cols: str, f32_budget: int, half_budget: int, h_per_thread: int = H_PER_THREAD):
    """`early_config_prune` for autotune: drop configs whose tiles cannot fit (shared memory for the
    pipelined dot operands, register tiles), keeping at least the smallest config.

    `rows` / `cols` name the meta-parameters (or kernel kwargs, e.g. "KT") of the output tile. The
    budgets bound rows * cols * BLOCK_KD / threads (MODE 0 = float32 FMA dot, else tensor cores):
    above them the sm_90 compile spills registers (measured with kernels/aot_check.py, Triton 3.8).

    Prepared candidates (NORM 0, POOL 0) see exactly the configs they saw before on-the-fly
    normalisation (the `raw` configs of `configs` are dropped); raw candidates try the raw configs
    when there are any. Eq. 4 pooled on the fly (POOL 2): configs whose h tile fits in registers
    (D_PAD * cols <= H_ELEMS and at most `h_per_thread` registers of it per thread) are preferred;
    the others would run the two-step scheme.
    """

    def fits(cfg, allargs, elt):
        meta = {**allargs, **cfg.kwargs}
        r, n, kd = int(meta[rows]), int(meta[cols]), int(meta["BLOCK_KD"])
        smem = cfg.num_stages * (r * kd * 4 + kd * n * elt)
        work = r * n * kd // (32 * cfg.num_warps)
        budget = f32_budget if int(allargs.get("MODE", 0)) == 0 else half_budget
        return smem <= SMEM_BUDGET and r * n <= REG_TILE_BUDGET // 2 and n * kd <= REG_TILE_BUDGET and work <= budget

    def h_fit(cfg, allargs):
        meta = {**allargs, **cfg.kwargs}
        h = int(meta.get("D_PAD", 0)) * int(meta[cols])
        return h <= int(meta.get("H_ELEMS", H_ELEMS)) and h <= h_per_thread * 32 * cfg.num_warps

    def prune(cfgs, named_args, **kwargs):
        allargs = {**named_args, **kwargs}
        c = allargs.get("c_ptr")
        elt = c.element_size() if hasattr(c, "element_size") else 4
        raw = bool(allargs.get("NORM", False)) or int(allargs.get("POOL", 0)) != 0
        raw_cfgs = [cfg for cfg in cfgs if _is_raw(cfg)]
        if raw and raw_cfgs:
            cfgs = raw_cfgs
        elif not raw:
            cfgs = [cfg for cfg in cfgs if not _is_raw(cfg)] or cfgs
        if int(allargs.get("POOL", 0)) == 2:
            cfgs = [cfg for cfg in cfgs if h_fit(cfg, allargs)] or cfgs
        kept = [cfg for cfg in cfgs if fits(cfg, allargs, elt)]
        if not kept:
            kept = [min(cfgs, key=lambda cfg: sum(int(v) for v in cfg.kwargs.values()) * cfg.num_stages)]
        if int(allargs.get("KT", 0)) >= 512:
            # the unrolled bitonic sorts of a [BLOCK_B, >=512] int64 list take minutes to compile
            # (measured ~110 s for KT = 1024 with ptxas for sm_90 on a 2-core CPU): tune nothing there
            kept = kept[:1]
        return kept

    return prune


@triton.jit
def _half_dot(acc, x, b):
    """acc += x @ b for x, b in the storage dtype: a tensor-core dot with float32 accumulation (interpreter,
    bfloat16: the same product as an IEEE float32 dot of the exactly upcast operands)."""
    if _EMU_BF16 and b.dtype == tl.bfloat16:
        acc = tl.dot(x.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(x, b, acc)
    return acc


@triton.jit
def _dot_acc(acc, a, b, MODE: tl.constexpr):
    """acc += a @ b with a float32 [M, R] and b [R, P] in the storage dtype (see MODE above)."""
    if MODE == 0:
        acc = tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    elif MODE == 2:
        acc = _half_dot(acc, a.to(b.dtype), b)
    else:
        hi = a.to(b.dtype)
        lo = (a - hi.to(tl.float32)).to(b.dtype)
        acc = _half_dot(acc, hi, b)
        acc = _half_dot(acc, lo, b)
    return acc


@triton.jit
def _pecm_tile(
    qw_ptr, qden_ptr, qsum_ptr, qp_ptr, c_ptr, cm_ptr, cp_ptr, w_ptr, offs_b, offs_n, B, N, K, D,
    HAS_CM: tl.constexpr, NORM: tl.constexpr, POOL: tl.constexpr, MODE: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KD: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr,
    H_ELEMS: tl.constexpr,
):  # fmt: skip
    """(sim, num, den) float32 [BLOCK_B, BLOCK_N] for query rows offs_b and candidate rows offs_n.

    Prepared candidates (NORM = 0, POOL = 0): one flat K*D loop of tl.dot chunks for num, one D loop
    for sim. Otherwise see `_proto_dot` (raw prototypes), `_proto_h` (Eq. 4 pooled in registers,
    D_PAD * BLOCK_N <= H_ELEMS) and `_pool_two_step` (Eq. 4 pooled, larger tiles).
    """
    mb = offs_b < B
    mn = offs_n < N
    rb = offs_b.to(tl.int64)
    rn = offs_n.to(tl.int64)  # N * K * D may exceed 2**31
    kd_total = K * D
    # per-prototype chunk of D (no wasted lanes when D < BLOCK_KD)
    BD: tl.constexpr = BLOCK_KD if BLOCK_KD < D_PAD else D_PAD
    if POOL == 2 and D_PAD * BLOCK_N <= H_ELEMS:
        num, sim = _proto_h(
            qw_ptr, qp_ptr, c_ptr, cm_ptr, w_ptr, rb, rn, mb, mn, K, D,
            HAS_CM, NORM, MODE, BLOCK_B, BLOCK_N, BD, D_PAD,
        )  # fmt: skip
    elif NORM or POOL == 2:
        num = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        if POOL == 2:
            kq = tl.arange(0, BLOCK_K)
            a2d = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # w_t inv_nt, for the second step
        for t in range(0, K):
            part, inv = _proto_dot(
                qw_ptr, c_ptr, cm_ptr, t, rb, rn, mb, mn, K, D, HAS_CM, NORM, MODE, BLOCK_B, BLOCK_N, BD
            )
            num += part * inv[None, :]
            if POOL == 2:
                a2d = tl.where(kq[None, :] == t, (tl.load(w_ptr + t) * inv)[:, None], a2d)
        if POOL == 2:
            sim = _pool_two_step(qp_ptr, c_ptr, a2d, rb, rn, mb, mn, K, D, BLOCK_B, BLOCK_N, BD, BLOCK_K)
        else:
            sim = _pooled_sim(qp_ptr, cp_ptr, rb, rn, mb, mn, D, POOL, MODE, BLOCK_B, BLOCK_N, BLOCK_KD)
    else:
        num = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for s in range(0, kd_total, BLOCK_KD):
            kk = s + tl.arange(0, BLOCK_KD)
            mk = kk < kd_total
            a = tl.load(qw_ptr + rb[:, None] * kd_total + kk[None, :], mask=mb[:, None] & mk[None, :], other=0.0)
            bt = tl.load(c_ptr + rn[None, :] * kd_total + kk[:, None], mask=mk[:, None] & mn[None, :], other=0.0)
            num = _dot_acc(num, a, bt, MODE)
        sim = _pooled_sim(qp_ptr, cp_ptr, rb, rn, mb, mn, D, POOL, MODE, BLOCK_B, BLOCK_N, BLOCK_KD)
    if HAS_CM:
        kq = tl.arange(0, BLOCK_K)
        mk = kq < K
        a = tl.load(qden_ptr + rb[:, None] * K + kq[None, :], mask=mb[:, None] & mk[None, :], other=0.0)
        bt = tl.load(cm_ptr + rn[None, :] * K + kq[:, None], mask=mk[:, None] & mn[None, :], other=0)
        if MODE == 0:  # mask bytes -> 0/1 in the dot's operand type (exact)
            bt = bt.to(tl.float32)
        else:  # via float32 (exact): the interpreter's uint8 -> bfloat16 cast gives 0
            bt = bt.to(tl.float32).to(c_ptr.dtype.element_ty)
        den = _dot_acc(tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32), a, bt, MODE)
    else:
        qs = tl.load(qsum_ptr + offs_b, mask=mb, other=0.0)
        den = qs[:, None] + tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    return sim, num, den


@triton.jit
def _pooled_sim(
    qp_ptr, cp_ptr, rb, rn, mb, mn, D,
    POOL: tl.constexpr, MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KD: tl.constexpr,
):  # fmt: skip
    """sim = qp . cp from given pooled vectors; POOL 1 scales by 1/||cp|| (sums of squares of the
    same loaded tiles, float64; see `_inv_vec`)."""
    sim = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    if POOL == 1:
        ss = tl.zeros((BLOCK_N,), dtype=tl.float64)
    for s in range(0, D, BLOCK_KD):
        dd = s + tl.arange(0, BLOCK_KD)
        md = dd < D
        a = tl.load(qp_ptr + rb[:, None] * D + dd[None, :], mask=mb[:, None] & md[None, :], other=0.0)
        bt = tl.load(cp_ptr + rn[None, :] * D + dd[:, None], mask=md[:, None] & mn[None, :], other=0.0)
        sim = _dot_acc(sim, a, bt, MODE)
        if POOL == 1:
            bf = bt.to(tl.float64)
            ss += tl.sum(bf * bf, axis=0)
    if POOL == 1:
        sim = sim * _inv_vec(ss)[None, :]
    return sim


@triton.jit
def _proto_mask(cm_ptr, rn, mn, K, t, HAS_CM: tl.constexpr):
    """Rows of the tile whose prototype t is read: valid rows, and m_nt != 0 with a mask (masked-out
    prototypes are never loaded)."""
    if HAS_CM:
        return mn & (tl.load(cm_ptr + rn * K + t, mask=mn, other=0) != 0)
    else:
        return mn


@triton.jit
def _inv_vec(ss):
    """float32 1/||x|| from a float64 sum of squares: 0 for an exactly zero x, NaN when ||x|| is outside
    [NORM_MIN, NORM_MAX] or not finite (see NORM_MIN above)."""
    n = tl.sqrt(ss)
    ok = (n >= NORM_MIN) & (n <= NORM_MAX)
    inv = tl.where(ok, 1.0 / tl.where(ok, n, 1.0), float("nan"))
    return tl.where(ss == 0.0, 0.0, inv).to(tl.float32)


@triton.jit
def _inv_h(hh):
    """1/||h|| of a float32 sum of squares of an Eq. 4 pooled vector; 0 when h is exactly zero."""
    return tl.where(hh > 0.0, 1.0 / tl.sqrt(tl.where(hh > 0.0, hh, 1.0)), 0.0)


@triton.jit
def _inv_norm(ss, live, NORM: tl.constexpr):
    """inv_t = m_t / ||c_t|| (m_t = live; ss a float64 sum of squares, see `_inv_vec`); m_t for unit prototypes."""
    if NORM:
        return tl.where(live, _inv_vec(ss), 0.0)
    else:
        return tl.where(live, 1.0, 0.0)


@triton.jit
def _proto_dot(
    qw_ptr, c_ptr, cm_ptr, t, rb, rn, mb, mn, K, D,
    HAS_CM: tl.constexpr, NORM: tl.constexpr, MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BD: tl.constexpr,
):  # fmt: skip
    """(qw_t . c_t [BLOCK_B, BLOCK_N], inv_t [BLOCK_N]) for prototype t, over D in BD chunks: the partial dot
    of the stored prototype and the sum of squares of the same loaded tiles (one read)."""
    kd_total = K * D
    live = _proto_mask(cm_ptr, rn, mn, K, t, HAS_CM)
    part = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    ss = tl.zeros((BLOCK_N,), dtype=tl.float64)
    for s in range(0, D, BD):
        dd = s + tl.arange(0, BD)
        md = dd < D
        a = tl.load(qw_ptr + rb[:, None] * kd_total + t * D + dd[None, :], mask=mb[:, None] & md[None, :], other=0.0)
        bt = tl.load(c_ptr + rn[None, :] * kd_total + t * D + dd[:, None], mask=md[:, None] & live[None, :], other=0.0)
        part = _dot_acc(part, a, bt, MODE)
        if NORM:
            bf = bt.to(tl.float64)
            ss += tl.sum(bf * bf, axis=0)
    return part, _inv_norm(ss, live, NORM)


@triton.jit
def _proto_h(
    qw_ptr, qp_ptr, c_ptr, cm_ptr, w_ptr, rb, rn, mb, mn, K, D,
    HAS_CM: tl.constexpr, NORM: tl.constexpr, MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BD: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    """(num, sim) with Eq. 4 pooled on the fly, h^T float32 kept in registers as [D_PAD / BD, BD, BLOCK_N].

    Per prototype t: `_proto_dot` (BD-wide chunks: partial dot and sum of squares -> inv_t), then
    h += w_t inv_t c_t from a second load of the same prototype tile, which the chunks have just
    brought into L1/L2 (a whole-prototype tl.dot operand instead spills at D = 256, docs/triton.md).
    At the end sim = sum_j qp_j . round_T(h_j / ||h||) over the BD-wide chunks j of h: the
    pooled vector rounded to T like a prepared one, in tl.dot chunks of the same shape as num's.
    """
    NCH: tl.constexpr = D_PAD // BD
    kd_total = K * D
    jj = tl.arange(0, NCH)
    dd = tl.arange(0, BD)
    d3 = jj[:, None, None] * BD + dd[None, :, None]  # [NCH, BD, 1] position in D
    md3 = d3 < D
    num = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    h = tl.zeros((NCH, BD, BLOCK_N), dtype=tl.float32)
    for t in range(0, K):
        part, inv = _proto_dot(qw_ptr, c_ptr, cm_ptr, t, rb, rn, mb, mn, K, D, HAS_CM, NORM, MODE, BLOCK_B, BLOCK_N, BD)
        num += part * inv[None, :]
        a = tl.load(w_ptr + t) * inv
        lm = md3 & (mn & (a != 0.0))[None, None, :]
        bt = tl.load(c_ptr + rn[None, None, :] * kd_total + t * D + d3, mask=lm, other=0.0)
        h += bt.to(tl.float32) * a[None, None, :]
    ih = _inv_h(tl.sum(tl.sum(h * h, axis=0), axis=0))
    sim = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for j in tl.static_range(NCH):
        hj = tl.sum(tl.where((jj == j)[:, None, None], h, 0.0), axis=0)
        dj = j * BD + dd
        qp = tl.load(qp_ptr + rb[:, None] * D + dj[None, :], mask=mb[:, None] & (dj < D)[None, :], other=0.0)
        sim = _dot_acc(sim, qp, (hj * ih[None, :]).to(c_ptr.dtype.element_ty), MODE)
    return num, sim


@triton.jit
def _pool_two_step(
    qp_ptr, c_ptr, a2d, rb, rn, mb, mn, K, D,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BD: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """sim with Eq. 4 pooled on the fly when h does not fit in registers: the second step of a tile.

    a2d [BLOCK_N, BLOCK_K] holds a_nt = w_t inv_nt from the first step (`_proto_dot` over the tile).
    D-chunk outer, prototype inner: h_chunk = sum_t a_t c_t[chunk] is complete per chunk, so
    ||h||^2 and qp . h accumulate chunk by chunk (IEEE float32 dot of the float32 h chunk). This step
    re-reads the tile's rows (prototypes with a_nt = 0 are skipped) right after the first step read them.
    """
    kd_total = K * D
    kq = tl.arange(0, BLOCK_K)
    sim = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    hh = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in range(0, D, BD):
        dd = s + tl.arange(0, BD)
        md = dd < D
        hc = tl.zeros((BD, BLOCK_N), dtype=tl.float32)
        for t in range(0, K):
            at = tl.sum(tl.where(kq[None, :] == t, a2d, 0.0), axis=1)
            lm = md[:, None] & (mn & (at != 0.0))[None, :]
            bt = tl.load(c_ptr + rn[None, :] * kd_total + t * D + dd[:, None], mask=lm, other=0.0)
            hc += bt.to(tl.float32) * at[None, :]
        hh += tl.sum(hc * hc, axis=0)
        a = tl.load(qp_ptr + rb[:, None] * D + dd[None, :], mask=mb[:, None] & md[None, :], other=0.0)
        sim = _dot_acc(sim, a, hc, 0)
    return sim * _inv_h(hh)[None, :]


@triton.jit
def _epilogue(sim, num, den, BY: tl.constexpr):
    """BY 0: score, 1: sim, 2: conf (BY_SCORE / BY_SIM / BY_CONF) -- exactly `pecm.backends.base.combine`."""
    pos = den > 0
    conf = tl.where(pos, num / tl.where(pos, den, 1.0), 0.0)
    # |conf|, |sim| <= 1 up to rounding: anything else is an overflow of a raw prototype's partial dot (or
    # NaN/inf input) -> NaN, which the top-k never selects (see NORM_MAX above)
    conf = tl.where(tl.abs(conf) <= 1.5, conf, float("nan"))
    sim = tl.where(tl.abs(sim) <= 1.5, sim, float("nan"))
    if BY == 1:
        out = sim
    elif BY == 2:
        out = conf
    else:
        out = sim * conf
    return out


# The ranked quantity BY: the values of pecm.operands.By (and pecm._C.By); tests/test_operands.py checks
# that the three agree. The kernels take the int.
BY_SCORE, BY_SIM, BY_CONF = 0, 1, 2


HAS_BITONIC_MERGE = tl.constexpr(hasattr(tl, "bitonic_merge"))  # Triton 3.6 and 3.8 have it


@triton.jit
def _lane_keys(val, idx, valid):
    """`_pack_keys` where `valid`, else the key of an empty lane (padded query rows, columns past the end,
    -1 ids): value -inf, id 0 -- the smallest key of the initial lists, so an empty lane never makes a
    tile enter a list (the per-row skip test of `_merge_topk` then holds for padded rows too)."""
    return _pack_keys(tl.where(valid, val, float("-inf")), tl.where(valid, idx, 0))


@triton.jit
def _pack_keys(val, idx):
    """int64 keys ordered like the float32 `val` (then by `idx`, a non-negative int32 id). NaN packs as -inf:
    a NaN value ranks below every real one and decodes as padding (-inf, -1), like `pecm.topk.RunningTopK`."""
    val = tl.where(val == val, val, float("-inf"))
    bits = val.to(tl.int32, bitcast=True)
    key32 = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (key32.to(tl.int64) << 32) | (idx.to(tl.int64) & 0xFFFFFFFF)


def decode_keys(keys: torch.Tensor):
    """(values float32, ids int64) of packed keys; -inf values (padding) get id -1."""
    hi = (keys >> 32).to(torch.int32)
    bits = hi ^ ((hi >> 31) & 0x7FFFFFFF)
    vals = bits.view(torch.float32)
    ids = keys & 0xFFFFFFFF
    ids = torch.where(vals == float("-inf"), torch.full_like(ids, -1), ids)
    return vals, ids


@triton.jit
def _merge_sorted(best):
    """Sort the bitonic sequence max(best desc, key asc) descending: one bitonic merge (log2 KT
    compare-exchange stages) where the installed Triton has `tl.bitonic_merge` (3.6 and 3.8 do), else a
    full sort."""
    if HAS_BITONIC_MERGE:
        return tl.bitonic_merge(best, descending=True)
    else:
        return tl.sort(best, dim=len(best.shape) - 1, descending=True)


@triton.jit
def _merge_topk(best, key, BLOCK_B: tl.constexpr, KT: tl.constexpr, SUB: tl.constexpr):
    """best [BLOCK_B, KT] sorted descending, key [BLOCK_B, SUB] a scored tile: the new best (exact).

    SUB == KT: skips the tile when no row of it can enter its own row's list (per-row test: max of the
    row's tile <= min of the row's list; empty lanes carry the key of `_lane_keys`, which never enters).
    SUB == KT: best = merge(max(best, sort(key))) (the bitonic-merge step: the elementwise max of a
    descending and an ascending list is bitonic and holds exactly the top KT of their union).
    SUB < KT (narrower raw tiles): the ascending tile padded in front with -inf to KT entries only
    meets the last SUB entries of best, so only that group (a reshape to [BLOCK_B, KT / SUB, SUB])
    takes the elementwise max before the merge (still bitonic).
    """
    if SUB < KT:
        # the ascending tile only meets the last SUB entries of best (a reshape to [BLOCK_B, KT / SUB, SUB]).
        # No skip branch here: with the reshape's layout flowing into an scf.if, Triton 3.8's
        # TritonGPURemoveLayoutConversions fails for sm_90 (half-precision raw tiles; aot_check found it)
        G: tl.constexpr = KT // SUB
        b3 = tl.reshape(best, (BLOCK_B, G, SUB))
        g = tl.arange(0, G)
        b3 = tl.where((g == G - 1)[None, :, None], tl.maximum(b3, tl.sort(key, dim=1)[:, None, :]), b3)
        best = _merge_sorted(tl.reshape(b3, (BLOCK_B, KT)))
    else:
        enter = tl.max(key, 1) > tl.min(best, 1)
        if tl.max(enter.to(tl.int32), 0) > 0:
            best = _merge_sorted(tl.maximum(best, tl.sort(key, dim=1)))
    return best


@triton.jit
def _merge_topk1(best, key, KT: tl.constexpr, SUB: tl.constexpr):
    """`_merge_topk` for one query: best [KT], key [SUB]."""
    if tl.max(key, 0) > tl.min(best, 0):
        key = tl.sort(key)
        if SUB == KT:
            best = tl.maximum(best, key)
        else:
            G: tl.constexpr = KT // SUB
            b2 = tl.reshape(best, (G, SUB))
            g = tl.arange(0, G)
            b2 = tl.where((g == G - 1)[:, None], tl.maximum(b2, key[None, :]), b2)
            best = tl.reshape(b2, (KT,))
        best = _merge_sorted(best)
    return best


def prepare_qsum(qden: torch.Tensor, cm) -> Optional[torch.Tensor]:
    """Per-query denominator when there is no candidate mask (sum_k qden), else None."""
    return qden.sum(1).contiguous() if cm is None else None


def query_operands(qs):
    """(qw, qden, qp) contiguous float32 of a duck-typed `Queries`."""
    return tuple(t.contiguous() for t in (qs.qw, qs.qden, qs.qp))


def cand_operands(cs):
    """Kernel arguments of a duck-typed `Candidates` (attributes: see the top of this file).

    Returns (c [N, K*D] in T, cm uint8 [N, K] or None, cp [N, D] or None, w float32 [K] or None, flags)
    with flags = dict(HAS_CM, NORM, POOL): all views of the stored tensors (the bool mask is viewed as
    bytes, not converted); w only when Eq. 4 is pooled on the fly.
    """
    c = cs.prototypes
    n = c.shape[0]
    c = c.contiguous().view(n, -1)
    mask = cs.mask
    cm = None if mask is None else mask.contiguous().view(torch.uint8)
    cp = cs.pooled
    if cp is None:
        pool, w = 2, cs.weights.to(torch.float32).contiguous()
    else:
        pool, w, cp = (0 if cs.pooled_normalized else 1), None, cp.contiguous()
    flags = dict(HAS_CM=cm is not None, NORM=not cs.normalized, POOL=pool)
    return c, cm, cp, w, flags


def d_pad(d: int) -> int:
    """Width of a whole-prototype tile: next power of two >= D, at least 16 (the tl.dot minimum)."""
    return max(16, next_pow2(d))


def raw_sub(kt: int, d: int, flags, budget: Optional[int] = None) -> int:
    """Candidates per scored tile of the top-k / re-rank kernels (a power of two dividing kt).

    kt itself, except when Eq. 4 is pooled on the fly (POOL 2): then the widest tile whose float32
    h [D_PAD, SUB] stays within `budget` elements (h in registers, `_proto_h`), at least 16; when even
    16 does not fit, kt (the two-step scheme, `_pool_two_step`, has no h tile).
    """
    if flags["POOL"] != 2:
        return kt
    budget = H_ELEMS if budget is None else int(budget)
    sub, dp = kt, d_pad(d)
    while sub > 16 and sub * dp > budget:
        sub //= 2
    return sub if sub * dp <= budget else kt
