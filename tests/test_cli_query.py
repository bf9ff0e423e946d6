"""`pecm search` as a query tool: batch queries (--texts-file, --images), --json on every command, lazy imports
(`--help` and bad input load no torch), progress bars only on a terminal, quiet exit on a closed pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pecm.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _py(code: str, *args, timeout=120):
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random PECM checkpoint and two indexes it filled (6 reports, 4 images of the shipped sample)."""
    pytest.importorskip("pecm.model.encode")
    import torch

    from pecm.data import load_pairs
    from pecm.data.layouts import SAMPLE_ROCO
    from pecm.model.config import PECMConfig
    from pecm.model.pecm import PECM

    d = tmp_path_factory.mktemp("query")
    pairs = load_pairs(SAMPLE_ROCO, limit=6)
    texts = [" ".join(p.text.split())[:300] for p in pairs.pairs]
    images = [p.image for p in pairs.pairs][:4]
    torch.manual_seed(0)
    m = PECM(PECMConfig.tiny(), load_pretrained=False)
    m.text.fit(texts * 3)
    ckpt = d / "ckpt"
    m.save(str(ckpt))
    (d / "reports.txt").write_text("\n".join(texts) + "\n")
    for name, src in (("reports", ["--texts-file", d / "reports.txt"]), ("images", ["--images", *images])):
        assert main(["index", "create", str(d / name), "--checkpoint", str(ckpt)]) == 0
        assert main(["index", "add", str(d / name), "--checkpoint", str(ckpt), *map(str, src)]) == 0
    return {"dir": d, "ckpt": ckpt, "texts": texts, "images": images}


def _search(capsys, ix, ckpt, *q, k=3):
    rc, out, err = _run(capsys, "search", ix, "--checkpoint", ckpt, *q, "-k", k, "--json")
    assert rc == 0, err
    return json.loads(out)


def _same(batch, singles):
    assert len(batch["queries"]) == len(singles)
    for b, one in enumerate(singles):
        assert batch["ids"][b] == one["ids"][0]
        np.testing.assert_allclose(batch["scores"][b], one["scores"][0], rtol=1e-5, atol=1e-6)
        assert [h["id"] for h in batch["queries"][b]["hits"]] == batch["ids"][b]
        assert [h["score"] for h in batch["queries"][b]["hits"]] == batch["scores"][b]


