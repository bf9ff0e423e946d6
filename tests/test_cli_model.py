"""`pecm train`, `pecm eval` and `pecm demo --quick` on a few shipped ROCO pairs with the tiny preset."""

import json
import os

import numpy as np
import pytest

from pecm import reference
from pecm.cli import main
from pecm.data import load_pairs
from pecm.data.layouts import SAMPLE_ROCO
from pecm.metrics import chance_levels, recall_at_k
from pecm.model.encode import load_encoder

N = 24
TRAIN = ["--data", SAMPLE_ROCO, "--preset", "tiny", "--batch-size", "8", "--limit", str(N), "--no-progress"]


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    assert main(["train", *TRAIN, "--out", str(out), "--epochs", "2", "--lr", "1e-3"]) == 0
    return str(out)


def test_train_writes_checkpoint_metrics_and_curve(ckpt):
    files = set(os.listdir(ckpt))
    assert {
        "config.json",
        "model.safetensors",
        "doc2vec.json",
        "doc2vec.safetensors",
        "train_state.pt",
        "metrics.json",
    } <= files
    assert "loss_curve.png" in files
    hist = json.load(open(os.path.join(ckpt, "metrics.json")))
    assert [h["epoch"] for h in hist] == [1, 2] and all(np.isfinite(h["train"]["loss"]) for h in hist)


def test_train_resume_continues_from_saved_epoch(ckpt, tmp_path, capsys):
    import shutil

    out = tmp_path / "c"
    shutil.copytree(ckpt, out)
    rc, stdout, _ = _run(capsys, "train", *TRAIN, "--out", out, "--epochs", "3", "--lr", "1e-3", "--resume")
    assert rc == 0
    last = json.loads(stdout.strip().splitlines()[-1])
    assert last["epochs"] == 3 and last["last"]["epoch"] == 3
    hist = json.load(open(out / "metrics.json"))
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[:2] == json.load(open(os.path.join(ckpt, "metrics.json")))  # epochs 1-2 kept, not redone


def test_eval_json_object(ckpt, capsys):
    rc, out, _ = _run(capsys, "eval", "--checkpoint", ckpt, "--data", SAMPLE_ROCO, "--limit", N, "--json")
    assert rc == 0
    res = json.loads(out)
    assert set(res) == {"image_to_report", "report_to_image", "cui", "cbir_cui", "n_pairs", "by"}
    assert set(res["image_to_report"]) == set(res["report_to_image"]) == {"R@1", "R@5", "R@10"}
    assert set(res["cui"]) == {"@1", "@5", "@10"}
    assert set(res["cbir_cui"]) == {"@5", "@10", "@50", "baseline@10"}
    assert res["n_pairs"] == N and res["by"] == "score"
    vals = [v for key in ("image_to_report", "report_to_image", "cui", "cbir_cui") for v in res[key].values()]
    assert all(0.0 <= v <= 100.0 for v in vals)


@pytest.mark.parametrize("by,which", [("sim", 0), ("conf", 1), ("score", 2), ("score_pos", 3)])
def test_eval_by_matches_reference(ckpt, capsys, by, which):
    rc, out, _ = _run(capsys, "eval", "--checkpoint", ckpt, "--data", SAMPLE_ROCO, "--limit", N, "--json", "--by", by)
    assert rc == 0
    res = json.loads(out)
    assert res["by"] == by
    # independently: encode the same pairs through the checkpoint's encoder, score with the float64 reference
    pairs = load_pairs(SAMPLE_ROCO, limit=N)
    enc = load_encoder(ckpt)
    ip, im = enc.encode_images(pairs.images)
    tp, tm = enc.encode_texts(pairs.texts)
    sim, conf, score = reference.scores(ip, tp, enc.weights, im, tm)
    mat = (sim, conf, score, sim * np.maximum(conf, 0.0))[which]  # score_pos: R+ = sim * max(C, 0)
    i2r, r2i = recall_at_k(mat), recall_at_k(mat.T)
    for k in (1, 5, 10):
        assert res["image_to_report"][f"R@{k}"] == pytest.approx(i2r[k])
        assert res["report_to_image"][f"R@{k}"] == pytest.approx(r2i[k])


