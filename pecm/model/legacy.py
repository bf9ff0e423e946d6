"""Explicit, opt-in conversion of an old checkpoint whose Doc2Vec is a gensim pickle (``doc2vec.model``).

Checkpoint formats 1 and 2 stored the Doc2Vec with gensim's ``Doc2Vec.save``: a pickle, and unpickling a
crafted file runs arbitrary code. `PECM.load` refuses such a checkpoint (`legacy_error` says why and how to
convert); it never unpickles. `convert_legacy_checkpoint` (CLI: ``pecm convert-checkpoint DIR --trust-pickle``)
is the only place in pecm that unpickles, and only when called with ``trust_pickle=True``: do that only for a
checkpoint from a source you trust. It rewrites the Doc2Vec as ``doc2vec.json`` + ``doc2vec.safetensors``
(`pecm.model.doc2vec_io`), saves the checkpoint again in the current format and deletes the pickle.
"""

from __future__ import annotations

import glob
import os
from typing import Union

from .doc2vec_io import JSON_FILE, LEGACY_FILE, save_doc2vec

CONVERT_CLI = "pecm convert-checkpoint {d} --trust-pickle"


def legacy_error(directory: str) -> str:
    d = os.fspath(directory)
    return (
        f"checkpoint: {os.path.join(d, LEGACY_FILE)} is a pickled gensim Doc2Vec (checkpoint format 1/2); pecm does"
        " not unpickle checkpoints, since loading a pickle can run code. If you trust whoever made this checkpoint,"
        f" convert it once: {CONVERT_CLI.format(d=d)} (or pecm.model.convert_legacy_checkpoint(d, trust_pickle=True))"
    )


def convert_legacy_checkpoint(directory: Union[str, "os.PathLike[str]"], *, trust_pickle: bool = False) -> str:
    """Convert a format-1/2 checkpoint in place to the current, pickle-free format; returns the directory.

    UNPICKLES ``DIR/doc2vec.model`` (gensim ``Doc2Vec.load``), which runs any code a crafted file contains:
    refused unless ``trust_pickle=True``. A format-1 checkpoint (no ``text_encoder/``) also needs its text
    encoder's source (the package or folder it was trained from), as loading it always did.
    """
    from gensim.models.doc2vec import Doc2Vec

    from .pecm import PECM

    d = os.fspath(directory)
    legacy = os.path.join(d, LEGACY_FILE)
    if trust_pickle is not True:
        raise ValueError(
            f"convert: {legacy} is a pickle and converting it unpickles it, which can run code: pass"
            " trust_pickle=True (CLI: --trust-pickle) only for a checkpoint from a source you trust"
        )
    if not os.path.isfile(os.path.join(d, "config.json")):
        raise FileNotFoundError(f"convert: {os.path.join(d, 'config.json')} not found (not a PECM checkpoint)")
    if not os.path.isfile(legacy):
        if os.path.isfile(os.path.join(d, JSON_FILE)):
            raise ValueError(f"convert: {d} has no {LEGACY_FILE}: it is already in the pickle-free format")
        raise FileNotFoundError(f"convert: {legacy} not found")
    try:
        model = Doc2Vec.load(legacy)  # the one deliberate unpickle in pecm (trust_pickle=True above)
    except Exception as e:
        raise ValueError(f"convert: {legacy} could not be loaded as a gensim Doc2Vec ({type(e).__name__}: {e})") from e
    if not isinstance(model, Doc2Vec):
        raise TypeError(f"convert: {legacy}: expected a gensim Doc2Vec, got {type(model).__name__}")
    save_doc2vec(model, d)
    PECM.load(d).save(d)  # validates everything and writes the current checkpoint.json
    for f in [legacy] + glob.glob(glob.escape(legacy) + ".*.npy"):  # gensim's side files for large arrays
        if os.path.exists(f):  # PECM.save already dropped doc2vec.model itself
            os.remove(f)
    return d
