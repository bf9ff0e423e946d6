#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <vector>

#include "dispatch.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace pecm {
namespace {

struct Entry {
    float v;
    int64_t id;
};
// "a ranks before b": larger value first, then smaller id (deterministic order for ties).
inline bool better(const Entry& a, const Entry& b) { return a.v > b.v || (a.v == b.v && a.id < b.id); }

// One thread's tile scratch (TileScratch): accumulators, plus the on-the-fly row preparation buffers
// sized for this problem's K and D, in one 64-byte aligned allocation.
struct Scratch {
    float* base;
    void* spill = nullptr;  // the robust fallback's buffer (kernel_impl.h), allocated there on first use
    TileScratch t;
    Scratch(int64_t K, int64_t D) {
        auto r16 = [](int64_t n) { return (n + 15) / 16 * 16; };  // whole cache lines of floats
        const int64_t n_acc = r16(kScratchFloats), n_inv = r16(kRowBlock * K), n_hp = r16(kRowBlock * D);
        const int64_t total = n_acc + n_inv + n_hp + r16(kGatherRows);
        base = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * (size_t)total));
        if (!base) throw std::bad_alloc();
        t = TileScratch{base, base + n_acc, base + n_acc + n_inv, base + n_acc + n_inv + n_hp, &spill};
    }
    ~Scratch() {
        std::free(base);
        std::free(spill);
    }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
};

inline int thread_id() {
#if defined(_OPENMP)
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// by -> which output pointer of the tile kernel receives the ranked quantity.
inline void by_ptrs(int by, float* buf, float** sim, float** conf, float** score) {
    *sim = by == kSim ? buf : nullptr;
    *conf = by == kConf ? buf : nullptr;
    *score = by == kScore ? buf : nullptr;
}

// Sort `e` best-first and write the best k into values/ids (padding the tail). `e` holds no NaN (the
// callers leave NaN values out: a candidate scored NaN is never selected, like the torch and Triton
// backends); a -inf value comes back as padding (-inf, -1), as in pecm.topk.pad_topk.
void emit(std::vector<Entry>& e, int64_t k, float* values, int64_t* ids) {
    const int64_t kk = std::min<int64_t>(k, (int64_t)e.size());
    std::partial_sort(e.begin(), e.begin() + kk, e.end(), better);
    for (int64_t j = 0; j < kk; j++) {
        values[j] = e[j].v;
        ids[j] = e[j].v == -std::numeric_limits<float>::infinity() ? -1 : e[j].id;
    }
    for (int64_t j = kk; j < k; j++) {
        values[j] = -std::numeric_limits<float>::infinity();
        ids[j] = -1;
    }
}

// Below this many multiply-adds a call runs on one thread: waking the OpenMP team costs more
// (and, on a loaded machine, can cost milliseconds).
constexpr double kParallelMinFlops = 4e6;
inline bool worth_parallel(const Problem& p, double rows) {
    return rows * (double)(p.K * (p.M ? 4 * p.M : p.D) + p.D) >= kParallelMinFlops;  // a PQ lookup ~ 4 flops
}

// The GEMM path of the tile kernel wants the queries packed: [ceil(B/L)][K*D + D][L] float32 (the
// qw row, then the qp row; L = lanes queries interleaved, zero padding). Returns the buffer and
// points p.qpk at it; empty (p.qpk stays null) when B is too small for that path.
std::vector<float> pack_queries(Problem& p, int lanes) {
    std::vector<float> pk;
    if (p.q.B < kGemmMinQ || lanes < 1 || p.M) return pk;  // (PQ problems have no dense rows)
    const int64_t KD = p.K * p.D, lt = KD + p.D, ng = (p.q.B + lanes - 1) / lanes;
    pk.assign((size_t)(ng * lt * lanes), 0.f);
    for (int64_t b = 0; b < p.q.B; b++) {
        float* dst = pk.data() + (b / lanes) * lt * lanes + b % lanes;
        const float* qw = p.q.qw + b * KD;
        const float* qp = p.q.qp + b * p.D;
        for (int64_t l = 0; l < KD; l++) dst[l * lanes] = qw[l];
        for (int64_t l = 0; l < p.D; l++) dst[(KD + l) * lanes] = qp[l];
    }
    p.q.qpk = pk.data();
    p.q.qlanes = lanes;
    return pk;
}

// The tile kernel of a problem: the PQ one for PQ candidates (pq_impl.h), else the dense one.
inline TileFn p0_tile(const Problem& p) { return p.M ? current_pq_tile() : current_tile(); }

// Work items of the exhaustive drivers and the tiles of each. Dense problems: an item is one kRowBlock-row block,
// run against every query block (the block's rows stay in cache). PQ problems with B > 1: an item is kPqGroup
// blocks, run one query at a time over all of them, so each query's lookup table ([K, R+M, 256] floats, 1.7 MB at K = 26 and
// 65 codes) is read from cache for kPqGroup * kRowBlock rows instead of once per kRowBlock rows (with 64 queries
// per tile, the 64 tables were streamed from memory for every 48 rows).
// One query's table is reused across the group, so a single-query problem keeps groups of one block (finer
// work items for the threads).
constexpr int64_t kPqGroup = 8;

inline int64_t group_blocks(const Problem& p) { return p.M && p.q.B > 1 ? kPqGroup : 1; }

inline int64_t n_items(const Problem& p) {
    const int64_t nblk = (p.c.N + kRowBlock - 1) / kRowBlock, g = group_blocks(p);
    return (nblk + g - 1) / g;
}

template <typename F>  // f(q0, q1, n0, nr) for the tiles of work item `item`
inline void for_tiles(const Problem& p, int64_t item, F&& f) {
    const int64_t nblk = (p.c.N + kRowBlock - 1) / kRowBlock, g = group_blocks(p);
    const int64_t b0 = item * g, b1 = std::min(nblk, b0 + g);
    const int64_t qb = p.M ? 1 : kQueryBlock;
    for (int64_t q0 = 0; q0 < p.q.B; q0 += qb) {
        const int64_t q1 = std::min<int64_t>(p.q.B, q0 + qb);
        for (int64_t blk = b0; blk < b1; blk++) {
            const int64_t n0 = blk * kRowBlock;
            f(q0, q1, n0, (int)std::min<int64_t>(kRowBlock, p.c.N - n0));
        }
    }
}

}  // namespace

