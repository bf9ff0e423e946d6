// Shared interface between the ISA-specific tile kernels (kernel_<isa>.cpp, each compiled with its
// own -m flags) and the ISA-neutral drivers (ops.cpp, dispatch.cpp, bindings.cpp).
//
// Nothing in this header may instantiate code: it is included by translation units compiled for
// different instruction sets, and an inline/template symbol shared between them could be merged by
// the linker into one copy built for the wrong (higher) ISA.
#pragma once
#include <cstdint>

namespace pecm {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Canonical operands of pecm/backends/base.py as raw C-contiguous buffers.
struct Problem {
    const float* qw;    // [B, K*D]
    const float* qden;  // [B, K]
    const float* qp;    // [B, D]
    const float* qsum;  // [B]   sum_k qden[b, k] (the denominator when cm is null)
    const void* c;      // [N, K*D] storage dtype
    const void* cm;     // [N, K] storage dtype, or nullptr
    const void* cp;     // [N, D] storage dtype
    int dtype;          // DType
    int64_t B, N, K, D;
    // Optional packed queries for the GEMM path (many queries): [ceil(B/L)][K*D + D][L] float32, the
    // qw row then the qp row of each query, L = qlanes queries interleaved (L = the vector width of
    // the ISA whose tile kernel is used: tile_lanes()). Null -> the dot-product paths only.
    const float* qpk = nullptr;
    int64_t qlanes = 0;
};

// Tile geometry shared by all ISAs (the drivers size scratch buffers with it).
constexpr int kRowBlock = 48;      // candidate rows per tile (a multiple of the GEMM micro-tiles 6 and 12)
constexpr int kQueryBlock = 64;    // queries per tile
constexpr int kGatherRows = 256;   // gathered rows per tile when the tile has one query (re-rank)
static_assert(kGatherRows <= kQueryBlock * kRowBlock, "one-query tiles keep their accumulators in one tile");
constexpr int64_t kGemmKC = 256;   // reduction slice of the GEMM path (converted rows: kRowBlock x kGemmKC fp32)
constexpr int kGemmMinQ = 12;      // query blocks with at least this many queries use the GEMM path (when packed)
// Scratch: two kQueryBlock x kRowBlock accumulator tiles, then the converted rows of the GEMM path.
constexpr int64_t kScratchFloats = 2 * kQueryBlock * kRowBlock + kRowBlock * kGemmKC;

// Computes, for queries [q0, q1) (q1 - q0 <= kQueryBlock) and nr <= kRowBlock candidate rows (or
// nr <= kGatherRows gathered rows for a single query, q1 - q0 == 1 and rows non-null)
// (rows[i], or n0 + i when rows is null), whichever of sim / conf / score is non-null:
// out[(q - q0) * ld + i]. scratch holds kScratchFloats floats (64-byte aligned).
using TileFn = void (*)(const Problem& p, int64_t q0, int64_t q1, const int64_t* rows, int64_t n0, int nr,
                        float* sim, float* conf, float* score, int64_t ld, float* scratch);

// Query lanes of the packed layout each ISA's GEMM path expects (its vector width in floats).
namespace scalar { int tile_lanes(); }
#if defined(PECM_HAVE_X86)
namespace avx2 { int tile_lanes(); }
namespace avx512 { int tile_lanes(); }
#endif

namespace scalar { void tile(const Problem&, int64_t, int64_t, const int64_t*, int64_t, int, float*, float*, float*,
                             int64_t, float*); }
#if defined(PECM_HAVE_X86)
namespace avx2 { void tile(const Problem&, int64_t, int64_t, const int64_t*, int64_t, int, float*, float*, float*,
                           int64_t, float*); }
namespace avx512 { void tile(const Problem&, int64_t, int64_t, const int64_t*, int64_t, int, float*, float*, float*,
                             int64_t, float*); }
#endif

// Index item encoder (encode_impl.h): x [n, K, D] float32 or float16 (dtype kF32 / kF16), w [K], mask
// [n, K] (nonzero = valid) or null -> unit [n, K, D] fp16 bits, pooled [n, D] float32 (null: not computed).
// Returns false when an item has a non-finite norm.
using EncodeFn = bool (*)(const void* x, int dtype, const float* w, const uint8_t* mask, int64_t n, int64_t K,
                          int64_t D, float eps, uint16_t* unit, float* pooled);
using HalfFn = void (*)(const float* x, int64_t n, uint16_t* out);  // float -> half bits (RNE)
namespace scalar { void to_half(const float*, int64_t, uint16_t*); }
#if defined(PECM_HAVE_X86)
namespace avx2 { void to_half(const float*, int64_t, uint16_t*); }
namespace avx512 { void to_half(const float*, int64_t, uint16_t*); }
#endif
namespace scalar { bool encode(const void*, int, const float*, const uint8_t*, int64_t, int64_t, int64_t, float,
                               uint16_t*, float*); }
#if defined(PECM_HAVE_X86)
namespace avx2 { bool encode(const void*, int, const float*, const uint8_t*, int64_t, int64_t, int64_t, float,
                             uint16_t*, float*); }
namespace avx512 { bool encode(const void*, int, const float*, const uint8_t*, int64_t, int64_t, int64_t, float,
                               uint16_t*, float*); }
#endif

}  // namespace pecm
