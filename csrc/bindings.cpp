// pecm._C: pybind11 bindings of the C++ CPU backend. Works on numpy buffers (no libtorch):
// float32 operands, candidate storage float32 / float16 / bfloat16 (half types may be passed as
// uint16/int16 bit patterns with the dtype flag). Every argument is checked here and a bad one
// raises ValueError (never a crash).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "dispatch.h"
#include "ops.h"
#include "prepare.h"

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

int parse_by(const std::string& s) {
    if (s == "score") return pecm::kScore;
    if (s == "sim") return pecm::kSim;
    if (s == "conf") return pecm::kConf;
    throw py::value_error("by: expected 'score', 'sim' or 'conf', got '" + s + "'");
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

struct Held {  // keeps the (possibly converted) query arrays alive for the duration of a call
    F32 qw, qden, qp;
    py::array c, cp;
    py::object cm;
    std::vector<float> qsum;
    Problem p{};
};

void build(Held& h, const py::array& qw_in, const py::array& qden_in, const py::array& qp_in, const py::array& c,
           const py::object& cm, const py::array& cp, const std::string& dtype_s) {
    const int dtype = parse_dtype(dtype_s);
    h.qw = F32::ensure(qw_in);
    h.qden = F32::ensure(qden_in);
    h.qp = F32::ensure(qp_in);
    if (!h.qw || !h.qden || !h.qp) throw py::value_error("qw, qden, qp: expected float32-convertible arrays");
    if (h.qden.ndim() != 2) throw py::value_error("qden: expected shape [B, K], got " + shape_str(h.qden));
    if (h.qp.ndim() != 2) throw py::value_error("qp: expected shape [B, D], got " + shape_str(h.qp));
    const int64_t B = h.qden.shape(0), K = h.qden.shape(1), D = h.qp.shape(1);
    if (B < 1 || K < 1 || D < 1) throw py::value_error("qden/qp: B, K and D must be >= 1");
    check_shape(h.qp, "qp", B, D, "B", "D");
    check_shape(h.qw, "qw", B, K * D, "B", "K*D");
    check_storage(c, "c", dtype);
    check_storage(cp, "cp", dtype);
    if (c.ndim() != 2) throw py::value_error("c: expected shape [N, K*D], got " + shape_str(c));
    const int64_t N = c.shape(0);
    if (N < 1) throw py::value_error("c: N must be >= 1");
    check_shape(c, "c", N, K * D, "N", "K*D");
    check_shape(cp, "cp", N, D, "N", "D");
    const void* cm_ptr = nullptr;
    if (!cm.is_none()) {
        py::array cma = py::reinterpret_borrow<py::array>(cm);
        if (!py::isinstance<py::array>(cm)) throw py::value_error("cm: expected a numpy array or None");
        check_storage(cma, "cm", dtype);
        check_shape(cma, "cm", N, K, "N", "K");
        cm_ptr = cma.data();
    }
    h.c = c;
    h.cp = cp;
    h.cm = cm;
    h.qsum.assign((size_t)B, 0.f);
    const float* qd = h.qden.data();
    for (int64_t b = 0; b < B; b++) {
        float s = 0.f;
        for (int64_t t = 0; t < K; t++) s += qd[b * K + t];
        h.qsum[(size_t)b] = s;
    }
    h.p = Problem{h.qw.data(), qd, h.qp.data(), h.qsum.data(), c.data(), cm_ptr, cp.data(), dtype, B, N, K, D};
}

int64_t check_k(int64_t k) {
    if (k < 1) throw py::value_error("k: expected an int >= 1, got " + std::to_string(k));
    return k;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "pecm C++ CPU backend: fused PECM scores / exhaustive top-k / re-rank (OpenMP + SIMD dispatch)";

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
        "Index item encoder: unit (fp16, written in place) = x / max(||x||, eps) per prototype (0 where masked); "
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

    m.def(
        "scores",
        [](py::array qw, py::array qden, py::array qp, py::array c, py::object cm, py::array cp, std::string dtype) {
            Held h;
            build(h, qw, qden, qp, c, cm, cp, dtype);
            const auto B = h.p.B, N = h.p.N;
            py::array_t<float> sim({B, N}), conf({B, N}), score({B, N});
            float *ps = sim.mutable_data(), *pc = conf.mutable_data(), *pr = score.mutable_data();
            {
                py::gil_scoped_release nogil;
                pecm::run_scores(h.p, ps, pc, pr);
            }
            return py::make_tuple(sim, conf, score);
        },
        py::arg("qw"), py::arg("qden"), py::arg("qp"), py::arg("c"), py::arg("cm"), py::arg("cp"), py::arg("dtype"),
        "(sim, conf, score) float32 [B, N] each.");

    m.def(
        "topk",
        [](py::array qw, py::array qden, py::array qp, py::array c, py::object cm, py::array cp, std::string dtype,
           int64_t k, std::string by) {
            Held h;
            build(h, qw, qden, qp, c, cm, cp, dtype);
            check_k(k);
            const int byi = parse_by(by);
            const auto B = h.p.B;
            py::array_t<float> vals({B, k});
            py::array_t<int64_t> ids({B, k});
            float* pv = vals.mutable_data();
            int64_t* pi = ids.mutable_data();
            {
                py::gil_scoped_release nogil;
                pecm::run_topk(h.p, k, byi, pv, pi);
            }
            return py::make_tuple(vals, ids);
        },
        py::arg("qw"), py::arg("qden"), py::arg("qp"), py::arg("c"), py::arg("cm"), py::arg("cp"), py::arg("dtype"),
        py::arg("k"), py::arg("by"), "Exhaustive fused top-k: (values f32 [B, k], ids int64 [B, k]).");

    m.def(
        "rerank",
        [](py::array qw, py::array qden, py::array qp, py::array c, py::object cm, py::array cp, std::string dtype,
           py::array_t<int64_t, py::array::c_style | py::array::forcecast> cand, int64_t k, std::string by) {
            Held h;
            build(h, qw, qden, qp, c, cm, cp, dtype);
            check_k(k);
            const int byi = parse_by(by);
            const auto B = h.p.B;
            if (cand.ndim() != 2 || cand.shape(0) != B)
                throw py::value_error("cand: expected shape [B=" + std::to_string(B) + ", M], got " + shape_str(cand));
            const int64_t M = cand.shape(1);
            const int64_t* pc = cand.data();
            for (int64_t i = 0; i < B * M; i++)
                if (pc[i] < -1 || pc[i] >= h.p.N)
                    throw py::value_error("cand: ids must be in [-1, N=" + std::to_string(h.p.N) + "), got " +
                                          std::to_string(pc[i]));
            py::array_t<float> vals({B, k});
            py::array_t<int64_t> ids({B, k});
            float* pv = vals.mutable_data();
            int64_t* pi = ids.mutable_data();
            {
                py::gil_scoped_release nogil;
                pecm::run_rerank(h.p, pc, M, k, byi, pv, pi);
            }
            return py::make_tuple(vals, ids);
        },
        py::arg("qw"), py::arg("qden"), py::arg("qp"), py::arg("c"), py::arg("cm"), py::arg("cp"), py::arg("dtype"),
        py::arg("cand"), py::arg("k"), py::arg("by"), "Best k of gathered candidate rows (-1 = padding).");
}