def test_texts_file_equals_each_query_alone(model, capsys):
    d, ckpt, texts = model["dir"], model["ckpt"], model["texts"][:3]
    (d / "q.txt").write_text("\n".join(texts) + "\n\n")
    (d / "q.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    singles = [_search(capsys, d / "images", ckpt, "--text", t) for t in texts]
    batch = _search(capsys, d / "images", ckpt, "--texts-file", d / "q.txt")
    _same(batch, singles)
    assert [q["query"] for q in batch["queries"]] == texts
    jl = _search(capsys, d / "images", ckpt, "--texts-file", d / "q.jsonl")
    assert jl["ids"] == batch["ids"] and jl["scores"] == batch["scores"]
    # the report index finds each report itself first
    rep = _search(capsys, d / "reports", ckpt, "--texts-file", d / "q.txt", k=1)
    assert [r[0]["text"] for r in rep["metadata"]] == texts


def test_images_equal_each_query_alone(model, capsys):
    d, ckpt, images = model["dir"], model["ckpt"], model["images"][:3]
    singles = [_search(capsys, d / "reports", ckpt, "--image", p) for p in images]
    batch = _search(capsys, d / "reports", ckpt, "--images", *images)
    _same(batch, singles)
    assert [q["query"] for q in batch["queries"]] == images


def test_human_output_grouped_per_query_with_report_text(model, capsys):
    d, ckpt, texts = model["dir"], model["ckpt"], model["texts"]
    rc, out, _ = _run(capsys, "search", d / "reports", "--checkpoint", ckpt, "--texts-file", d / "reports.txt", "-k", 2)
    assert rc == 0
    heads = [ln for ln in out.splitlines() if ln.startswith("query ")]
    assert len(heads) == len(texts) and heads[0].startswith(f"query 1/{len(texts)}: ")
    shown = texts[0] if len(texts[0]) <= 100 else texts[0][:90]
    assert shown in out  # a report hit is printed with its text
    assert max(len(ln) for ln in out.splitlines()) <= 100 + 40  # long texts are cut ("...")


def test_batch_input_errors_are_one_line(model, capsys, tmp_path):
    d, ckpt = model["dir"], model["ckpt"]
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no text field"}\n')
    for argv, needle in (
        (["--texts-file", tmp_path / "empty.txt"], "holds no report"),
        (["--texts-file", tmp_path / "bad.jsonl"], "line 2"),
        (["--images", model["images"][0], tmp_path / "nope.png"], "--images: no such file"),
    ):
        rc, _, err = _run(capsys, "search", d / "reports", "--checkpoint", ckpt, *argv)
        assert rc == 2 and needle in err and err.count("\n") == 1 and err.startswith("pecm: error:"), err
    rc, _, err = _run(capsys, "search", d / "reports", "--texts-file", d / "reports.txt")
    assert rc == 2 and "needs --checkpoint" in err


def test_json_on_every_command(tmp_path, capsys):
    rng = np.random.default_rng(0)
    K, D = 4, 16
    np.save(tmp_path / "p.npy", rng.standard_normal((300, K, D)).astype(np.float32))
    np.save(tmp_path / "q.npy", rng.standard_normal((2, K, D)).astype(np.float32))
    np.save(tmp_path / "q1.npy", rng.standard_normal((K, D)).astype(np.float32))
    ix = tmp_path / "ix"

    def js(*argv):
        rc, out, err = _run(capsys, *argv, "--json")
        assert rc == 0, err
        lines = out.strip().splitlines()
        assert len(lines) == 1, out  # one JSON object, nothing else on stdout
        return json.loads(lines[0])

    assert js("index", "create", ix, "-K", K, "-D", D) == {"path": str(ix), "K": K, "D": D, "dtype": "float16"}
    assert js("index", "add", ix, "--prototypes", tmp_path / "p.npy") == {
        "path": str(ix),
        "added": 300,
        "first_id": 0,
        "last_id": 299,
        "live": 300,
    }
    assert js("index", "info", ix)["count"] == 300
    assert js("index", "verify", ix)["ok"] is True
    assert js("index", "delete", ix, 3, 4) == {"path": str(ix), "deleted": 2, "live": 298}
    assert js("index", "compact", ix) == {"path": str(ix), "rows_before": 300, "rows_after": 298}
    res = js("search", ix, "--query-file", tmp_path / "q.npy", "-k", 4)
    assert len(res["queries"]) == 2 and len(res["ids"][0]) == 4
    assert res["queries"][1]["query"].endswith("q.npy[1]")
    assert [h["id"] for h in res["queries"][0]["hits"]] == res["ids"][0]
    assert set(res["queries"][0]["hits"][0]) == {"id", "score", "sim", "conf", "metadata"}
    one = js("search", ix, "--query-file", tmp_path / "q1.npy", "-k", 2)  # one [K, D] query: a batch of one
    assert len(one["ids"]) == 1 and len(one["ids"][0]) == 2
    assert set(js("backends")) == {"available", "errors"}
    if _has("faiss"):
        assert js("index", "build-ann", ix, "--kind", "flat")["kind"] == "flat"
        assert "chosen" in js("index", "tune", ix, "--queries", 4, "--dry-run", "-k", 2)


def _has(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


def test_query_module_max_k_is_the_ops_one():
    from pecm import ops, query

    assert query.MAX_K == ops.MAX_K


HEAVY = ("torch", "transformers", "timm", "pecm.ops", "pecm.model.encode", "pecm.index")
PROBE = """
import json, sys
from pecm.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: --help, usage errors
        rc = e.code
    sys.stdout.flush()
    print("RC", rc, file=sys.stderr)
    print("LOADED", ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr, flush=True)
"""


def _probe_all(cases):
    """Runs each argv in turn in one fresh interpreter: [(rc, heavy modules loaded so far, stderr, stdout)]."""
    r = _py(PROBE.format(heavy=HEAVY), json.dumps([[str(a) for a in argv] for argv in cases]))
    res, err, lines = [], [], r.stderr.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("RC ") and i + 1 < len(lines) and lines[i + 1].startswith("LOADED"):
            res.append((int(lines[i].split()[1]), lines[i + 1].split()[1:], "\n".join(err)))
            err, i = [], i + 2
        else:
            err.append(lines[i])
            i += 1
    assert len(res) == len(cases), r.stderr[-2000:]
    return res, r.stdout


def _probe(*argv):
    (res,), out = _probe_all([argv])
    return (*res, out)


def test_help_and_argument_errors_import_no_torch():
    for argv in (["--help"], ["search", "--help"], ["index", "add", "--help"]):
        rc, loaded, _, out = _probe(*argv)
        assert rc == 0 and loaded == [] and "usage:" in out, (argv, loaded)
    rc, loaded, err, _ = _probe("search")  # argparse: INDEX missing
    assert rc == 2 and loaded == [] and "error:" in err
    rc, loaded, err, _ = _probe("search", "ix", "--text", "a", "--images", "x.png")  # exclusive query sources
    assert rc == 2 and loaded == [] and "not allowed with" in err
    # -X importtime agrees: the interpreter never imports torch for --help
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pecm", "--help"], capture_output=True, text=True, env=ENV, cwd=ROOT
    )
    mods = {ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    assert r.returncode == 0 and "pecm.cli" in mods and not mods & {"torch", "numpy", "transformers", "timm"}


def test_missing_inputs_fail_before_the_model_loads(model, tmp_path):
    d, ckpt = model["dir"], model["ckpt"]
    ix = d / "reports"
    cases = [
        (["search", tmp_path / "no_ix", "--checkpoint", ckpt, "--text", "x"], "index: no such directory"),
        (["search", tmp_path, "--checkpoint", ckpt, "--text", "x"], "not a pecm index"),
        (["search", ix, "--query-file", tmp_path / "q.npy"], "--query-file: no such file"),
        (["search", ix, "--checkpoint", ckpt, "--texts-file", tmp_path / "q.txt"], "--texts-file: no such file"),
        (["search", ix, "--checkpoint", ckpt, "--image", tmp_path / "x.png"], "--image: no such file"),
        (["search", ix, "--checkpoint", ckpt, "--images", tmp_path / "x.png"], "--images: no such file"),
        (["search", ix, "--checkpoint", tmp_path / "no_ckpt", "--text", "x"], "--checkpoint: no such file"),
        (["search", ix, "--checkpoint", ckpt, "--text", "x", "-k", 0], "-k: expected an int in [1,"),
        (["index", "add", ix, "--checkpoint", ckpt, "--texts-file", tmp_path / "q.txt"], "--texts-file: no such"),
        (["index", "add", ix, "--checkpoint", tmp_path / "no_ckpt", "--texts-file", d / "reports.txt"], "--checkpoint"),
    ]
    res, _ = _probe_all([argv for argv, _ in cases])  # one interpreter: nothing heavy may load in any case
    for (argv, needle), (rc, loaded, err) in zip(cases, res):
        assert rc == 2 and err.startswith("pecm: error:") and err.count("\n") == 0 and needle in err, (argv, err)
        assert loaded == [], (argv, loaded)


def test_closed_pipe_is_quiet(tmp_path):
    rng = np.random.default_rng(1)
    K, D = 4, 8
    np.save(tmp_path / "p.npy", rng.standard_normal((64, K, D)).astype(np.float32))
    np.save(tmp_path / "q.npy", rng.standard_normal((400, K, D)).astype(np.float32))
    meta = "".join(json.dumps({"text": "report text " * 8 + str(i)}) + "\n" for i in range(64))
    (tmp_path / "m.jsonl").write_text(meta)
    ix = tmp_path / "ix"
    assert main(["index", "create", str(ix), "-K", str(K), "-D", str(D)]) == 0
    assert (
        main(["index", "add", str(ix), "--prototypes", str(tmp_path / "p.npy"), "--meta", str(tmp_path / "m.jsonl")])
        == 0
    )
    # 400 queries x 20 hits with their text: ~1.5 MB, far more than a pipe buffer
    cmd = [sys.executable, "-m", "pecm", "search", str(ix), "--query-file", str(tmp_path / "q.npy"), "-k", "20"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT)
    first = p.stdout.read(64)  # like `| head -c 64`: read a little, then close the pipe
    p.stdout.close()
    err = p.stderr.read().decode()
    rc = p.wait(timeout=120)
    assert first.startswith(b"query 1/400") and rc == 141, (rc, err)  # 128 + SIGPIPE, as a shell reports it
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def test_progress_bars_only_on_a_terminal(monkeypatch):
    import argparse

    from pecm.commands._common import add_progress_flags, progress, show_progress

    p = argparse.ArgumentParser()
    add_progress_flags(p)
    assert progress(p.parse_args([])) is None  # the library decides: stderr a TTY
    assert progress(p.parse_args([]), quiet=True) is False
    assert progress(p.parse_args(["--progress"]), quiet=True) is True
    assert progress(p.parse_args(["--no-progress"])) is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert show_progress(p.parse_args([])) is False and show_progress(p.parse_args(["--progress"])) is True


def test_index_add_prints_no_bar_when_stderr_is_a_pipe(tmp_path):
    rng = np.random.default_rng(2)
    np.save(tmp_path / "p.npy", rng.standard_normal((9000, 2, 8)).astype(np.float32))  # > ADD_BLOCK (8192)
    code = (
        "import sys; from pecm.cli import main; ix, p = sys.argv[1:3]\n"
        "assert main(['index', 'create', ix, '-K', '2', '-D', '8']) == 0\n"
        "assert main(['index', 'add', ix, '--prototypes', p]) == 0\n"
        "print('FORCED', file=sys.stderr, flush=True)\n"
        "assert main(['index', 'add', ix, '--prototypes', p, '--progress']) == 0\n"
    )
    r = _py(code, tmp_path / "ix", tmp_path / "p.npy")
    assert r.returncode == 0, r.stderr
    default, forced = r.stderr.split("FORCED")
    assert "pecm index add" not in default and "pecm index add" in forced, r.stderr
