// Query preparation (see prepare.h). Scalar code: B*K*D is small next to any candidate scan, and
// the point is to avoid per-op dispatch cost, not to vectorise.
#include "prepare.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"

#define PECM_ISA_SCALAR 1
#define PECM_NS prep
#include "simd.h"

namespace pecm {
namespace {

template <typename T>
void prepare_t(const T* q, const float* w, const uint8_t* mask, const float* pooled, int64_t B, int64_t K, int64_t D,
               float eps, float* qw, float* qden, float* qp) {
    std::vector<float> row((size_t)D);
    for (int64_t b = 0; b < B; b++) {
        float* pb = qp + b * D;
        std::fill(pb, pb + D, 0.f);
        for (int64_t t = 0; t < K; t++) {
            const T* src = q + (b * K + t) * D;
            double ss = 0.0;
            for (int64_t d = 0; d < D; d++) {
                row[(size_t)d] = prep::to_f32(src + d);
                ss += (double)row[(size_t)d] * row[(size_t)d];
            }
            const bool live = !mask || mask[b * K + t];
            const float wt = live ? w[t] : 0.f;
            qden[b * K + t] = wt;
            float* dst = qw + (b * K + t) * D;
            if (!live) {  // masked out: zero, whatever it holds (NaN * 0 would be NaN)
                std::fill(dst, dst + D, 0.f);
                continue;
            }
            // float64 sum of squares of float32 values: exact for every finite magnitude (no eps; zero stays 0)
            const double inv = ss > 0.0 ? 1.0 / std::sqrt(ss) : 0.0;
            for (int64_t d = 0; d < D; d++) {
                dst[d] = (float)(row[(size_t)d] * inv) * wt;
                pb[d] += dst[d];
            }
        }
        if (pooled) std::copy(pooled + b * D, pooled + (b + 1) * D, pb);
        double ss = 0.0;
        for (int64_t d = 0; d < D; d++) ss += (double)pb[d] * pb[d];
        const double inv = ss > 0.0 ? 1.0 / std::sqrt(ss) : 0.0;
        for (int64_t d = 0; d < D; d++) pb[d] = (float)(pb[d] * inv);
    }
}

}  // namespace

void prepare_query(const void* q, int dtype, const float* w, const uint8_t* mask, const float* pooled, int64_t B,
                   int64_t K, int64_t D, float eps, float* qw, float* qden, float* qp) {
    if (dtype == kF16)
        prepare_t((const prep::F16*)q, w, mask, pooled, B, K, D, eps, qw, qden, qp);
    else if (dtype == kBF16)
        prepare_t((const prep::BF16*)q, w, mask, pooled, B, K, D, eps, qw, qden, qp);
    else
        prepare_t((const float*)q, w, mask, pooled, B, K, D, eps, qw, qden, qp);
}

}  // namespace pecm
