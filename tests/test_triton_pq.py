"""`pecm.kernels.pq_topk` / `pq_scores` (product-quantised candidates scored from their codes, fused top-k)
against a float64 numpy reference written here (the codes decoded by gathering the look-up table).

Without CUDA the kernels run on the CPU under TRITON_INTERPRET=1 (set before Triton is first imported;
tests marked ``interpret``, small shapes); with CUDA the same tests run on the GPU (marked ``gpu``).
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
from test_triton_kernels import DEVICES, fresh_triton_backend  # noqa: E402

BY = {"score": 0, "sim": 1, "conf": 2}  # pecm.operands.By values
RTOL, ATOL = 1e-5, 1e-6  # float32 accumulation of K*M (num) and D (sim) terms vs float64


@pytest.fixture(scope="module")
def kernels():
    fresh_triton_backend()
    from pecm.backends.triton_backend import kernels as k

    return k


def make_pq(b, n, kq, m, d, cp_dtype=torch.float32, masks=True, seed=0):
    """Random PQ operands (numpy-friendly CPU tensors) with adversarial rows: exact duplicates (ties), a
    zero-scale row, an all-masked row (den = 0 -> conf = score = 0), a query with qden = 0 (den = 0)."""
    g = torch.Generator().manual_seed(seed)
    lut = torch.randn(b, kq, m, 256, generator=g) / m
    codes = torch.randint(0, 256, (n, kq, m), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, kq, generator=g) + 0.5
    cm = None
    if masks:
        cm = (torch.rand(n, kq, generator=g) > 0.3).to(torch.uint8)
        if n > 4:
            cm[4] = 0  # all masked: den = 0
        scales = scales * cm
    qden = torch.rand(b, kq, generator=g) + 0.1
    if b > 1:
        qden[1] = 0.0  # den = 0 for every candidate of this query
    qsum = qden.sum(1)
    qp = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    cp = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    if n > 8:
        for dst in (5, 7):  # exact duplicates of row 2 -> tied values
            codes[dst], scales[dst], cp[dst] = codes[2], scales[2], cp[2]
            if cm is not None:
                cm[dst] = cm[2]
        scales[3] = 0.0  # zero scales: num = 0
    return lut, codes, scales, cm, qden, qsum, qp, cp.to(cp_dtype)


def ref_pq(lut, codes, scales, cm, qden, qsum, qp, cp):
    """float64 (sim, conf, score) [B, N] of the math at the top of kernels/pq_topk.py (a zero scale
    contributes exactly 0, also against a non-finite table entry: the kernel skips its loads)."""
    lut, scales, qden, qsum = (t.double().numpy() for t in (lut, scales, qden, qsum))
    qp, cp = qp.double().numpy(), cp.double().numpy()
    codes = codes.numpy().astype(np.int64)
    b, kq, m, _ = lut.shape
    kk, mm = np.arange(kq)[:, None], np.arange(m)[None, :]
    part = lut[:, kk[None], mm[None], codes]  # [B, N, K, M]
    num = np.where(scales[None] == 0, 0.0, part.sum(-1) * scales[None]).sum(-1)
    den = np.broadcast_to(qsum[:, None], num.shape) if cm is None else qden @ cm.numpy().astype(np.float64).T
    pos = den > 0
    conf = np.where(pos, num / np.where(pos, den, 1.0), 0.0)
    sim = qp @ cp.T
    return sim, conf, sim * conf


def ref_topk(vals, k, cand=None):
    """Reference sorted values [B, k] (-inf tail) of each query row (its cand rows when given)."""
    out = np.full((vals.shape[0], k), -np.inf)
    for b in range(vals.shape[0]):
        v = vals[b] if cand is None else vals[b, cand[b][cand[b] >= 0]]
        v = np.sort(v[~np.isnan(v)])[::-1][:k]
        out[b, : len(v)] = v
    return out


def check_topk(vals, ids, ref_vals, k, cand=None):
    """Values match the reference top-k; ids tie-aware: the ids whose reference value is strictly above the
    k-th value are exactly those returned with such values, every id's reference value matches its value,
    ids are unique (and in cand), -inf exactly with id -1."""
    vals, ids = vals.double().cpu().numpy(), ids.cpu().numpy()
    exp = ref_topk(ref_vals, k, cand)
    assert vals.shape == ids.shape == exp.shape
    fin = np.isfinite(exp)
    assert np.array_equal(np.isfinite(vals), fin), "padding (-inf) positions differ"
    assert np.all(ids[~fin] == -1) and np.all(ids[fin] >= 0)
    np.testing.assert_allclose(vals[fin], exp[fin], rtol=RTOL, atol=ATOL)
    for b in range(vals.shape[0]):
        got = ids[b][fin[b]]
        assert len(set(got.tolist())) == len(got), "duplicate ids"
        pool = np.arange(ref_vals.shape[1]) if cand is None else cand[b][cand[b] >= 0]
        assert np.all(np.isin(got, pool)), "id not among the candidates"
        np.testing.assert_allclose(ref_vals[b, got], vals[b][fin[b]], rtol=RTOL, atol=ATOL)
        if fin[b].any():
            kth = exp[b][fin[b]][-1]
            strict = {int(i) for i in pool if ref_vals[b, i] > kth + ATOL + RTOL * abs(kth)}
            assert strict <= set(got.tolist()), "a candidate strictly above the k-th value is missing"


def on(device, ops):
    return [None if t is None else t.to(device) for t in ops]


def make_cand(n, b, mc, seed=1):
    """Row ids with -1 padding, tied rows (2, 5, 7 are duplicates when n > 8), a padding-only row."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(n, generator=g) for _ in range(b)]
    if n > 8:  # tied rows first in query 0 (each id still once per row)
        rows[0] = torch.cat([torch.tensor([2, 5, 7]), rows[0][~torch.isin(rows[0], torch.tensor([2, 5, 7]))]])
    cand = torch.stack([r[: min(mc, n)] for r in rows])
    if cand.shape[1] < mc:
        cand = torch.cat([cand, torch.full((b, mc - cand.shape[1]), -1)], 1)
    pad = torch.rand(cand.shape, generator=g) < 0.2
    pad[0, :3] = False
    cand[pad] = -1
    if b > 2:
        cand[2] = -1
    return cand


