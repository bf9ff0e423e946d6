"""Triton backend vs. the float64 reference: fused scores, exhaustive top-k and re-ranking.

Without CUDA the kernels run on the CPU under TRITON_INTERPRET=1 (set here before Triton is first
imported; tests marked ``interpret``, small shapes). With CUDA the same tests run on the GPU
(marked ``gpu``). Gradients are in test_triton_grad.py.

Every candidate mode (raw prototypes or unit ones x pooled vectors absent / raw / unit, mask or not)
goes through the kernels as it is: raw candidates are normalised and pooled on the fly inside the
fused pass (kernels/common.py). The schemes for Eq. 4 pooled on the fly (h in registers, narrower
sub-tiles merged into the top-k list, two steps) are reached by lowering the register budgets.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # shared helpers, any import mode
from helpers import assert_topk_matches, candidate_modes, make_inputs, unit_masked  # noqa: E402

from pecm import ops, reference  # noqa: E402
from pecm.operands import Candidates  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
BY_INDEX = {"sim": 0, "conf": 1, "score": 2}

DEVICES = [
    pytest.param(
        "cpu",
        marks=[
            pytest.mark.interpret,
            pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1"),
        ],
    ),
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    ),
]


def fresh_triton_backend():
    """Make sure pecm.kernels was defined under the current TRITON_INTERPRET and the registry has it.

    Another test module may have loaded the backend (or recorded its failure) before this module
    set TRITON_INTERPRET; `triton.jit` fixes interpreted vs. compiled at definition time.
    """
    from pecm import backends

    common = sys.modules.get("pecm.kernels.common")
    want = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if common is not None and common.INTERPRET_AT_IMPORT != want:
        for name in [m for m in sys.modules if m.startswith("pecm.kernels") or m == "pecm.backends.triton_backend"]:
            del sys.modules[name]
        backends._CACHE.pop("triton", None)
    backends._ERRORS.pop("triton", None)
    if "triton" not in backends.available_backends():
        pytest.fail(f"triton backend failed to load: {backends.backend_errors().get('triton')}")


@pytest.fixture(scope="module", autouse=True)
def _triton_ready():
    fresh_triton_backend()


def make_case(device, dtype, b=3, n=40, k=5, d=24, masks=True, seed=0, ties=True):
    """Random inputs with adversarial rows: duplicates (exact ties), zero prototypes, masked rows."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, k, d, generator=g)
    c = torch.randn(n, k, d, generator=g)
    w = torch.rand(k, generator=g) * 2
    qm = cm = None
    if masks:
        qm = torch.rand(b, k, generator=g) > 0.25
        cm = torch.rand(n, k, generator=g) > 0.25
        cm[1] = False  # fully masked candidate: conf = score = 0
        qm[-1, :] = False  # fully masked query row
        qm[0, 0] = True
    if ties:
        c[5] = c[2]  # exact duplicates -> tied values
        c[7] = c[2]
        if cm is not None:
            cm[5] = cm[2]
            cm[7] = cm[2]
        c[3, 0] = 0.0  # a zero prototype
    cast = lambda t: None if t is None else t.to(device)
    return cast(q.to(dtype)), cast(c.to(dtype)), cast(w), cast(qm), cast(cm)


def ref_scores(q, c, w, qm, cm):
    return reference.scores(q, c, w, qm, cm)


