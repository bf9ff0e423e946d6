// ISA-neutral drivers: OpenMP over candidate blocks, per-thread bounded heaps for top-k, exact merge.
#pragma once
#include <cstdint>

#include "kernels.h"

namespace pecm {

// All three take the problem as Queries + Candidates (kernels.h); `by` is a By.
// sim/conf/score: [B, N] each.
void run_scores(const Problem& p, float* sim, float* conf, float* score);
// values [B, k] sorted descending, ids [B, k]; tail (-inf, -1) when k > N.
void run_topk(const Problem& p, int64_t k, int by, float* values, int64_t* ids);
// cand [B, M] rows of c (-1 = padding, already validated); same outputs as run_topk.
void run_rerank(const Problem& p, const int64_t* cand, int64_t m, int64_t k, int by, float* values, int64_t* ids);

int max_threads();

}  // namespace pecm