# (B, N, K, M, D, k): N in {1, 37, 300}, K in {3, 5}, M in {2, 4}, D in {8, 12} with D % M == 0, k in {1, 5, > N}
SHAPES = [
    (1, 1, 3, 2, 8, 1),
    (3, 1, 5, 4, 8, 5),
    (3, 37, 3, 4, 12, 5),
    (1, 37, 5, 2, 12, 40),
    (3, 37, 5, 4, 8, 1),
    (3, 300, 3, 2, 8, 5),
    (1, 300, 5, 4, 12, 303),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-K{}-M{}-D{}-k{}".format(*s))
@pytest.mark.parametrize("masks", [False, True])
def test_pq_topk_matches_reference(kernels, device, shape, masks):
    """Exhaustive and re-rank top-k for every `by`, both pooled dtypes alternating over the cases."""
    b, n, kq, m, d, k = shape
    i = SHAPES.index(shape)
    cp_dtype = (torch.float32, torch.float16)[(i + masks) % 2]
    ops = make_pq(b, n, kq, m, d, cp_dtype=cp_dtype, masks=masks, seed=i)
    ref = ref_pq(*ops)
    dev = on(device, ops)
    cand = make_cand(n, b, max(3, n // 2 + 3), seed=i)
    for j, by in enumerate(("score", "sim", "conf")):
        if (i + j) % 3 == 2 and n > 37:  # the big shapes: two of the three `by` per path (interpreter time)
            continue
        vals, ids = kernels.pq_topk(*dev, k, BY[by])
        assert vals.dtype == torch.float32 and ids.dtype == torch.int64 and vals.shape == (b, k)
        check_topk(vals, ids, ref[(2, 0, 1)[BY[by]]], k)
        vals, ids = kernels.pq_topk(*dev, k, BY[by], cand=cand.to(device))
        assert vals.shape == (b, k)
        check_topk(vals, ids, ref[(2, 0, 1)[BY[by]]], k, cand=cand.numpy())
        if b > 2:
            assert torch.all(ids[2] == -1) and torch.all(torch.isneginf(vals[2]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cp_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("masks", [False, True])
def test_pq_scores_matches_reference(kernels, device, cp_dtype, masks):
    """The unfused values, including den = 0 (all-masked row, zero query weights) -> conf = score = 0."""
    ops = make_pq(3, 37, 5, 4, 12, cp_dtype=cp_dtype, masks=masks, seed=11)
    out = kernels.pq_scores(*on(device, ops))
    for got, exp in zip(out, ref_pq(*ops)):
        assert got.dtype == torch.float32 and got.shape == (3, 37)
        np.testing.assert_allclose(got.double().cpu().numpy(), exp, rtol=RTOL, atol=ATOL)
    assert torch.all(out[1][1] == 0) and torch.all(out[2][1] == 0)  # qden = 0
    if masks:
        assert torch.all(out[1][:, 4] == 0) and torch.all(out[2][:, 4] == 0)  # all masked
    assert torch.all(out[1][:, 3] == 0)  # zero scales


@pytest.mark.parametrize("device", DEVICES)
def test_pq_topk_all_ties_many_splits_and_grid_stride(kernels, device, monkeypatch):
    """Every candidate identical (all values tied), several splits, and a 1-program grid stride."""
    common = sys.modules[kernels.__name__ + ".common"]
    lut, codes, scales, cm, qden, qsum, qp, cp = make_pq(2, 70, 3, 2, 8, masks=False, seed=5)
    codes, scales, cp = codes[:1].expand(70, -1, -1), scales[:1].expand(70, -1), cp[:1].expand(70, -1)
    ops = (lut, codes.contiguous(), scales.contiguous(), None, qden, qsum, qp, cp.contiguous())
    ref = ref_pq(*ops)
    monkeypatch.setattr(common, "MAX_GRID", 1)
    for by in ("score", "conf"):
        vals, ids = kernels.pq_topk(*on(device, ops), 4, BY[by])
        check_topk(vals, ids, ref[(2, 0, 1)[BY[by]]], 4)
    vals, ids = kernels.pq_topk(*on(device, ops), 70, BY["sim"])
    assert sorted(ids[0].tolist()) == list(range(70))
    out = kernels.pq_scores(*on(device, ops))
    np.testing.assert_allclose(out[2].double().cpu().numpy(), ref[2], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_pq_topk_nan_never_ranked_and_odd_m(kernels, device):
    """A NaN table entry (NaN num for the candidates that use it) is never returned; M = 3 (padded to 4)."""
    ops = list(make_pq(1, 37, 3, 3, 12, masks=True, seed=7))
    ops[0][0, 0, 0, ops[1][10, 0, 0]] = float("nan")
    ops[2][10, 0] = 1.0
    ref = ref_pq(*ops)
    nan_rows = np.isnan(ref[1][0])
    assert nan_rows.any()
    vals, ids = kernels.pq_topk(*on(device, ops), 37, BY["conf"])
    check_topk(vals, ids, ref[1], 37)
    assert not set(np.nonzero(nan_rows)[0].tolist()) & set(ids[0].tolist())


@pytest.mark.parametrize("device", DEVICES)
def test_pq_topk_k_above_max_kt(kernels, device, monkeypatch):
    """k > MAX_KT: exhaustive -> streamed `pq_scores` chunks (chunk lowered to run several); with cand ->
    every program keeps its whole MAX_KT slice (a 1024-wide list: slow under the interpreter, so Mc small)."""
    mod = sys.modules[kernels.__name__ + ".pq_topk"]
    monkeypatch.setattr(mod, "FALLBACK_CHUNK", 16)
    ops = make_pq(2, 37, 3, 2, 8, masks=True, seed=9)
    ref = ref_pq(*ops)
    k = kernels.MAX_KT + 5
    vals, ids = kernels.pq_topk(*on(device, ops), k, BY["score"])
    assert vals.shape == (2, k)
    check_topk(vals, ids, ref[2], k)
    cand = torch.full((2, kernels.MAX_KT + 76), -1)  # two slices of MAX_KT positions, each id once per row
    g = torch.Generator().manual_seed(3)
    for b in range(2):
        cand[b, torch.randperm(cand.shape[1], generator=g)[:30]] = torch.randperm(37, generator=g)[:30]
    assert (cand[:, kernels.MAX_KT :] >= 0).any()  # real ids in the second slice too
    vals, ids = kernels.pq_topk(*on(device, ops), k, BY["sim"], cand=cand.to(device))
    check_topk(vals, ids, ref[0], k, cand=cand.numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_pq_topk_bool_mask_out_of_range_ids_and_errors(kernels, device):
    """A bool mask reads like the uint8 one; cand ids outside [-1, N) count as padding; bad k / shapes raise."""
    ops = make_pq(2, 20, 3, 2, 8, masks=True, seed=4)
    ref = ref_pq(*ops)
    as_bool = list(ops)
    as_bool[3] = ops[3].bool()
    cand = torch.tensor([[0, 25, 3, -1, -7, 19], [1, 1000, 2, 4, 5, -1]])
    vals, ids = kernels.pq_topk(*on(device, as_bool), 6, BY["score"], cand=cand.to(device))
    valid = torch.where((cand >= 0) & (cand < 20), cand, -1)
    check_topk(vals, ids, ref[2], 6, cand=valid.numpy())
    with pytest.raises(ValueError, match="k"):
        kernels.pq_topk(*on(device, ops), 0, 0)
    with pytest.raises(ValueError, match="cand"):
        kernels.pq_topk(*on(device, ops), 3, 0, cand=cand.to(torch.int32).to(device))
