// pecm._C: pybind11 bindings of the C++ CPU backend. Works on numpy buffers (no libtorch).
// The scoring functions take the two operand types of pecm.operands as C++ objects: `_C.Queries`
// (float32 qw, qden, qp) and `_C.Candidates` (prototypes in float32 / float16 / bfloat16 -- half types
// may be passed as uint16/int16 bit patterns with the dtype flag -- a bool mask, pooled vectors or
// None, the weights and the normalised promises), plus `_C.By`. pecm.ops validates the user's inputs;
// the checks here are the memory-safety ones (shapes, dtypes, contiguity, candidate ids in range) and
// raise ValueError naming the argument, so a direct call can never crash the process.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>

#include "dispatch.h"
#include "ops.h"
#include "prepare.h"

// The package version this module was built for (CMake passes -DPECM_VERSION from pyproject.toml);
// pecm.backends.cpp_backend refuses an extension whose version differs from pecm.__version__.
#ifndef PECM_VERSION
#define PECM_VERSION "0+unknown"
#endif

namespace py = pybind11;
using pecm::Problem;

namespace {

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;

std::string shape_str(const py::array& a) {
    std::string s = "[";
    for (py::ssize_t i = 0; i < a.ndim(); i++) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + "]";
}

void check_shape(const py::array& a, const char* name, int64_t r, int64_t c, const char* rn, const char* cn) {
    if (a.ndim() != 2 || a.shape(0) != r || a.shape(1) != c)
        throw py::value_error(std::string(name) + ": expected shape [" + rn + "=" + std::to_string(r) + ", " + cn +
                              "=" + std::to_string(c) + "], got " + shape_str(a));
}

// A bool/uint8 mask [rows, K] (or None -> nullptr); `keep` holds the array while the pointer is used.
const uint8_t* byte_mask(const py::object& mask, const char* name, int64_t rows, int64_t K, const char* rn,
                         py::array& keep) {
    if (mask.is_none()) return nullptr;
    if (!py::isinstance<py::array>(mask)) throw py::value_error(std::string(name) + ": expected a numpy array or None");
    keep = py::reinterpret_borrow<py::array>(mask);
    if (keep.itemsize() != 1 || !(keep.dtype().kind() == 'b' || keep.dtype().kind() == 'u') ||
        !(keep.flags() & py::array::c_style))
        throw py::value_error(std::string(name) + ": expected a C-contiguous bool/uint8 array, got dtype " +
                              std::string(py::str(keep.dtype())));
    check_shape(keep, name, rows, K, rn, "K");
    return (const uint8_t*)keep.data();
}

int parse_dtype(const std::string& s) {
    if (s == "float32") return pecm::kF32;
    if (s == "float16") return pecm::kF16;
    if (s == "bfloat16") return pecm::kBF16;
    throw py::value_error("dtype: expected 'float32', 'float16' or 'bfloat16', got '" + s + "'");
}

// Storage arrays must already be C-contiguous with the element size of `dtype` (no silent copies
// of the big candidate matrix).
void check_storage(const py::array& a, const char* name, int dtype) {
    if (!(a.flags() & py::array::c_style))
        throw py::value_error(std::string(name) + ": expected a C-contiguous array");
    const char kind = a.dtype().kind();
    const auto item = a.itemsize();
    bool ok;
    if (dtype == pecm::kF32)
        ok = kind == 'f' && item == 4;
    else if (dtype == pecm::kF16)
        ok = item == 2 && (kind == 'f' || kind == 'u' || kind == 'i');
    else
        ok = item == 2 && (kind == 'u' || kind == 'i');
    if (!ok)
        throw py::value_error(std::string(name) + ": dtype " + std::string(py::str(a.dtype())) +
                              " does not match the storage dtype flag " + std::to_string(dtype) +
                              " (float32 -> float32 array; float16 -> float16/uint16; bfloat16 -> uint16/int16)");
}

// _C.Queries: the float32 query operands (forcecast to float32 C-contiguous; they are small).
struct PyQueries {
    F32 qw, qden, qp;
    std::vector<float> qsum;
    int64_t B = 0, K = 0, D = 0;

