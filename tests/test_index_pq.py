"""ArchiveIndex(dtype="pq"): codebook trained at the first add and committed crash-safely, searches scored
from the codes (exhaustive / two_stage / ann / filters) equal to the float64 reference of the decoded
prototypes that get(vectors=True) returns, compact, verify, and the recall floor on clustered data."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

import numpy as np
import pytest
import torch

from pecm import ops, reference
from pecm.index import ArchiveIndex, IndexCorruptError
from pecm.index import format as fmt

pytest.importorskip("faiss")

K, D = 6, 32


def _items(n, seed=0, centres=40, noise=0.8):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn((centres, K, D), generator=g)
    return (c[torch.randint(0, centres, (n,), generator=g)] + noise * torch.randn((n, K, D), generator=g)).numpy()


def _decoded_conf(q, c, cm, w):
    """Float64 confidence of unit query prototypes against the decoded prototypes ``c`` *as they are*
    (Σ_k w_k m_k <q̂_k, c_k> / Σ_k w_k m_k, no renormalisation of c): what scoring from the codes computes."""
    qh = q / np.linalg.norm(q, axis=-1, keepdims=True)
    wm = cm.astype(np.float64) * w  # [N, K]
    num = np.einsum("bkd,nkd,nk->bn", qh, c, wm)
    den = wm.sum(-1)[None, :]
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _ref_topk(idx, q, k, by="score", ids=None):
    """Float64 top-k over the decoded prototypes and stored pooled vectors of live items: exact for the
    decoded values; their float64 `pecm.reference` confidence (which renormalises each decoded prototype)
    agrees to float32 rounding with float32 scales and to the float16 rounding of float16 scales."""
    live = np.setdiff1d(np.asarray(idx.ids()), idx.tombstones) if ids is None else np.asarray(ids)
    rows = idx.get(live, vectors=True)
    c = np.stack([r["prototypes"] for r in rows]).astype(np.float64)
    cm = np.stack([r["mask"] for r in rows])
    qs = ops.prepare_queries(torch.from_numpy(q), torch.from_numpy(idx.weights))
    w = idx.weights.astype(np.float64)
    conf = _decoded_conf(q.astype(np.float64), c, cm, w)
    _, conf_ref, _ = reference.scores(q.astype(np.float64), c, w, c_mask=cm)
    tol = 2e-3 if fmt.pq_storage(idx.manifest)["scales"] == "float16" else 1e-5
    np.testing.assert_allclose(conf, conf_ref, atol=tol)
    pooled = np.stack([r["pooled"] for r in rows]).astype(np.float64)
    sim = qs.qp.double().numpy() @ pooled.T
    vals = {"score": sim * conf, "sim": sim, "conf": conf}[by]
    v, i = reference.topk(vals, k)
    return v, np.where(i >= 0, live[np.maximum(i, 0)], -1)


# (coarse stages, pooled, scales): the storage of indexes written before pq_pooled / pq_scales, and the defaults
STORAGE = [(0, "float16", "float32"), (2, "int8", "float16")]


@pytest.fixture(params=STORAGE, ids=["coarse0-f16pooled-f32scales", "coarse2-int8pooled-f16scales"])
def pq_index(tmp_path, request):
    x = _items(1500)
    masks = np.random.default_rng(1).random((1500, K)) > 0.1
    r, pooled, scales = request.param
    idx = ArchiveIndex.create(
        tmp_path / "pq", K, D, dtype="pq", pq_m=8, pq_coarse=r, pq_pooled=pooled, pq_scales=scales
    )
    meta = [{"modality": "CT" if i % 3 == 0 else "MR", "site": i % 4} for i in range(1500)]
    idx.add(x, masks=masks, metadata=meta)
    return idx


def test_layout_and_bytes(pq_index):
    idx = pq_index
    assert idx.manifest["pq"]["codebook"]["file"] == fmt.PQ_CODEBOOK
    st = idx.stats()
    r = idx.manifest["pq"]["coarse"]
    store = fmt.pq_storage(idx.manifest)
    want = {"m": 8, "per_slot": False, "coarse": r, "codebook_bytes": 4 * D * 256 * (1 + K * r), **store}
    assert st["pq"] == want
    assert idx.codebook.r == r and os.path.getsize(os.path.join(idx.root, fmt.PQ_CODEBOOK)) == 4 * D * 256 * (1 + K * r)
    per_item = sum(idx.item_bytes.values())
    scale_b = {"float16": 2, "float32": 4}[store["scales"]]
    pooled_b = {"int8": 1, "float16": 2}[store["pooled"]]
    assert per_item == K * (8 + r) + K * scale_b + D * pooled_b + K + 8  # codes, scales, pooled, mask, id
    assert np.asarray(idx.array("prototypes")).dtype == np.uint8
    assert np.asarray(idx.array("prototypes")).shape == (1500, K, 8 + r)
    assert np.asarray(idx.array("pooled")).dtype == np.dtype(store["pooled"])
    assert np.asarray(idx.array("scales")).dtype == np.dtype(store["scales"])
    got = idx.get([0, 1], vectors=True)
    assert got[0]["prototypes"].shape == (K, D) and got[0]["pooled"].dtype == np.float32
    nrm = np.linalg.norm(got[0]["prototypes"], axis=-1)
    np.testing.assert_allclose(nrm[got[0]["mask"]], 1.0, atol=1e-5 if store["scales"] == "float32" else 5e-4)
    assert np.all(nrm[~got[0]["mask"]] == 0)
    np.testing.assert_allclose(np.linalg.norm(got[0]["pooled"]), 1.0, atol=1e-6 if store["pooled"] == "int8" else 1e-3)
    if store["pooled"] == "int8":  # decoded as r / ||r|| of the stored int8 row, close to the unit pooled vector
        row = np.asarray(idx.array("pooled"))[0].astype(np.float64)
        np.testing.assert_allclose(got[0]["pooled"], row / np.linalg.norm(row), atol=1e-6)
        exact = ArchiveIndex.create(idx.root + "-f16", K, D, weights=idx.weights)
        exact.add(_items(1500)[:2], masks=np.random.default_rng(1).random((1500, K))[:2] > 0.1, progress=False)
        assert np.abs(got[0]["pooled"] - exact.get([0], vectors=True)[0]["pooled"]).max() < 1e-2
        exact.close()
    ArchiveIndex.open(idx.root, verify=True).close()


@pytest.mark.parametrize("by", ["score", "conf"])
@pytest.mark.parametrize("mode", ["exhaustive", "two_stage"])
def test_search_matches_decoded_reference(pq_index, by, mode):
    idx = pq_index
    q = _items(4, seed=9)
    kw = {"shortlist": 1500} if mode == "two_stage" else {"chunk_size": 256}  # shortlist = all: exact
    s, i, _ = idx.search(q, 10, mode=mode, by=by, with_metadata=False, **kw)
    rv, ri = _ref_topk(idx, q, 10, by)
    np.testing.assert_allclose(s, rv, atol=2e-5)
    for b in range(len(q)):  # ids carry their own reference value (ties in any order)
        assert len(set(i[b].tolist())) == 10


def test_filters_deletes_and_compact(pq_index):
    idx = pq_index
    q = _items(3, seed=11)
    idx.delete([0, 3, 6])
    s, i, meta = idx.search(q, 5, where={"modality": "CT"})
    allowed = [j for j in range(1500) if j % 3 == 0 and j not in (0, 3, 6)]
    rv, ri = _ref_topk(idx, q, 5, ids=allowed)
    np.testing.assert_allclose(s, rv, atol=2e-5)
    assert all(m["modality"] == "CT" for row in meta for m in row)
    before = idx.get([9], vectors=True)[0]["prototypes"]
    idx.compact(progress=False)
    assert idx.manifest["generation"] == 1 and os.path.exists(os.path.join(idx.root, fmt.PQ_CODEBOOK))
    np.testing.assert_array_equal(idx.get([9], vectors=True)[0]["prototypes"], before)
    s2, i2, _ = idx.search(q, 5, where={"modality": "CT"}, with_metadata=False)
    np.testing.assert_allclose(s2, s, atol=1e-6)
    ArchiveIndex.open(idx.root, verify=True).close()


def test_ann_mode(pq_index):
    idx = pq_index
    idx.build_ann("flat")  # exact first stage: the ann result is the exact top-k of a full shortlist
    q = _items(3, seed=12)
    s, i, _ = idx.search(q, 10, mode="ann", shortlist=1500, with_metadata=False)
    se, ie, _ = idx.search(q, 10, with_metadata=False)
    np.testing.assert_allclose(s, se, atol=1e-6)
    idx.add(_items(50, seed=13))  # added since the build: found through the exact tail
    s, i, _ = idx.search(idx.get([1520], vectors=True)[0]["prototypes"], 1, mode="ann", with_metadata=False)
    assert i[0, 0] == 1520


def test_codebook_fixed_after_first_add(pq_index):
    idx = pq_index
    cb = idx.codebook.centroids.copy()
    idx.add(_items(300, seed=5))
    np.testing.assert_array_equal(idx.codebook.centroids, cb)
    with pytest.raises(ValueError, match="already trained"):
        idx.train_pq(_items(300))


def test_train_pq_then_small_adds(tmp_path):
    idx = ArchiveIndex.create(tmp_path / "p", K, D, dtype="pq", pq_m=4, pq_per_slot=True)
    with pytest.raises(ValueError, match="at least 256"):
        idx.add(_items(10))  # a first add too small to train on: nothing is committed
    assert idx.count == 0 and not os.path.exists(os.path.join(idx.root, fmt.PQ_CODEBOOK))
    idx.train_pq(_items(400, seed=2))
    assert idx.count == 0 and idx.codebook.s == K
    idx.add(_items(3, seed=3))
    idx.add(_items(2, seed=4))
    assert len(idx) == 5
    q = _items(2, seed=6)
    s, i, _ = idx.search(q, 5, with_metadata=False)
    rv, _ = _ref_topk(idx, q, 5)
    np.testing.assert_allclose(s, rv, atol=2e-5)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="pq_m"):
        ArchiveIndex.create(tmp_path / "a", K, D, dtype="pq", pq_m=5)
    with pytest.raises(ValueError, match="pq_m"):
        ArchiveIndex.create(tmp_path / "b", K, D, dtype="float16", pq_m=4)
    with pytest.raises(TypeError, match="pq_per_slot"):
        ArchiveIndex.create(tmp_path / "c", K, D, dtype="pq", pq_per_slot="yes")
    with pytest.raises(ValueError, match="pq_coarse"):
        ArchiveIndex.create(tmp_path / "e", K, D, dtype="pq", pq_coarse=9)
    with pytest.raises(ValueError, match="pq_coarse"):
        ArchiveIndex.create(tmp_path / "f", K, D, pq_coarse=1)
    with pytest.raises(ValueError, match="pq_pooled"):
        ArchiveIndex.create(tmp_path / "g", K, D, dtype="pq", pq_pooled="float32")
    with pytest.raises(ValueError, match="pq_scales"):
        ArchiveIndex.create(tmp_path / "h", K, D, dtype="pq", pq_scales="int8")
    with pytest.raises(ValueError, match="pq_pooled"):
        ArchiveIndex.create(tmp_path / "i", K, D, dtype="int8", pq_pooled="int8")
    idx = ArchiveIndex.create(tmp_path / "d", K, D)
    with pytest.raises(ValueError, match="train_pq"):
        idx.train_pq(_items(300))


def test_corrupt_codebook_detected(pq_index):
    idx = pq_index
    root = idx.root
    idx.close()
    p = os.path.join(root, fmt.PQ_CODEBOOK)
    with open(p, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(IndexCorruptError, match="pq_codebook"):
        ArchiveIndex.open(root, verify=True)
    with open(p, "r+b") as f:
        f.truncate(64)
    with pytest.raises(IndexCorruptError, match="pq_codebook"):
        ArchiveIndex.open(root)


def _first_add_killed(path, ready):
    idx = ArchiveIndex.open(path, mode="a")
    orig = fmt.write_manifest

    def stop(*a, **kw):  # the codebook and the rows are written and fsynced; the commit never happens
        ready.set()
        os.kill(os.getpid(), signal.SIGSTOP)
        return orig(*a, **kw)

    fmt.write_manifest = stop
    idx.add(_items(600))


def test_sigkill_during_first_add(tmp_path):
    path = str(tmp_path / "k")
    ArchiveIndex.create(path, K, D, dtype="pq", pq_m=8).close()
    ctx = mp.get_context("forkserver")  # (a forked child of a process that ran OpenMP can hang)
    ready = ctx.Event()
    p = ctx.Process(target=_first_add_killed, args=(path, ready))
    p.start()
    assert ready.wait(120)
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    assert os.path.exists(os.path.join(path, fmt.PQ_CODEBOOK))  # written, never committed
    r = ArchiveIndex.open(path, verify=True)
    assert r.count == 0 and r.codebook is None
    w = ArchiveIndex.open(path, mode="a")  # recovery drops the uncommitted codebook
    assert not os.path.exists(os.path.join(path, fmt.PQ_CODEBOOK))
    w.add(_items(400, seed=1))
    assert len(ArchiveIndex.open(path, verify=True)) == 400


def test_recall_floor_clustered():
    """pq (default M = D / 8, shared codebook) against exact float16 search of the same items: the
    confidence re-ranking survives compression (recall@10 >= 0.9 on this fixed clustered set)."""
    import tempfile

    k2, d2, n = 26, 256, 6000
    g = torch.Generator().manual_seed(0)
    centres = torch.randn((600, k2, d2), generator=g)
    x = centres[torch.randint(0, 600, (n,), generator=g)] + 0.8 * torch.randn((n, k2, d2), generator=g)
    q = (x[:32] + 0.3 * torch.randn((32, k2, d2), generator=g)).numpy()
    with tempfile.TemporaryDirectory() as d:
        a = ArchiveIndex.create(os.path.join(d, "f"), k2, d2)
        a.add(x.numpy())
        b = ArchiveIndex.create(os.path.join(d, "p"), k2, d2, dtype="pq")
        b.add(x.numpy())
        _, ia, _ = a.search(q, 10, with_metadata=False)
        _, ib, _ = b.search(q, 10, with_metadata=False)
    rec = np.mean([len(set(ia[j]) & set(ib[j])) / 10 for j in range(len(q))])
    assert rec >= 0.9, rec


def test_manifest_without_coarse_field_opens(pq_index, tmp_path):
    """A pq manifest written before the coarse stages and the pooled / scales storage fields existed (no
    "coarse", "pooled", "scales" keys) reads as 0 stages, float16 pooled, float32 scales; a bad value is refused
    as corruption."""
    import json

    idx = pq_index
    if idx.manifest["pq"]["coarse"]:
        pytest.skip("the old layout has no coarse stages")
    root = idx.root
    q = _items(2, seed=21)
    s, i, _ = idx.search(q, 5, with_metadata=False)
    idx.close()
    mp_ = os.path.join(root, fmt.MANIFEST)
    m = json.load(open(mp_))
    for key in ("coarse", "pooled", "scales"):
        del m["pq"][key]
    json.dump(m, open(mp_, "w"))
    with ArchiveIndex.open(root, verify=True) as r:
        s2, i2, _ = r.search(q, 5, with_metadata=False)
        np.testing.assert_array_equal(i2, i)
        assert r.codebook.r == 0 and fmt.pq_storage(r.manifest) == {"pooled": "float16", "scales": "float32"}
    for key, bad in (("pooled", "int4"), ("scales", "float64")):
        json.dump({**m, "pq": {**m["pq"], key: bad}}, open(mp_, "w"))
        with pytest.raises(IndexCorruptError, match="pooled must be one of"):
            ArchiveIndex.open(root)
    m["pq"]["coarse"] = -1
    json.dump(m, open(mp_, "w"))
    with pytest.raises(IndexCorruptError, match="coarse"):
        ArchiveIndex.open(root)


def test_hit_sim_and_conf_agree_with_the_score(pq_index):
    """`pecm search` / the service report each hit's sim and conf (`pecm.query.hit_scores`, from the decoded rows);
    their product is the score the codes gave, with float16 scales too (the decoded rows are scored as they are)."""
    from pecm.query import hit_scores

    idx = pq_index
    q = _items(3, seed=31)
    s, i, _ = idx.search(q, 8, with_metadata=False)
    sim, conf = hit_scores(idx._current(), q, None, i)
    np.testing.assert_allclose(sim * conf, s, atol=2e-6)
