"""`pecm index ...` and `pecm search ...` command lines (in-process, plus one torchrun run)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types

import numpy as np
import pytest

from pecm.cli import main
from pecm.index import ArchiveIndex

K, D = 4, 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "p.npy", rng.standard_normal((120, K, D)).astype(np.float32))
    np.save(tmp_path / "m.npy", rng.random((120, K)) > 0.2)
    np.save(tmp_path / "q.npy", rng.standard_normal((3, K, D)).astype(np.float32))
    np.save(tmp_path / "bad_q.npy", rng.standard_normal((3, K, D + 1)).astype(np.float32))
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps({"text": f"r{i}", "cui": i}) + "\n" for i in range(120)))
    return tmp_path


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def index(files, capsys):
    ix = files / "ix"
    assert _run(capsys, "index", "create", ix, "-K", K, "-D", D, "--weights", "1,2,0.5,1")[0] == 0
    rc, out, _ = _run(
        capsys,
        "index",
        "add",
        ix,
        "--prototypes",
        files / "p.npy",
        "--masks",
        files / "m.npy",
        "--meta",
        files / "meta.jsonl",
    )
    assert rc == 0 and "added 120 items" in out
    return ix


def test_create_add_info_verify_search_json(files, index, capsys):
    rc, out, _ = _run(capsys, "index", "info", index, "--json")
    st = json.loads(out)
    assert rc == 0 and st["count"] == 120 and st["K"] == K and st["weights"] == [1.0, 2.0, 0.5, 1.0]
    assert _run(capsys, "index", "verify", index)[0] == 0
    q = np.load(files / "q.npy")
    with ArchiveIndex.open(index) as idx:
        for extra, kw in (
            ([], {}),
            (
                ["--mode", "two_stage", "--shortlist", "50", "--by", "conf"],
                {"mode": "two_stage", "shortlist": 50, "by": "conf"},
            ),
        ):
            rc, out, _ = _run(capsys, "search", index, "--query-file", files / "q.npy", "-k", 5, "--json", *extra)
            res = json.loads(out)
            s, i, meta = idx.search(q, 5, **kw)
            assert rc == 0 and res["ids"] == i.tolist()
            np.testing.assert_allclose(res["scores"], s, rtol=1e-6)
            assert [[r["text"] for r in row] for row in res["metadata"]] == [[f"r{j}" for j in row] for row in i]
    rc, out, _ = _run(capsys, "search", index, "--query-file", files / "q.npy", "-k", 2)
    assert rc == 0 and out.count("id=") == 6


def test_delete_compact_and_sentinels_in_json(files, index, capsys):
    assert _run(capsys, "index", "delete", index, 0, 1, 2)[0] == 0
    assert _run(capsys, "index", "compact", index, "--no-progress")[0] == 0
    rc, out, _ = _run(capsys, "search", index, "--query-file", files / "q.npy", "-k", 200, "--json")
    res = json.loads(out)
    assert rc == 0 and len(res["ids"][0]) == 200
    assert res["ids"][0][117:] == [-1] * 83 and res["scores"][0][117] is None and res["metadata"][0][117] is None
    assert not {0, 1, 2} & set(res["ids"][0])


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["search", "{d}/missing", "--query-file", "{d}/q.npy"], "no such directory"),
        (["search", "{d}/ix", "--query-file", "{d}/bad_q.npy"], "queries: expected shape"),
        (["search", "{d}/ix", "--query-file", "{d}/q.npy", "-k", "0"], "-k"),
        (["search", "{d}/ix", "--query-file", "{d}/nope.npy"], "--query-file"),
        (["search", "{d}/ix"], "--query-file"),
        (["index", "add", "{d}/ix", "--prototypes", "{d}/bad_q.npy"], "prototypes: expected shape"),
        (["index", "create", "{d}/ix"], "already holds an index"),
    ],
)
def test_bad_input_one_line_exit_2(files, index, capsys, argv, needle):
    rc, out, err = _run(capsys, *[a.format(d=files) for a in argv])
    assert rc == 2 and needle in err and err.count("\n") == 1 and err.startswith("pecm: error:")


def test_corrupt_index_reported(files, index, capsys):
    p = index / "prototypes.bin"
    data = bytearray(p.read_bytes())
    data[100] ^= 1
    p.write_bytes(bytes(data))
    rc, _, err = _run(capsys, "index", "verify", index)
    assert rc == 2 and "checksum mismatch" in err


class _FakeEncoder:
    """Stands in for `pecm.model.encode`'s encoder: deterministic prototypes from the input strings."""

    K, D = K, D
    weights = np.array([0.5, 1.5, 1.0, 1.0], dtype=np.float32)

    def _enc(self, items):
        seeds = [sum(map(ord, s)) for s in items]
        protos = np.stack([np.random.default_rng(s).standard_normal((K, D)) for s in seeds]).astype(np.float32)
        return protos, np.ones((len(items), K), dtype=bool)

    encode_images = encode_texts = _enc


