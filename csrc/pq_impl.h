// Product-quantised (PQ) candidates, compiled once per ISA next to the tile kernel (kernel_<isa>.cpp).
//
// Storage (pecm.pq): each unit prototype c_{n,k} (D floats) is M codes of 8 bits, one per subspace of
// DS = D / M dimensions, into a codebook of 256 centroids per (slot group s, subspace m): cent[s][m][c]
// (s = 0 for a codebook shared by every slot, s = k for per-slot codebooks), plus one float32 scale
// a_{n,k} = mask_{n,k} / ||decode(c_{n,k})|| so the decoded prototype a * decode(codes) is unit length
// (0 for a masked-out prototype). The pooled vectors stay dense (float16 / float32).
//
// Scoring from the codes (asymmetric distance computation): the caller builds, per query b, the lookup
// table lut[b][k][m][c] = w_k mq_{b,k} <q̂_{b,k} restricted to subspace m, cent[s(k)][m][c]> (float32,
// [K, M, 256] per query), so that, exactly for the decoded prototypes,
//     num = sum_k a_{n,k} sum_m lut[b][k][m][codes[n][k][m]]
//     den = sum_k qden[b][k] mask[n][k]   (qsum[b] without a candidate mask)
//     sim = qp[b] . pooled[n],  conf = num / den (0 if den <= 0),  score = sim * conf
// `pq_tile` has the TileFn signature of the dense tile kernel, so the drivers of ops.cpp (exhaustive
// top-k, re-rank, scores) run PQ problems unchanged: rows are never decompressed to memory.
//
// `pq_encode` assigns each subvector to its nearest centroid (squared L2, ties to the smaller code)
// and computes the scale from the centroid norms (the subspaces are orthogonal, so
// ||decode||^2 = sum_m ||cent[m][code_m]||^2).
#pragma once
#include <cmath>
#include <cstring>

#include "kernels.h"
#include "simd.h"

namespace pecm {
namespace PECM_NS {

static inline float pq_dot_pooled(const float* qp, const float* c, int64_t D) {
    V s = vzero();
    int64_t d = 0;
    for (; d + VL <= D; d += VL) s = vfma(vload(qp + d), vload(c + d), s);
    float r = vsum(s);
    for (; d < D; d++) r += qp[d] * c[d];
    return r;
}

static inline float pq_dot_pooled(const float* qp, const F16* c, int64_t D) {
    V s = vzero();
    int64_t d = 0;
    for (; d + VL <= D; d += VL) s = vfma(vload(qp + d), vload(c + d), s);
    float r = vsum(s);
    for (; d < D; d++) r += qp[d] * to_f32(c + d);
    return r;
}

// sum_m L[m * 256 + c[m]] with four independent partial sums (the loads are independent gathers).
static inline float pq_lookup(const float* L, const uint8_t* c, int64_t M) {
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
        a0 += L[(m + 0) * 256 + c[m + 0]];
        a1 += L[(m + 1) * 256 + c[m + 1]];
        a2 += L[(m + 2) * 256 + c[m + 2]];
        a3 += L[(m + 3) * 256 + c[m + 3]];
    }
    for (; m < M; m++) a0 += L[m * 256 + c[m]];
    return (a0 + a1) + (a2 + a3);
}

template <typename P>
static void pq_tile_t(const Problem& p, int64_t q0, int64_t q1, const int64_t* rows, int64_t n0, int nr, float* sim,
                      float* conf, float* score, int64_t ld) {
    const int64_t K = p.K, D = p.D, M = p.M, LQ = K * M * 256;
    const uint8_t* codes = p.c.codes;
    const float* scales = p.c.scales;
    const uint8_t* mask = p.c.mask;
    const P* pooled = static_cast<const P*>(p.c.pooled);
    const bool need_conf = conf || score, need_sim = sim || score;
    // Slot-major within the tile: for each query, slot t's table ([M, 256] floats, 65 KB at 65 codes) is gathered
    // for every row of the tile before slot t + 1's, so the table being read stays in L1/L2 instead of all K
    // tables (K times that) being touched per candidate. Each candidate still adds its slots in the order
    // t = 0..K-1, so every value is the same as with a candidate-major loop.
    float num[kGatherRows > kRowBlock ? kGatherRows : kRowBlock];
    for (int64_t q = q0; q < q1; q++) {
        const float* lut = p.q.lut + q * LQ;
        const float* qp = p.q.qp + q * D;
        const float* qd = p.q.qden + q * K;
        const int64_t o = (q - q0) * ld;
        if (need_conf) {
            for (int i = 0; i < nr; i++) num[i] = 0.f;
            for (int64_t t = 0; t < K; t++) {
                const float* L = lut + t * M * 256;
                for (int i = 0; i < nr; i++) {
                    const int64_t n = rows ? rows[i] : n0 + i;
                    const float a = scales[n * K + t];
                    if (a != 0.f) num[i] += a * pq_lookup(L, codes + (n * K + t) * M, M);
                }
            }
        }
        for (int i = 0; i < nr; i++) {
            const int64_t n = rows ? rows[i] : n0 + i;
            float sm = 0.f, cf = 0.f;
            if (need_sim) sm = pq_dot_pooled(qp, pooled + n * D, D);
            if (need_conf) {
                float den;
                if (mask) {
                    const uint8_t* mr = mask + n * K;
                    den = 0.f;
                    for (int64_t t = 0; t < K; t++) den += mr[t] ? qd[t] : 0.f;
                } else {
                    den = p.q.qsum[q];
                }
                cf = den > 0.f ? num[i] / den : 0.f;
            }
            if (sim) sim[o + i] = sm;
            if (conf) conf[o + i] = cf;
            if (score) score[o + i] = sm * cf;
        }
    }
}

void pq_tile(const Problem& p, int64_t q0, int64_t q1, const int64_t* rows, int64_t n0, int nr, float* sim,
             float* conf, float* score, int64_t ld, const TileScratch&) {
    if (p.c.dtype == kF16)
        pq_tile_t<F16>(p, q0, q1, rows, n0, nr, sim, conf, score, ld);
    else
        pq_tile_t<float>(p, q0, q1, rows, n0, nr, sim, conf, score, ld);
}

// Index of the largest of buf[0..256) (the smallest such index on ties; no NaN in buf).
static inline int pq_argmax256(const float* buf) {
#if defined(PECM_ISA_AVX512)
    __m512 bv = _mm512_loadu_ps(buf);
    __m512i bi = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i ci = bi;
    const __m512i step = _mm512_set1_epi32(16);
    for (int c0 = 16; c0 < 256; c0 += 16) {
        ci = _mm512_add_epi32(ci, step);
        const __m512 v = _mm512_loadu_ps(buf + c0);
        const __mmask16 gt = _mm512_cmp_ps_mask(v, bv, _CMP_GT_OQ);  // strict: a lane keeps its first maximum
        bv = _mm512_mask_blend_ps(gt, bv, v);
        bi = _mm512_mask_blend_epi32(gt, bi, ci);
    }
    const float mx = _mm512_reduce_max_ps(bv);
    return _mm512_mask_reduce_min_epi32(_mm512_cmp_ps_mask(bv, _mm512_set1_ps(mx), _CMP_EQ_OQ), bi);
#elif defined(PECM_ISA_AVX2)
    __m256 bv = _mm256_loadu_ps(buf);
    __m256i bi = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i ci = bi;
    const __m256i step = _mm256_set1_epi32(8);
    for (int c0 = 8; c0 < 256; c0 += 8) {
        ci = _mm256_add_epi32(ci, step);
        const __m256 v = _mm256_loadu_ps(buf + c0);
        const __m256 gt = _mm256_cmp_ps(v, bv, _CMP_GT_OQ);
        bv = _mm256_blendv_ps(bv, v, gt);
        bi = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bi), _mm256_castsi256_ps(ci), gt));
    }
    alignas(32) float vv[8];
    alignas(32) int ii[8];
    _mm256_store_ps(vv, bv);
    _mm256_store_si256((__m256i*)ii, bi);
    int best = ii[0];
    float mx = vv[0];
    for (int l = 1; l < 8; l++)
        if (vv[l] > mx || (vv[l] == mx && ii[l] < best)) {
            mx = vv[l];
            best = ii[l];
        }
    return best;
