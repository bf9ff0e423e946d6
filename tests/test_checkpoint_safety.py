"""Loading a checkpoint never runs code (fault injection with crafted checkpoints).

A checkpoint is JSON + safetensors only (format 3: the Doc2Vec as ``doc2vec.json`` + ``doc2vec.safetensors``);
``train_state.pt`` is read with ``torch.load(weights_only=True)``. Hostile pickles (a ``__reduce__`` payload that
would create a marker file) in ``doc2vec.model``, ``train_state.pt`` and the safetensors files are refused
without running; damaged, truncated, missing and wrong-shape files are one-line ValueError / TypeError /
FileNotFoundError naming the file (CLI: exit 2); an old checkpoint converts only on explicit opt-in."""

import builtins
import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load
from safetensors.numpy import save_file as np_save
from safetensors.torch import load_file, save_file

from pecm.cli import main
from pecm.data import load_pairs
from pecm.data.layouts import SAMPLE_ROCO
from pecm.model import PECM, PECMConfig
from pecm.train import TrainConfig, extract_features, train

REPORTS = [
    "Chest x-ray shows no acute findings.",
    "Large left pleural effusion. Heart size normal. No pneumothorax.",
    "CT of the abdomen shows a hepatic mass. The spleen is normal. Kidneys are normal.",
]
ERRORS = (ValueError, TypeError, FileNotFoundError)
PKG = os.path.join(os.path.dirname(__file__), os.pardir, "pecm")
# torch.load(weights_only=True) notes that the crafted (non-torch.save) pickles use protocol 4: expected here
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")


class Payload:
    """Unpickling this creates ``path`` (builtins.open(path, "w")): proof that a loader ran pickled code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def _hostile(path, marker, wrap=None, torch_save=False):
    obj = Payload(marker) if wrap is None else wrap(Payload(marker))
    if torch_save:  # the zip format torch.save writes, as a crafted train_state.pt would be
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)


def _refused(e, marker, types, pattern):
    """The payload did not run (checked first), then the error is the clear one-line kind."""
    assert not marker.exists(), "the pickled payload ran"
    assert isinstance(e.value, types), repr(e.value)
    assert re.search(pattern, str(e.value)) and "\n" not in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def pairs():
    return load_pairs(SAMPLE_ROCO, limit=8)


@pytest.fixture(scope="module")
def fitted(pairs):
    torch.manual_seed(0)
    m = PECM(PECMConfig.tiny(), load_pretrained=False)
    m.text.fit(pairs.texts + REPORTS)
    return m.eval()


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    fitted.save(str(d))
    return d


@pytest.fixture
def ckpt(saved, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(saved, d)
    return d


def _legacy(ckpt, fitted, marker=None):
    """What pecm <= format 2 wrote: gensim's pickled doc2vec.model (hostile when ``marker`` is given)."""
    (ckpt / "doc2vec.json").unlink(missing_ok=True)
    (ckpt / "doc2vec.safetensors").unlink(missing_ok=True)
    if marker is None:
        fitted.text.doc2vec.save(str(ckpt / "doc2vec.model"))
    else:
        _hostile(ckpt / "doc2vec.model", marker)
    man = json.loads((ckpt / "checkpoint.json").read_text())
    (ckpt / "checkpoint.json").write_text(json.dumps({**man, "format_version": 2}))
    return ckpt


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------------- round trip
def test_checkpoint_is_json_and_safetensors_only(saved):
    assert sorted(os.listdir(saved)) == sorted(
        ["checkpoint.json", "config.json", "doc2vec.json", "doc2vec.safetensors", "model.safetensors", "tokenizer"]
    )
    assert all(f.endswith((".json", ".txt")) for f in os.listdir(saved / "tokenizer"))
    assert json.loads((saved / "checkpoint.json").read_text())["format_version"] == 3


def test_doc2vec_round_trip_same_vectors_and_infer_vector(fitted, saved):
    from pecm.model.doc2vec_io import load_doc2vec

    a, b = fitted.text.doc2vec, load_doc2vec(str(saved), fitted.config)
    for x, y in [(a.wv.vectors, b.wv.vectors), (a.dv.vectors, b.dv.vectors), (a.syn1neg, b.syn1neg)]:
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.cum_table, b.cum_table)
    assert a.wv.index_to_key == b.wv.index_to_key and (a.epochs, a.seed, a.window) == (b.epochs, b.seed, b.window)
    np.testing.assert_array_equal(
        fitted.text.sentence_vectors(REPORTS), PECM.load(saved).text.sentence_vectors(REPORTS)
    )
    # infer_vector draws from the model's RandomState (saved with it) and seeds its start vector from hash(words)
    state = a.random.get_state()
    try:
        for r in REPORTS + ["unseen words only", "heart normal heart normal"]:
            w = r.lower().split()
            np.testing.assert_array_equal(a.infer_vector(w), b.infer_vector(w))
    finally:
        a.random.set_state(state)