def test_checkpoint_paths_with_encoder(files, index, capsys, monkeypatch):
    fake = types.ModuleType("pecm.model.encode")
    fake.load_encoder = lambda path: _FakeEncoder()
    monkeypatch.setitem(sys.modules, "pecm.model.encode", fake)
    ckpt = files / "model.ckpt"
    ckpt.write_bytes(b"x")
    (files / "reports.txt").write_text("a chest x-ray\n\nno acute findings\n")
    rc, out, _ = _run(capsys, "index", "create", files / "model_ix", "--checkpoint", ckpt)
    assert rc == 0 and f"K={K}, D={D}" in out
    with ArchiveIndex.open(files / "model_ix") as made:
        np.testing.assert_allclose(made.weights, _FakeEncoder.weights)
    rc, out, _ = _run(capsys, "index", "add", index, "--checkpoint", ckpt, "--texts-file", files / "reports.txt")
    assert rc == 0 and "added 2 items (ids 120..121)" in out
    rc, out, _ = _run(capsys, "search", index, "--checkpoint", ckpt, "--text", "no acute findings", "-k", 1, "--json")
    res = json.loads(out)
    assert rc == 0 and res["ids"] == [[121]] and res["metadata"][0][0]["text"] == "no acute findings"


def test_checkpoint_without_encoder_module_is_clear(files, index, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pecm.model.encode", None)  # import raises ImportError
    rc, _, err = _run(capsys, "search", index, "--checkpoint", files / "q.npy", "--text", "x")
    assert rc == 2 and "encoder" in err


def test_torchrun_distributed_json_equals_single(files, index, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["search", str(index), "--query-file", str(files / "q.npy"), "-k", "6", "--json"]
    rc, single, _ = _run(capsys, *args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run(
        [*cmd, "-m", "pecm", *args, "--distributed"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # only rank 0 prints
    a, b = json.loads(lines[0]), json.loads(single)
    assert a["ids"] == b["ids"] and a["metadata"] == b["metadata"]
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-6)


def test_checkpoint_paths_with_real_encoder(tmp_path, capsys):
    encode = pytest.importorskip("pecm.model.encode", reason="pecm.model.encode (the model issue) is not available")
    from pecm.model.config import PECMConfig
    from pecm.model.pecm import PECM

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    reports = ["Chest x-ray shows no acute findings.", "Large left pleural effusion. Heart size normal.", "Fracture."]
    model = PECM(PECMConfig.tiny(), load_pretrained=False)
    model.text.fit(reports * 4)
    model.save(str(ckpt))
    enc = encode.load_encoder(str(ckpt))
    (tmp_path / "reports.txt").write_text("\n".join(reports) + "\n")
    ix = tmp_path / "ix"
    assert _run(capsys, "index", "create", ix, "--checkpoint", ckpt)[0] == 0
    rc, out, _ = _run(capsys, "index", "add", ix, "--checkpoint", ckpt, "--texts-file", tmp_path / "reports.txt")
    assert rc == 0 and "added 3 items" in out
    rc, out, _ = _run(capsys, "search", ix, "--checkpoint", ckpt, "--text", reports[1], "-k", 3, "--json")
    res = json.loads(out)
    protos, masks = enc.encode_texts([reports[1]])
    with ArchiveIndex.open(ix) as idx:
        s, i, _ = idx.search(protos, 3, q_mask=masks)
    assert rc == 0 and res["ids"] == i.tolist() and res["metadata"][0][0]["modality"] == "text"
    np.testing.assert_allclose(res["scores"], s, rtol=1e-5)


def test_pq_index_from_the_command_line(files, capsys):
    pytest.importorskip("faiss")
    ix = files / "pq"
    rc, out, err = _run(
        capsys,
        "index",
        "create",
        ix,
        "-K",
        K,
        "-D",
        D,
        "--dtype",
        "pq",
        "--pq-m",
        4,
        "--pq-coarse",
        2,
        "--pq-scales",
        "float32",
    )
    assert rc == 0, err
    rc, _, err = _run(capsys, "index", "add", ix, "--prototypes", files / "p.npy", "--masks", files / "m.npy")
    assert rc == 0, err  # 120 items x K = 480 prototypes: enough to train the shared codebook
    rc, out, _ = _run(capsys, "index", "info", ix, "--json")
    st = json.loads(out)
    assert st["dtype"] == "pq" and st["pq"]["m"] == 4 and st["pq"]["coarse"] == 2
    assert st["pq"]["pooled"] == "int8" and st["pq"]["scales"] == "float32"  # the default, the flag
    assert st["bytes"]["prototypes"] == 120 * K * (2 + 4)  # 2 coarse + 4 PQ codes per prototype
    assert st["bytes"]["pooled"] == 120 * D and st["bytes"]["scales"] == 120 * K * 4
    assert _run(capsys, "index", "verify", ix)[0] == 0
    rc, out, _ = _run(capsys, "search", ix, "--query-file", files / "q.npy", "-k", 5, "--json")
    with ArchiveIndex.open(ix) as idx:
        s, i, _ = idx.search(np.load(files / "q.npy"), 5)
    assert rc == 0 and json.loads(out)["ids"] == i.tolist()
    rc, _, err = _run(capsys, "index", "create", files / "bad", "--dtype", "float16", "--pq-m", 4)
    assert rc == 2 and "--pq-m" in err
    rc, _, err = _run(capsys, "index", "create", files / "bad2", "--dtype", "int8", "--pq-pooled", "int8")
    assert rc == 2 and "--pq-pooled" in err