    PyQueries(const py::array& qw_in, const py::array& qden_in, const py::array& qp_in) {
        qw = F32::ensure(qw_in);
        qden = F32::ensure(qden_in);
        qp = F32::ensure(qp_in);
        if (!qw || !qden || !qp) throw py::value_error("qw, qden, qp: expected float32-convertible arrays");
        if (qden.ndim() != 2) throw py::value_error("qden: expected shape [B, K], got " + shape_str(qden));
        if (qp.ndim() != 2) throw py::value_error("qp: expected shape [B, D], got " + shape_str(qp));
        B = qden.shape(0);
        K = qden.shape(1);
        D = qp.shape(1);
        if (B < 1 || K < 1 || D < 1) throw py::value_error("qden/qp: B, K and D must be >= 1");
        check_shape(qp, "qp", B, D, "B", "D");
        check_shape(qw, "qw", B, K * D, "B", "K*D");
        qsum.assign((size_t)B, 0.f);
        const float* qd = qden.data();
        for (int64_t b = 0; b < B; b++) {
            float sum = 0.f;
            for (int64_t t = 0; t < K; t++) sum += qd[b * K + t];
            qsum[(size_t)b] = sum;
        }
    }
    pecm::Queries raw() const { return pecm::Queries{qw.data(), qden.data(), qp.data(), qsum.data(), B, nullptr, 0}; }
};

// _C.Candidates: views of the candidate buffers (never copied: they must already be C-contiguous in
// the storage dtype) and the promises of pecm.operands.Candidates.
struct PyCandidates {
    py::array c;
    py::object mask, pooled;
    py::array mask_arr;
    F32 w;
    int dtype = 0;
    int64_t N = 0, K = 0, D = 0;
    bool unit = false, pooled_unit = false;
    float eps = 1e-12f;

    PyCandidates(const py::array& c_in, const std::string& dtype_s, const py::array& w_in, const py::object& mask_in,
                 const py::object& pooled_in, bool normalized, bool pooled_normalized, float eps_in)
        : c(c_in), mask(mask_in), pooled(pooled_in), unit(normalized), pooled_unit(pooled_normalized), eps(eps_in) {
        dtype = parse_dtype(dtype_s);
        check_storage(c, "c", dtype);
        if (c.ndim() != 3) throw py::value_error("c: expected shape [N, K, D], got " + shape_str(c));
        N = c.shape(0);
        K = c.shape(1);
        D = c.shape(2);
        if (N < 1 || K < 1 || D < 1) throw py::value_error("c: N, K and D must be >= 1, got " + shape_str(c));
        w = F32::ensure(w_in);
        if (!w || w.ndim() != 1 || w.shape(0) != K)
            throw py::value_error("w: expected float32 shape [K=" + std::to_string(K) + "], got " + shape_str(w_in));
        byte_mask(mask, "c_mask", N, K, "N", mask_arr);
        if (!pooled.is_none()) {
            if (!py::isinstance<py::array>(pooled)) throw py::value_error("c_pooled: expected a numpy array or None");
            py::array pa = py::reinterpret_borrow<py::array>(pooled);
            check_storage(pa, "c_pooled", dtype);
            check_shape(pa, "c_pooled", N, D, "N", "D");
        } else if (pooled_unit) {
            throw py::value_error("pooled_normalized: True needs pooled vectors");
        }
        if (!(eps > 0.f)) throw py::value_error("eps: expected > 0");
    }
    pecm::Candidates raw() const {
        const void* pp = pooled.is_none() ? nullptr : py::reinterpret_borrow<py::array>(pooled).data();
        const uint8_t* pm = mask.is_none() ? nullptr : (const uint8_t*)mask_arr.data();
        return pecm::Candidates{c.data(), pm,   pp,  w.data(), dtype, N, unit, pooled_unit,
                                unit && pp && pooled_unit, eps};
    }
};

Problem problem(const PyQueries& q, const PyCandidates& c) {
    if (q.K != c.K || q.D != c.D)
        throw py::value_error("queries: K=" + std::to_string(q.K) + ", D=" + std::to_string(q.D) +
                              " do not match the candidates' K=" + std::to_string(c.K) + ", D=" + std::to_string(c.D));
    return Problem{q.raw(), c.raw(), c.K, c.D};
}

// _C.PQCandidates: views of product-quantised candidate buffers (pq_impl.h): codes uint8 [N, K, M],
// scales float32 [N, K], unit pooled vectors [N, D] (float32 or float16), weights [K], mask or None.
struct PyPQCandidates {
    py::array codes, pooled;
    F32 scales, w;
    py::object mask;
    py::array mask_arr;
    int dtype = 0;
    int64_t N = 0, K = 0, M = 0, D = 0;