# ---------------------------------------------------------------------------------------------- hostile pickles
def test_pickled_doc2vec_is_refused_not_run(ckpt, fitted, tmp_path):
    marker = tmp_path / "PWNED"
    _legacy(ckpt, fitted, marker)
    with pytest.raises(Exception) as e:
        PECM.load(ckpt)
    _refused(e, marker, ValueError, r"doc2vec\.model.*pickle.*convert-checkpoint .* --trust-pickle")


def _index(tmp_path):
    """An existing (empty) index: `pecm search` checks the index before it loads the checkpoint."""
    from pecm.index import ArchiveIndex

    ArchiveIndex.create(tmp_path / "ix", 4, 16).close()
    return tmp_path / "ix"


def test_cli_search_with_pickled_doc2vec_exits_2_without_running_it(ckpt, fitted, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    _legacy(ckpt, fitted, marker)
    rc, out, err = _cli(capsys, "search", _index(tmp_path), "--checkpoint", ckpt, "--text", "no acute findings")
    assert rc == 2 and not marker.exists() and out == ""
    assert len(err.strip().splitlines()) == 1 and "doc2vec.model" in err and "--trust-pickle" in err


@pytest.mark.parametrize("name", ["model.safetensors", "doc2vec.safetensors", "doc2vec.json", "config.json"])
def test_pickle_in_place_of_any_other_file_is_not_run(ckpt, tmp_path, name):
    marker = tmp_path / "PWNED"
    _hostile(ckpt / name, marker)
    with pytest.raises(Exception) as e:
        PECM.load(ckpt)
    _refused(e, marker, ERRORS, re.escape(name))


def test_conversion_needs_explicit_trust_and_never_runs_without_it(ckpt, fitted, tmp_path, capsys):
    from pecm.model.legacy import convert_legacy_checkpoint

    marker = tmp_path / "PWNED"
    _legacy(ckpt, fitted, marker)
    with pytest.raises(ValueError, match="trust_pickle=True"):
        convert_legacy_checkpoint(ckpt)
    rc, _, err = _cli(capsys, "convert-checkpoint", ckpt)
    assert rc == 2 and "--trust-pickle" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and (ckpt / "doc2vec.model").exists()


def test_explicit_conversion_of_an_old_checkpoint(ckpt, fitted, capsys):
    from pecm.model.legacy import convert_legacy_checkpoint

    _legacy(ckpt, fitted)
    rc, out, err = _cli(capsys, "convert-checkpoint", ckpt, "--trust-pickle")
    assert rc == 0 and err == "" and json.loads(out)["format_version"] == 3
    assert not (ckpt / "doc2vec.model").exists() and (ckpt / "doc2vec.json").is_file()
    assert json.loads((ckpt / "checkpoint.json").read_text())["format_version"] == 3
    back = PECM.load(ckpt).eval()
    np.testing.assert_array_equal(back.text.doc2vec.wv.vectors, fitted.text.doc2vec.wv.vectors)
    with torch.no_grad():
        for a, b in zip(fitted.encode_texts(REPORTS), back.encode_texts(REPORTS)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="already"):
        convert_legacy_checkpoint(ckpt, trust_pickle=True)


def _resume_cfg():
    return TrainConfig(epochs=1, batch_size=4, progress=False, resume=True)


@pytest.mark.parametrize("wrap", [None, lambda p: {"optimizer": p, "epoch": 0}], ids=["object", "nested"])
def test_hostile_train_state_is_refused_not_run(fitted, pairs, ckpt, tmp_path, wrap):
    marker = tmp_path / "PWNED"
    _hostile(ckpt / "train_state.pt", marker, wrap, torch_save=True)
    feats = {"img": torch.zeros(len(pairs), 5, fitted.image.dim), "txt": torch.zeros(len(pairs), 5, fitted.text.dim)}
    feats["txt_mask"] = torch.ones(len(pairs), 5, dtype=torch.bool)
    model = PECM.load(ckpt)
    with pytest.raises(Exception) as e:
        train(model, pairs, str(ckpt), _resume_cfg(), train_feats=feats)
    _refused(e, marker, ValueError, r"train_state\.pt.*weights_only=True.*global (io|builtins)\.open")


def test_cli_train_resume_with_hostile_state_exits_2(ckpt, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    _hostile(ckpt / "train_state.pt", marker, torch_save=True)
    argv = ["train", "--data", SAMPLE_ROCO, "--preset", "tiny", "--limit", "8", "--batch-size", "4", "--epochs", "1"]
    rc, _, err = _cli(capsys, *argv, "--no-progress", "--out", ckpt, "--resume")
    assert rc == 2 and not marker.exists()
    assert len(err.strip().splitlines()) == 1 and "train_state.pt" in err


def _state(fitted, pairs, tmp_path):
    """A real train_state.pt (one epoch of a tiny run) to damage."""
    feats = extract_features(fitted, pairs, batch=8, progress=False)
    out = tmp_path / "run"
    m = PECM(PECMConfig.tiny(), load_pretrained=False)
    m.text.doc2vec, m.text.tokenizer = fitted.text.doc2vec, fitted.text.tokenizer
    train(m, pairs, str(out), TrainConfig(epochs=1, batch_size=4, progress=False), train_feats=feats)
    return out, feats, m


def test_damaged_train_state_is_a_clear_error(fitted, pairs, tmp_path):
    out, feats, m = _state(fitted, pairs, tmp_path)
    st = torch.load(out / "train_state.pt", weights_only=True)
    good = (out / "train_state.pt").read_bytes()
    pid = next(iter(st["optimizer"]["state"]))
    cases = {
        "truncated": None,
        "epoch": {**st, "epoch": "1"},
        "history": {**st, "history": []},
        "exp_avg shape": {
            **st,
            "optimizer": {
                **st["optimizer"],
                "state": {
                    **st["optimizer"]["state"],
                    pid: {**st["optimizer"]["state"][pid], "exp_avg": torch.zeros(3)},
                },
            },
        },
        "scheduler": {**st, "scheduler": {**st["scheduler"], "base_lrs": "x"}},
    }
    for name, bad in cases.items():
        if bad is None:
            (out / "train_state.pt").write_bytes(good[: len(good) // 2])
        else:
            torch.save(bad, out / "train_state.pt")
        cfg = TrainConfig(epochs=2, batch_size=4, progress=False, resume=True)
        with pytest.raises((ValueError, TypeError), match=r"train_state\.pt") as e:
            train(m, pairs, str(out), cfg, train_feats=feats)
        assert "\n" not in str(e.value), name


# ---------------------------------------------------------------------------------------------- damaged files
def _edit_json(name, fn):
    def damage(d):
        p = d / name
        p.write_text(json.dumps(fn(json.loads(p.read_text()))))

    return damage


def _edit_arrays(name, fn, numpy=False):
    def damage(d):
        p = str(d / name)
        a = np_load(p) if numpy else load_file(p)
        fn(a)
        (np_save if numpy else save_file)(a, p)

    return damage


def _truncate(name):
    def damage(d):
        b = (d / name).read_bytes()
        (d / name).write_bytes(b[: len(b) // 2])

    return damage


def _set(a, k, v):
    a[k] = v


def _d2v(section, **kw):
    return _edit_json("doc2vec.json", lambda m: {**m, section: {**m[section], **kw}})


def _theta(fn):
    return _edit_arrays("model.safetensors", lambda a: _set(a, "theta", fn(a["theta"])))


DAMAGE = {
    "config not an object": ("config.json", lambda d: (d / "config.json").write_text("[1, 2]")),
    "config truncated": ("config.json", _truncate("config.json")),
    "config wrong type": ("config.json", _edit_json("config.json", lambda c: {**c, "D": "16"})),
    "config huge hidden": ("text_hidden", _edit_json("config.json", lambda c: {**c, "text_hidden": 2**40})),
    "config huge layers": ("text_layers", _edit_json("config.json", lambda c: {**c, "text_layers": 10**7})),
    "manifest truncated": ("checkpoint.json", _truncate("checkpoint.json")),
    "manifest bad version": ("checkpoint.json", _edit_json("checkpoint.json", lambda m: {**m, "format_version": "3"})),
    "weights truncated": ("model.safetensors", _truncate("model.safetensors")),
    "weights wrong shape": ("theta", _theta(lambda t: torch.zeros(6))),
    "weights wrong dtype": ("theta", _theta(lambda t: t.double())),
    "weights NaN": ("theta", _theta(lambda t: t.fill_(float("nan")))),
    "weights extra key": ("evil", _edit_arrays("model.safetensors", lambda a: _set(a, "evil", torch.zeros(1)))),
    "doc2vec.json missing": ("doc2vec.json", lambda d: (d / "doc2vec.json").unlink()),
    "doc2vec.json truncated": ("doc2vec.json", _truncate("doc2vec.json")),
    "doc2vec dim vs config": ("vector_size", _d2v("params", vector_size=8)),
    "doc2vec hs": ("hs", _d2v("params", hs=1)),
    "doc2vec alpha type": ("alpha", _d2v("params", alpha="x")),
    "doc2vec rng pos": ("random.pos", _d2v("random", pos=9999)),
    "doc2vec vocab short": ("wv_vectors", _edit_json("doc2vec.json", lambda m: {**m, "vocab": m["vocab"][:-1]})),
    "doc2vec vocab dupes": ("duplicate", _edit_json("doc2vec.json", lambda m: {**m, "vocab": m["vocab"][:1] * 2})),
    "doc2vec arrays missing": ("doc2vec.safetensors", lambda d: (d / "doc2vec.safetensors").unlink()),
    "doc2vec arrays truncated": ("doc2vec.safetensors", _truncate("doc2vec.safetensors")),
    "doc2vec counts dtype": (
        "wv_count",
        _edit_arrays("doc2vec.safetensors", lambda a: _set(a, "wv_count", a["wv_count"].astype(np.float32)), True),
    ),
    "doc2vec counts zero": ("wv_count", _edit_arrays("doc2vec.safetensors", lambda a: a["wv_count"].fill(0), True)),
    "doc2vec vectors NaN": (
        "wv_vectors",
        _edit_arrays("doc2vec.safetensors", lambda a: a["wv_vectors"].fill(np.nan), True),
    ),
    "tokenizer missing": ("tokenizer", lambda d: shutil.rmtree(d / "tokenizer")),
    "tokenizer garbage": ("tokenizer", lambda d: (d / "tokenizer" / "tokenizer.json").write_text("{not json")),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_is_a_clear_one_line_error(ckpt, case):
    needle, damage = DAMAGE[case]
    damage(ckpt)
    with pytest.raises(ERRORS) as e:
        PECM.load(ckpt)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg


@pytest.mark.parametrize("case", ["weights truncated", "doc2vec counts zero", "tokenizer garbage"])
def test_cli_search_with_damaged_checkpoint_exits_2(ckpt, tmp_path, capsys, case):
    DAMAGE[case][1](ckpt)
    rc, out, err = _cli(capsys, "search", _index(tmp_path), "--checkpoint", ckpt, "--text", "no acute findings")
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and err.startswith("pecm: error: checkpoint:")


def test_no_unpickling_on_any_load_path():
    """Static guard: the package never unpickles, except the explicit opt-in converter."""
    bad = re.compile(r"weights_only\s*=\s*False|allow_pickle\s*=\s*True|pickle\.loads?\(|Doc2Vec\.load\(|\bdill\b")
    hits = []
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                for n, line in enumerate(open(path, encoding="utf-8"), 1):
                    if bad.search(line) and not path.endswith(os.path.join("model", "legacy.py")):
                        hits.append(f"{os.path.relpath(path, PKG)}:{n}: {line.strip()}")
                    if re.search(r"torch\.load\(", line) and "weights_only=True" not in line:
                        hits.append(f"{os.path.relpath(path, PKG)}:{n}: {line.strip()}")
    assert hits == []


def test_text_encoder_config_sizes_are_bounded():
    from types import SimpleNamespace

    from pecm.model.text import check_encoder_size

    ok = SimpleNamespace(
        hidden_size=768,
        num_hidden_layers=12,
        intermediate_size=3072,
        vocab_size=30522,
        max_position_embeddings=512,
        num_attention_heads=12,
    )
    check_encoder_size(ok, "enc")  # BERT-base passes
    for field, v in [("hidden_size", 10**9), ("num_hidden_layers", -1), ("vocab_size", "30522")]:
        with pytest.raises(ValueError, match=field):
            check_encoder_size(SimpleNamespace(**{**vars(ok), field: v}), "enc")
    with pytest.raises(ValueError, match="parameters"):  # each size within bounds, the product not
        check_encoder_size(SimpleNamespace(**{**vars(ok), "hidden_size": 16384, "num_hidden_layers": 200}), "enc")
