// Index item encoder (pecm.index.format.BlockEncoder's float16 path), compiled once per ISA next to
// the tile kernel (kernel_<isa>.cpp). One pass over each item, instead of ~6 float32 passes of torch
// ops over the whole block:
//   sc[t]     = mask[t] / ||x[t]||                       (0 for a masked prototype, whatever it holds)
//   unit[t]   = fp16(x[t] * sc[t])                       (round to nearest even)
//   pooled    = normalize(sum_t w[t] * sc[t] * x[t])     (Eq. 4; only when `pooled` is non-null)
// Exact for any finite magnitude: a float32 sum of squares outside [2^-100, 2^100] (zero, tiny, huge,
// overflowed) takes a float64 power-of-two-scaled path for that prototype; an exactly zero prototype
// stays zero; there is no eps. Returns false when an unmasked prototype holds NaN / inf.
#pragma once
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "kernels.h"
#include "simd.h"

namespace pecm {
namespace PECM_NS {

template <typename T>
static bool encode_item(const T* x, const float* w, const uint8_t* mask, int64_t K, int64_t D, float eps, F16* unit,
                        float* pooled, float* acc) {
    bool ok = true;
    if (pooled)
        for (int64_t d = 0; d < D; d++) acc[d] = 0.f;
    for (int64_t t = 0; t < K; t++) {
        const T* row = x + t * D;
        V s = vzero();
        int64_t d = 0;
        for (; d + VL <= D; d += VL) {
            V v = vload(row + d);
            s = vfma(v, v, s);
        }
        float ss = vsum(s);
        for (; d < D; d++) ss += to_f32(row + d) * to_f32(row + d);
        F16* out = unit + t * D;
        if (mask && !mask[t]) {  // masked out: zero, never read as numbers
            std::memset((void*)out, 0, sizeof(F16) * (size_t)D);
            continue;
        }
        if (!(ss >= 0x1p-100f && ss <= 0x1p100f)) {  // rare: zero, tiny, huge or non-finite -> float64, scaled
            double m = 0.0;
            for (d = 0; d < D; d++) m = std::fmax(m, std::fabs((double)to_f32(row + d)));
            bool fin = std::isfinite(ss) || std::isinf(ss);  // ss NaN: some NaN input
            for (d = 0; d < D && fin; d++) fin = std::isfinite(to_f32(row + d));
            ok = ok && fin;  // NaN / inf input: refused, like the torch path
            int e = 0;
            std::frexp(m, &e);
            const double scl = std::ldexp(1.0, -e);
            double s2 = 0.0;
            for (d = 0; d < D; d++) s2 += ((double)to_f32(row + d) * scl) * ((double)to_f32(row + d) * scl);
            const double inv = (fin && m > 0.0) ? scl / std::sqrt(s2) : 0.0;
            for (d = 0; d < D; d++) {
                const float u = (float)(to_f32(row + d) * inv);
                out[d].v = float_to_half(u);
                if (pooled) acc[d] += u * w[t];
            }
            continue;
        }
        const float sc = 1.f / std::sqrt(ss);
        const V vs = vset1(sc), vp = vset1(sc * w[t]);
        for (d = 0; d + VL <= D; d += VL) {
            V v = vload(row + d);
            vstore(out + d, vmul(v, vs));
            if (pooled) vstore(acc + d, vfma(v, vp, vload(acc + d)));
        }
        for (; d < D; d++) {
            const float v = to_f32(row + d);
            out[d].v = float_to_half(v * sc);
            if (pooled) acc[d] += v * (sc * w[t]);
        }
    }
    if (pooled) {
        double s2 = 0.0;
        for (int64_t d = 0; d < D; d++) s2 += (double)acc[d] * acc[d];
        const double nrm = std::sqrt(s2);
        const double inv = nrm > 0.0 ? 1.0 / nrm : 0.0;  // h = 0 (everything masked): pooled 0
        for (int64_t d = 0; d < D; d++) pooled[d] = (float)(acc[d] * inv);
    }
    return ok;
}

bool encode(const void* x, int dtype, const float* w, const uint8_t* mask, int64_t n, int64_t K, int64_t D, float eps,
            uint16_t* unit, float* pooled) {
    bool ok = true;
#pragma omp parallel reduction(&& : ok)
    {
        // plain malloc, no std::vector: a template instantiated in this ISA-specific file could be
        // merged by the linker into code that runs on CPUs without the ISA (see kernels.h)
        float* acc = (float*)std::malloc(sizeof(float) * (size_t)(D > 0 ? D : 1));
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            const uint8_t* m = mask ? mask + i * K : nullptr;
            float* p = pooled ? pooled + i * D : nullptr;
            F16* u = (F16*)unit + i * K * D;
            bool r = dtype == kF16 ? encode_item((const F16*)x + i * K * D, w, m, K, D, eps, u, p, acc)
                                   : encode_item((const float*)x + i * K * D, w, m, K, D, eps, u, p, acc);
            ok = ok && r;
        }
        std::free(acc);
    }
    return ok;
}

void to_half(const float* x, int64_t n, uint16_t* out) {
    int64_t i = 0;
    for (; i + VL <= n; i += VL) vstore((F16*)out + i, vload(x + i));
    for (; i < n; i++) out[i] = float_to_half(x[i]);
}

}  // namespace PECM_NS
}  // namespace pecm
