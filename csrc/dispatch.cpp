#include "dispatch.h"

#include <cstdlib>
#include <stdexcept>

namespace pecm {
namespace {

TileFn g_tile = nullptr;
int g_lanes = 1;
std::string g_level;

int lanes_for(const std::string& level) {
#if defined(PECM_HAVE_X86)
    if (level == "avx512") return avx512::tile_lanes();
    if (level == "avx2") return avx2::tile_lanes();
#endif
    (void)level;
    return scalar::tile_lanes();
}

TileFn tile_for(const std::string& level) {
#if defined(PECM_HAVE_X86)
    if (level == "avx512") return &avx512::tile;
    if (level == "avx2") return &avx2::tile;
#endif
    (void)level;
    return &scalar::tile;
}

void init_once() {
    if (g_tile) return;
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
    g_tile = tile_for(best);
    g_lanes = lanes_for(best);
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
            g_tile = tile_for(level);
            g_lanes = lanes_for(level);
            return;
        }
    }
    throw std::invalid_argument("level: '" + level + "' is not supported by this CPU/build (supported: " +
                                supported_levels().back() + " and below)");
}

TileFn current_tile() {
    init_once();
    return g_tile;
}

int current_lanes() {
    init_once();
    return g_lanes;
}

EncodeFn current_encode() {
    init_once();
#if defined(PECM_HAVE_X86)
    if (g_level == "avx512") return &avx512::encode;
    if (g_level == "avx2") return &avx2::encode;
#endif
    return &scalar::encode;
}

HalfFn current_to_half() {
    init_once();
#if defined(PECM_HAVE_X86)
    if (g_level == "avx512") return &avx512::to_half;
    if (g_level == "avx2") return &avx2::to_half;
#endif
    return &scalar::to_half;
}

}  // namespace pecm