def check_topk(vals, ids, ref_matrix, k, tol, cand=None):
    """Tie-aware: sorted values match the reference top-k; every id is valid, unique and its
    reference value matches the value returned with it; -inf exactly with id -1."""
    vals = vals.double().cpu().numpy()
    ids = ids.cpu().numpy()
    exp_v, _ = reference.topk(ref_matrix, k) if cand is None else reference.rerank(ref_matrix, cand, k)
    assert vals.shape == exp_v.shape == ids.shape
    fin = np.isfinite(exp_v)
    assert np.array_equal(np.isfinite(vals), fin), "padding (-inf) positions differ"
    assert np.all(ids[~fin] == -1)
    np.testing.assert_allclose(vals[fin], exp_v[fin], atol=tol, rtol=0)
    assert np.all(np.diff(np.where(np.isfinite(vals), vals, -1e30), axis=1) <= 1e-6), "not sorted descending"
    for b in range(ids.shape[0]):
        got = ids[b][ids[b] >= 0]
        if cand is None:
            assert len(set(got.tolist())) == len(got), "duplicate ids"
        else:
            allowed = np.asarray(cand[b])
            for i in set(got.tolist()):
                assert (got == i).sum() <= (allowed == i).sum(), "id returned more often than given"
        np.testing.assert_allclose(ref_matrix[b, got], vals[b][ids[b] >= 0], atol=tol, rtol=0)


