// Index item encoder (pecm.index.format.BlockEncoder's float16 path), compiled once per ISA next to
// the tile kernel (kernel_<isa>.cpp). One pass over each item, instead of ~6 float32 passes of torch
// ops over the whole block:
//   sc[t]     = mask[t] / max(||x[t]||, eps)             (0 for a masked prototype)
//   unit[t]   = fp16(x[t] * sc[t])                       (round to nearest even)
//   pooled    = normalize(sum_t w[t] * sc[t] * x[t])     (Eq. 4; only when `pooled` is non-null)
// Returns false when some float32 ||x[t]||^2 is not finite (NaN / inf input, or |x| too large for float32).
#pragma once
#include <cmath>
#include <cstdlib>

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
        // NaN/inf input, or a float32 sum of squares that overflows (|x| >~ 1e19): refused, like the torch path
        ok = ok && std::isfinite(ss);
        const double nrm = std::sqrt((double)ss);
        const float sc = (mask && !mask[t]) ? 0.f : (float)(1.0 / (nrm > eps ? nrm : (double)eps));
        const V vs = vset1(sc), vp = vset1(sc * w[t]);
        F16* out = unit + t * D;
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
        const float inv = (float)(1.0 / (nrm > eps ? nrm : (double)eps));
        for (int64_t d = 0; d < D; d++) pooled[d] = acc[d] * inv;
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
