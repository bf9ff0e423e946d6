// The score tile kernel, compiled once per ISA (kernel_avx512.cpp, kernel_avx2.cpp,
// kernel_scalar.cpp). See docs/cpp.md for the algorithm.
//
// Three paths:
//  * few queries (< kGemmMinQ): a register-blocked dot-product micro-kernel (QB queries x RB rows,
//    one vector accumulator per pair, horizontal sum at the end) reads the storage dtype directly,
//    converting fp16/bf16 -> fp32 in registers (F16C / shift);
//  * re-rank (one query, gathered rows): micro_gather, with a steady line-by-line prefetch;
//  * many queries: the GEMM path (packed queries, kGemmKC-wide slices of the rows converted to fp32
//    once and reused by every query of the block, broadcast-FMA micro-tiles).
#pragma once
#include "kernels.h"
#include "simd.h"

namespace pecm {
namespace PECM_NS {

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <int QB, int RB, typename T>
static void micro(const float* q, int64_t qs, const T* const* cr, int64_t len, float* acc, int64_t accld) {
    V a[QB][RB];
    for (int i = 0; i < QB; i++)
        for (int r = 0; r < RB; r++) a[i][r] = vzero();
    int64_t j = 0;
    for (; j + VL <= len; j += VL) {
        V cv[RB];
        for (int r = 0; r < RB; r++) cv[r] = vload(cr[r] + j);
        for (int i = 0; i < QB; i++) {
            V qv = vload(q + i * qs + j);
            for (int r = 0; r < RB; r++) a[i][r] = vfma(qv, cv[r], a[i][r]);
        }
    }
    for (int i = 0; i < QB; i++) {
        for (int r = 0; r < RB; r++) {
            float s = vsum(a[i][r]);
            for (int64_t t = j; t < len; t++) s += q[i * qs + t] * to_f32(cr[r] + t);
            acc[i * accld + r] += s;
        }
    }
}

// One query x RB gathered rows (rerank), with a steady software prefetch: for every cache line of
// the current rows consumed, the same line of the next group's rows (nx[0..nnx)) is requested, so
// about one group (RB rows, ~RB * 14 KB at K=26, D=256 fp16) is always in flight (a burst of
// whole-row prefetches would overflow the miss buffers and gathered rows defeat the hardware
// prefetcher at every row start).
template <int RB, typename T>
static void micro_gather(const float* q, const T* const* cr, const T* const* nx, int nnx, int64_t len, float* acc) {
    constexpr int64_t line = 64 / (int64_t)sizeof(T);
    V a[RB][2];
    for (int r = 0; r < RB; r++) a[r][0] = a[r][1] = vzero();
    int64_t j = 0;
    for (; j + 2 * VL <= len; j += 2 * VL) {
        if constexpr (2 * VL >= line) {
            for (int64_t o = 0; o < 2 * VL; o += line)
                for (int r = 0; r < nnx; r++) __builtin_prefetch(nx[r] + j + o, 0, 2);
        } else if (j % line == 0) {
            for (int r = 0; r < nnx; r++) __builtin_prefetch(nx[r] + j, 0, 2);
        }
        const V q0 = vload(q + j), q1 = vload(q + j + VL);
        for (int r = 0; r < RB; r++) {
            a[r][0] = vfma(q0, vload(cr[r] + j), a[r][0]);
            a[r][1] = vfma(q1, vload(cr[r] + j + VL), a[r][1]);
        }
    }
    for (int r = 0; r < RB; r++) {
        float s = vsum(a[r][0]) + vsum(a[r][1]);
        for (int64_t t = j; t < len; t++) s += q[t] * to_f32(cr[r] + t);
        acc[r] += s;
    }
}

template <typename T>
using GatherFn = void (*)(const float*, const T* const*, const T* const*, int, int64_t, float*);

template <typename T>
static GatherFn<T> pick_gather(int rb) {
    switch (rb) {
        case 1: return &micro_gather<1, T>;
        case 2: return &micro_gather<(RB_MAX >= 2 ? 2 : 1), T>;
        case 3: return &micro_gather<(RB_MAX >= 3 ? 3 : 1), T>;
        default: return &micro_gather<RB_MAX, T>;
    }
}

template <typename T>
using MicroFn = void (*)(const float*, int64_t, const T* const*, int64_t, float*, int64_t);

template <typename T, int QB>
static MicroFn<T> pick_rb(int rb) {
    switch (rb) {
        case 1: return &micro<QB, 1, T>;
        case 2: return &micro<QB, (RB_MAX >= 2 ? 2 : 1), T>;
        case 3: return &micro<QB, (RB_MAX >= 3 ? 3 : 1), T>;
        default: return &micro<QB, RB_MAX, T>;
    }
}

template <typename T>
static MicroFn<T> pick(int qb, int rb) {
    switch (qb) {
        case 1: return pick_rb<T, 1>(rb);
        case 2: return pick_rb<T, (QB_MAX >= 2 ? 2 : 1)>(rb);
        case 3: return pick_rb<T, (QB_MAX >= 3 ? 3 : 1)>(rb);
        default: return pick_rb<T, QB_MAX>(rb);
    }
}

// acc[i * nr + r] += q[i] . row_r  for i < nq, r < nr; rows have `rowlen` elements.
template <typename T>
static void accumulate(const float* q, int64_t qs, int64_t nq, const T* base, int64_t rowlen, const int64_t* rows,
                       int64_t n0, int nr, float* acc) {
    const T* rp[kGatherRows];
    for (int r = 0; r < nr; r++) rp[r] = base + (rows ? rows[r] : n0 + r) * rowlen;
    if (rows && nq == 1) {
        // Re-rank: one query, gathered rows. The first group is requested up front; every later group
        // is prefetched line by line while the previous one is computed (micro_gather).
        constexpr int64_t line = 64 / (int64_t)sizeof(T);
        for (int r = 0; r < (int)imin(RB_MAX, nr); r++)
            for (int64_t j = 0; j < rowlen; j += line) __builtin_prefetch(rp[r] + j, 0, 2);
        for (int r0 = 0; r0 < nr; r0 += RB_MAX) {
            const int rb = (int)imin(RB_MAX, nr - r0);
            const int nnx = (int)imin(RB_MAX, imin(nr, r0 + 2 * RB_MAX) - (r0 + RB_MAX));
            if (nnx > 0)
                pick_gather<T>(rb)(q, rp + r0, rp + r0 + RB_MAX, nnx, rowlen, acc + r0);
            else
                pick_gather<T>(rb)(q, rp + r0, nullptr, 0, rowlen, acc + r0);
        }
        return;
    }
    // Few queries (bandwidth-bound): stream the storage dtype, converting in registers. Gathered rows
    // with several queries are prefetched a group ahead (contiguous rows: the hardware prefetcher).
    constexpr int64_t line = 64 / (int64_t)sizeof(T);
    if (rows)
        for (int r = 0; r < (int)imin(RB_MAX, nr); r++)
            for (int64_t j = 0; j < rowlen; j += line) __builtin_prefetch(rp[r] + j, 0, 2);
    for (int r0 = 0; r0 < nr; r0 += RB_MAX) {
        int rb = (int)imin(RB_MAX, nr - r0);
        if (rows)
            for (int r = r0 + RB_MAX; r < (int)imin(r0 + 2 * RB_MAX, nr); r++)
                for (int64_t j = 0; j < rowlen; j += line) __builtin_prefetch(rp[r] + j, 0, 2);
        for (int64_t i0 = 0; i0 < nq; i0 += QB_MAX) {
            int qb = (int)imin(QB_MAX, nq - i0);
            pick<T>(qb, rb)(q + i0 * qs, qs, rp + r0, rowlen, acc + i0 * nr + r0, nr);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// GEMM path (many queries, compute-bound). Outputs acc[r * kQueryBlock + i] for candidate row r and
// query i of the block. Queries come pre-packed by the driver ([group][K*D + D][VL], VL queries per
// vector, zero padding); candidate rows are converted fp16/bf16 -> fp32 once per kGemmKC slice into
// cbuf (rows of stride kGemmKC, L2-resident) and every query of the block reuses the slice.
// Micro-kernel: MR candidate rows x NG query vectors of accumulators, each step loads NG query
// vectors and broadcasts MR candidate values (no horizontal sums, no shuffles).
template <int MR, int NG>
static void gmicro(const float* a, const float* b, int64_t bstride, int64_t len, float* c) {
    V acc[MR][NG];
    for (int r = 0; r < MR; r++)
        for (int g = 0; g < NG; g++) acc[r][g] = vload(c + r * kQueryBlock + g * VL);
    const float* b1 = b + bstride;
#pragma GCC unroll 2
    for (int64_t k = 0; k < len; k++) {
        V x[NG];
        x[0] = vload(b + k * VL);
        if constexpr (NG > 1) x[1] = vload(b1 + k * VL);
        for (int r = 0; r < MR; r++) {
            const V av = vbcast(a + r * kGemmKC + k);
            for (int g = 0; g < NG; g++) acc[r][g] = vfma(av, x[g], acc[r][g]);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int g = 0; g < NG; g++) vstore(c + r * kQueryBlock + g * VL, acc[r][g]);
}

using GMicroFn = void (*)(const float*, const float*, int64_t, int64_t, float*);

template <int NG, int MR>
static GMicroFn gpick_rows(int mr) {
    if constexpr (MR == 1) {
        return &gmicro<1, NG>;
    } else {
        return mr == MR ? &gmicro<MR, NG> : gpick_rows<NG, MR - 1>(mr);
    }
}

constexpr int kMR2 = 6;   // rows of the 2-vector micro-tile (6 x 2 accumulators)
constexpr int kMR1 = 12;  // rows of the 1-vector micro-tile (12 x 1 accumulators)
static_assert(kRowBlock % kMR2 == 0 && kRowBlock % kMR1 == 0, "row block must tile evenly");

// acc[r * kQueryBlock + i] += q_i . row_r over one segment (the K*D prototypes or the D pooled values).
template <typename T>
static void gemm_segment(const float* qpk, int64_t lt, int64_t qoff, int64_t ng, const T* const* rp, int nr,
                         int64_t rowlen, float* acc, float* cbuf) {
    constexpr int64_t line = 64 / (int64_t)sizeof(T);
    const int full = nr / kMR2 * kMR2, full1 = nr / kMR1 * kMR1;
    const GMicroFn tail2 = gpick_rows<2, kMR2>(nr - full > 0 ? nr - full : 1);
    const GMicroFn tail1 = gpick_rows<1, kMR1>(nr - full1 > 0 ? nr - full1 : 1);
    for (int64_t k0 = 0; k0 < rowlen; k0 += kGemmKC) {
        const int64_t len = imin(kGemmKC, rowlen - k0);
        const int64_t next = imin(kGemmKC, rowlen - k0 - kGemmKC);  // elements of the next slice (<= 0: none)
        for (int r = 0; r < nr; r++) {
            const T* src = rp[r] + k0;
            float* dst = cbuf + r * kGemmKC;
            int64_t j = 0;
            for (; j + VL <= len; j += VL) vstore(dst + j, vload(src + j));
            for (; j < len; j++) dst[j] = to_f32(src + j);
        }
        // Prefetch the next slice of the rows spread over the micro-kernel calls of this slice (a burst
        // of hundreds of prefetches would overflow the miss buffers): rows r0..r0+5 with group pair 0.
        auto prefetch_rows = [&](int r0, int r1) {
            for (int r = r0; r < r1 && next > 0; r++)
                for (int64_t j = 0; j < next; j += line) __builtin_prefetch(rp[r] + k0 + kGemmKC + j, 0, 3);
        };
        for (int64_t g = 0; g < ng; g += 2) {
            const float* b = qpk + (g * lt + qoff + k0) * VL;
            float* c = acc + g * VL;
            if (g + 1 < ng) {
                int r0 = 0;
                for (; r0 < full; r0 += kMR2) {
                    if (g == 0) prefetch_rows(r0, r0 + kMR2);
                    gmicro<kMR2, 2>(cbuf + r0 * kGemmKC, b, lt * VL, len, c + r0 * kQueryBlock);
                }
                if (r0 < nr) {
                    if (g == 0) prefetch_rows(r0, nr);
                    tail2(cbuf + r0 * kGemmKC, b, lt * VL, len, c + r0 * kQueryBlock);
                }
            } else {
                int r0 = 0;
                for (; r0 < full1; r0 += kMR1) {
                    if (g == 0) prefetch_rows(r0, r0 + kMR1);
                    gmicro<kMR1, 1>(cbuf + r0 * kGemmKC, b, lt * VL, len, c + r0 * kQueryBlock);
                }
                if (r0 < nr) {
                    if (g == 0) prefetch_rows(r0, nr);
                    tail1(cbuf + r0 * kGemmKC, b, lt * VL, len, c + r0 * kQueryBlock);
                }
            }
        }
    }
}

template <typename T>
static void gemm_accumulate(const Problem& p, int64_t q0, int64_t nq, const int64_t* rows, int64_t n0, int nr,
                            bool need_num, bool need_sim, float* accn, float* accs, float* cbuf) {
    const int64_t KD = p.K * p.D, lt = KD + p.D, ng = (nq + VL - 1) / VL;
    const float* qpk = p.qpk + (q0 / VL) * lt * VL;
    for (int r = 0; r < nr; r++)
        for (int64_t i = 0; i < ng * VL; i++) accn[r * kQueryBlock + i] = accs[r * kQueryBlock + i] = 0.f;
    const T* rp[kRowBlock];
    if (need_num) {
        for (int r = 0; r < nr; r++) rp[r] = (const T*)p.c + (rows ? rows[r] : n0 + r) * KD;
        gemm_segment<T>(qpk, lt, 0, ng, rp, nr, KD, accn, cbuf);
    }
    if (need_sim) {
        for (int r = 0; r < nr; r++) rp[r] = (const T*)p.cp + (rows ? rows[r] : n0 + r) * p.D;
        gemm_segment<T>(qpk, lt, KD, ng, rp, nr, p.D, accs, cbuf);
    }
}

template <typename T>
static void tile_t(const Problem& p, int64_t q0, int64_t q1, const int64_t* rows, int64_t n0, int nr, float* sim,
                   float* conf, float* score, int64_t ld, float* scratch) {
    const int64_t nq = q1 - q0, KD = p.K * p.D;
    float* accn = scratch;
    float* accs = scratch + kQueryBlock * kRowBlock;
    float* cbuf = scratch + 2 * kQueryBlock * kRowBlock;
    const bool need_sim = sim || score, need_num = conf || score;
    // GEMM path: acc[r * kQueryBlock + i]; dot-product paths: acc[i * nr + r].
    const bool gemm = p.qpk && p.qlanes == VL && nq >= kGemmMinQ && q0 % VL == 0;
    int64_t si = nr, sr = 1;
    if (gemm) {
        gemm_accumulate<T>(p, q0, nq, rows, n0, nr, need_num, need_sim, accn, accs, cbuf);
        si = 1;
        sr = kQueryBlock;
    } else {
        for (int64_t i = 0; i < nq * nr; i++) accn[i] = accs[i] = 0.f;
        if (need_num) accumulate<T>(p.qw + q0 * KD, KD, nq, (const T*)p.c, KD, rows, n0, nr, accn);
        if (need_sim) accumulate<T>(p.qp + q0 * p.D, p.D, nq, (const T*)p.cp, p.D, rows, n0, nr, accs);
    }
    const T* cm = (const T*)p.cm;
    for (int64_t i = 0; i < nq; i++) {
        const int64_t b = q0 + i;
        const float* qd = p.qden + b * p.K;
        for (int r = 0; r < nr; r++) {
            const int64_t n = rows ? rows[r] : n0 + r;
            float cf = 0.f;
            if (need_num) {
                float den;
                if (cm) {
                    den = 0.f;
                    const T* m = cm + n * p.K;
                    for (int64_t t = 0; t < p.K; t++) den += qd[t] * to_f32(m + t);
                } else {
                    den = p.qsum[b];
                }
                cf = den > 0.f ? accn[i * si + r * sr] / den : 0.f;
            }
            const float s = accs[i * si + r * sr];
            if (sim) sim[i * ld + r] = s;
            if (conf) conf[i * ld + r] = cf;
            if (score) score[i * ld + r] = s * cf;
        }
    }
}

int tile_lanes() { return VL; }

void tile(const Problem& p, int64_t q0, int64_t q1, const int64_t* rows, int64_t n0, int nr, float* sim, float* conf,
          float* score, int64_t ld, float* scratch) {
    switch (p.dtype) {
        case kF16: tile_t<F16>(p, q0, q1, rows, n0, nr, sim, conf, score, ld, scratch); break;
        case kBF16: tile_t<BF16>(p, q0, q1, rows, n0, nr, sim, conf, score, ld, scratch); break;
        default: tile_t<float>(p, q0, q1, rows, n0, nr, sim, conf, score, ld, scratch); break;
    }
}

}  // namespace PECM_NS
}  // namespace pecm
