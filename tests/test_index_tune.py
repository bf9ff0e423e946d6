"""`ArchiveIndex.tune` / `pecm index tune`: recall table against exhaustive search, stored defaults used by
``mode="auto"`` and by ann / two_stage searches without a shortlist."""

from __future__ import annotations

import json
import shutil

import pytest
from test_index_ann import D, K, clustered

from pecm.cli import main as cli
from pecm.index import ArchiveIndex, IndexCorruptError


@pytest.fixture(scope="module")
def ix(tmp_path_factory):
    x, _ = clustered(3000, seed=4)
    path = tmp_path_factory.mktemp("tune") / "ix"
    with ArchiveIndex.create(path, K, D) as idx:
        idx.add(x, progress=False)
        idx.build_ann("ivf_flat", progress=False, nlist=32, nprobe=1)
    return path


def test_tune_stores_the_cheapest_setting_reaching_the_target(ix, tmp_path):
    p = tmp_path / "ix"
    shutil.copytree(ix, p)
    with ArchiveIndex.open(p, mode="a") as idx:
        res = idx.tune(target=0.9, k=10, n_queries=24, progress=False)
        table = res["table"]
        assert table[0]["mode"] == "exhaustive" and table[0]["recall"] == 1.0
        assert {r["mode"] for r in table} == {"exhaustive", "two_stage", "ann"}
        assert {r["nprobe"] for r in table if r["mode"] == "ann"} == {1, 2, 4, 8, 16, 32}
        c = res["chosen"]
        assert c["recall"] >= 0.9 and c["mode"] in ("ann", "two_stage")
        ok = [r for r in table if r["recall"] >= 0.9 and r["mode"] != "exhaustive"]
        assert c["ms_b1"] == min(r["ms_b1"] for r in ok)
        d = idx.manifest["search_defaults"]
        assert d["mode"] == c["mode"] and d[c["mode"]]["shortlist"] == c["shortlist"]
    with ArchiveIndex.open(p) as idx:
        q = clustered(3000, seed=4)[0][:5]
        explicit = dict(mode=c["mode"], shortlist=c["shortlist"], **({"nprobe": c["nprobe"]} if c["nprobe"] else {}))
        assert idx.search(q, 10, mode="auto")[1].tolist() == idx.search(q, 10, **explicit)[1].tolist()
    with ArchiveIndex.open(p, mode="a") as idx:  # a new ANN invalidates the ann defaults only
        idx.build_ann("flat", progress=False)
        assert "ann" not in (idx.manifest.get("search_defaults") or {})


def test_tune_cli_and_bad_input(ix, tmp_path, capsys):
    p = tmp_path / "ix"
    shutil.copytree(ix, p)
    assert cli(["index", "tune", str(p), "--queries", "8", "--dry-run", "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["queries"] == 8 and len(res["table"]) > 3
    with ArchiveIndex.open(p) as idx:
        assert idx.manifest.get("search_defaults") is None  # --dry-run stored nothing
    assert cli(["index", "tune", str(p), "--target-recall", "2", "--no-progress"]) == 2
    assert cli(["index", "tune", str(p), "--queries", "8", "--no-progress"]) == 0
    assert "stored defaults" in capsys.readouterr().out
    m = json.loads((p / "manifest.json").read_text())
    for bad in ({"mode": "fast"}, {"ann": {"shortlist": 0}}, {"ann": {"nprobe": "8"}}, {"other": 1}, [1]):
        (p / "manifest.json").write_text(json.dumps({**m, "search_defaults": bad}))
        with pytest.raises(IndexCorruptError, match="search_defaults"):
            ArchiveIndex.open(p)
