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
//
// Candidates that are not prepared (Candidates in kernels.h) are normalised on the fly, in the read
// of the rows the tile scores: each row's per-prototype scales inv_k = m_k / ||c_k|| come
// from the first query's dot products in the same read (micro_norm; GEMM path: prep_norms first) and
// the other queries multiply every loaded candidate vector by its prototype's scale (SCALED micro) or
// fold the scale into the fp32 conversion (GEMM path); without pooled vectors, prep_pool accumulates
// h = sum_k w_k inv_k c_k in fp32 from the cache-resident rows and sim is scaled by 1/||h||. Groups
// are RB_MAX rows (dot paths) or the tile's 48 rows (GEMM path), so every read after the first hits
// the cache. Prototypes masked out in every row of a group are not read at all.
//
// Numerics (docs/cpp.md, "Numerics"): the fast path above takes inv = 1 / sqrt(sum of squares) in
// float32, which is exact only while the sum of squares is a normal, comfortably ranged float. Every
// place that computes one (micro_norm, prep_norms, prep_pool) also checks it against
// [kSsLo, kSsHi] (one compare per prototype, false for NaN); when any check of a tile fails (a prototype
// that is zero, tiny, huge, or holds NaN/inf; a NaN/inf in a masked-out prototype that the group reads),
// the tile is recomputed by robust_tile: its rows are prepared in float64 (power-of-two pre-scale, so any
// finite magnitude normalises exactly; masked-out prototypes zero whatever they hold; NaN/inf -> NaN) into
// a float32 scratch copy and scored as prepared float32 candidates. Rare inputs pay for it; the hot loops
// are unchanged. There is no eps: a prototype is zero only when it is exactly zero.
#pragma once
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "kernels.h"
#include "simd.h"

