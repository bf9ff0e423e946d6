#include "dispatch.h"

#include <cstdlib>
#include <stdexcept>

namespace pecm {
namespace {

// The entry points of one SIMD level: every current_*() below answers from the set in use.
struct LevelFns {
    TileFn tile = nullptr;
    int lanes = 1;
    EncodeFn encode = nullptr;
    HalfFn to_half = nullptr;
    TileFn pq_tile = nullptr;
    PQEncodeFn pq_encode = nullptr;
};

LevelFns g_fns;
std::string g_level;

LevelFns fns_for(const std::string& level) {
#if defined(PECM_HAVE_X86)
    if (level == "avx512")
        return {&avx512::tile,    avx512::tile_lanes(), &avx512::encode,
                &avx512::to_half, &avx512::pq_tile,     &avx512::pq_encode};
    if (level == "avx2")
        return {&avx2::tile, avx2::tile_lanes(), &avx2::encode, &avx2::to_half, &avx2::pq_tile, &avx2::pq_encode};
#endif
    (void)level;
    return {&scalar::tile,    scalar::tile_lanes(), &scalar::encode,
            &scalar::to_half, &scalar::pq_tile,     &scalar::pq_encode};
}

void init_once() {
    if (g_fns.tile) return;
    auto levels = supported_levels();
    std::string best = levels.back();
    const char* env = std::getenv("PECM_CPP_SIMD");
    if (env && *env) {
        std::string want(env);
        bool known = want == "scalar" || want == "avx2" || want == "avx512";
        bool ok = false;
        for (auto& l : levels) ok = ok || l == want;
        // An unknown or unsupported request never raises at import: it falls back to the best safe level.
        if (known && ok) best = want;
    }
    g_level = best;
    g_fns = fns_for(best);
}

}  // namespace

std::vector<std::string> supported_levels() {
    std::vector<std::string> out{"scalar"};
#if defined(PECM_HAVE_X86)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (avx2) out.push_back("avx2");
    if (avx2 && __builtin_cpu_supports("avx512f")) out.push_back("avx512");
#endif
    return out;
}

std::string simd_level() {
    init_once();
    return g_level;
}

void set_simd(const std::string& level) {
    init_once();
    if (level != "scalar" && level != "avx2" && level != "avx512")
        throw std::invalid_argument("level: expected one of 'scalar', 'avx2', 'avx512', got '" + level + "'");
    for (auto& l : supported_levels()) {
        if (l == level) {
            g_level = level;
            g_fns = fns_for(level);
            return;
        }
    }
    throw std::invalid_argument("level: '" + level + "' is not supported by this CPU/build (supported: " +
                                supported_levels().back() + " and below)");
}

TileFn current_tile() {
    init_once();
    return g_fns.tile;
}

int current_lanes() {
    init_once();
    return g_fns.lanes;
}

EncodeFn current_encode() {
    init_once();
    return g_fns.encode;
}

TileFn current_pq_tile() {
    init_once();
    return g_fns.pq_tile;
}

PQEncodeFn current_pq_encode() {
    init_once();
    return g_fns.pq_encode;
}

HalfFn current_to_half() {
    init_once();
    return g_fns.to_half;
}

}  // namespace pecm