int max_threads() {
#if defined(_OPENMP)
    return omp_get_max_threads();
#else
    return 1;
#endif
}

void run_scores(const Problem& p0, float* sim, float* conf, float* score) {
    const TileFn tile = p0_tile(p0);
    Problem p = p0;
    const std::vector<float> packed = pack_queries(p, current_lanes());
    const int64_t items = n_items(p);
    const bool par = worth_parallel(p, (double)p.q.B * p.c.N);
#pragma omp parallel if (par)
    {
        Scratch s(p.K, p.D);
#pragma omp for schedule(dynamic, 4)
        for (int64_t it = 0; it < items; it++) {
            for_tiles(p, it, [&](int64_t q0, int64_t q1, int64_t n0, int nr) {
                const int64_t off = q0 * p.c.N + n0;
                tile(p, q0, q1, nullptr, n0, nr, sim + off, conf + off, score + off, p.c.N, s.t);
            });
        }
    }
}

void run_topk(const Problem& p0, int64_t k, int by, float* values, int64_t* ids) {
    const TileFn tile = p0_tile(p0);
    Problem p = p0;
    const std::vector<float> packed = pack_queries(p, current_lanes());
    const int64_t items = n_items(p);
    const bool par = worth_parallel(p, (double)p.q.B * p.c.N);
    if (k * 4 >= p.c.N) {
        // Large k: the output is as large as the score matrix, so materialise the ranked quantity
        // ([B, N] floats) and select exactly.
        std::vector<float> all((size_t)(p.q.B * p.c.N));
#pragma omp parallel if (par)
        {
            Scratch s(p.K, p.D);
#pragma omp for schedule(dynamic, 4)
            for (int64_t it = 0; it < items; it++) {
                for_tiles(p, it, [&](int64_t q0, int64_t q1, int64_t n0, int nr) {
                    float *sm, *cf, *sc;
                    by_ptrs(by, all.data() + q0 * p.c.N + n0, &sm, &cf, &sc);
                    tile(p, q0, q1, nullptr, n0, nr, sm, cf, sc, p.c.N, s.t);
                });
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t b = 0; b < p.q.B; b++) {
                std::vector<Entry> e;
                e.reserve((size_t)p.c.N);
                const float* row = all.data() + b * p.c.N;
                for (int64_t n = 0; n < p.c.N; n++)
                    if (!std::isnan(row[n])) e.push_back(Entry{row[n], n});
                emit(e, k, values + b * k, ids + b * k);
            }
        }
        return;
    }
    // Small k: each thread keeps one bounded min-heap (worst on top) per query; exact merge at the end.
    const int nt = max_threads();
    std::vector<std::vector<std::vector<Entry>>> heaps((size_t)nt, std::vector<std::vector<Entry>>((size_t)p.q.B));
    auto worse_first = [](const Entry& a, const Entry& b) { return better(a, b); };  // heap top = worst
#pragma omp parallel if (par)
    {
        Scratch s(p.K, p.D);
        std::vector<float> buf((size_t)kQueryBlock * kRowBlock);
        auto& mine = heaps[(size_t)thread_id()];
        for (auto& h : mine) h.reserve((size_t)std::min<int64_t>(k, p.c.N));  // never more than N entries
#pragma omp for schedule(dynamic, 4)
        for (int64_t it = 0; it < items; it++) {
            for_tiles(p, it, [&](int64_t q0, int64_t q1, int64_t n0, int nr) {
                float *sm, *cf, *sc;
                by_ptrs(by, buf.data(), &sm, &cf, &sc);
                tile(p, q0, q1, nullptr, n0, nr, sm, cf, sc, kRowBlock, s.t);
                for (int64_t b = q0; b < q1; b++) {
                    auto& h = mine[(size_t)b];
                    const float* v = buf.data() + (b - q0) * kRowBlock;
                    for (int r = 0; r < nr; r++) {
                        Entry e{v[r], n0 + r};
                        if (std::isnan(e.v)) continue;  // NaN never ranks (and would break the heap order)
                        if ((int64_t)h.size() < k) {
                            h.push_back(e);
                            std::push_heap(h.begin(), h.end(), worse_first);
                        } else if (better(e, h.front())) {
                            std::pop_heap(h.begin(), h.end(), worse_first);
                            h.back() = e;
                            std::push_heap(h.begin(), h.end(), worse_first);
                        }
                    }
                }
            });
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < p.q.B; b++) {
            std::vector<Entry> e;
            for (int t = 0; t < nt; t++) e.insert(e.end(), heaps[t][b].begin(), heaps[t][b].end());
            emit(e, k, values + b * k, ids + b * k);
        }
    }
}

