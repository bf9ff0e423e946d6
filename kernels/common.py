# Shared pieces of the PECM Triton kernels (installed as `pecm.kernels.common`).
#
# Math of one (query b, candidate n) pair on the canonical operands of `pecm.backends.base`:
#
#     num[b, n] = qw[b, :] . c[n, :]      (K*D long: confidence numerator)
#     den[b, n] = qden[b, :] . cm[n, :]   (K long; = sum_k qden[b, k] when cm is None)
#     sim[b, n] = qp[b, :] . cp[n, :]     (D long: pooled cosine)
#     conf = num / den if den > 0 else 0,  score = sim * conf
#
# Precision of the dots (`dot_mode`): the query operands are float32, the candidate operands are in
# the storage dtype T. MODE 0 casts the T tile up to float32 and uses an IEEE float32 `tl.dot`
# (exact float32 FMA accumulation; used for T = float32). MODE 1 keeps the tensor cores: the float32
# query tile is split into hi = round_T(q) and lo = round_T(q - hi) and accumulated as
# hi.c + lo.c in float32. The candidate tile is exact in T, so only the residual rounding of lo is
# lost (~2^-22 relative for float16, ~2^-16 for bfloat16) -- far below the half-type tolerance and
# far better than casting q to T once. Under TRITON_INTERPRET=1 bfloat16 uses MODE 0, because the
# Triton interpreter's bfloat16 `tl.dot` returns garbage (seen with Triton 3.8).
#
# Top-k keys (`_pack_keys` / `decode_keys`): a float32 value and a 32-bit candidate id are packed
# into one int64 whose signed order is the order of the value (ties: larger id first). Sorting,
# `tl.maximum` and `torch.topk` on keys therefore select (value, id) pairs together.

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

MAX_KT = 1024  # largest per-program top-k list (power of two) the fused top-k/rerank kernels keep


def interpret() -> bool:
    """True when kernels run on the CPU through the Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# `triton.jit` decides interpreted vs compiled when the kernels are *defined* (module import), so a
# process must set TRITON_INTERPRET before importing pecm.kernels; this records what was seen.
INTERPRET_AT_IMPORT = interpret()


def kt_floor() -> int:
    """Smallest top-k list / candidate tile of the top-k and rerank kernels (GPU: 64-wide tiles keep the
    dot and the gathers efficient for small k; interpreter: 16, its tl.sort cost grows with the width)."""
    return 16 if interpret() else 64


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def b_bucket(b: int) -> int:
    """Coarse query-batch bucket used as an autotune key (1-16, 17-128, more)."""
    return 16 if b <= 16 else (128 if b <= 128 else 1024)


def dot_mode(dtype: torch.dtype) -> int:
    """0: float32 IEEE dot on upcast tiles; 1: hi/lo split of the float32 operand into `dtype`."""
    if dtype == torch.float32:
        return 0
    if dtype == torch.bfloat16 and interpret():
        return 0
    return 1


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs keep the device busy (4 per SM on a GPU; 2 under the interpreter)."""
    if device.type != "cuda":
        return 2
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def configs(gpu, interp):
    """Autotune config list: the GPU set, or the single interpreter config under TRITON_INTERPRET=1.

    Each entry is (meta-parameter dict, num_warps, num_stages).
    """
    chosen = [interp] if interpret() else gpu
    return [triton.Config(dict(meta), num_warps=w, num_stages=s) for meta, w, s in chosen]


SMEM_BUDGET = 160 * 1024  # bytes of shared memory a pipelined config may plan for (H100: 227 KB max)
REG_TILE_BUDGET = 64 * 1024  # elements of the per-program register tiles (accumulator / gathered chunk)


