"""ArchiveIndex against hostile or damaged input: crafted manifests, damaged metadata, read-only mounts,
absurd arguments. Every case must end in a clear error naming what is wrong, never a side effect
outside the index directory or a silently wrong answer."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from pecm.cli import main as cli
from pecm.index import ArchiveIndex, IndexCorruptError

K, D = 4, 16


def _items(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, K, D)).astype(np.float32)


@pytest.fixture
def ix(tmp_path):
    path = tmp_path / "ix"
    with ArchiveIndex.create(path, K, D) as idx:
        idx.add(_items(20), metadata=[{"text": f"r{i}", "site": i % 3} for i in range(20)])
        idx.add(_items(10, 1))  # an append without metadata
        idx.delete([3])
    return path


def _edit_manifest(path, **fields):
    p = path / "manifest.json"
    m = json.loads(p.read_text())
    for k, v in fields.items():
        if v is KeyError:
            m.pop(k)
        else:
            m[k] = v
    p.write_text(json.dumps(m))
    return m


# ---------------------------------------------------------------------------------------- manifest
@pytest.mark.parametrize("target", ["relative", "absolute"])
def test_manifest_file_names_cannot_reach_outside(ix, tmp_path, target):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    name = "../victim.txt" if target == "relative" else str(victim)
    m = json.loads((ix / "manifest.json").read_text())
    _edit_manifest(ix, files={**m["files"], "prototypes": name})
    for mode in ("r", "a"):
        with pytest.raises(IndexCorruptError, match="'files'"):
            ArchiveIndex.open(ix, mode=mode)
    np.save(tmp_path / "p.npy", _items(2))
    assert cli(["index", "add", str(ix), "--prototypes", str(tmp_path / "p.npy"), "--no-progress"]) == 2
    assert cli(["index", "compact", str(ix), "--no-progress"]) == 2
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("name", ["prototypes.bin", "ids.bin", "meta.sqlite", "write.lock"])
def test_symlinked_index_files_are_never_written_through(ix, tmp_path, name):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious" * 100)
    os.remove(ix / name) if (ix / name).exists() else None
    os.symlink(victim, ix / name)
    with pytest.raises(IndexCorruptError, match="symbolic link|regular file"):
        with ArchiveIndex.open(ix, mode="a") as idx:
            idx.add(_items(3))
    assert victim.read_bytes() == b"precious" * 100
    if name.endswith(".bin"):  # readers do not follow it either
        with pytest.raises(IndexCorruptError, match=name):
            ArchiveIndex.open(ix)


BAD_FIELDS = [
    ("K", 10**12),
    ("K", "4"),
    ("K", True),
    ("D", 0),
    ("D", 2.5),
    ("dtype", "float64"),
    ("count", -1),
    ("count", 10**30),
    ("count", 29),  # fewer rows than the checksum records cover
    ("next_id", 5),  # below count
    ("generation", -2),
    ("generation", None),
    ("weights", [1.0] * (K - 1)),
    ("weights", [1.0, -1.0, 1.0, 1.0]),
    ("weights", "ones"),
    ("weights", [1.0, {"a": 1}, 1.0, 1.0]),
    ("files", {"prototypes": "prototypes.bin"}),
    ("files", "prototypes.bin"),
    ("checksums", {"start": 0}),
    ("checksums", [{"start": 0, "count": 20, "crc32": {}}, {"start": 20, "count": 10, "crc32": {}}]),
    ("checksums", [[0, 20]]),
    ("tombstones", [10**6]),
    ("tombstones", [3, 3]),
    ("tombstones", ["3"]),
    ("tombstones", 3),
    ("K", KeyError),
    ("checksums", KeyError),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={v!r}"[:40] for f, v in BAD_FIELDS])
def test_damaged_manifest_fields_do_not_open(ix, field, value):
    _edit_manifest(ix, **{field: value})
    with pytest.raises(IndexCorruptError, match=field if value is not KeyError else "lacks"):
        ArchiveIndex.open(ix)
    assert cli(["index", "info", str(ix)]) == 2


def test_manifest_crc_record_tampered(ix):
    m = json.loads((ix / "manifest.json").read_text())
    m["checksums"][0]["crc32"]["pooled"] = -5
    (ix / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexCorruptError, match="'checksums': record 0"):
        ArchiveIndex.open(ix)


HOSTILE_TEXT = ["[" * 100000 + "]" * 100000, '{"format": "pecm-archive-index", "version": "1"}', "[]"]


@pytest.mark.parametrize("text", HOSTILE_TEXT)
def test_hostile_manifest_text(ix, text):
    (ix / "manifest.json").write_text(text)
    with pytest.raises(IndexCorruptError):
        ArchiveIndex.open(ix)


# ---------------------------------------------------------------------------------------- metadata
def _db(ix, sql, *args):
    with sqlite3.connect(ix / "meta.sqlite") as db:
        db.execute(sql, args)


@pytest.mark.parametrize(
    "damage",
    [
        ("UPDATE items SET text = 'forged' WHERE id = 7",),
        ("DELETE FROM items WHERE id = 11",),
        ("INSERT INTO items VALUES (25, 'image', 'x.png', NULL, NULL)",),  # an item that had no metadata
        ("UPDATE items SET extras = '{\"site\": 9}' WHERE id = 4",),
    ],
    ids=["changed", "missing", "added", "extras"],
)
def test_metadata_changes_are_detected_by_verify(ix, damage):
    ArchiveIndex.open(ix, verify=True).close()
    _db(ix, *damage)
    with pytest.raises(IndexCorruptError, match="metadata of rows"):
        ArchiveIndex.open(ix, verify=True)
    assert cli(["index", "verify", str(ix)]) == 2


def test_metadata_of_deleted_items_still_verifies_across_compact(ix):
    with ArchiveIndex.open(ix, mode="a") as idx:
        idx.delete([5, 25])
        ArchiveIndex.open(ix, verify=True).close()
        idx.compact(progress=False)
    with ArchiveIndex.open(ix, verify=True) as idx:
        assert len(idx) == 27 and idx.get([6])[0]["text"] == "r6"
    with sqlite3.connect(ix / "meta.sqlite") as db:  # the deleted items' rows are gone
        assert db.execute("SELECT COUNT(*) FROM items WHERE id IN (3, 5)").fetchone()[0] == 0


@pytest.mark.parametrize("where", ["header", "middle"])
def test_garbled_meta_db_is_index_corrupt_not_sqlite_error(ix, where):
    p = ix / "meta.sqlite"
    data = bytearray(p.read_bytes())
    if where == "header":
        data[:100] = b"\xff" * 100
    else:
        data[len(data) // 2 :] = b"\x00\xff" * ((len(data) - len(data) // 2) // 2)
    p.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError):
        ArchiveIndex.open(ix, verify=True)
    with ArchiveIndex.open(ix) as idx:  # plain open does not read metadata; the first read reports it
        try:
            _, ids, meta = idx.search(_items(1)[0], 30)
        except IndexCorruptError:
            pass
        else:  # the damaged pages held no row that search needed: then every row must still be right
            got = {r["id"]: r.get("text") for r in meta[0]}
            assert all(got[i] == f"r{i}" for i in got if i < 20)
    assert cli(["index", "verify", str(ix)]) == 2


def test_missing_meta_db(ix):
    os.remove(ix / "meta.sqlite")
    with pytest.raises(IndexCorruptError, match="meta.sqlite"):
        ArchiveIndex.open(ix, verify=True)
    with ArchiveIndex.open(ix) as idx, pytest.raises(IndexCorruptError, match="meta.sqlite"):
        idx.get([1])


def test_extras_that_do_not_decode(ix):
    _db(ix, "UPDATE items SET extras = '{broken' WHERE id = 2")
    with ArchiveIndex.open(ix) as idx, pytest.raises(IndexCorruptError, match="extras of item 2"):
        idx.get([2])


# ---------------------------------------------------------------------------------------- read-only
def _ro_mount(src, dst) -> bool:
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    os.makedirs(dst)
    r = subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(dst)], capture_output=True)
    if r.returncode != 0:
        return False
    subprocess.run(["mount", "-o", "remount,bind,ro", str(dst)], capture_output=True)
    return os.statvfs(dst).f_flag & os.ST_RDONLY != 0


def test_read_only_mounted_index_can_be_searched(ix, tmp_path):
    ro = tmp_path / "ro"
    if not _ro_mount(ix, ro):
        pytest.skip("needs root and bind mounts to make a read-only mount (the CI container has them)")
    try:
        before = sorted(os.listdir(ix))
        with ArchiveIndex.open(ro, verify=True) as idx:
            s, ids, meta = idx.search(_items(1)[0], 5)
            assert (ids >= 0).all() and meta[0][0]["id"] == ids[0, 0]
            assert idx.get([7])[0]["text"] == "r7" and len(idx) == 29
            s2, ids2, _ = idx.search(_items(1)[0], 5, mode="two_stage")
        assert sorted(os.listdir(ix)) == before
        assert cli(["index", "verify", str(ro)]) == 0
        with pytest.raises(OSError):
            ArchiveIndex.open(ro, mode="a")
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=True)


# ---------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("bad", [{"K": 10**12}, {"D": 10**7}, {"K": 0}, {"K": True}, {"D": 1.5}])
def test_create_bounds_name_the_argument(tmp_path, bad):
    args = {"K": K, "D": D, **bad}
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"^{name}:"):
        ArchiveIndex.create(tmp_path / "x", args["K"], args["D"])
    assert not (tmp_path / "x").exists()


def test_cli_create_huge_k_exit_2(tmp_path, capsys):
    assert cli(["index", "create", str(tmp_path / "x"), "-K", str(10**12)]) == 2
    assert "K:" in capsys.readouterr().err


@pytest.mark.parametrize("ids", [[1.5], ["a"], [2**70]])
def test_get_and_delete_reject_non_integer_ids(ix, ids):
    with ArchiveIndex.open(ix, mode="a") as idx:
        with pytest.raises((TypeError, ValueError, OverflowError), match="ids"):
            idx.delete(ids)
        with pytest.raises((TypeError, ValueError, OverflowError), match="ids"):
            idx.get(ids)


@pytest.mark.parametrize("k", [2**62, 10**9, 2**31])
def test_search_absurd_k_names_k_before_allocating(ix, tmp_path, capsys, k):
    with ArchiveIndex.open(ix) as idx:
        with pytest.raises(ValueError, match="^k: "):
            idx.search(_items(1)[0], k)
    np.save(tmp_path / "q.npy", _items(1))
    assert cli(["search", str(ix), "--query-file", str(tmp_path / "q.npy"), "-k", str(k)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "k" in err[0]


def test_search_k_beyond_items_is_padded(ix):
    with ArchiveIndex.open(ix) as idx:
        s, ids, _ = idx.search(_items(2), 100)
    assert s.shape == (2, 100) and (ids[:, 29:] == -1).all() and np.isneginf(s[:, 29:]).all()
