"""ANN first stage of `ArchiveIndex` search (``mode="ann"``): a FAISS index over the unit pooled vectors.

What is stored: one FAISS index over rows ``[0, rows)`` of ``pooled.bin`` (FAISS ids = row numbers,
inner product = pooled cosine = ``sim``), serialised with `faiss.serialize_index` into
``ann.g<generation>.s<seq>.faiss`` and named by the manifest (``manifest["ann"]``: file, kind,
params, rows, bytes, crc32). It is written, fsynced and then committed by the manifest replace, like
the data files, so a crash during `build_ann` leaves the previous ANN (or none) and never one that
disagrees with the data; readers hold its descriptor in their snapshot.

Kinds (``kind=None`` chooses from N): ``flat`` (exact inner product, N < 20,000), ``ivf_flat`` (N <
5,000,000; nlist = 4·sqrt(N)), ``ivf_pq`` (larger; PQ with D/4 sub-quantisers of 8 bits, i.e. D/4
bytes per item), and ``hnsw`` on request. Rows appended after the build (``rows`` to ``count``) are
searched exactly and merged, so an ANN is current after every `add`; tombstones, filters and row
ranges are applied inside the FAISS search with an `IDSelectorBitmap`. `compact` rebuilds the ANN
with the same kind and parameters. Loading deserialises the whole file (its CRC-32 is checked
first); FAISS parses the file, so only load indexes from sources you trust as much as the data
itself.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from typing import Optional

import numpy as np

KINDS = ("flat", "ivf_flat", "ivf_pq", "hnsw")
FILE_RE = re.compile(r"^ann\.g(\d+)\.s(\d+)\.faiss$")
TRAIN_PER_LIST = 64  # training vectors per IVF list (FAISS warns below 39)
BLOCK = 65536  # pooled rows read and added per block


def _faiss():
    try:
        import faiss
    except ImportError as e:  # the base install has no faiss
        raise ImportError("the ANN first stage needs faiss: pip install 'pecm[ann]' (faiss-cpu)") from e
    return faiss


def choose_kind(n: int) -> str:
    return "flat" if n < 20000 else "ivf_flat" if n < 5_000_000 else "ivf_pq"


def default_params(kind: str, n: int, d: int) -> dict:
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"M": 32, "ef_construction": 80, "nprobe": 128}
    nlist = max(1, min(int(4 * math.sqrt(max(n, 1))), max(1, n // TRAIN_PER_LIST)))
    p = {"nlist": nlist, "nprobe": max(1, min(nlist, max(16, nlist // 8)))}
    if kind == "ivf_pq":
        m = next(m for m in (d // 4, d // 2, d) if m >= 1 and d % m == 0)
        p.update(m=m, nbits=8)
    return p


def check_params(kind, params: dict, n: int, d: int) -> tuple:
    """(kind, full params) with defaults filled in; bad values are ValueError naming them."""
    kind = choose_kind(n) if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS} or None, got {kind!r}")
    p = default_params(kind, n, d)
    allowed = set(p) | {"seed"}
    for key, v in params.items():
        if key not in allowed:
            raise ValueError(f"{key}: not a parameter of a {kind!r} ANN (expected one of {sorted(allowed)})")
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < (0 if key == "seed" else 1):
            raise ValueError(f"{key}: expected a positive int, got {v!r}")
        p[key] = int(v)
    if kind in ("ivf_flat", "ivf_pq") and p["nlist"] > max(1, n):
        raise ValueError(f"nlist: {p['nlist']} lists for {n} items (use nlist <= {max(1, n)})")
    if kind == "ivf_pq" and d % p["m"]:
        raise ValueError(f"m: D={d} is not divisible by m={p['m']}")
    if not fits(kind, p, n):
        raise ValueError(f"kind: a {kind!r} ANN with these parameters needs more than {n} items to train")
    p.setdefault("seed", 0)
    return kind, p


def fits(kind: str, params: dict, n: int) -> bool:
    """Whether ``n`` items are enough to train this ANN (IVF: one per list; PQ: 2**nbits)."""
    if kind in ("ivf_flat", "ivf_pq") and n < params["nlist"]:
        return False
    return not (kind == "ivf_pq" and n < 2 ** params["nbits"])


def build(pooled_rows, n: int, d: int, kind: str, params: dict, progress=None):
    """A trained FAISS index holding rows [0, n) of the pooled vectors; ``pooled_rows(rows)`` reads them."""
    faiss = _faiss()
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params["M"], ip)
        index.hnsw.efConstruction = params["ef_construction"]
    else:
        quant = faiss.IndexFlatIP(d)
        if kind == "ivf_flat":
            index = faiss.IndexIVFFlat(quant, d, params["nlist"], ip)
        else:
            index = faiss.IndexIVFPQ(quant, d, params["nlist"], params["m"], params["nbits"], ip)
        sample = min(n, max(TRAIN_PER_LIST * params["nlist"], 2 ** params.get("nbits", 0) * 40))
        rows = np.sort(np.random.default_rng(params["seed"]).choice(n, size=sample, replace=False))
        index.train(np.ascontiguousarray(pooled_rows(rows), dtype=np.float32))
    for s in range(0, n, BLOCK):
        index.add(np.ascontiguousarray(pooled_rows(np.arange(s, min(n, s + BLOCK))), dtype=np.float32))
        if progress is not None:
            progress(min(n, s + BLOCK) - s)
    return index


def serialize(index) -> np.ndarray:
    return _faiss().serialize_index(index)


def load(fd: int, nbytes: int, crc: int, name: str):
    """Deserialise the committed ANN through the snapshot's descriptor, after checking its CRC-32."""
    from .format import IndexCorruptError

    buf = bytearray(nbytes)
    view, off = memoryview(buf), 0
    while off < nbytes:
        n = os.preadv(fd, [view[off:]], off)
        if n <= 0:
            raise IndexCorruptError(f"index: {name} ended early ({off} of {nbytes} bytes)")
        off += n
    got = zlib.crc32(buf)
    if got != crc:
        raise IndexCorruptError(f"index: checksum mismatch in {name} (crc32 {got:#010x}, manifest {crc:#010x})")
    try:
        return _faiss().deserialize_index(np.frombuffer(buf, dtype=np.uint8))
    except RuntimeError as e:
        raise IndexCorruptError(f"index: {name} is not a readable FAISS index ({e})") from e


def search_params(kind: str, params: dict, nprobe: Optional[int], selector):
    """FAISS SearchParameters: nprobe (IVF) or efSearch (HNSW; ``nprobe`` sets it), and the selector."""
    faiss = _faiss()
    probe = params.get("nprobe", 1) if nprobe is None else nprobe
    kw = {} if selector is None else {"sel": selector}
    if kind in ("ivf_flat", "ivf_pq"):
        return faiss.SearchParametersIVF(nprobe=min(int(probe), params["nlist"]), **kw)
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=int(probe), **kw)
    return faiss.SearchParameters(**kw) if kw else None


def bitmap_selector(ok: np.ndarray):
    """(selector, keep-alive) passing the rows where ``ok`` is True."""
    faiss = _faiss()
    bits = np.packbits(ok.astype(np.uint8), bitorder="little")
    return faiss.IDSelectorBitmap(ok.size, faiss.swig_ptr(bits)), bits