namespace pecm {
namespace PECM_NS {

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

constexpr int64_t kMaxPrepK = 64;  // prototypes pooled per register pass (K above it: a scalar remainder pass)
// Sums of squares the fast path trusts (= pecm.operands.NORM_LO / NORM_HI); NaN fails both compares.
constexpr float kSsLo = 0x1p-100f, kSsHi = 0x1p100f;
static inline bool ss_ok(float ss) { return ss >= kSsLo && ss <= kSsHi; }

// ------------------------------------------------------------------------------------------------
// On-the-fly row preparation (candidates that are not prepared).

// Prefetch, for the elements [j, j + 2*VL) of the current row just consumed, the same elements of
// another row (pf; null: none): a steady one-row-ahead stream for gathered rows.
template <typename T>
static inline void prefetch_step(const T* pf, int64_t j) {
    constexpr int64_t line = 64 / (int64_t)sizeof(T);
    if (!pf) return;
    if constexpr (2 * VL >= line) {
        for (int64_t o = 0; o < 2 * VL; o += line) __builtin_prefetch(pf + j + o, 0, 2);
    } else if (j % line == 0) {
        __builtin_prefetch(pf + j, 0, 2);
    }
}

template <typename T>
static float sumsq(const T* x, int64_t n, const T* pf) {
    V s0 = vzero(), s1 = vzero();
    int64_t j = 0;
    for (; j + 2 * VL <= n; j += 2 * VL) {
        prefetch_step(pf, j);
        const V a = vload(x + j), b = vload(x + j + VL);
        s0 = vfma(a, a, s0);
        s1 = vfma(b, b, s1);
    }
    for (; j + VL <= n; j += VL) {
        const V a = vload(x + j);
        s0 = vfma(a, a, s0);
    }
    float r = vsum(s0) + vsum(s1);
    for (; j < n; j++) {
        const float v = to_f32(x + j);
        r += v * v;
    }
    return r;
}

// 1 / sqrt(ss) in float32 (IEEE sqrt and division, as torch divides by the same float32 norm); the
// callers check ss_ok (else the tile is recomputed by robust_tile); 0 for ss = 0 (an all-zero vector).
static inline float inv_norm(float ss) { return ss > 0.f ? 1.f / std::sqrt(ss) : 0.f; }

// h[0..D) = sum_t a[t] * x[t*D ..] (fp32); returns ||h||^2. CH vector accumulators stay in registers
// across the K prototypes (the row is cache-resident after the norm pass), so h is stored once.
template <typename T>
static float pool_row(const T* x, const float* a, int64_t K, int64_t D, float* h, const T* pf) {
    // 16 accumulators where the ISA has 32 vector registers (AVX-512: D = 256 in one sequential sweep
    // over the row), else 8 (AVX2's 16 registers).
    constexpr int CH = VL == 16 ? 16 : 8;
    V ss = vzero();
    int64_t d0 = 0;
    for (; d0 + CH * VL <= D; d0 += CH * VL) {
        V acc[CH];
        for (int j = 0; j < CH; j++) acc[j] = vzero();
        for (int64_t t = 0; t < K; t++) {
            if (pf && d0 == 0)  // another row streamed in while this cache-resident one is pooled
                for (int64_t o = 0; o < D; o += 64 / (int64_t)sizeof(T)) __builtin_prefetch(pf + t * D + o, 0, 2);
            if (a[t] == 0.f) continue;
            const V av = vset1(a[t]);
            const T* xt = x + t * D + d0;
            for (int j = 0; j < CH; j++) acc[j] = vfma(vload(xt + j * VL), av, acc[j]);
        }
        for (int j = 0; j < CH; j++) {
            vstore(h + d0 + j * VL, acc[j]);
            ss = vfma(acc[j], acc[j], ss);
        }
    }
    float r = vsum(ss);
    for (int64_t d = d0; d < D; d++) {
        float v = 0.f;
        for (int64_t t = 0; t < K; t++)
            if (a[t] != 0.f) v += to_f32(x + t * D + d) * a[t];
        h[d] = v;
        r += v * v;
    }
    return r;
}

// inv[r*K + t] = m_rt / ||c_rt|| (m_rt when the prototypes are unit) for rows cr[0..nr)
// ([K*D] each) with masks mr[r] ([K] bytes; mr null = all valid). nx[0..nnx): the next group's rows,
// prefetched line by line as the current rows are read (gathered rows; contiguous rows leave it to
// the hardware prefetcher). The dot-product paths fuse this into the first query's dots (micro_norm).
// Returns false when a sum of squares is out of the fast path's range (the tile goes to robust_tile).
template <typename T>
static bool prep_norms(const Problem& p, const T* const* cr, const uint8_t* const* mr, int nr, const T* const* nx,
                       int nnx, float* inv) {
    const int64_t K = p.K, D = p.D;
    bool ok = true;
    for (int r = 0; r < nr; r++) {
        float* iv = inv + r * K;
        const T* pf = r < nnx ? nx[r] : nullptr;
        for (int64_t t = 0; t < K; t++) {
            if (mr && !mr[r][t]) {
                iv[t] = 0.f;
            } else if (p.c.unit) {
                iv[t] = 1.f;
            } else {
                const float ss = sumsq(cr[r] + t * D, D, pf ? pf + t * D : nullptr);
                ok = ok && ss_ok(ss);
                iv[t] = inv_norm(ss);
            }
        }
    }
    return ok;
}

// The pooled side of rows whose inv is known (pr[r]: given pooled rows [D]; pr null = pool on the fly):
//   hp[r*D + d] = sum_t w_t inv_rt c_rt     (fp32, not normalised)
//   pinv[r]     = 1 / ||hp_r||, or 1 / ||cp_r|| for given pooled vectors (1 when unit; 0 for a zero vector)
// so sim = (qp . hp_r or cp_r) * pinv[r]; pnx[0..npnx): the next group's pooled rows, prefetched while
// given pooled rows are read; cnx2[0..ncnx2): the rows two groups ahead, prefetched while the current
// (cache-resident) rows are pooled, so memory stays busy through this compute phase (gathered rows).
// With prep_norms / micro_norm this is
// pecm.operands.normalize_block in float32, without rounding ĉ to the storage dtype.
// Returns false when a sum of squares is out of the fast path's range (an exactly zero h is fine: sim 0).
template <typename T>
static bool prep_pool(const Problem& p, const T* const* cr, const T* const* pr, int nr, const T* const* pnx, int npnx,
                      const T* const* cnx2, int ncnx2, const float* inv, float* hp, float* pinv) {
    const int64_t K = p.K, D = p.D;
    const Candidates& cs = p.c;
    float a[kMaxPrepK];
    bool ok = true;
    for (int r = 0; r < nr; r++) {
        if (pr) {  // given pooled rows: this is their first read, so it prefetches the next group's (pnx)
            if (cs.pooled_unit) {
                pinv[r] = 1.f;
            } else {
                const float ss = sumsq(pr[r], D, r < npnx ? pnx[r] : nullptr);
                ok = ok && ss_ok(ss);
                pinv[r] = inv_norm(ss);
            }
            continue;
        }
        const float* iv = inv + r * K;
        float* h = hp + r * D;
        for (int64_t t0 = 0; t0 < K; t0 += kMaxPrepK) {  // h in slices of kMaxPrepK prototypes
            const int64_t kk = imin(kMaxPrepK, K - t0);
            for (int64_t t = 0; t < kk; t++) a[t] = cs.w[t0 + t] * iv[t0 + t];
            if (t0 == 0) {
                pinv[r] = pool_row(cr[r], a, kk, D, h, t0 == 0 && r < ncnx2 ? cnx2[r] : nullptr);  // ||h||^2
            } else {  // K > kMaxPrepK (rare): add the slice; the norm is taken below
                for (int64_t d = 0; d < D; d++)
                    for (int64_t t = 0; t < kk; t++) h[d] += to_f32(cr[r] + (t0 + t) * D + d) * a[t];
            }
        }
        if (K > kMaxPrepK) pinv[r] = sumsq(h, D, (const float*)nullptr);
        const float hh = pinv[r];
        if (!ss_ok(hh)) {  // h exactly zero (every prototype masked or weighted 0) is fine; anything else is not
            bool zero = hh == 0.f;
            for (int64_t d = 0; zero && d < D; d++) zero = h[d] == 0.f;
            ok = ok && zero;
        }
        pinv[r] = inv_norm(hh);
    }
    return ok;
}

// One query x RB rows of raw prototypes, norms fused with the dots in one read of the rows:
// inv[r*K + t] = m_rt / ||c_rt|| and acc[r] += sum_t inv_rt (q_t . c_rt). Prototypes masked
// in every row are not read. nx[0..nnx): the next group's rows, prefetched line by line (gathered rows).
// Returns false when a live prototype's sum of squares is out of the fast path's range, or a masked-out
// one read with the group holds NaN/inf (its 0 scale would not cancel it): the tile goes to robust_tile.
template <int RB, typename T>
static bool micro_norm(const float* q, const T* const* cr, const uint8_t* const* mr, const T* const* nx, int nnx,
                       int64_t K, int64_t D, float* inv, float* acc) {
    bool ok = true;
    static_assert(RB >= 1 && RB <= 4, "the norms of a group are reduced 4 at a time");
    V tot[RB];
    float tl[RB];
    for (int r = 0; r < RB; r++) {
        tot[r] = vzero();
        tl[r] = 0.f;
    }
    for (int64_t t = 0; t < K; t++) {
        bool live[RB], any = false;
        for (int r = 0; r < RB; r++) {
            live[r] = !mr || mr[r][t];
            any = any || live[r];
        }
        if (!any) {
            for (int r = 0; r < RB; r++) inv[r * K + t] = 0.f;
            continue;
        }
        V a[RB], n[RB];
        float ta[RB], tn[RB];
        for (int r = 0; r < RB; r++) {
            a[r] = n[r] = vzero();
            ta[r] = tn[r] = 0.f;
        }
        const int64_t b0 = t * D, e = b0 + D;
        int64_t j = b0;
        for (; j + 2 * VL <= e; j += 2 * VL) {
            for (int r = 0; r < nnx; r++) prefetch_step(nx[r], j);
            const V q0 = vload(q + j), q1 = vload(q + j + VL);
            for (int r = 0; r < RB; r++) {
                const V c0 = vload(cr[r] + j), c1 = vload(cr[r] + j + VL);
                a[r] = vfma(q1, c1, vfma(q0, c0, a[r]));
                n[r] = vfma(c1, c1, vfma(c0, c0, n[r]));
            }
        }
        for (; j < e; j++)
            for (int r = 0; r < RB; r++) {
                const float cv = to_f32(cr[r] + j);
                ta[r] += q[j] * cv;
                tn[r] += cv * cv;
            }
        float ss[4] = {0.f, 0.f, 0.f, 0.f}, iv[4];
        for (int r = 0; r < RB; r++) ss[r] = vsum(n[r]) + tn[r];
        inv_norm4(ss, 0.f, iv);  // the group's RB norms in one vector sqrt / division
        for (int r = 0; r < RB; r++) ok = ok && (live[r] ? ss_ok(ss[r]) : ss[r] <= kSsHi);
        for (int r = 0; r < RB; r++) {
            const float x = live[r] ? iv[r] : 0.f;
            inv[r * K + t] = x;
            tot[r] = vfma(a[r], vset1(x), tot[r]);
            tl[r] += ta[r] * x;
        }
    }
    for (int r = 0; r < RB; r++) acc[r] += vsum(tot[r]) + tl[r];
    return ok;
}

template <typename T>
using NormFn = bool (*)(const float*, const T* const*, const uint8_t* const*, const T* const*, int, int64_t, int64_t,
                        float*, float*);

template <typename T>
static NormFn<T> pick_norm(int rb) {
    switch (rb) {
        case 1: return &micro_norm<1, T>;
        case 2: return &micro_norm<(RB_MAX >= 2 ? 2 : 1), T>;
        case 3: return &micro_norm<(RB_MAX >= 3 ? 3 : 1), T>;
        default: return &micro_norm<RB_MAX, T>;
    }
}

// ------------------------------------------------------------------------------------------------
// Dot-product paths. Rows are K segments of D values; SCALED multiplies segment t of row r by
// inv[r*K + t] (unscaled callers pass K = 1, D = the row length).

// sv[r] = inv[r*K + t] broadcast; false when every row's scale is 0 (the segment need not be read).
template <int RB>
static inline bool segment_scales(const float* inv, int64_t K, int64_t t, V* sv) {
    bool any = false;
    for (int r = 0; r < RB; r++) {
        const float x = inv[r * K + t];
        sv[r] = vset1(x);
        any = any || x != 0.f;
    }
    return any;
}
template <int QB, int RB, typename T, bool SCALED>
static void micro(const float* q, int64_t qs, const T* const* cr, int64_t K, int64_t D, const float* inv, float* acc,
                  int64_t accld) {
    V a[QB][RB];
    float tl[QB][RB];
    for (int i = 0; i < QB; i++)
        for (int r = 0; r < RB; r++) {
            a[i][r] = vzero();
            tl[i][r] = 0.f;
        }
    for (int64_t t = 0; t < K; t++) {
        V sv[RB];
        if constexpr (SCALED) {
            if (!segment_scales<RB>(inv, K, t, sv)) continue;  // masked in every row of the group: not read
        }
        const int64_t b0 = t * D;
        int64_t j = b0;
        for (; j + VL <= b0 + D; j += VL) {
            V cv[RB];
            for (int r = 0; r < RB; r++) {
                cv[r] = vload(cr[r] + j);
                if constexpr (SCALED) cv[r] = vmul(cv[r], sv[r]);
            }
            for (int i = 0; i < QB; i++) {
                const V qv = vload(q + i * qs + j);
                for (int r = 0; r < RB; r++) a[i][r] = vfma(qv, cv[r], a[i][r]);
            }
        }
        for (; j < b0 + D; j++)
            for (int r = 0; r < RB; r++) {
                float cv = to_f32(cr[r] + j);
                if constexpr (SCALED) cv *= inv[r * K + t];
                for (int i = 0; i < QB; i++) tl[i][r] += q[i * qs + j] * cv;
            }
    }
    for (int i = 0; i < QB; i++)
        for (int r = 0; r < RB; r++) acc[i * accld + r] += vsum(a[i][r]) + tl[i][r];
}

// One query x RB gathered rows (rerank), with a steady software prefetch: for every cache line of
// the current rows consumed, the same line of the next group's rows (nx[0..nnx)) is requested, so
// about one group (RB rows, ~RB * 14 KB at K=26, D=256 fp16) is always in flight (a burst of
// whole-row prefetches would overflow the miss buffers and gathered rows defeat the hardware
// prefetcher at every row start).
template <int RB, typename T, bool SCALED>
static void micro_gather(const float* q, const T* const* cr, const T* const* nx, int nnx, int64_t K, int64_t D,
                         const float* inv, float* acc) {
    constexpr int64_t line = 64 / (int64_t)sizeof(T);
    V a[RB][2];
    float tl[RB];
    for (int r = 0; r < RB; r++) {
        a[r][0] = a[r][1] = vzero();
        tl[r] = 0.f;
    }
    for (int64_t t = 0; t < K; t++) {
        V sv[RB];
        if constexpr (SCALED) {
            if (!segment_scales<RB>(inv, K, t, sv)) continue;  // masked in every row of the group: not read
        }
        const int64_t b0 = t * D, e = b0 + D;
        int64_t j = b0;
        for (; j + 2 * VL <= e; j += 2 * VL) {
            if constexpr (2 * VL >= line) {
                for (int64_t o = 0; o < 2 * VL; o += line)
                    for (int r = 0; r < nnx; r++) __builtin_prefetch(nx[r] + j + o, 0, 2);
            } else if (j % line == 0) {
                for (int r = 0; r < nnx; r++) __builtin_prefetch(nx[r] + j, 0, 2);
            }
            const V q0 = vload(q + j), q1 = vload(q + j + VL);
            for (int r = 0; r < RB; r++) {
                V c0 = vload(cr[r] + j), c1 = vload(cr[r] + j + VL);
                if constexpr (SCALED) {
                    c0 = vmul(c0, sv[r]);
                    c1 = vmul(c1, sv[r]);
                }
                a[r][0] = vfma(q0, c0, a[r][0]);
                a[r][1] = vfma(q1, c1, a[r][1]);
            }
        }
        for (; j < e; j++)
            for (int r = 0; r < RB; r++) {
                float cv = to_f32(cr[r] + j);
                if constexpr (SCALED) cv *= inv[r * K + t];
                tl[r] += q[j] * cv;
            }
    }
    for (int r = 0; r < RB; r++) acc[r] += vsum(a[r][0]) + vsum(a[r][1]) + tl[r];
}

template <typename T, bool S>
using GatherFn = void (*)(const float*, const T* const*, const T* const*, int, int64_t, int64_t, const float*, float*);

template <typename T, bool S>
static GatherFn<T, S> pick_gather(int rb) {
    switch (rb) {
        case 1: return &micro_gather<1, T, S>;
        case 2: return &micro_gather<(RB_MAX >= 2 ? 2 : 1), T, S>;
        case 3: return &micro_gather<(RB_MAX >= 3 ? 3 : 1), T, S>;
        default: return &micro_gather<RB_MAX, T, S>;
    }
}

template <typename T, bool S>
using MicroFn = void (*)(const float*, int64_t, const T* const*, int64_t, int64_t, const float*, float*, int64_t);

template <typename T, bool S, int QB>
static MicroFn<T, S> pick_rb(int rb) {
    switch (rb) {
        case 1: return &micro<QB, 1, T, S>;
        case 2: return &micro<QB, (RB_MAX >= 2 ? 2 : 1), T, S>;
        case 3: return &micro<QB, (RB_MAX >= 3 ? 3 : 1), T, S>;
        default: return &micro<QB, RB_MAX, T, S>;
    }
}

template <typename T, bool S>
static MicroFn<T, S> pick(int qb, int rb) {
    switch (qb) {
        case 1: return pick_rb<T, S, 1>(rb);
        case 2: return pick_rb<T, S, (QB_MAX >= 2 ? 2 : 1)>(rb);
        case 3: return pick_rb<T, S, (QB_MAX >= 3 ? 3 : 1)>(rb);
        default: return pick_rb<T, S, QB_MAX>(rb);
    }
}

// acc[i * accld + r] += q_i . row_r (segments scaled when S) for i < nq, r < rb; one query with
// gathered rows takes micro_gather (prefetching the next group nx[0..nnx)).
template <typename T, bool S>
static void dot_group(const float* q, int64_t qs, int64_t nq, const T* const* rp, int rb, const T* const* nx, int nnx,
                      bool gathered, int64_t K, int64_t D, const float* inv, float* acc, int64_t accld) {
    if (gathered && nq == 1) {
        pick_gather<T, S>(rb)(q, rp, nnx > 0 ? nx : nullptr, nnx, K, D, inv, acc);
        return;
    }
    if (gathered) {  // several queries over gathered rows: the next group a whole row at a time
        constexpr int64_t line = 64 / (int64_t)sizeof(T);
        for (int r = 0; r < nnx; r++)
            for (int64_t j = 0; j < K * D; j += line) __builtin_prefetch(nx[r] + j, 0, 2);
    }
    for (int64_t i0 = 0; i0 < nq; i0 += QB_MAX) {
        const int qb = (int)imin(QB_MAX, nq - i0);
        pick<T, S>(qb, rb)(q + i0 * qs, qs, rp, K, D, inv, acc + i0 * accld, accld);
    }
}

// The dot-product paths over a tile: RB_MAX rows at a time. Raw prototypes: the first query's dots
// compute the rows' inv in the same read (micro_norm); the other queries and the pooled side reuse it.
// accn / accs [nq][nr]. crow / prow / mrow: per-row pointers (prow null: pooled on the fly into hp).
// Returns false when a norm was out of the fast path's range (the caller recomputes the tile robustly).
template <typename T>
static bool dot_tile(const Problem& p, const float* qw, const float* qp, int64_t nq, const T* const* crow,
                     const T* const* prow, const uint8_t* const* mrow, int nr, bool gathered, bool need_num,
                     bool need_sim, float* accn, float* accs, const TileScratch& s) {
    bool ok = true;
    const int64_t K = p.K, D = p.D, KD = K * D;
    const bool prep = !p.c.prepared, scaled = !p.c.unit;
    // Gathered rows: the first groups are requested up front, later ones `ahead` groups ahead of the
    // read that consumes them: 1 for prepared rows (their dots keep up with memory), 3 for raw rows,
    // whose first read computes the norms too (1-2 groups left memory idle; 2 threads, Zen 4).
    const int ahead = gathered && scaled && need_num ? 3 : 1;
    if (gathered) {
        constexpr int64_t line = 64 / (int64_t)sizeof(T);
        for (int r = 0; r < (int)imin(ahead * RB_MAX, nr); r++)
            for (int64_t j = 0; j < KD; j += line) __builtin_prefetch(crow[r] + j, 0, 2);
    }
    for (int r0 = 0; r0 < nr; r0 += RB_MAX) {
        const int rb = (int)imin(RB_MAX, nr - r0);
        const int nnx = gathered ? (int)imin(RB_MAX, imin(nr, r0 + (ahead + 1) * RB_MAX) - (r0 + ahead * RB_MAX)) : 0;
        const T* const* cnx = nnx > 0 ? crow + r0 + ahead * RB_MAX : nullptr;  // the rows to prefetch now
        const uint8_t* const* mg = mrow ? mrow + r0 : nullptr;
        if (scaled && need_num) {
            ok = pick_norm<T>(rb)(qw, crow + r0, mg, cnx, nnx > 0 ? nnx : 0, K, D, s.inv, accn + r0) && ok;
            if (nq > 1)
                dot_group<T, true>(qw + KD, KD, nq - 1, crow + r0, rb, nullptr, 0, gathered, K, D, s.inv, accn + nr + r0,
                                   nr);
        } else if (prep && (need_num || !prow)) {  // inv for the unscaled dots' mask or for pooling
            ok = prep_norms<T>(p, crow + r0, mg, rb, scaled ? cnx : nullptr, scaled ? nnx : 0, s.inv) && ok;
        }
        if (need_num && !scaled)
            dot_group<T, false>(qw, KD, nq, crow + r0, rb, cnx, nnx, gathered, 1, KD, nullptr, accn + r0, nr);
        // The pooled rows' first read prefetches the next group's: prep_pool's norm of raw given rows,
        // else the sim dots.
        const int npx = gathered ? (int)imin(RB_MAX, imin(nr, r0 + 2 * RB_MAX) - (r0 + RB_MAX)) : 0;
        const T* const* pnx = prow && npx > 0 ? prow + r0 + RB_MAX : nullptr;
        const bool pooled_read = prep && prow && !p.c.pooled_unit;
        const int nnx2 = gathered ? (int)imin(RB_MAX, imin(nr, r0 + 3 * RB_MAX) - (r0 + 2 * RB_MAX)) : 0;
        const T* const* cnx2 = nnx2 > 0 && scaled && ahead == 1 ? crow + r0 + 2 * RB_MAX : nullptr;
        if (prep && need_sim)
            ok = prep_pool<T>(p, crow + r0, prow ? prow + r0 : nullptr, rb, pooled_read ? pnx : nullptr, npx, cnx2,
                              cnx2 ? nnx2 : 0, s.inv, s.hp, s.pinv + r0) &&
                 ok;
        if (need_sim) {
            if (prow) {
                const bool pf = !pooled_read && pnx;
                dot_group<T, false>(qp, D, nq, prow + r0, rb, pf ? pnx : nullptr, pf ? npx : 0, gathered, 1, D, nullptr,
                                    accs + r0, nr);
            } else {
                const float* hr[RB_MAX];
                for (int r = 0; r < rb; r++) hr[r] = s.hp + r * D;
                dot_group<float, false>(qp, D, nq, hr, rb, nullptr, 0, gathered, 1, D, nullptr, accs + r0, nr);
            }
        }
    }
    return ok;
}

// ------------------------------------------------------------------------------------------------
// GEMM path (many queries, compute-bound). Outputs acc[r * kQueryBlock + i] for candidate row r and
// query i of the block. Queries come pre-packed by the driver ([group][K*D + D][VL], VL queries per
// vector, zero padding); candidate rows are converted fp16/bf16 -> fp32 once per kGemmKC slice into
// cbuf (rows of stride kGemmKC, L2-resident) and every query of the block reuses the slice; rows of
// candidates that are not unit are scaled by their prototype's inv in that conversion.
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

// Slice [k0, k0 + len) of row src into dst as fp32, segment t scaled by inv[t] (inv null: unscaled).
template <typename T>
static void convert_slice(const T* src, float* dst, int64_t k0, int64_t len, const float* inv, int64_t D) {
    if (!inv) {
        int64_t j = 0;
        for (; j + VL <= len; j += VL) vstore(dst + j, vload(src + j));
        for (; j < len; j++) dst[j] = to_f32(src + j);
        return;
    }
    int64_t j = 0;
    while (j < len) {
        const int64_t t = (k0 + j) / D, e = imin(len, (t + 1) * D - k0);
        const float sc = inv[t];
        if (sc == 0.f) {  // masked out: zeros, whatever the prototype holds (NaN * 0 would be NaN)
            std::memset(dst + j, 0, sizeof(float) * (size_t)(e - j));
            j = e;
            continue;
        }
        const V sv = vset1(sc);
        for (; j + VL <= e; j += VL) vstore(dst + j, vmul(vload(src + j), sv));
        for (; j < e; j++) dst[j] = to_f32(src + j) * sc;
    }
}

// acc[r * kQueryBlock + i] += q_i . row_r over one segment (the K*D prototypes or the D pooled values).
template <typename T>
static void gemm_segment(const float* qpk, int64_t lt, int64_t qoff, int64_t ng, const T* const* rp, int nr,
                         int64_t rowlen, const float* inv, int64_t K, int64_t D, float* acc, float* cbuf) {
    constexpr int64_t line = 64 / (int64_t)sizeof(T);
    const int full = nr / kMR2 * kMR2, full1 = nr / kMR1 * kMR1;
    const GMicroFn tail2 = gpick_rows<2, kMR2>(nr - full > 0 ? nr - full : 1);
    const GMicroFn tail1 = gpick_rows<1, kMR1>(nr - full1 > 0 ? nr - full1 : 1);
    for (int64_t k0 = 0; k0 < rowlen; k0 += kGemmKC) {
        const int64_t len = imin(kGemmKC, rowlen - k0);
        const int64_t next = imin(kGemmKC, rowlen - k0 - kGemmKC);  // elements of the next slice (<= 0: none)
        for (int r = 0; r < nr; r++)
            convert_slice<T>(rp[r] + k0, cbuf + r * kGemmKC, k0, len, inv ? inv + r * K : nullptr, D);
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
static void gemm_accumulate(const Problem& p, int64_t q0, int64_t nq, const T* const* crow, const T* const* prow,
                            int nr, bool need_num, bool need_sim, float* accn, float* accs, const TileScratch& s) {
    const int64_t K = p.K, D = p.D, KD = K * D, lt = KD + D, ng = (nq + VL - 1) / VL;
    const float* qpk = p.q.qpk + (q0 / VL) * lt * VL;
    float* cbuf = s.acc + 2 * kQueryBlock * kRowBlock;
    for (int r = 0; r < nr; r++)
        for (int64_t i = 0; i < ng * VL; i++) accn[r * kQueryBlock + i] = accs[r * kQueryBlock + i] = 0.f;
    if (need_num) gemm_segment<T>(qpk, lt, 0, ng, crow, nr, KD, p.c.unit ? nullptr : s.inv, K, D, accn, cbuf);
    if (need_sim) {
        if (prow) {
            gemm_segment<T>(qpk, lt, KD, ng, prow, nr, D, nullptr, 1, D, accs, cbuf);
        } else {
            const float* hr[kRowBlock];
            for (int r = 0; r < nr; r++) hr[r] = s.hp + r * D;
            gemm_segment<float>(qpk, lt, KD, ng, hr, nr, D, nullptr, 1, D, accs, cbuf);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Robust fallback (see the top of this file). Cold code: float64, scalar.

template <typename T>
static void tile_t(const Problem& p, int64_t q0, int64_t q1, const int64_t* rows, int64_t n0, int nr, float* sim,
                   float* conf, float* score, int64_t ld, const TileScratch& s);

// out[0..D) = x / ||x|| computed in float64 after an exact power-of-two scale of max|x| to [0.5, 1):
// exact for every finite magnitude; zero stays zero; NaN/inf anywhere -> NaN. Returns ||x|| > 0.
template <typename T>
static void robust_unit(const T* x, int64_t D, double* out) {
    double m = 0.0;
    bool finite = true;
    for (int64_t d = 0; d < D; d++) {
        const double v = to_f32(x + d);
        finite = finite && std::isfinite(v);
        m = std::fabs(v) > m ? std::fabs(v) : m;
    }
    if (!finite) {
        for (int64_t d = 0; d < D; d++) out[d] = std::numeric_limits<double>::quiet_NaN();
        return;
    }
    if (m == 0.0) {
        for (int64_t d = 0; d < D; d++) out[d] = 0.0;
        return;
    }
    int e = 0;
    std::frexp(m, &e);
    const double sc = std::ldexp(1.0, -e);
    double ss = 0.0;
    for (int64_t d = 0; d < D; d++) {
        const double v = to_f32(x + d) * sc;
        ss += v * v;
    }
    const double inv = sc / std::sqrt(ss);
    for (int64_t d = 0; d < D; d++) out[d] = to_f32(x + d) * inv;
}

// unit float64 h -> float32, rescaling so that tiny / huge h (tiny or huge weights) stay exact.
static void robust_unit_d(const double* h, int64_t D, float* out) {
    double m = 0.0;
    bool finite = true;
    for (int64_t d = 0; d < D; d++) {
        finite = finite && std::isfinite(h[d]);
        m = std::fabs(h[d]) > m ? std::fabs(h[d]) : m;
    }
    if (!finite || m == 0.0) {
        for (int64_t d = 0; d < D; d++) out[d] = finite ? 0.f : std::numeric_limits<float>::quiet_NaN();
        return;
    }
    double ss = 0.0;
    for (int64_t d = 0; d < D; d++) ss += (h[d] / m) * (h[d] / m);
    const double n = std::sqrt(ss);
    for (int64_t d = 0; d < D; d++) out[d] = (float)(h[d] / m / n);
}

// The tile recomputed from a float64 preparation of its rows (chunks of kRowBlock rows): unit
// prototypes (masked-out ones zero), unit pooled vectors (given, or Eq. 4), then the prepared float32
// tile kernel. The spill buffer is allocated on first use and freed with the thread's scratch.
template <typename T>
static void robust_tile(const Problem& p, int64_t q0, int64_t q1, const int64_t* rows, int64_t n0, int nr, float* sim,
                        float* conf, float* score, int64_t ld, const TileScratch& s) {
    const int64_t K = p.K, D = p.D, KD = K * D;
    const Candidates& cs = p.c;
    const size_t need = sizeof(double) * (size_t)(2 * D) + sizeof(float) * (size_t)(kRowBlock * (KD + D)) +
                        (size_t)(kRowBlock * K);
    if (!*s.spill) *s.spill = std::malloc(need);  // plain malloc (see kernels.h: no std containers here)
    if (!*s.spill) std::abort();                  // out of memory in a cold path: nothing sane to return
    double* hd = (double*)*s.spill;               // [D] Eq. 4 h of one row, float64
    double* ud = hd + D;                          // [D] one unit prototype, float64
    float* uc = (float*)(ud + D);                 // [kRowBlock][K*D] unit prototypes
    float* up = uc + kRowBlock * KD;              // [kRowBlock][D] unit pooled vectors
    uint8_t* um = (uint8_t*)(up + kRowBlock * D);  // [kRowBlock][K] mask
    Problem p2 = p;
    p2.c.unit = p2.c.pooled_unit = p2.c.prepared = true;
    p2.c.dtype = kF32;
    for (int c0 = 0; c0 < nr; c0 += kRowBlock) {
        const int cn = (int)imin(kRowBlock, nr - c0);
        for (int r = 0; r < cn; r++) {
            const int64_t n = rows ? rows[c0 + r] : n0 + c0 + r;
            const T* x = (const T*)cs.c + n * KD;
            const uint8_t* m = cs.mask ? cs.mask + n * K : nullptr;
            float* u = uc + r * KD;
            for (int64_t d = 0; d < D; d++) hd[d] = 0.0;
            for (int64_t t = 0; t < K; t++) {
                const bool live = !m || m[t];
                um[r * K + t] = live ? 1 : 0;
                if (!live) {
                    for (int64_t d = 0; d < D; d++) u[t * D + d] = 0.f;
                    continue;
                }
                if (cs.unit) {
                    for (int64_t d = 0; d < D; d++) ud[d] = to_f32(x + t * D + d);
                } else {
                    robust_unit(x + t * D, D, ud);
                }
                for (int64_t d = 0; d < D; d++) u[t * D + d] = (float)ud[d];
                if (!cs.pooled)
                    for (int64_t d = 0; d < D; d++) hd[d] += (double)cs.w[t] * ud[d];
            }
            float* pu = up + r * D;
            if (cs.pooled) {
                const T* pr = (const T*)cs.pooled + n * D;
                if (cs.pooled_unit) {
                    for (int64_t d = 0; d < D; d++) pu[d] = to_f32(pr + d);
                } else {
                    robust_unit(pr, D, ud);
                    for (int64_t d = 0; d < D; d++) pu[d] = (float)ud[d];
                }
            } else {
                robust_unit_d(hd, D, pu);
            }
        }
        p2.c.c = uc;
        p2.c.pooled = up;
        p2.c.mask = cs.mask ? um : nullptr;
        p2.c.N = cn;
        tile_t<float>(p2, q0, q1, nullptr, 0, cn, sim ? sim + c0 : nullptr, conf ? conf + c0 : nullptr,
                      score ? score + c0 : nullptr, ld, s);
    }
}

template <typename T>
static void tile_t(const Problem& p, int64_t q0, int64_t q1, const int64_t* rows, int64_t n0, int nr, float* sim,
                   float* conf, float* score, int64_t ld, const TileScratch& s) {
    const int64_t nq = q1 - q0, K = p.K, D = p.D, KD = K * D;
    const Candidates& cs = p.c;
    float* accn = s.acc;
    float* accs = s.acc + kQueryBlock * kRowBlock;
    const bool need_sim = sim || score, need_num = conf || score;
    const T* crow[kGatherRows];
    const T* prow_buf[kGatherRows];
    const uint8_t* mrow_buf[kGatherRows];
    for (int r = 0; r < nr; r++) {
        const int64_t n = rows ? rows[r] : n0 + r;
        crow[r] = (const T*)cs.c + n * KD;
        if (cs.pooled) prow_buf[r] = (const T*)cs.pooled + n * D;
        if (cs.mask) mrow_buf[r] = cs.mask + n * K;
    }
    const T* const* prow = cs.pooled ? prow_buf : nullptr;
    const uint8_t* const* mrow = cs.mask ? mrow_buf : nullptr;
    // GEMM path: acc[r * kQueryBlock + i]; dot-product paths: acc[i * nr + r].
    const bool gemm = p.q.qpk && p.q.qlanes == VL && nq >= kGemmMinQ && q0 % VL == 0 && nr <= kRowBlock;
    int64_t si = nr, sr = 1;
    bool ok = true;
    if (gemm) {
        if (!cs.prepared) {
            ok = prep_norms<T>(p, crow, mrow, nr, nullptr, 0, s.inv);
            if (need_sim) ok = prep_pool<T>(p, crow, prow, nr, nullptr, 0, nullptr, 0, s.inv, s.hp, s.pinv) && ok;
        }
        if (ok) gemm_accumulate<T>(p, q0, nq, crow, prow, nr, need_num, need_sim, accn, accs, s);
        si = 1;
        sr = kQueryBlock;
    } else {
        for (int64_t i = 0; i < nq * nr; i++) accn[i] = accs[i] = 0.f;
        ok = dot_tile<T>(p, p.q.qw + q0 * KD, p.q.qp + q0 * D, nq, crow, prow, mrow, nr, rows != nullptr, need_num,
                         need_sim, accn, accs, s);
    }
    if (!ok) {  // a norm outside the fast path's range somewhere in the tile (rare): recompute it robustly
        robust_tile<T>(p, q0, q1, rows, n0, nr, sim, conf, score, ld, s);
        return;
    }
    const bool pscale = need_sim && !(cs.pooled && cs.pooled_unit);  // then prep_pool wrote pinv for every row
    for (int64_t i = 0; i < nq; i++) {
        const int64_t b = q0 + i;
        const float* qd = p.q.qden + b * K;
        for (int r = 0; r < nr; r++) {
            float cf = 0.f;
            if (need_num) {
                float den;
                if (mrow) {
                    den = 0.f;
                    const uint8_t* m = mrow[r];
                    for (int64_t t = 0; t < K; t++) den += m[t] ? qd[t] : 0.f;
                } else {
                    den = p.q.qsum[b];
                }
                cf = den > 0.f ? accn[i * si + r * sr] / den : 0.f;
            }
            float sv = accs[i * si + r * sr];
            if (pscale) sv *= s.pinv[r];
            if (sim) sim[i * ld + r] = sv;
            if (conf) conf[i * ld + r] = cf;
            if (score) score[i * ld + r] = sv * cf;
        }
    }
}

int tile_lanes() { return VL; }

void tile(const Problem& p, int64_t q0, int64_t q1, const int64_t* rows, int64_t n0, int nr, float* sim, float* conf,
          float* score, int64_t ld, const TileScratch& scratch) {
    switch (p.c.dtype) {
        case kF16: tile_t<F16>(p, q0, q1, rows, n0, nr, sim, conf, score, ld, scratch); break;
        case kBF16: tile_t<BF16>(p, q0, q1, rows, n0, nr, sim, conf, score, ld, scratch); break;
        default: tile_t<float>(p, q0, q1, rows, n0, nr, sim, conf, score, ld, scratch); break;
    }
}

}  // namespace PECM_NS
}  // namespace pecm