void run_rerank(const Problem& p, const int64_t* cand, int64_t m, int64_t k, int by, float* values, int64_t* ids) {
    const TileFn tile = p0_tile(p);
    // Id blocks of at most kGatherRows rows (few cold block starts: within a block the next rows are
    // prefetched while the current ones are scored), as many per query as a multiple of the thread
    // count when there are few queries (so one query's gather, B = 1, is split evenly over the threads).
    const int nt = max_threads();
    int64_t mblk = (m + kGatherRows - 1) / kGatherRows;
    if (p.q.B < 4 * nt) mblk = (mblk + nt - 1) / nt * nt;
    const int64_t bs = (m + mblk - 1) / mblk;
    const float ninf = -std::numeric_limits<float>::infinity();
    std::vector<float> vals((size_t)(p.q.B * m), ninf);
    const bool par = worth_parallel(p, (double)p.q.B * m);
#pragma omp parallel if (par)
    {
        Scratch s(p.K, p.D);
        float buf[kGatherRows];
        int64_t rows[kGatherRows];
        int pos[kGatherRows];
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (int64_t b = 0; b < p.q.B; b++) {
            for (int64_t blk = 0; blk < mblk; blk++) {
                const int64_t j0 = blk * bs, j1 = std::min<int64_t>(m, j0 + bs);
                int nr = 0;
                for (int64_t j = j0; j < j1; j++) {
                    const int64_t id = cand[b * m + j];
                    if (id >= 0) {
                        rows[nr] = id;
                        pos[nr++] = (int)(j - j0);
                    }
                }
                if (!nr) continue;
                float *sm, *cf, *sc;
                by_ptrs(by, buf, &sm, &cf, &sc);
                tile(p, b, b + 1, rows, 0, nr, sm, cf, sc, kGatherRows, s.t);
                for (int r = 0; r < nr; r++) vals[(size_t)(b * m + j0 + pos[r])] = buf[r];
            }
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < p.q.B; b++) {
            std::vector<Entry> e;
            e.reserve((size_t)m);
            for (int64_t j = 0; j < m; j++) {
                const int64_t id = cand[b * m + j];
                if (id >= 0 && !std::isnan(vals[(size_t)(b * m + j)])) e.push_back(Entry{vals[(size_t)(b * m + j)], id});
            }
            emit(e, k, values + b * k, ids + b * k);
        }
    }
}

}  // namespace pecm
