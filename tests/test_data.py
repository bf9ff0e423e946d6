"""pecm.data: pairs.jsonl reading, bad-row skipping with counts, split, layouts."""

import json
import os
import shutil

import pytest

from pecm.data import default_data_dir, load_dataset, load_mimic, load_pairs, split_pairs
from pecm.data.layouts import SAMPLE_ROCO

SAMPLE_IMG = os.path.join(SAMPLE_ROCO, "images")


def _good_image(tmp, name):
    src = os.path.join(SAMPLE_IMG, sorted(os.listdir(SAMPLE_IMG))[0])
    os.makedirs(os.path.join(tmp, "images"), exist_ok=True)
    shutil.copy(src, os.path.join(tmp, "images", name))
    return f"images/{name}"


def test_shipped_sample_is_attributed():
    ps = load_pairs(SAMPLE_ROCO)
    assert 300 <= len(ps) <= 400 and not ps.skipped
    assert all(p.extra.get("license", "").startswith("CC BY") and p.extra.get("source") for p in ps.pairs)
    assert all(p.cuis for p in ps.pairs)
    with open(os.path.join(SAMPLE_ROCO, "ATTRIBUTION.tsv")) as f:
        assert len(f.read().strip().splitlines()) == len(ps) + 1
    assert os.path.isfile(default_data_dir() + "/pairs.jsonl")


def test_bad_rows_are_skipped_and_counted(tmp_path, caplog):
    t = str(tmp_path)
    good = _good_image(t, "a.jpg")
    with open(os.path.join(t, "images", "broken.jpg"), "wb") as f:
        f.write(b"not a jpeg at all")
    rows = [
        {"id": "a", "image": good, "caption": "Chest x-ray.", "cuis": ["C1"], "license": "CC BY"},
        {"id": "b", "image": "images/missing.jpg", "caption": "x"},
        {"id": "c", "image": "images/broken.jpg", "caption": "x"},
        {"id": "d", "image": good, "caption": "   "},
        {"id": "e", "image": good, "report": "A report. Second sentence."},
        {"id": "a", "image": good, "caption": "duplicate"},
        {"image": good, "caption": "no id"},
    ]
    with open(os.path.join(t, "pairs.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write("{not json\n")
    with caplog.at_level("WARNING", logger="pecm.data"):
        ps = load_pairs(t)
    assert [p.id for p in ps.pairs] == ["a", "e"]
    assert ps.pairs[1].text == "A report. Second sentence."  # "report" is read when present
    assert ps.pairs[0].extra == {"license": "CC BY"}
    reasons = sorted(r for _, r in ps.skipped)
    assert reasons == sorted(
        ["missing image", "unreadable image", "empty text", "duplicate id", "missing id or image", "invalid JSON"]
    )
    assert "skipped 6 bad rows" in caplog.text


def test_no_valid_rows_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="pairs.jsonl"):
        load_pairs(str(tmp_path))
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"id": "x", "image": "nope.jpg", "caption": "c"}) + "\n")
    with pytest.raises(ValueError, match="no valid pairs"):
        load_pairs(str(tmp_path))


def test_split_is_seeded_and_disjoint():
    ps = load_pairs(SAMPLE_ROCO, limit=50)
    a_tr, a_te = split_pairs(ps, 0.2, seed=3)
    b_tr, b_te = split_pairs(ps, 0.2, seed=3)
    assert [p.id for p in a_te] == [p.id for p in b_te] and len(a_te) == 10
    assert not {p.id for p in a_tr} & {p.id for p in a_te} and len(a_tr) + len(a_te) == 50
    with pytest.raises(ValueError, match="test_fraction"):
        split_pairs(ps, 1.5)


def test_mimic_layout(tmp_path):
    t = str(tmp_path)
    study = os.path.join(t, "files", "p10", "p10000032", "s50414267")
    os.makedirs(study)
    shutil.copy(os.path.join(SAMPLE_IMG, sorted(os.listdir(SAMPLE_IMG))[0]), os.path.join(study, "d1.jpg"))
    with open(study + ".txt", "w") as f:
        f.write("FINDINGS: No acute process.\nIMPRESSION: Normal chest.")
    empty = os.path.join(t, "files", "p10", "p10000032", "s2")
    os.makedirs(empty)  # no image, no report: skipped
    ps = load_mimic(t)
    assert [p.id for p in ps.pairs] == ["s50414267"] and "IMPRESSION" in ps.pairs[0].text
    assert len(ps.skipped) == 1
    assert [p.id for p in load_dataset(t).pairs] == ["s50414267"]
    with pytest.raises(ValueError, match="layout"):
        load_dataset(t, layout="other")
