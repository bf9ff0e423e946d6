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
// The ranked quantity: the same values as pecm.operands.By (and the Triton kernels' BY constexpr).
enum By : int { kScore = 0, kSim = 1, kConf = 2 };

// pecm.operands.Queries as raw C-contiguous buffers.
struct Queries {
    const float* qw;    // [B, K*D]  w_k mq_k q̂_k
    const float* qden;  // [B, K]    w_k mq_k
    const float* qp;    // [B, D]    unit pooled query
    const float* qsum;  // [B]       sum_k qden[b, k] (the denominator when there is no candidate mask)
    int64_t B;
    // Optional packed queries for the GEMM path (many queries): [ceil(B/L)][K*D + D][L] float32, the
    // qw row then the qp row of each query, L = qlanes queries interleaved (L = the vector width of
    // the ISA whose tile kernel is used: tile_lanes()). Null -> the dot-product paths only.
    const float* qpk;
    int64_t qlanes;
    // PQ problems (pq_impl.h): lookup tables [B][K][M][256] w_k mq_k <q̂_k|m, centroid>; null otherwise.
    const float* lut = nullptr;
};

// pecm.operands.Candidates as raw C-contiguous buffers. Unless `unit`, the tile kernels normalise each
// prototype on the fly (inv = mask / ||c_k||, exact for any finite magnitude; see kernel_impl.h); without
// `pooled` they pool Eq. 4 on the fly (h = normalize(sum_k w_k inv_k c_k)); pooled vectors that are not
// `pooled_unit` are normalised. `eps` is kept for the bindings' signature only: nothing clamps to it.
struct Candidates {
    const void* c;        // [N, K*D] storage dtype
    const uint8_t* mask;  // [N, K] 0/1, or null = all valid
    const void* pooled;   // [N, D] storage dtype, or null = pooled on the fly
    const float* w;       // [K] weights (read only when pooling on the fly)
    int dtype;            // DType
    int64_t N;
    bool unit;            // prototypes are unit length and masked-out prototypes are zero
    bool pooled_unit;     // pooled vectors are unit length
    bool prepared;        // unit && pooled && pooled_unit: the rows are used as they are
    float eps;
    // PQ candidates (pq_impl.h; then `c` is unused and `pooled` holds unit pooled vectors):
    const uint8_t* codes = nullptr;  // [N, K, M] 8-bit codes
    const float* scales = nullptr;   // [N, K] 1 / ||decoded prototype|| (0 when masked out)
};

struct Problem {
    Queries q;
    Candidates c;
    int64_t K, D;
    int64_t M = 0;  // PQ subspaces per prototype (0: dense candidates)
};

// Tile geometry shared by all ISAs (the drivers size scratch buffers with it).
constexpr int kRowBlock = 48;      // candidate rows per tile (a multiple of the GEMM micro-tiles 6 and 12)
constexpr int kQueryBlock = 64;    // queries per tile
constexpr int kGatherRows = 256;   // gathered rows per tile when the tile has one query (re-rank)
static_assert(kGatherRows <= kQueryBlock * kRowBlock, "one-query tiles keep their accumulators in one tile");
constexpr int64_t kGemmKC = 256;   // reduction slice of the GEMM path (converted rows: kRowBlock x kGemmKC fp32)
constexpr int kGemmMinQ = 12;      // query blocks with at least this many queries use the GEMM path (when packed)
// Accumulator scratch: two kQueryBlock x kRowBlock tiles, then the converted rows of the GEMM path.
constexpr int64_t kScratchFloats = 2 * kQueryBlock * kRowBlock + kRowBlock * kGemmKC;

// Per-thread scratch of the tile kernel (64-byte aligned float buffers, allocated by the driver):
// acc: kScratchFloats; and for candidates that are not prepared, the on-the-fly row preparation of up
// to kRowBlock rows at a time: inv [kRowBlock][K] prototype scales, hp [kRowBlock][D] unit pooled
// vectors (fp32), pinv [kGatherRows] pooled-vector scales of every row of the tile.
// spill: a buffer the robust fallback (robust_tile, kernel_impl.h) allocates with malloc on first use
// and the driver frees with the scratch (null until then).
struct TileScratch {
    float* acc;
    float* inv;
    float* hp;
    float* pinv;
    void** spill;
};

// Computes, for queries [q0, q1) (q1 - q0 <= kQueryBlock) and nr <= kRowBlock candidate rows (or
// nr <= kGatherRows gathered rows for a single query, q1 - q0 == 1 and rows non-null)
// (rows[i], or n0 + i when rows is null), whichever of sim / conf / score is non-null:
// out[(q - q0) * ld + i].
using TileFn = void (*)(const Problem& p, int64_t q0, int64_t q1, const int64_t* rows, int64_t n0, int nr,
                        float* sim, float* conf, float* score, int64_t ld, const TileScratch& scratch);

// Query lanes of the packed layout each ISA's GEMM path expects (its vector width in floats).
namespace scalar { int tile_lanes(); }
#if defined(PECM_HAVE_X86)
namespace avx2 { int tile_lanes(); }
namespace avx512 { int tile_lanes(); }
#endif

namespace scalar { void tile(const Problem&, int64_t, int64_t, const int64_t*, int64_t, int, float*, float*, float*,
                             int64_t, const TileScratch&); }
#if defined(PECM_HAVE_X86)
namespace avx2 { void tile(const Problem&, int64_t, int64_t, const int64_t*, int64_t, int, float*, float*, float*,
                           int64_t, const TileScratch&); }
namespace avx512 { void tile(const Problem&, int64_t, int64_t, const int64_t*, int64_t, int, float*, float*, float*,
                             int64_t, const TileScratch&); }
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

// PQ candidates (pq_impl.h): a TileFn reading p.c.codes / p.c.scales / p.q.lut, and the encoder.
using PQEncodeFn = void (*)(const float* x, const uint8_t* mask, int64_t n, int64_t K, int64_t D, int64_t M,
                            int64_t S, const float* centT, const float* half_norm, const float* norm2, uint8_t* codes,
                            float* scales);
namespace scalar {
void pq_tile(const Problem&, int64_t, int64_t, const int64_t*, int64_t, int, float*, float*, float*, int64_t,
             const TileScratch&);
void pq_encode(const float*, const uint8_t*, int64_t, int64_t, int64_t, int64_t, int64_t, const float*, const float*,
               const float*, uint8_t*, float*);
}  // namespace scalar
#if defined(PECM_HAVE_X86)
namespace avx2 {
void pq_tile(const Problem&, int64_t, int64_t, const int64_t*, int64_t, int, float*, float*, float*, int64_t,
             const TileScratch&);
void pq_encode(const float*, const uint8_t*, int64_t, int64_t, int64_t, int64_t, int64_t, const float*, const float*,
               const float*, uint8_t*, float*);
}  // namespace avx2
namespace avx512 {
void pq_tile(const Problem&, int64_t, int64_t, const int64_t*, int64_t, int, float*, float*, float*, int64_t,
             const TileScratch&);
void pq_encode(const float*, const uint8_t*, int64_t, int64_t, int64_t, int64_t, int64_t, const float*, const float*,
               const float*, uint8_t*, float*);
}  // namespace avx512
#endif

}  // namespace pecm
