"""Pickle-free storage of the report side's gensim `Doc2Vec` (checkpoint format 3).

gensim's own ``Doc2Vec.save`` / ``Doc2Vec.load`` pickle the model, and unpickling a crafted file runs code. A
checkpoint therefore stores the fitted Doc2Vec as

- ``doc2vec.json``: ``format`` (1), the training parameters (``params``), the vocabulary in index order
  (``vocab``), the number of trained document tags (``doc_count``; tags are the ints 0..n-1) and the scalar part
  of the model's NumPy ``RandomState`` (``random``: pos, has_gauss, cached_gaussian);
- ``doc2vec.safetensors`` (safetensors, plain arrays): ``wv_vectors`` float32 [V, E] (word vectors),
  ``wv_count`` int64 [V] and ``wv_sample_int`` uint32 [V] (the vocabulary's counts and down-sampling
  thresholds), ``dv_vectors`` float32 [n, E] (document vectors), ``syn1neg`` float32 [V, E] (the
  negative-sampling output layer) and ``random_key`` uint32 [624] (the MT19937 key of ``RandomState``).

`load_doc2vec` validates every field, type, shape and dtype against the `PECMConfig` and rebuilds a
``Doc2Vec`` from them (the negative-sampling table from the counts, as gensim builds it): `sentence_vectors`
(mean of word vectors, what pecm uses) is bit-identical, and so is ``infer_vector`` within a process (it seeds
its start vector with Python's per-process ``hash`` of the words, so it differs between processes anyway).
Only what pecm's `TextFeatures.fit` trains is accepted: PV-DM (``dm=1``, no ``dm_concat``), negative sampling
(``hs=0``). Nothing here unpickles; see `pecm.model.legacy` for converting a pickled ``doc2vec.model``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

import numpy as np

from .safety import one_line, read_json_object

JSON_FILE = "doc2vec.json"
ARRAYS_FILE = "doc2vec.safetensors"
LEGACY_FILE = "doc2vec.model"  # gensim's pickle (checkpoint formats 1 and 2): never loaded by default
FORMAT = 1

# name -> (type, check) of the Doc2Vec parameters stored in doc2vec.json
_INT, _FLOAT, _BOOL = (int,), (int, float), (bool,)
PARAMS = {
    "vector_size": _INT,
    "window": _INT,
    "alpha": _FLOAT,
    "min_alpha": _FLOAT,
    "sample": _FLOAT,
    "negative": _INT,
    "hs": _INT,
    "dm": _INT,
    "dm_concat": _INT,
    "dm_tag_count": _INT,
    "dbow_words": _INT,
    "cbow_mean": _INT,
    "epochs": _INT,
    "seed": _INT,
    "min_count": _INT,
    "ns_exponent": _FLOAT,
    "shrink_windows": _BOOL,
    "corpus_count": _INT,
    "corpus_total_words": _INT,
}
ARRAYS = ("wv_vectors", "wv_count", "wv_sample_int", "dv_vectors", "syn1neg", "random_key")


def save_doc2vec(model, directory: str) -> None:
    """Write ``doc2vec.json`` + ``doc2vec.safetensors`` (atomically each) for a fitted gensim Doc2Vec."""
    from safetensors.numpy import save_file

    wv, dv = model.wv, model.dv
    if model.hs or model.dm_concat or not model.dm or model.sg:
        raise ValueError("doc2vec: only PV-DM with negative sampling (dm=1, dm_concat=0, hs=0) can be saved")
    if list(dv.index_to_key) != list(range(len(dv))):
        raise ValueError("doc2vec: document tags must be the ints 0..n-1 (as TextFeatures.fit makes them)")
    name, key, pos, has_gauss, cached = model.random.get_state()
    params = {}
    for k, types in PARAMS.items():
        v = getattr(model, k)
        params[k] = bool(v) if types is _BOOL else int(v) if types is _INT else float(v)
    meta = {
        "format": FORMAT,
        "params": params,
        "vocab": list(wv.index_to_key),
        "doc_count": len(dv),
        "random": {"pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    arrays = {
        "wv_vectors": np.ascontiguousarray(wv.vectors, dtype=np.float32),
        "wv_count": np.ascontiguousarray(wv.expandos["count"], dtype=np.int64),
        "wv_sample_int": np.ascontiguousarray(wv.expandos["sample_int"], dtype=np.uint32),
        "dv_vectors": np.ascontiguousarray(dv.vectors, dtype=np.float32),
        "syn1neg": np.ascontiguousarray(model.syn1neg, dtype=np.float32),
        "random_key": np.ascontiguousarray(key, dtype=np.uint32),
    }
    tmp = os.path.join(directory, ARRAYS_FILE + ".tmp")
    save_file(arrays, tmp, metadata={"format": "doc2vec", "version": str(FORMAT)})
    os.replace(tmp, os.path.join(directory, ARRAYS_FILE))
    tmp = os.path.join(directory, JSON_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False)
    os.replace(tmp, os.path.join(directory, JSON_FILE))


def _read_json(path: str) -> Dict[str, Any]:
    meta = read_json_object(path, "the Doc2Vec vocabulary and parameters")
    if meta.get("format") != FORMAT or isinstance(meta.get("format"), bool):
        raise ValueError(f"checkpoint: {path}: format: expected {FORMAT}, got {meta.get('format')!r}")
    return meta


def _check_params(path: str, p: Any, config) -> None:
    if not isinstance(p, dict):
        raise TypeError(f"checkpoint: {path}: params: expected a JSON object, got {type(p).__name__}")
    missing, unknown = sorted(set(PARAMS) - set(p)), sorted(set(p) - set(PARAMS))
    if missing or unknown:
        raise ValueError(f"checkpoint: {path}: params: missing {missing}, unknown {unknown}")
    for k, types in PARAMS.items():
        v = p[k]
        if not isinstance(v, types) or (types is not _BOOL and isinstance(v, bool)):
            raise TypeError(f"checkpoint: {path}: params.{k}: expected {types[-1].__name__}, got {v!r}")
        if types is not _BOOL and not (np.isfinite(v) and v >= 0):
            raise ValueError(f"checkpoint: {path}: params.{k}: expected a finite number >= 0, got {v!r}")
    fixed = {"hs": 0, "dm": 1, "dm_concat": 0, "dm_tag_count": 1}
    for k, v in fixed.items():
        if p[k] != v:
            raise ValueError(f"checkpoint: {path}: params.{k}: pecm's Doc2Vec has {k}={v}, got {p[k]!r}")
    for k in ("negative", "window", "epochs", "vector_size", "min_count"):
        if p[k] < 1:
            raise ValueError(f"checkpoint: {path}: params.{k}: expected an int >= 1, got {p[k]!r}")
    if not 0 < p["min_alpha"] <= p["alpha"] <= 1:
        raise ValueError(f"checkpoint: {path}: params: expected 0 < min_alpha <= alpha <= 1, got {p['alpha']!r}")
    if p["ns_exponent"] > 4:
        raise ValueError(f"checkpoint: {path}: params.ns_exponent: expected a value in [0, 4], got {p['ns_exponent']}")
    want = {
        "vector_size": config.doc2vec_dim,
        "epochs": config.doc2vec_epochs,
        "min_count": config.doc2vec_min_count,
        "seed": config.seed,
    }
    for k, v in want.items():
        if p[k] != v:
            raise ValueError(f"checkpoint: {path}: params.{k} is {p[k]!r} but config.json says {v!r}")


def _read_arrays(path: str) -> Dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: {path} not found (the Doc2Vec arrays)")
    try:
        arrays = load_file(path)
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"checkpoint: {path} is not a readable safetensors file ({one_line(e)})") from e
    missing, unknown = sorted(set(ARRAYS) - set(arrays)), sorted(set(arrays) - set(ARRAYS))
    if missing or unknown:
        raise ValueError(f"checkpoint: {path}: arrays: missing {missing}, unknown {unknown}")
    return arrays


def _check_arrays(path: str, a: Dict[str, np.ndarray], n_vocab: int, n_docs: int, dim: int) -> None:
    want = {
        "wv_vectors": (np.float32, (n_vocab, dim)),
        "wv_count": (np.int64, (n_vocab,)),
        "wv_sample_int": (np.uint32, (n_vocab,)),
        "dv_vectors": (np.float32, (n_docs, dim)),
        "syn1neg": (np.float32, (n_vocab, dim)),
        "random_key": (np.uint32, (624,)),
    }
    for k, (dtype, shape) in want.items():
        if a[k].dtype != dtype or a[k].shape != shape:
            raise ValueError(
                f"checkpoint: {path}: {k}: expected {np.dtype(dtype).name} {list(shape)}, got {a[k].dtype.name}"
                f" {list(a[k].shape)} (doc2vec.json: {n_vocab} words, {n_docs} documents, {dim} dimensions)"
            )
    for k in ("wv_vectors", "dv_vectors", "syn1neg"):
        if not np.isfinite(a[k]).all():
            raise ValueError(f"checkpoint: {path}: {k}: contains NaN or infinite values")
    if n_vocab and int(a["wv_count"].min()) < 1:
        raise ValueError(f"checkpoint: {path}: wv_count: expected counts >= 1")


def _check_random(path: str, r: Any) -> tuple:
    if not isinstance(r, dict) or set(r) != {"pos", "has_gauss", "cached_gaussian"}:
        raise ValueError(f"checkpoint: {path}: random: expected {{pos, has_gauss, cached_gaussian}}, got {r!r}")
    pos, has_gauss, cached = r["pos"], r["has_gauss"], r["cached_gaussian"]
    if not isinstance(pos, int) or isinstance(pos, bool) or not 0 <= pos <= 624:
        raise ValueError(f"checkpoint: {path}: random.pos: expected an int in [0, 624], got {pos!r}")
    if has_gauss not in (0, 1) or isinstance(has_gauss, bool):
        raise ValueError(f"checkpoint: {path}: random.has_gauss: expected 0 or 1, got {has_gauss!r}")
    if not isinstance(cached, (int, float)) or isinstance(cached, bool) or not np.isfinite(cached):
        raise ValueError(f"checkpoint: {path}: random.cached_gaussian: expected a finite float, got {cached!r}")
    return pos, has_gauss, float(cached)


def load_doc2vec(directory: str, config):
    """Rebuild the gensim Doc2Vec of a checkpoint directory from ``doc2vec.json`` + ``doc2vec.safetensors``."""
    from gensim.models.doc2vec import Doc2Vec
    from gensim.models.keyedvectors import KeyedVectors

    jpath, apath = os.path.join(directory, JSON_FILE), os.path.join(directory, ARRAYS_FILE)
    if not os.path.isfile(jpath):
        if os.path.exists(os.path.join(directory, LEGACY_FILE)):
            from .legacy import legacy_error

            raise ValueError(legacy_error(directory))
        raise FileNotFoundError(f"checkpoint: {jpath} not found (the Doc2Vec vocabulary and parameters)")
    meta = _read_json(jpath)
    missing = sorted({"params", "vocab", "doc_count", "random"} - set(meta))
    if missing:
        raise ValueError(f"checkpoint: {jpath}: missing fields {missing}")
    p = meta["params"]
    _check_params(jpath, p, config)
    vocab, n_docs = meta["vocab"], meta["doc_count"]
    if not isinstance(vocab, list) or not all(isinstance(w, str) and w for w in vocab):
        raise TypeError(f"checkpoint: {jpath}: vocab: expected a list of non-empty strings")
    if len(set(vocab)) != len(vocab):
        raise ValueError(f"checkpoint: {jpath}: vocab: contains duplicate words")
    if not vocab:
        raise ValueError(f"checkpoint: {jpath}: vocab: is empty (a fitted Doc2Vec has at least one word)")
    if not isinstance(n_docs, int) or isinstance(n_docs, bool) or n_docs < 1:
        raise ValueError(f"checkpoint: {jpath}: doc_count: expected an int >= 1, got {n_docs!r}")
    pos, has_gauss, cached = _check_random(jpath, meta["random"])
    a = _read_arrays(apath)
    _check_arrays(apath, a, len(vocab), n_docs, p["vector_size"])

    m = Doc2Vec(
        vector_size=p["vector_size"],
        window=p["window"],
        alpha=float(p["alpha"]),
        min_alpha=float(p["min_alpha"]),
        sample=float(p["sample"]),
        negative=p["negative"],
        hs=0,
        dm=1,
        dm_concat=0,
        dm_tag_count=1,
        dbow_words=p["dbow_words"],
        dm_mean=p["cbow_mean"],
        epochs=p["epochs"],
        seed=p["seed"],
        min_count=p["min_count"],
        ns_exponent=float(p["ns_exponent"]),
        shrink_windows=p["shrink_windows"],
        workers=1,
    )
    m.cbow_mean = p["cbow_mean"]
    m.corpus_count, m.corpus_total_words = p["corpus_count"], p["corpus_total_words"]
    m.effective_min_count = p["min_count"]
    wv = KeyedVectors(p["vector_size"])
    wv.index_to_key = list(vocab)
    wv.key_to_index = {w: i for i, w in enumerate(vocab)}
    wv.vectors = a["wv_vectors"].copy()
    wv.expandos = {"count": a["wv_count"].copy(), "sample_int": a["wv_sample_int"].copy()}
    wv.vectors_lockf = np.ones(1, dtype=np.float32)
    dv = KeyedVectors(p["vector_size"])
    dv.index_to_key = list(range(n_docs))
    dv.vectors = a["dv_vectors"].copy()
    dv.vectors_lockf = np.ones(1, dtype=np.float32)
    m.wv, m.dv = wv, dv
    m.syn1neg = a["syn1neg"].copy()
    m.make_cum_table()
    m.random.set_state(("MT19937", a["random_key"].copy(), pos, has_gauss, cached))
    return m
