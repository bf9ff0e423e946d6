// Tile kernel instantiated for the avx2 instruction set (flags set per file in CMakeLists.txt).
// Only called after dispatch.cpp has checked that the CPU supports it.
#define PECM_ISA_AVX2 1
#define PECM_NS avx2
#include "kernel_impl.h"
#include "encode_impl.h"
#include "pq_impl.h"
