// Per-ISA vector traits for kernel_impl.h. Exactly one of PECM_ISA_AVX512 / PECM_ISA_AVX2 /
// PECM_ISA_SCALAR is defined by the including translation unit. Everything here has internal
// linkage (static) so the copies compiled for different ISAs never meet in the linker.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(PECM_ISA_AVX512) || defined(PECM_ISA_AVX2)
#include <immintrin.h>
#endif

namespace pecm {
namespace PECM_NS {

// IEEE half -> float in plain C (subnormals, inf and NaN included).
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: renormalise
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while ((man & 0x400u) == 0);
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// float -> IEEE half, round to nearest even (overflow -> inf, NaN stays NaN), in plain C.
static inline uint16_t float_to_half(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0u));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520 rounds to inf
    if (ax < 0x38800000u) {                                     // half subnormal (or zero): units of 2^-24
        const uint32_t e = ax >> 23;
        if (e < 102) return (uint16_t)sign;  // < 2^-25 rounds to 0
        const uint32_t m = (ax & 0x7fffffu) | 0x800000u, shift = 126 - e;
        uint32_t q = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t r = ax - 0x38000000u;  // rebias the exponent (127 -> 15)
    r += 0xfffu + ((r >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
}

struct F16 { uint16_t v; };
struct BF16 { uint16_t v; };

static inline float to_f32(const float* p) { return *p; }
static inline float to_f32(const F16* p) { return half_to_float(p->v); }
static inline float to_f32(const BF16* p) { return bf16_to_float(p->v); }

#if defined(PECM_ISA_AVX512)
typedef __m512 V;
static constexpr int VL = 16;
static constexpr int QB_MAX = 4, RB_MAX = 4;  // 16 accumulators + 4 rows + 1 query of 32 zmm
static inline V vzero() { return _mm512_setzero_ps(); }
static inline V vload(const float* p) { return _mm512_loadu_ps(p); }
static inline V vload(const F16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline V vload(const BF16* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
static inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
static inline V vbcast(const float* p) { return _mm512_set1_ps(*p); }
static inline float vsum(V v) { return _mm512_reduce_add_ps(v); }
static inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
static inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
// out[i] = 1 / max(sqrt(ss[i]), eps) for 4 lanes at once (IEEE sqrt and division)
static inline void inv_norm4(const float* ss, float eps, float* out) {
    _mm_storeu_ps(out, _mm_div_ps(_mm_set1_ps(1.f), _mm_max_ps(_mm_sqrt_ps(_mm_loadu_ps(ss)), _mm_set1_ps(eps))));
}
static inline V vset1(float x) { return _mm512_set1_ps(x); }
static inline void vstore(F16* p, V v) {
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#elif defined(PECM_ISA_AVX2)
typedef __m256 V;
static constexpr int VL = 8;
static constexpr int QB_MAX = 2, RB_MAX = 4;  // 8 accumulators + 4 rows + 1 query of 16 ymm
static inline V vzero() { return _mm256_setzero_ps(); }
static inline V vload(const float* p) { return _mm256_loadu_ps(p); }
static inline V vload(const F16* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline V vload(const BF16* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
static inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
static inline V vbcast(const float* p) { return _mm256_broadcast_ss(p); }
static inline float vsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
static inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
static inline void inv_norm4(const float* ss, float eps, float* out) {
    _mm_storeu_ps(out, _mm_div_ps(_mm_set1_ps(1.f), _mm_max_ps(_mm_sqrt_ps(_mm_loadu_ps(ss)), _mm_set1_ps(eps))));
}
static inline V vset1(float x) { return _mm256_set1_ps(x); }
static inline void vstore(F16* p, V v) { _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)); }
#else
typedef float V;
static constexpr int VL = 1;
static constexpr int QB_MAX = 2, RB_MAX = 4;
static inline V vzero() { return 0.f; }
static inline V vload(const float* p) { return *p; }
static inline V vload(const F16* p) { return half_to_float(p->v); }
static inline V vload(const BF16* p) { return bf16_to_float(p->v); }
static inline void vstore(float* p, V v) { *p = v; }
static inline V vfma(V a, V b, V c) { return a * b + c; }
static inline V vbcast(const float* p) { return *p; }
static inline float vsum(V v) { return v; }
static inline V vmul(V a, V b) { return a * b; }
static inline V vadd(V a, V b) { return a + b; }
static inline void inv_norm4(const float* ss, float eps, float* out) {
    for (int i = 0; i < 4; i++) {
        const float n = __builtin_sqrtf(ss[i]);
        out[i] = 1.f / (n > eps ? n : eps);
    }
}
static inline V vset1(float x) { return x; }
static inline void vstore(F16* p, V v) { p->v = float_to_half(v); }
#endif

}  // namespace PECM_NS
}  // namespace pecm
