// Run-time choice of the tile kernel: the best ISA this CPU supports, capped by PECM_CPP_SIMD
// (scalar | avx2 | avx512) at import or by set_simd().
#pragma once
#include <string>
#include <vector>

#include "kernels.h"

namespace pecm {

std::vector<std::string> supported_levels();  // ascending, always starts with "scalar"
std::string simd_level();                      // the level in use
void set_simd(const std::string& level);       // throws std::invalid_argument when unsupported/unknown
TileFn current_tile();
int current_lanes();         // tile_lanes() of the level in use (query lanes of the packed GEMM layout)
EncodeFn current_encode();   // the index item encoder of the level in use
HalfFn current_to_half();    // its float -> half store (a test hook)
TileFn current_pq_tile();    // the PQ tile kernel (pq_impl.h) of the level in use
PQEncodeFn current_pq_encode();

}  // namespace pecm
