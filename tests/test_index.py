"""ArchiveIndex: storage format, add/get/delete/compact and search vs pecm.ops / pecm.reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pecm import ops, reference
from pecm.index import ArchiveIndex

K, D = 5, 12


def _data(n, seed=0, mask_p=0.3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, K, D)).astype(np.float32) * rng.uniform(0.5, 3.0, (n, K, 1)).astype(np.float32)
    m = rng.random((n, K)) > mask_p
    m[:, 0] = True
    w = rng.uniform(0.2, 1.8, K)
    return x, m, w


@pytest.fixture
def built(tmp_path):
    x, m, w = _data(230)
    idx = ArchiveIndex.create(tmp_path / "ix", K, D, dtype="float32", weights=w)
    meta = [{"text": f"report {i}", "source": f"img{i}.jpg", "modality": "image", "cui": [i]} for i in range(100)]
    ids_a = idx.add(x[:100], m[:100], metadata=meta)
    ids_b = idx.add(x[100:], m[100:], progress=False)
    yield idx, x, m, w, np.concatenate([ids_a, ids_b])
    idx.close()


def test_stored_layout_matches_contract(built):
    idx, x, m, w, ids = built
    assert len(idx) == 230 and ids.tolist() == list(range(230))
    protos = np.asarray(idx.array("prototypes"), dtype=np.float64)
    norms = np.linalg.norm(protos, axis=-1)
    np.testing.assert_allclose(norms[m], 1.0, atol=1e-5)
    assert np.all(protos[~m] == 0)  # masked-out prototypes are exactly zero
    np.testing.assert_array_equal(np.asarray(idx.array("masks")).astype(bool), m)
    pooled = np.asarray(idx.array("pooled"), dtype=np.float64)
    for i in (0, 57, 229):
        np.testing.assert_allclose(pooled[i], reference.pooled(x[i].astype(np.float64), w, m[i]), atol=1e-5)


@pytest.mark.parametrize("by", ["score", "sim", "conf"])
def test_exhaustive_matches_ops_and_reference(built, by):
    idx, x, m, w, _ = built
    rng = np.random.default_rng(1)
    q = rng.standard_normal((3, K, D)).astype(np.float32)
    qm = rng.random((3, K)) > 0.2
    s, i, meta = idx.search(q, 7, by=by, q_mask=qm, chunk_size=37, backend="torch")
    rv, ri = ops.pecm_topk(q, x, w, 7, q_mask=qm, c_mask=m, by=by, backend="torch")
    np.testing.assert_array_equal(i, ri.numpy())
    np.testing.assert_allclose(s, rv.numpy(), atol=1e-5)
    sim, conf, score = reference.scores(q, x, w, q_mask=qm, c_mask=m)
    ref_v, ref_i = reference.topk({"score": score, "sim": sim, "conf": conf}[by], 7)
    np.testing.assert_allclose(s, ref_v, atol=1e-5)
    np.testing.assert_array_equal(i, ref_i)
    assert meta[0][0]["id"] == i[0, 0]


def test_two_stage_full_shortlist_equals_exhaustive_and_meta(built):
    idx, *_ = built
    q = np.random.default_rng(2).standard_normal((4, K, D)).astype(np.float32)
    s1, i1, _ = idx.search(q, 5, chunk_size=50)
    s2, i2, meta = idx.search(q, 5, mode="two_stage", shortlist=230)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    # a short shortlist reranks only the best items by pooled sim
    _, i3, _ = idx.search(q, 5, mode="two_stage", shortlist=20)
    _, sim_ids, _ = idx.search(q, 20, by="sim")
    for b in range(4):
        assert set(i3[b]) <= set(sim_ids[b])
    row = next(r for r in meta[0] if r["id"] < 100)
    assert row["text"] == f"report {row['id']}" and row["cui"] == [row["id"]]


def test_k_larger_than_n_and_empty_index(tmp_path):
    x, m, w = _data(6)
    idx = ArchiveIndex.create(tmp_path / "e", K, D, weights=w)
    q = x[:2]
    for mode in ("exhaustive", "two_stage"):
        s, i, meta = idx.search(q, 3, mode=mode)
        assert np.all(i == -1) and np.all(np.isneginf(s)) and meta[0] == [None, None, None]
    idx.add(x, m)
    for mode in ("exhaustive", "two_stage"):
        s, i, _ = idx.search(q, 10, mode=mode)
        assert sorted(i[0, :6].tolist()) == list(range(6)) and np.all(i[:, 6:] == -1)
        assert np.all(np.isneginf(s[:, 6:])) and np.all(np.isfinite(s[:, :6]))


def test_float16_and_int8_close_to_reference(tmp_path):
    x, m, w = _data(120, seed=3)
    q = np.random.default_rng(4).standard_normal((2, K, D)).astype(np.float32)
    _, _, score = reference.scores(q, x, w, c_mask=m)
    for dt, tol in (("float16", 2e-3), ("int8", 2e-2)):
        idx = ArchiveIndex.create(tmp_path / dt, K, D, dtype=dt, weights=w)
        idx.add(x, m)
        for mode in ("exhaustive", "two_stage"):
            s, i, _ = idx.search(q, 5, mode=mode, shortlist=120, chunk_size=33)
            got = score[np.arange(2)[:, None], i]  # exact score of the returned ids
            np.testing.assert_allclose(s, got, atol=tol)
            np.testing.assert_allclose(s[:, 0], score.max(1), atol=2 * tol)
        vec = idx.get([7], vectors=True)[0]
        unit7 = x[7] / np.linalg.norm(x[7], axis=-1, keepdims=True)
        np.testing.assert_allclose(vec["prototypes"][m[7]], unit7[m[7]], atol=tol)
        idx.close()


def test_given_pooled_is_used(tmp_path):
    x, m, w = _data(40, seed=5)
    p = np.random.default_rng(6).standard_normal((40, D)).astype(np.float32)
    idx = ArchiveIndex.create(tmp_path / "p", K, D, dtype="float32", weights=w)
    idx.add(x, m, pooled=p)
    q = x[:2]
    s, i, _ = idx.search(q, 4)
    rv, ri = ops.pecm_topk(q, x, w, 4, c_mask=m, c_pooled=p, backend="torch")
    np.testing.assert_array_equal(i, ri.numpy())
    np.testing.assert_allclose(s, rv.numpy(), atol=1e-5)


def test_delete_compact_keep_ids(built, tmp_path):
    idx, x, m, w, _ = built
    q = np.random.default_rng(7).standard_normal((2, K, D)).astype(np.float32)
    _, before, _ = idx.search(q, 4)
    dead = [int(before[0, 0]), int(before[1, 1]), 5]
    assert idx.delete(dead) == 3 and len(idx) == 227
    keep = np.setdiff1d(np.arange(230), dead)
    rv, ri = ops.pecm_topk(q, x[keep], w, 4, c_mask=m[keep], backend="torch")
    for mode in ("exhaustive", "two_stage"):
        s, i, _ = idx.search(q, 4, mode=mode, shortlist=230, chunk_size=16)
        np.testing.assert_array_equal(i, keep[ri.numpy()])
        assert not set(i.ravel()) & set(dead)
    with pytest.raises(KeyError):
        idx.get([5])
    stale = ArchiveIndex.open(idx.root)
    idx.compact(progress=False)
    assert idx.count == 227 and len(idx) == 227 and idx.stats()["generation"] == 1
    s, i, meta = idx.search(q, 4)
    np.testing.assert_array_equal(i, keep[ri.numpy()])
    assert idx.get([6])[0]["text"] == "report 6"
    new = idx.add(x[:2], m[:2])
    assert new.tolist() == [230, 231]  # ids are never reused
    latest = idx.search(q, 4)[1].tolist()
    idx.close()
    with pytest.raises(ValueError, match="closed"):
        idx.search(q, 4)
    # opened before the compact: its calls move to the latest commit (no deleted item, the current len)
    assert len(stale) == 229 and stale.search(q, 4)[1].tolist() == latest
    with pytest.raises(KeyError):
        stale.get([5])
    again = ArchiveIndex.open(idx.root, verify=True)
    assert len(again) == 229 and again.get([231], vectors=True)[0]["mask"].tolist() == m[1].tolist()


def test_bad_input_is_rejected(built, tmp_path):
    idx, x, m, w, _ = built
    with pytest.raises(ValueError, match="queries"):
        idx.search(np.zeros((2, K + 1, D), np.float32), 3)
    with pytest.raises(ValueError, match="k"):
        idx.search(x[:1], 0)
    with pytest.raises(ValueError, match="mode"):
        idx.search(x[:1], 1, mode="fast")
    with pytest.raises(ValueError, match="prototypes"):
        idx.add(np.zeros((2, K, D + 1), np.float32))
    bad = x[:2].copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        idx.add(bad)
    with pytest.raises(ValueError, match="masks"):
        idx.add(x[:2], m[:1])
    with pytest.raises(ValueError, match="weights"):
        ArchiveIndex.create(tmp_path / "w", K, D, weights=np.ones(K + 1))
    with pytest.raises(FileExistsError):
        ArchiveIndex.create(idx.root, K, D)
    ro = ArchiveIndex.open(idx.root)
    with pytest.raises(ValueError, match="read-only"):
        ro.add(x[:1])
    assert len(ro) == 230  # the failed adds committed nothing
    assert torch.is_tensor(torch.from_numpy(ro.search(x[:1], 1)[0]))


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
        ),
    ],
)
def test_search_on_device_matches_host(built, device):
    idx, x, m, w, _ = built
    q = np.random.default_rng(8).standard_normal((2, K, D)).astype(np.float32)
    for mode in ("exhaustive", "two_stage"):
        s0, i0, _ = idx.search(q, 6, mode=mode, shortlist=230, backend="torch")
        s1, i1, _ = idx.search(q, 6, mode=mode, shortlist=230, device=device)
        np.testing.assert_array_equal(i0, i1)
        np.testing.assert_allclose(s0, s1, atol=1e-5)


def test_bulk_append_paths_keep_data_exact(tmp_path, monkeypatch):
    """The bulk-ingest paths (pages dropped after fsync, 4 MB pwrite pieces, several encoder blocks)
    write exactly what the small-add path writes: forced on here with tiny thresholds."""
    from pecm.index import archive

    x, m, w = _data(300, seed=3)
    monkeypatch.setattr(archive, "DROP_CACHE_BYTES", 1)
    monkeypatch.setattr(archive, "WRITE_CHUNK", 1000)
    monkeypatch.setattr(archive, "ADD_BLOCK", 64)
    bulk = ArchiveIndex.create(tmp_path / "bulk", K, D, weights=w)
    bulk.add(x[:250], m[:250])
    bulk.add(x[250:], m[250:])
    bulk.close()
    monkeypatch.undo()
    plain = ArchiveIndex.create(tmp_path / "plain", K, D, weights=w)
    plain.add(x, m)
    a, b = ArchiveIndex.open(tmp_path / "bulk", verify=True), ArchiveIndex.open(tmp_path / "plain", verify=True)
    for name in ("prototypes", "pooled", "masks", "ids"):
        np.testing.assert_array_equal(np.asarray(a.array(name)), np.asarray(b.array(name)))