#else
    int best = 0;
    float bv = buf[0];
    for (int c = 1; c < 256; c++)
        if (buf[c] > bv) {
            bv = buf[c];
            best = c;
        }
    return best;
#endif
}

// x [n, K, D] float32 (unit prototypes; masked ones are not read), centT [S][M][DS][256] (the codebook
// transposed so 256 centroids of one dimension are contiguous), half_norm [S][M][256] = ||cent||^2 / 2,
// norm2 [S][M][256] = ||cent||^2 -> codes [n, K, M], scales [n, K].
void pq_encode(const float* x, const uint8_t* mask, int64_t n, int64_t K, int64_t D, int64_t M, int64_t S,
               const float* centT, const float* half_norm, const float* norm2, uint8_t* codes, float* scales) {
    const int64_t DS = D / M;
    alignas(64) float buf[256];
    for (int64_t i = 0; i < n; i++) {
        for (int64_t t = 0; t < K; t++) {
            const int64_t it = i * K + t;
            uint8_t* out = codes + it * M;
            if (mask && !mask[it]) {
                std::memset(out, 0, (size_t)M);
                scales[it] = 0.f;
                continue;
            }
            const int64_t s = S == 1 ? 0 : t;
            const float* xr = x + it * D;
            double nrm2 = 0.0;
            for (int64_t m = 0; m < M; m++) {
                const float* ct = centT + ((s * M + m) * DS) * 256;
                const float* hn = half_norm + (s * M + m) * 256;
                const float* xs = xr + m * DS;
                for (int c0 = 0; c0 < 256; c0 += 4 * VL) {  // argmax_c <x, cent_c> - ||cent_c||^2 / 2
                    V a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
                    for (int64_t j = 0; j < DS; j++) {
                        const V xv = vset1(xs[j]);
                        const float* row = ct + j * 256 + c0;
                        a0 = vfma(xv, vload(row), a0);
                        a1 = vfma(xv, vload(row + VL), a1);
                        a2 = vfma(xv, vload(row + 2 * VL), a2);
                        a3 = vfma(xv, vload(row + 3 * VL), a3);
                    }
                    const V m1 = vset1(-1.f);
                    vstore(buf + c0, vfma(vload(hn + c0), m1, a0));
                    vstore(buf + c0 + VL, vfma(vload(hn + c0 + VL), m1, a1));
                    vstore(buf + c0 + 2 * VL, vfma(vload(hn + c0 + 2 * VL), m1, a2));
                    vstore(buf + c0 + 3 * VL, vfma(vload(hn + c0 + 3 * VL), m1, a3));
                }
                const int best = pq_argmax256(buf);
                out[m] = (uint8_t)best;
                nrm2 += (double)norm2[(s * M + m) * 256 + best];
            }
            scales[it] = nrm2 > 0.0 ? (float)(1.0 / std::sqrt(nrm2)) : 0.f;
        }
    }
}

}  // namespace PECM_NS
}  // namespace pecm
