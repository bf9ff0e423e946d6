// Query preparation on the CPU: the float32 operands (qw, qden, qp) of pecm/backends/base.py from raw
// query prototypes, without a round of small torch ops (they dominate a one-query re-rank call).
#pragma once
#include <cstdint>

namespace pecm {

// q [B, K, D] in storage dtype `dtype` (DType), w [K] float32, mask [B, K] (nonzero = valid) or null,
// pooled [B, D] float32 or null. With qhat = q / ||q|| per prototype (float64 norm, no eps; 0 when zero or masked) and wq = w * mask:
//   qw[b, t*D + d] = wq[b, t] * qhat[b, t, d],   qden[b, t] = wq[b, t],
//   qp[b] = normalize(pooled[b])  or, without pooled, normalize(sum_t qw[b, t, :])   (normalize: x / ||x||, zero stays zero).
// The same as pecm.ops.prepare_query in float32.
void prepare_query(const void* q, int dtype, const float* w, const uint8_t* mask, const float* pooled, int64_t B,
                   int64_t K, int64_t D, float eps, float* qw, float* qden, float* qp);

}  // namespace pecm