# ------------------------------------------------------------------------------------------------
# scores
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masks", [False, True])
def test_scores_match_reference(device, dtype, masks):
    q, c, w, qm, cm = make_case(device, dtype, masks=masks)
    out = ops.pecm_scores(q, c, w, q_mask=qm, c_mask=cm, backend="triton")
    ref = ref_scores(q, c, w, qm, cm)
    for got, exp in zip(out, ref):
        assert got.dtype == torch.float32 and got.device.type == device
        np.testing.assert_allclose(got.double().cpu().numpy(), exp, atol=TOL[dtype], rtol=0)
    if masks:  # fully masked candidate row and query row: conf and score exactly 0
        assert torch.all(out[1][:, 1] == 0) and torch.all(out[2][:, 1] == 0)
        assert torch.all(out[1][-1] == 0) and torch.all(out[2][-1] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_scores_pooled_single_query_and_odd_sizes(device):
    """Given pooled vectors, a 2-D query, K/D not multiples of the blocks, N not a tile multiple."""
    g = torch.Generator().manual_seed(3)
    k, d, n = 3, 70, 37
    q = torch.randn(k, d, generator=g).to(device)
    c = torch.randn(n, k, d, generator=g).to(device)
    w = (torch.rand(k, generator=g) * 3).to(device)
    qp = torch.randn(d, generator=g).to(device)
    cp = torch.randn(n, d, generator=g).to(device)
    out = ops.pecm_scores(q, c, w, q_pooled=qp, c_pooled=cp, backend="triton")
    ref = reference.scores(q, c, w, q_pooled=qp, c_pooled=cp)
    for got, exp in zip(out, ref):
        assert got.shape == (n,)
        np.testing.assert_allclose(got.double().cpu().numpy(), exp[0], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# exhaustive top-k
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,by,k",
    [
        (torch.float32, "score", 1),
        (torch.float32, "score", 6),
        (torch.float32, "sim", 6),
        (torch.float32, "conf", 6),
        (torch.float16, "score", 6),
        (torch.bfloat16, "score", 6),
        (torch.bfloat16, "conf", 17),
    ],
)
def test_topk_matches_reference(device, dtype, by, k):
    q, c, w, qm, cm = make_case(device, dtype, n=45)
    vals, ids = ops.pecm_topk(q, c, w, k, q_mask=qm, c_mask=cm, by=by, backend="triton")
    assert vals.dtype == torch.float32 and ids.dtype == torch.int64 and vals.shape == (3, k)
    ref = ref_scores(q, c, w, qm, cm)[BY_INDEX[by]]
    check_topk(vals, ids, ref, k, TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_topk_k_larger_than_n_and_no_masks(device):
    q, c, w, _, _ = make_case(device, torch.float32, n=12, masks=False)
    vals, ids = ops.pecm_topk(q, c, w, 20, backend="triton")
    assert torch.all(ids[:, 12:] == -1) and torch.all(torch.isneginf(vals[:, 12:]))
    check_topk(vals, ids, ref_scores(q, c, w, None, None)[2], 20, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_chunk_size_hint_and_all_ties(device):
    """All candidates identical (every value tied) with many splits (chunk_size = 16)."""
    q, c, w, _, _ = make_case(device, torch.float32, b=2, n=50, masks=False, ties=False)
    c = c[:1].expand(50, -1, -1).contiguous()
    vals, ids = ops.pecm_topk(q, c, w, 5, by="score", chunk_size=16, backend="triton")
    check_topk(vals, ids, ref_scores(q, c, w, None, None)[2], 5, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_large_k_uses_chunked_path(device):
    """k above the fused kernel's 1024 list: chunked fused-scores path, still exact, tail padded."""
    q, c, w, qm, cm = make_case(device, torch.float16, b=2, n=30)
    vals, ids = ops.pecm_topk(q, c, w, 1100, q_mask=qm, c_mask=cm, chunk_size=16, backend="triton")
    assert vals.shape == (2, 1100)
    check_topk(vals, ids, ref_scores(q, c, w, qm, cm)[2], 1100, 2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_many_query_blocks_scores_and_topk(device):
    """B larger than one query block (scores: 16 rows, interpreter top-k: 4 rows), N over several tiles."""
    q, c, w, qm, cm = make_case(device, torch.float32, b=18, n=70, k=3, d=16)
    ref = ref_scores(q, c, w, qm, cm)
    out = ops.pecm_scores(q, c, w, q_mask=qm, c_mask=cm, backend="triton")
    for got, exp in zip(out, ref):
        np.testing.assert_allclose(got.double().cpu().numpy(), exp, atol=1e-5, rtol=0)
    vals, ids = ops.pecm_topk(q[:9], c, w, 3, q_mask=qm[:9], c_mask=cm, backend="triton")
    check_topk(vals, ids, ref[2][:9], 3, 1e-5)


# ------------------------------------------------------------------------------------------------
# re-ranking
# ------------------------------------------------------------------------------------------------
def make_cand(n, b, m, seed=1, pad_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    cand = torch.randint(0, n, (b, m), generator=g)
    cand[torch.rand(b, m, generator=g) < pad_frac] = -1
    cand[0, :3] = torch.tensor([2, 5, 2])  # tied rows and a duplicated id
    if b > 1:
        cand[1, :] = -1  # a row with padding only
        cand[1, 0] = 4
    return cand


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,by,k,m",
    [
        (torch.float32, "score", 4, 30),
        (torch.float32, "sim", 10, 30),
        (torch.float32, "conf", 40, 30),  # k > M: (-inf, -1) tail
        (torch.float16, "score", 5, 40),
        (torch.bfloat16, "score", 5, 40),
    ],
)
def test_rerank_matches_reference(device, dtype, by, k, m):
    q, c, w, qm, cm = make_case(device, dtype, n=40)
    cand = make_cand(40, 3, m)
    vals, ids = ops.pecm_rerank(q, c, cand.to(device), w, k, q_mask=qm, c_mask=cm, by=by, backend="triton")
    assert vals.shape == (3, k)
    ref = ref_scores(q, c, w, qm, cm)[BY_INDEX[by]]
    check_topk(vals, ids, ref, k, TOL[dtype], cand=cand.numpy())
    assert torch.all(ids[1, 1:] == -1) and ids[1, 0] == 4  # padding never returned


@pytest.mark.parametrize("device", DEVICES)
def test_rerank_single_query_many_splits(device):
    """One query, M large enough for several programs along M (exact partial merge)."""
    q, c, w, qm, cm = make_case(device, torch.float32, b=1, n=40)
    cand = make_cand(40, 1, 70, pad_frac=0.1)
    vals, ids = ops.pecm_rerank(q[0], c, cand[0].to(device), w, 7, q_mask=qm[0], c_mask=cm, backend="triton")
    assert vals.shape == (7,)
    ref = ref_scores(q, c, w, qm, cm)[2]
    check_topk(vals[None], ids[None], ref, 7, 1e-5, cand=cand.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_rerank_k_above_list_size_keeps_every_candidate(device):
    """k > 1024 with M > 1024: each program keeps its whole 1024-id slice; the merge stays exact.

    Slow under the interpreter (~20 s: a 1024-wide tl.sort), hence marked slow.
    """
    q, c, w, qm, cm = make_case(device, torch.float32, b=1, n=50)
    cand = make_cand(50, 1, 1100, pad_frac=0.05)
    vals, ids = ops.pecm_rerank(q, c, cand.to(device), w, 1030, q_mask=qm, c_mask=cm, backend="triton")
    check_topk(vals, ids, ref_scores(q, c, w, qm, cm)[2], 1030, 1e-5, cand=cand.numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_degenerate_shapes_k1_d1_n1(device):
    """K = 1, D = 1, a single candidate: every op still matches the reference (k > N tail too)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 1, 1, generator=g).to(device)
    c = torch.randn(1, 1, 1, generator=g).to(device)
    w = torch.ones(1, device=device)
    ref = reference.scores(q, c, w)
    out = ops.pecm_scores(q, c, w, backend="triton")
    for got, exp in zip(out, ref):
        np.testing.assert_allclose(got.double().cpu().numpy(), exp, atol=1e-6, rtol=0)
    vals, ids = ops.pecm_topk(q, c, w, 3, backend="triton")
    check_topk(vals, ids, ref[2], 3, 1e-6)
    cand = torch.tensor([[0, -1], [-1, -1]])
    vals, ids = ops.pecm_rerank(q, c, cand.to(device), w, 2, backend="triton")
    check_topk(vals, ids, ref[2], 2, 1e-6, cand=cand.numpy())
    assert ids[1].tolist() == [-1, -1]


# ------------------------------------------------------------------------------------------------
# every candidate mode, normalised on the fly
# ------------------------------------------------------------------------------------------------
BYS = ("score", "sim", "conf")
# (normalized, pooled given, pooled_normalized) -> the kernels' (NORM, POOL) flags
MODE_FLAGS = {
    "raw": (True, 2),
    "raw+pooled": (True, 1),
    "raw+unitpooled": (True, 0),
    "unit": (False, 2),
    "unit+rawpooled": (False, 1),
    "unit+pooled": (False, 0),
    "prepared": (False, 0),
    "prepared+pooled": (False, 0),
}


def all_modes(c, w, cm, seed=0):
    """`helpers.candidate_modes` plus the two flag combinations the ops never build themselves
    (unit prototypes with raw pooled vectors, raw prototypes with unit pooled vectors): a Candidates."""
    modes = candidate_modes(c, w, cm, seed=seed)
    raw_pooled = modes[1][2]
    unit_pooled = modes[3][2]
    u = unit_masked(c, cm)
    modes.append(("unit+rawpooled", dict(c=Candidates(u, w, cm, raw_pooled, True, False)), raw_pooled))
    modes.append(("raw+unitpooled", dict(c=Candidates(c, w, cm, unit_pooled, False, True)), unit_pooled))
    return modes


def _on(kw, device):
    """A mode's kwargs with every tensor / Candidates on `device`."""
    out = {}
    for key, v in kw.items():
        out[key] = v.to(device) if isinstance(v, (torch.Tensor, Candidates)) else v
    return out


def run_modes(device, q, c, w, qm, cm, k, cand, names=None, by_offset=0, tol=None, seed=0):
    """Scores, top-k and rerank of each candidate mode vs float64; the ranked quantity cycles over
    the modes (by_offset shifts it, so a parametrised test covers every (mode, by) pair)."""
    tol = TOL[c.dtype] if tol is None else tol
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    for i, (name, kw, ref_pooled) in enumerate(all_modes(c, w, cm, seed=seed)):
        if names is not None and name not in names:
            continue
        kw = _on(kw, device)
        cs = kw.pop("c")
        wa = None if isinstance(cs, Candidates) else dev(w)
        ref = reference.scores(q.double(), c.double(), w.double(), qm, cm, None, ref_pooled)
        got = ops.pecm_scores(dev(q), cs, wa, q_mask=dev(qm), backend="triton", **kw)
        for g, r, what in zip(got, ref, ("sim", "conf", "score")):
            np.testing.assert_allclose(g.double().cpu().numpy(), r, atol=tol, rtol=0, err_msg=f"{name} {what}")
        by = BYS[(i + by_offset) % 3]
        v, ids = ops.pecm_topk(dev(q), cs, wa, k, q_mask=dev(qm), by=by, backend="triton", **kw)
        assert_topk_matches(v, ids, ref[BY_INDEX[by]], k, tol)
        by = BYS[(i + by_offset + 1) % 3]
        v, ids = ops.pecm_rerank(dev(q), cs, dev(cand), wa, k, q_mask=dev(qm), by=by, backend="triton", **kw)
        check_topk(v, ids, ref[BY_INDEX[by]], k, tol, cand=cand.numpy())


def make_mode_case(b=3, n=37, k=5, d=24, dtype=torch.float32, masks=True, seed=0, m=30):
    """`helpers.make_inputs` (duplicated rows, a zero prototype, fully masked rows) + rerank ids with
    -1 padding, a duplicated id and a row of padding only."""
    q, c, w, qm, cm = make_inputs(b, n, k, d, dtype=dtype, masks=masks, seed=seed, ties=True)
    g = torch.Generator().manual_seed(seed + 1)
    cand = torch.randint(-1, n, (b, m), generator=g)
    cand[0, :4] = torch.tensor([n // 2, n // 2, 0, -1])  # tied rows, a duplicated id, padding
    cand[-1] = -1  # padding only: (-inf, -1) everywhere
    return q, c, w, qm, cm, cand


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masks", [False, True])
def test_every_candidate_mode_matches_reference(device, dtype, masks):
    """The 8 candidate modes (every NORM x POOL flag combination) x mask / no mask x dtype, all three by."""
    q, c, w, qm, cm, cand = make_mode_case(dtype=dtype, masks=masks, seed=DTYPES.index(dtype) + 3 * masks)
    names = None if masks else [n for n in MODE_FLAGS if not n.startswith("prepared")]  # prepared: once per dtype
    run_modes(device, q, c, w, qm, cm, 7, cand, names=names, by_offset=DTYPES.index(dtype) + masks)


def _budget(monkeypatch, h):
    """Set the register budget of the h tile (float32 elements) for this test."""
    from pecm.backends.triton_backend import kernels

    common = sys.modules[kernels.__name__ + ".common"]
    monkeypatch.setattr(common, "H_ELEMS", h)
    return common


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "scheme,d,dtype",
    [
        ("h-regs", 70, torch.float32),  # D not a power of two over two BLOCK_KD chunks (h as 2 chunks)
        ("sub-tiles", 24, torch.float16),  # h in registers for 16-wide tiles merged into a 32-wide top-k list
        ("two-step", 70, torch.bfloat16),  # h does not fit: inverse norms first, then h chunk by chunk
        ("two-step", 24, torch.float32),
    ],
)
def test_on_the_fly_pooling_schemes(device, monkeypatch, scheme, d, dtype):
    """Eq. 4 pooled on the fly by each scheme of `common._pecm_tile` / `pecm_rerank._gather_raw`."""
    common = _budget(monkeypatch, {"h-regs": 8192, "sub-tiles": 512, "two-step": 256}[scheme])
    q, c, w, qm, cm, cand = make_mode_case(d=d, dtype=dtype, seed=d)
    k = 20  # KT = 32 under the interpreter (64 on a GPU)
    kt = max(common.kt_floor(), common.next_pow2(k))
    sub = common.raw_sub(kt, d, dict(POOL=2))
    if scheme == "sub-tiles":
        assert sub < kt
    elif scheme == "two-step":
        assert sub == kt and common.d_pad(d) * 16 > common.H_ELEMS
    run_modes(device, q, c, w, qm, cm, k, cand, names=["raw", "unit", "raw+pooled"], by_offset=d)


@pytest.mark.parametrize("device", DEVICES)
def test_raw_k_larger_than_n_and_all_masked(device):
    """Raw candidates pooled on the fly with k > N, a zero row and every prototype of a row masked."""
    q, c, w, qm, cm, cand = make_mode_case(n=12, d=20, seed=9)
    c[4] = 0.0  # every prototype zero: sim = conf = 0
    cm[6] = False
    run_modes(device, q, c, w, qm, cm, 15, cand.clamp_max(11), names=["raw", "unit"])


def test_operands_are_views_and_mask_is_bytes():
    """cand_operands: the prototypes and the mask are zero-copy views (the bool mask as uint8), the flags
    follow the promises, and only pooling on the fly reads the weights."""
    from pecm.backends.triton_backend import kernels

    common = sys.modules[kernels.__name__ + ".common"]
    _, c, w, _, cm = make_inputs(1, 10, 4, 8, masks=True)
    for name, kw, _ in all_modes(c, w, cm):
        cs = kw["c"] if isinstance(kw["c"], Candidates) else Candidates(
            kw["c"], w, kw.get("c_mask"), kw.get("c_pooled"), kw.get("normalized", False),
            kw.get("normalized", False) and kw.get("c_pooled") is not None,
        )  # fmt: skip
        cc, mm, cp, ww, flags = common.cand_operands(cs)
        assert cc.data_ptr() == cs.prototypes.data_ptr() and cc.shape == (10, 32)
        assert mm.dtype == torch.uint8 and mm.data_ptr() == cs.mask.data_ptr()
        assert (flags["NORM"], flags["POOL"]) == MODE_FLAGS[name], name
        assert (ww is not None) == (flags["POOL"] == 2) and (cp is None) == (flags["POOL"] == 2)
    assert common.cand_operands(Candidates(c, w))[1] is None


@pytest.mark.parametrize("device", DEVICES)
def test_launchers_are_duck_typed(device):
    """The launchers read attributes only (kernels/ never imports pecm): plain namespaces work."""
    from types import SimpleNamespace

    from pecm.backends.triton_backend import kernels

    q, c, w, qm, cm, cand = make_mode_case(b=2, n=20, d=16, seed=4)
    qs = ops.prepare_queries(q, w, q_mask=qm)
    qs = SimpleNamespace(qw=qs.qw.to(device), qden=qs.qden.to(device), qp=qs.qp.to(device))
    cs = SimpleNamespace(
        prototypes=c.to(device), mask=cm.to(device), pooled=None, weights=w.to(device),
        normalized=False, pooled_normalized=False, dtype=c.dtype,
    )  # fmt: skip
    ref = reference.scores(q.double(), c.double(), w.double(), qm, cm)
    for got, exp in zip(kernels.pecm_scores_fwd(qs, cs), ref):
        np.testing.assert_allclose(got.double().cpu().numpy(), exp, atol=1e-5, rtol=0)
    v, i = kernels.pecm_topk(qs, cs, 5, 1)
    assert_topk_matches(v, i, ref[0], 5, 1e-5)
    v, i = kernels.pecm_rerank(qs, cs, cand[:, :12].clamp_max(19).to(device), 4, 2)
    exp_v, _ = reference.rerank(ref[1], cand[:, :12].clamp_max(19).numpy(), 4)
    np.testing.assert_allclose(v.double().cpu().numpy(), exp_v, atol=1e-5, rtol=0)