def test_eval_table_has_sim_vs_r_and_chance(ckpt, capsys):
    rc, out, _ = _run(capsys, "eval", "--checkpoint", ckpt, "--data", SAMPLE_ROCO, "--limit", N, "--no-progress")
    assert rc == 0
    rows = {line[:18].strip(): line for line in out.splitlines()}
    assert {"sim only", "R = sim*C", "chance", "raw backbone"} <= set(rows)
    assert f"{chance_levels(N)[10]:.1f}" in rows["chance"]
    assert "R+ = sim*max(C,0)" not in rows  # the evaluation-only ranking: a row only when asked for
    rc, out, _ = _run(capsys, "eval", "--checkpoint", ckpt, "--data", SAMPLE_ROCO, "--limit", N, "--by", "score_pos")
    assert rc == 0 and "R+ = sim*max(C,0)" in {line[:18].strip() for line in out.splitlines()}


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--epochs", "0"], "--epochs"),
        (["--lr", "-1"], "--lr"),
        (["--batch-size", "1"], "--batch-size"),
        (["--val-fraction", "1.5"], "--val-fraction"),
        (["--temperature", "0"], "--temperature"),
        (["--data", "/nonexistent/dir"], "--data"),
        (["--select-best"], "--select-best"),
        (["--theta-lr", "0"], "--theta-lr"),
        (["--backbone-lr", "-0.1"], "--backbone-lr"),
    ],
)
def test_train_bad_flags_exit_2_one_line(tmp_path, capsys, argv, flag):
    rc, out, err = _run(capsys, "train", *TRAIN, "--out", tmp_path / "x", *argv)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and flag in err and err.startswith("pecm: error:")
    assert not (tmp_path / "x").exists()


def test_eval_bad_input_exit_2(ckpt, tmp_path, capsys):
    rc, _, err = _run(capsys, "eval", "--checkpoint", ckpt, "--data", SAMPLE_ROCO, "--by", "bogus")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--by" in err
    rc, _, err = _run(capsys, "eval", "--checkpoint", tmp_path, "--data", SAMPLE_ROCO)
    assert rc == 2 and "config.json" in err


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    rc, stdout, _ = _run(capsys, "demo", "--quick", "--out", out, "--no-progress")
    assert rc == 0
    assert (out / "checkpoint" / "model.safetensors").is_file() and (out / "checkpoint" / "config.json").is_file()
    for mod in ("images", "reports"):
        assert (out / "index" / mod / "manifest.json").is_file()
    assert stdout.count("report -> image  query") == 2 and stdout.count("image -> report  query") == 2
    assert "  1. R=" in stdout and "  3. R=" in stdout
    assert "sim only" in stdout and "R = sim*C" in stdout and "chance" in stdout
    ev = json.load(open(out / "eval.json"))
    assert set(ev["results"]) == {"sim", "score", "conf"} and ev["results"]["score"]["n_pairs"] == 12


def test_eval_test_split_uses_the_seeded_held_out_pairs(ckpt, capsys):
    argv = ["eval", "--checkpoint", ckpt, "--data", SAMPLE_ROCO, "--limit", N, "--json", "--test-split", "0.25"]
    rc, out, _ = _run(capsys, *argv)
    assert rc == 0 and json.loads(out)["n_pairs"] == 6
    rc, _, err = _run(capsys, *argv[:-1], "1.5")
    assert rc == 2 and "test_fraction" in err


@pytest.mark.parametrize("extra,gather", [([], True), (["--local-negatives"], False)])
def test_train_local_negatives_flag_sets_gather(tmp_path, capsys, monkeypatch, extra, gather):
    """DDP negatives: the global batch by default, each rank's own batch with --local-negatives."""
    import pecm.train as T

    seen = {}

    def fake_train(model, pairs, out, cfg, val_pairs=None):
        seen["cfg"] = cfg
        return []

    monkeypatch.setattr(T, "train", fake_train)
    rc, _, _ = _run(capsys, "train", *TRAIN, "--out", tmp_path / "o", *extra)
    assert rc == 0 and seen["cfg"].gather is gather
