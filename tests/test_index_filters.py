"""Metadata filters (`where=`, `ids=`) of ArchiveIndex.search against the float64 reference over the items that pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_topk_matches

from pecm import reference
from pecm.cli import main as cli
from pecm.index import ArchiveIndex

K, D, N = 4, 16, 300
MODS = ["CT", "MR", "XR"]


def _meta(i):
    if i % 17 == 5:
        return None  # no metadata row
    row = {"modality": MODS[i % 3], "site": i % 4, "flag": i % 5 == 0, "dept": f"d{i % 2}"}
    if i % 7 == 0:
        row["note"] = 'it\'s "quoted"'  # a key and value that need quoting
    return row


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((N, K, D)).astype(np.float32)
    m = rng.random((N, K)) > 0.1
    m[:, 0] = True
    meta = [_meta(i) for i in range(N)]
    path = tmp_path_factory.mktemp("f") / "ix"
    with ArchiveIndex.create(path, K, D, dtype="float32") as idx:
        idx.add(x[:200], m[:200], metadata=meta[:200], progress=False)
        idx.add(x[200:], m[200:], metadata=meta[200:], progress=False)
        idx.delete([0, 9, 44])
    q = rng.standard_normal((3, K, D)).astype(np.float32)
    ref = reference.scores(q, x, np.ones(K), c_mask=m)[2]  # R, float64 [B, N]
    return path, ref, meta, q


def _passes(meta, i, where, ids):
    if i in (0, 9, 44) or (ids is not None and i not in ids):
        return False
    row = meta[i] or {}
    return all(row.get(k) == v and (v is None or type(row.get(k)) is type(v)) for k, v in where.items())


CASES = [
    ({"modality": "CT"}, None),  # a third of the rows: the streamed scan with the filter inside
    ({"modality": "CT", "site": 2}, None),  # ~1/12: gathered rows
    ({"flag": True}, None),
    ({"site": 3, "dept": "d1"}, None),
    ({"note": 'it\'s "quoted"'}, None),
    ({"flag": None}, None),  # items without the key (the items without metadata too)
    ({}, list(range(0, N, 3))),
    ({"modality": "MR"}, [1, 4, 7, 10, 13, 250, 299, 9]),
    ({"modality": "PET"}, None),  # nothing passes
    ({"site": 2}, []),
]


@pytest.mark.parametrize("mode", ["exhaustive", "two_stage"])
@pytest.mark.parametrize("where,ids", CASES)
@pytest.mark.parametrize("k", [1, 10, 400])
def test_filtered_search_is_exact(built, mode, where, ids, k):
    path, ref, meta, q = built
    keep = np.array([i for i in range(N) if _passes(meta, i, where, ids)], dtype=np.int64)
    with ArchiveIndex.open(path) as idx:
        s, got, rows = idx.search(q, k, mode=mode, shortlist=N, chunk_size=32, where=where or None, ids=ids)
    assert ((got == -1) | np.isin(got, keep)).all()
    if keep.size == 0:
        assert (got == -1).all() and np.isneginf(s).all()
        return
    local = np.searchsorted(keep, np.where(got >= 0, got, keep[0]))
    local = np.where(got >= 0, local, -1)
    assert_topk_matches(torch.from_numpy(s), torch.from_numpy(local), ref[:, keep], k, 1e-5)
    for b in range(q.shape[0]):  # metadata rows come with the hits
        for i, row in zip(got[b], rows[b]):
            assert (row is None) == (i < 0) and (row is None or row["id"] == i)


def test_bad_filters_name_the_argument(built):
    path, *_ = built
    with ArchiveIndex.open(path) as idx:
        q = np.ones((K, D), np.float32)
        for where, err, pat in [
            ("modality=CT", TypeError, "where"),
            ({"": 1}, ValueError, "where"),
            ({"id": 3}, ValueError, "where"),
            ({"site": [1, 2]}, TypeError, r"where\['site'\]"),
            ({"site": float("nan")}, ValueError, r"where\['site'\]"),
            ({"modality": 3}, TypeError, r"where\['modality'\]"),
        ]:
            with pytest.raises(err, match=pat):
                idx.search(q, 3, where=where)
        with pytest.raises(TypeError, match="ids"):
            idx.search(q, 3, ids=[1.5])
        with pytest.raises(TypeError, match="ids"):
            idx.search(q, 3, ids=[[1, 2]])


def test_filter_index_and_cli(built, tmp_path, capsys):
    path, ref, meta, q = built
    import json
    import shutil

    p = tmp_path / "ix"
    shutil.copytree(path, p)
    with ArchiveIndex.open(p, mode="a") as idx:
        idx.add_filter_index(["site", "modality"])
        plan = idx.meta.db.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM items WHERE json_extract(extras, '$.\"site\"') = 2"
        ).fetchall()
        assert any("USING INDEX" in str(r) for r in plan), plan
    np.save(tmp_path / "q.npy", q[:1])
    args = ["search", str(p), "--query-file", str(tmp_path / "q.npy"), "-k", "5", "--json"]
    assert cli([*args, "--where", "modality=CT", "--where", "site=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    hits = [row for row in out["metadata"][0] if row is not None]
    assert len(hits) == 5 and all(h["modality"] == "CT" and h["site"] == 2 for h in hits)
    assert cli([*args, "--ids", "1,2,3,4,5,6,7,8"]) == 0
    assert set(json.loads(capsys.readouterr().out)["ids"][0]) <= set(range(1, 9))
    assert cli([*args, "--where", "nokey"]) == 2