def prune_configs(rows: str, cols: str, f32_budget: int, half_budget: int):
    """`early_config_prune` for autotune: drop configs whose tiles cannot fit (shared memory for the
    pipelined dot operands, register tiles), keeping at least the smallest config.

    `rows` / `cols` name the meta-parameters (or kernel kwargs, e.g. "KT") of the output tile. The
    budgets bound rows * cols * BLOCK_KD / threads (MODE 0 = float32 FMA dot, else tensor cores):
    above them the sm_90 compile spills registers (measured with kernels/aot_check.py, Triton 3.8).
    """

    def prune(cfgs, named_args, **kwargs):
        allargs = {**named_args, **kwargs}
        c = allargs.get("c_ptr")
        elt = c.element_size() if hasattr(c, "element_size") else 4
        kept = []
        for cfg in cfgs:
            meta = {**allargs, **cfg.kwargs}
            r, n, kd = int(meta[rows]), int(meta[cols]), int(meta["BLOCK_KD"])
            smem = cfg.num_stages * (r * kd * 4 + kd * n * elt)
            work = r * n * kd // (32 * cfg.num_warps)
            budget = f32_budget if int(allargs.get("MODE", 0)) == 0 else half_budget
            if smem <= SMEM_BUDGET and r * n <= REG_TILE_BUDGET // 2 and n * kd <= REG_TILE_BUDGET and work <= budget:
                kept.append(cfg)
        if not kept:
            kept = [min(cfgs, key=lambda cfg: sum(int(v) for v in cfg.kwargs.values()) * cfg.num_stages)]
        if int(allargs.get("KT", 0)) >= 512:
            # the unrolled bitonic sorts of a [BLOCK_B, >=512] int64 list take minutes to compile
            # (measured ~110 s for KT = 1024 with ptxas for sm_90 on a 2-core CPU): tune nothing there
            kept = kept[:1]
        return kept

    return prune


@triton.jit
def _dot_acc(acc, a, b, MODE: tl.constexpr):
    """acc += a @ b with a float32 [M, R] and b [R, P] in the storage dtype (see MODE above)."""
    if MODE == 0:
        acc = tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    else:
        hi = a.to(b.dtype)
        lo = (a - hi.to(tl.float32)).to(b.dtype)
        acc = tl.dot(hi, b, acc)
        acc = tl.dot(lo, b, acc)
    return acc


@triton.jit
def _pecm_tile(
    qw_ptr, qden_ptr, qsum_ptr, qp_ptr, c_ptr, cm_ptr, cp_ptr, offs_b, offs_n, B, N, K, D,
    HAS_CM: tl.constexpr, MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KD: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """(sim, num, den) float32 [BLOCK_B, BLOCK_N] for query rows offs_b and candidate rows offs_n."""
    mb = offs_b < B
    mn = offs_n < N
    rb = offs_b.to(tl.int64)
    rn = offs_n.to(tl.int64)  # N * K * D may exceed 2**31
    kd_total = K * D
    num = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for s in range(0, kd_total, BLOCK_KD):
        kk = s + tl.arange(0, BLOCK_KD)
        mk = kk < kd_total
        a = tl.load(qw_ptr + rb[:, None] * kd_total + kk[None, :], mask=mb[:, None] & mk[None, :], other=0.0)
        bt = tl.load(c_ptr + rn[None, :] * kd_total + kk[:, None], mask=mk[:, None] & mn[None, :], other=0.0)
        num = _dot_acc(num, a, bt, MODE)
    sim = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for s in range(0, D, BLOCK_KD):
        dd = s + tl.arange(0, BLOCK_KD)
        md = dd < D
        a = tl.load(qp_ptr + rb[:, None] * D + dd[None, :], mask=mb[:, None] & md[None, :], other=0.0)
        bt = tl.load(cp_ptr + rn[None, :] * D + dd[:, None], mask=md[:, None] & mn[None, :], other=0.0)
        sim = _dot_acc(sim, a, bt, MODE)
    if HAS_CM:
        kq = tl.arange(0, BLOCK_K)
        mk = kq < K
        a = tl.load(qden_ptr + rb[:, None] * K + kq[None, :], mask=mb[:, None] & mk[None, :], other=0.0)
        bt = tl.load(cm_ptr + rn[None, :] * K + kq[:, None], mask=mk[:, None] & mn[None, :], other=0.0)
        den = _dot_acc(tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32), a, bt, MODE)
    else:
        qs = tl.load(qsum_ptr + offs_b, mask=mb, other=0.0)
        den = qs[:, None] + tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    return sim, num, den


@triton.jit
def _epilogue(sim, num, den, BY: tl.constexpr):
    """BY 0: score, 1: sim, 2: conf (BY_SCORE / BY_SIM / BY_CONF) -- exactly `pecm.backends.base.combine`."""
    pos = den > 0
    conf = tl.where(pos, num / tl.where(pos, den, 1.0), 0.0)
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


@triton.jit
def _pack_keys(val, idx):
    """int64 keys ordered like the float32 `val` (then by `idx`, a non-negative int32 id)."""
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


def prepare_qsum(qden: torch.Tensor, cm) -> torch.Tensor:
    """Per-query denominator when cm is None (sum_k qden), else a placeholder pointer."""
    return qden.sum(1).contiguous() if cm is None else qden