    PyPQCandidates(const py::array& codes_in, const py::array& scales_in, const py::array& pooled_in,
                   const std::string& dtype_s, const py::array& w_in, const py::object& mask_in)
        : codes(codes_in), pooled(pooled_in), mask(mask_in) {
        if (codes.ndim() != 3 || codes.itemsize() != 1 || codes.dtype().kind() != 'u' ||
            !(codes.flags() & py::array::c_style))
            throw py::value_error("codes: expected a C-contiguous uint8 array [N, K, M], got dtype " +
                                  std::string(py::str(codes.dtype())) + " shape " + shape_str(codes));
        N = codes.shape(0);
        K = codes.shape(1);
        M = codes.shape(2);
        if (N < 1 || K < 1 || M < 1) throw py::value_error("codes: N, K and M must be >= 1, got " + shape_str(codes));
        dtype = parse_dtype(dtype_s);
        if (dtype == pecm::kBF16) throw py::value_error("dtype: PQ pooled vectors are 'float32' or 'float16'");
        check_storage(pooled, "c_pooled", dtype);
        if (pooled.ndim() != 2 || pooled.shape(0) != N)
            throw py::value_error("c_pooled: expected shape [N=" + std::to_string(N) + ", D], got " + shape_str(pooled));
        D = pooled.shape(1);
        if (D < 1) throw py::value_error("c_pooled: D must be >= 1");
        if (!(scales_in.flags() & py::array::c_style) || scales_in.dtype().kind() != 'f' || scales_in.itemsize() != 4)
            throw py::value_error("scales: expected a C-contiguous float32 array [N, K]");
        scales = F32::ensure(scales_in);
        check_shape(scales, "scales", N, K, "N", "K");
        w = F32::ensure(w_in);
        if (!w || w.ndim() != 1 || w.shape(0) != K)
            throw py::value_error("w: expected float32 shape [K=" + std::to_string(K) + "], got " + shape_str(w_in));
        byte_mask(mask, "c_mask", N, K, "N", mask_arr);
    }
    // The problem of queries `q` (qden/qp; qw unused) with lookup tables `lut` [B, K*M*256].
    Problem problem(const PyQueries& q, const F32& lut) const {
        if (q.K != K || q.D != D)
            throw py::value_error("queries: K=" + std::to_string(q.K) + ", D=" + std::to_string(q.D) +
                                  " do not match the PQ candidates' K=" + std::to_string(K) + ", D=" + std::to_string(D));
        check_shape(lut, "lut", q.B, K * M * 256, "B", "K*M*256");
        pecm::Queries qr = q.raw();
        qr.lut = lut.data();
        const uint8_t* pm = mask.is_none() ? nullptr : (const uint8_t*)mask_arr.data();
        pecm::Candidates c{nullptr, pm, pooled.data(), w.data(), dtype, N, true, true, true, 1e-12f};
        c.codes = (const uint8_t*)codes.data();
        c.scales = scales.data();
        Problem p{qr, c, K, D};
        p.M = M;
        return p;
    }
};

int64_t check_k(int64_t k) {
    if (k < 1) throw py::value_error("k: expected an int >= 1, got " + std::to_string(k));
    if (k > 2147483647) throw py::value_error("k: expected an int <= 2147483647, got " + std::to_string(k));
    return k;
}

// cand [B, M] rows in [-1, N) (the one check of the re-rank candidates).
const int64_t* check_cand(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& cand, int64_t B,
                          int64_t N) {
    if (cand.ndim() != 2 || cand.shape(0) != B)
        throw py::value_error("candidates: expected shape [B=" + std::to_string(B) + ", M], got " + shape_str(cand));
    const int64_t* pc = cand.data();
    for (int64_t i = 0; i < B * cand.shape(1); i++)
        if (pc[i] < -1 || pc[i] >= N)
            throw py::value_error("candidates: ids must be in [-1, N=" + std::to_string(N) + "), got " +
                                  std::to_string(pc[i]));
    return pc;
}

// (values [B, k], ids [B, k]) of run_topk (cand null) or run_rerank.
py::tuple topk_call(const Problem& p, const int64_t* cand, int64_t m, int64_t k, pecm::By by) {
    check_k(k);
    const auto B = p.q.B;
    py::array_t<float> vals({B, k});
    py::array_t<int64_t> ids({B, k});
    float* pv = vals.mutable_data();
    int64_t* pi = ids.mutable_data();
    {
        py::gil_scoped_release nogil;
        if (cand)
            pecm::run_rerank(p, cand, m, k, by, pv, pi);
        else
            pecm::run_topk(p, k, by, pv, pi);
    }
    return py::make_tuple(vals, ids);
}

py::tuple scores_call(const Problem& p) {
    const auto B = p.q.B, N = p.c.N;
    py::array_t<float> sim({B, N}), conf({B, N}), score({B, N});
    float *ps = sim.mutable_data(), *pc = conf.mutable_data(), *pr = score.mutable_data();
    {
        py::gil_scoped_release nogil;
        pecm::run_scores(p, ps, pc, pr);
    }
    return py::make_tuple(sim, conf, score);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "pecm C++ CPU backend: fused PECM scores / exhaustive top-k / re-rank (OpenMP + SIMD dispatch)";
    m.attr("__version__") = PECM_VERSION;

    m.def("simd_level", &pecm::simd_level, "SIMD path in use: 'scalar', 'avx2' or 'avx512'.");
    m.def("simd_levels", &pecm::supported_levels, "SIMD paths this CPU and build support, ascending.");
    m.def(
        "set_simd",
        [](const std::string& level) {
            try {
                pecm::set_simd(level);
            } catch (const std::invalid_argument& e) {
                throw py::value_error(e.what());
            }
        },
        py::arg("level"), "Force a SIMD path (must be supported); PECM_CPP_SIMD sets it at import.");
    m.def("max_threads", &pecm::max_threads, "OpenMP threads used (OMP_NUM_THREADS).");
    m.def("has_openmp", []() {
#if defined(_OPENMP)
        return true;
#else
        return false;
#endif
    });

    m.def(
        "prepare_query",
        [](py::array q, std::string dtype_s, py::array w_in, py::object mask, py::object pooled, float eps) {
            const int dtype = parse_dtype(dtype_s);
            check_storage(q, "q", dtype);
            if (q.ndim() != 3) throw py::value_error("q: expected shape [B, K, D], got " + shape_str(q));
            const int64_t B = q.shape(0), K = q.shape(1), D = q.shape(2);
            if (K < 1 || D < 1) throw py::value_error("q: K and D must be >= 1, got " + shape_str(q));
            F32 w = F32::ensure(w_in);
            if (!w || w.ndim() != 1 || w.shape(0) != K)
                throw py::value_error("w: expected float32 shape [K=" + std::to_string(K) + "], got " + shape_str(w_in));
            py::array ma;
            const uint8_t* pm = byte_mask(mask, "q_mask", B, K, "B", ma);
            F32 pa;
            const float* pp = nullptr;
            if (!pooled.is_none()) {
                pa = F32::ensure(pooled);
                if (!pa) throw py::value_error("q_pooled: expected a float32-convertible array or None");
                check_shape(pa, "q_pooled", B, D, "B", "D");
                pp = pa.data();
            }
            py::array_t<float> qw({B, K * D}), qden({B, K}), qp({B, D});
            float *o1 = qw.mutable_data(), *o2 = qden.mutable_data(), *o3 = qp.mutable_data();
            const void* pq = q.data();
            {
                py::gil_scoped_release nogil;
                pecm::prepare_query(pq, dtype, w.data(), pm, pp, B, K, D, eps, o1, o2, o3);
            }
            return py::make_tuple(qw, qden, qp);
        },
        py::arg("q"), py::arg("dtype"), py::arg("w"), py::arg("q_mask"), py::arg("q_pooled"), py::arg("eps"),
        "(qw f32 [B, K*D], qden f32 [B, K], qp f32 [B, D]) from raw q [B, K, D] (see pecm.ops.prepare_query).");

    m.def(
        "encode_items",
        [](py::array x, py::array w_in, py::object mask, py::array unit, py::object pooled, float eps) {
            if (x.ndim() != 3) throw py::value_error("x: expected shape [n, K, D], got " + shape_str(x));
            const int64_t n = x.shape(0), K = x.shape(1), D = x.shape(2);
            int dtype;
            if (x.dtype().kind() == 'f' && x.itemsize() == 4)
                dtype = pecm::kF32;
            else if (x.dtype().kind() == 'f' && x.itemsize() == 2)
                dtype = pecm::kF16;
            else
                throw py::value_error("x: dtype: expected float32 or float16, got " + std::string(py::str(x.dtype())));
            if (!(x.flags() & py::array::c_style)) throw py::value_error("x: expected a C-contiguous array");
            F32 w = F32::ensure(w_in);
            if (!w || w.ndim() != 1 || w.shape(0) != K)
                throw py::value_error("w: expected float32 shape [K=" + std::to_string(K) + "], got " + shape_str(w_in));
            if (!(unit.flags() & py::array::c_style) || !unit.writeable() ||
                unit.dtype().kind() != 'f' || unit.itemsize() != 2 || unit.ndim() != 3 || unit.shape(0) != n ||
                unit.shape(1) != K || unit.shape(2) != D)
                throw py::value_error("unit: expected a writable C-contiguous float16 array of shape " + shape_str(x) +
                                      ", got " + shape_str(unit));
            py::array ma;
            const uint8_t* pm = byte_mask(mask, "mask", n, K, "n", ma);
            float* pp = nullptr;
            py::array_t<float> pa;
            if (!pooled.is_none()) {
                if (!py::isinstance<py::array_t<float>>(pooled)) throw py::value_error("pooled: expected float32");
                pa = py::reinterpret_borrow<py::array_t<float>>(pooled);
                if (!(pa.flags() & py::array::c_style) || !pa.writeable())
                    throw py::value_error("pooled: expected a writable C-contiguous float32 array");
                check_shape(pa, "pooled", n, D, "n", "D");
                pp = pa.mutable_data();
            }
            const void* px = x.data();
            uint16_t* pu = (uint16_t*)unit.mutable_data();
            bool ok;
            {
                py::gil_scoped_release nogil;
                ok = pecm::current_encode()(px, dtype, w.data(), pm, n, K, D, eps, pu, pp);
            }
            return ok;
        },
        py::arg("x"), py::arg("w"), py::arg("mask"), py::arg("unit"), py::arg("pooled"), py::arg("eps"),
        "Index item encoder: unit (fp16, written in place) = x / ||x|| per prototype, any finite magnitude (0 where masked; eps is ignored); "
        "pooled (float32, in place, optional) = normalize(sum_k w_k * unit_k) in float32. False if a norm is "
        "not finite.");

    m.def(
        "_to_half",
        [](py::array_t<float, py::array::c_style | py::array::forcecast> x) {
            py::array_t<uint16_t> out(x.size());
            pecm::current_to_half()(x.data(), x.size(), out.mutable_data());
            return out;
        },
        py::arg("x"),
        "Test hook: float32 -> IEEE half bits (uint16) with the encoder's store of the current SIMD level.");

    py::enum_<pecm::By>(m, "By", "The ranked quantity (values shared with pecm.operands.By).")
        .value("SCORE", pecm::kScore)
        .value("SIM", pecm::kSim)
        .value("CONF", pecm::kConf);

    py::class_<PyQueries>(m, "Queries", "pecm.operands.Queries as float32 buffers (qw [B, K*D], qden [B, K], qp [B, D]).")
        .def(py::init<const py::array&, const py::array&, const py::array&>(), py::arg("qw"), py::arg("qden"),
             py::arg("qp"))
        .def_readonly("B", &PyQueries::B)
        .def_readonly("K", &PyQueries::K)
        .def_readonly("D", &PyQueries::D);

    py::class_<PyCandidates>(m, "Candidates",
                             "pecm.operands.Candidates as buffers: c [N, K, D] storage dtype, w [K] float32, mask "
                             "bool [N, K] or None, pooled [N, D] storage dtype or None, and the normalised promises.")
        .def(py::init<const py::array&, const std::string&, const py::array&, const py::object&, const py::object&, bool,
                      bool, float>(),
             py::arg("c"), py::arg("dtype"), py::arg("w"), py::arg("mask") = py::none(), py::arg("pooled") = py::none(),
             py::arg("normalized") = false, py::arg("pooled_normalized") = false, py::arg("eps") = 1e-12f)
        .def_readonly("N", &PyCandidates::N)
        .def_readonly("K", &PyCandidates::K)
        .def_readonly("D", &PyCandidates::D)
        .def_readonly("normalized", &PyCandidates::unit)
        .def_readonly("pooled_normalized", &PyCandidates::pooled_unit);

    m.def(
        "scores", [](const PyQueries& q, const PyCandidates& c) { return scores_call(problem(q, c)); },
        py::arg("queries"), py::arg("candidates"), "(sim, conf, score) float32 [B, N] each.");

    m.def(
        "topk",
        [](const PyQueries& q, const PyCandidates& c, int64_t k, pecm::By by) {
            return topk_call(problem(q, c), nullptr, 0, k, by);
        },
        py::arg("queries"), py::arg("candidates"), py::arg("k"), py::arg("by"),
        "Exhaustive fused top-k: (values f32 [B, k], ids int64 [B, k]).");

    m.def(
        "rerank",
        [](const PyQueries& q, const PyCandidates& c, py::array_t<int64_t, py::array::c_style | py::array::forcecast> cand,
           int64_t k, pecm::By by) {
            const Problem p = problem(q, c);
            const int64_t* pc = check_cand(cand, p.q.B, p.c.N);  // (before cand.shape(1): a 1-D cand is an error)
            return topk_call(p, pc, cand.shape(1), k, by);
        },
        py::arg("queries"), py::arg("candidates"), py::arg("cand"), py::arg("k"), py::arg("by"),
        "Best k of gathered candidate rows (-1 = padding).");

    py::class_<PyPQCandidates>(m, "PQCandidates",
                               "Product-quantised candidates: codes uint8 [N, K, M], scales float32 [N, K], unit "
                               "pooled [N, D] (dtype 'float32' | 'float16'), w [K], mask [N, K] or None.")
        .def(py::init<const py::array&, const py::array&, const py::array&, const std::string&, const py::array&,
                      const py::object&>(),
             py::arg("codes"), py::arg("scales"), py::arg("pooled"), py::arg("dtype"), py::arg("w"),
             py::arg("mask") = py::none())
        .def_readonly("N", &PyPQCandidates::N)
        .def_readonly("K", &PyPQCandidates::K)
        .def_readonly("M", &PyPQCandidates::M)
        .def_readonly("D", &PyPQCandidates::D);

    m.def(
        "pq_scores", [](const PyQueries& q, const F32& lut, const PyPQCandidates& c) { return scores_call(c.problem(q, lut)); },
        py::arg("queries"), py::arg("lut"), py::arg("candidates"),
        "PQ candidates scored from their codes: (sim, conf, score) float32 [B, N] each.");
    m.def(
        "pq_topk",
        [](const PyQueries& q, const F32& lut, const PyPQCandidates& c, int64_t k, pecm::By by) {
            return topk_call(c.problem(q, lut), nullptr, 0, k, by);
        },
        py::arg("queries"), py::arg("lut"), py::arg("candidates"), py::arg("k"), py::arg("by"),
        "Exhaustive top-k of PQ candidates from their codes (ADC fused with the top-k).");
    m.def(
        "pq_rerank",
        [](const PyQueries& q, const F32& lut, const PyPQCandidates& c,
           py::array_t<int64_t, py::array::c_style | py::array::forcecast> cand, int64_t k, pecm::By by) {
            const Problem p = c.problem(q, lut);
            const int64_t* pc = check_cand(cand, p.q.B, p.c.N);
            return topk_call(p, pc, cand.shape(1), k, by);
        },
        py::arg("queries"), py::arg("lut"), py::arg("candidates"), py::arg("cand"), py::arg("k"), py::arg("by"),
        "Best k of gathered PQ candidate rows (-1 = padding), scored from their codes.");
    m.def(
        "pq_encode",
        [](const F32& x, const py::object& mask_in, const F32& codebook) {
            if (x.ndim() != 3) throw py::value_error("prototypes: expected shape [n, K, D], got " + shape_str(x));
            if (codebook.ndim() != 4 || codebook.shape(2) != 256)
                throw py::value_error("codebook: expected shape [S, M, 256, D/M], got " + shape_str(codebook));
            const int64_t n = x.shape(0), K = x.shape(1), D = x.shape(2);
            const int64_t S = codebook.shape(0), M = codebook.shape(1), DS = codebook.shape(3);
            if (M * DS != D || !(S == 1 || S == K))
                throw py::value_error("codebook: shape " + shape_str(codebook) + " does not fit prototypes " +
                                      shape_str(x) + " (expected [1 or K, M, 256, D/M])");
            py::array keep;
            const uint8_t* mk = byte_mask(mask_in, "masks", n, K, "n", keep);
            std::vector<float> centT((size_t)(S * M * DS * 256)), hn((size_t)(S * M * 256)), n2((size_t)(S * M * 256));
            const float* cb = codebook.data();
            for (int64_t g = 0; g < S * M; g++)
                for (int64_t c = 0; c < 256; c++) {
                    double ss = 0.0;
                    for (int64_t j = 0; j < DS; j++) {
                        const float v = cb[(g * 256 + c) * DS + j];
                        centT[(size_t)((g * DS + j) * 256 + c)] = v;
                        ss += (double)v * v;
                    }
                    n2[(size_t)(g * 256 + c)] = (float)ss;
                    hn[(size_t)(g * 256 + c)] = (float)(ss / 2);
                }
            py::array_t<uint8_t> codes({n, K, M});
            py::array_t<float> scales({n, K});
            uint8_t* pc = codes.mutable_data();
            float* ps = scales.mutable_data();
            const float* px = x.data();
            {
                py::gil_scoped_release nogil;
                const auto enc = pecm::current_pq_encode();
                const int64_t blk = 64;
#pragma omp parallel for schedule(dynamic, 1) if (n * K * D >= 65536)
                for (int64_t i0 = 0; i0 < n; i0 += blk) {
                    const int64_t nb = std::min<int64_t>(blk, n - i0);
                    enc(px + i0 * K * D, mk ? mk + i0 * K : nullptr, nb, K, D, M, S, centT.data(), hn.data(), n2.data(),
                        pc + i0 * K * M, ps + i0 * K);
                }
            }
            return py::make_tuple(codes, scales);
        },
        py::arg("prototypes"), py::arg("masks"), py::arg("codebook"),
        "PQ-encode unit prototypes [n, K, D] float32 with codebook [S, M, 256, D/M] (S = 1 shared, or K per slot): "
        "(codes uint8 [n, K, M], scales float32 [n, K] = mask / ||decoded||).");
}
