"""On-disk format of `pecm.index.ArchiveIndex`: manifest, data files, checksums, block encoding.

An index is a directory::

    manifest.json     the only source of truth (format version, K, D, dtype, count, weights, ...)
    prototypes.bin    [N, K, D] unit prototypes, masked-out prototypes exactly zero
                      (float16 default, float32, or int8 with scales.bin); for dtype "pq"
                      [N, K, R + M] uint8 coarse + product-quantisation codes (`pecm.pq`)
    scales.bin        [N, K] float32 per-prototype scale (int8: dequantisation; pq: 1/||decoded||)
    pq_codebook.bin   [S, M, 256, D/M] float32 PQ centroids, then [K, R, 256, D] float32 coarse centroids
                      (dtype "pq"; written once, at the first add)
    pooled.bin        [N, D] unit pooled vectors (Eq. 4 with the index weights, or given)
    masks.bin         [N, K] uint8 0/1
    ids.bin           [N] int64 global ids, strictly increasing (stable across `compact`)
    meta.sqlite       metadata rows (id, modality, source, text, extras JSON)
    write.lock        flock'ed by the single writer

Files may be *longer* than the manifest says (an interrupted append); readers use only the first
``count`` rows. After `compact` the data files carry a generation suffix (``prototypes.g3.bin``):
the manifest names the files of its generation, so replacing it switches atomically.

Checksums: ``manifest["checksums"]`` is a list of append records ``{"start", "count", "crc32":
{file: crc}}``, each covering the bytes that one append wrote to every file; an append adds a record
and never re-reads older data; ``verify=True`` recomputes all records.
"""

from __future__ import annotations

import json
import math
import os
import stat
import warnings
import zlib
from typing import Dict, Optional

import numpy as np
import torch

from ..operands import NORM_HI, NORM_LO
from ..operands import unit as unit_vectors
from ..pq import MAX_COARSE

FORMAT_NAME = "pecm-archive-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
META_DB = "meta.sqlite"
LOCK_FILE = "write.lock"
DTYPES = ("float16", "float32", "int8", "pq")
PQ_CODEBOOK = "pq_codebook.bin"  # immutable once committed: every generation shares it
EPS = 1e-12
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # index files are never followed through symbolic links


class IndexCorruptError(ValueError):
    """The index directory is truncated, corrupt or not an index (never a silent wrong answer)."""


class IndexLockedError(RuntimeError):
    """Another process holds the index open for writing."""


def has_scales(dtype: str) -> bool:
    return dtype in ("int8", "pq")


def pq_m(m: dict) -> int:
    """Codes per prototype of a manifest's pq index: coarse stages + PQ subspaces (0 for the other dtypes)."""
    return int(m["pq"]["m"]) + pq_coarse(m) if m.get("dtype") == "pq" else 0


def pq_coarse(m: dict) -> int:
    """Residual (coarse) stages of a manifest's pq index (manifests written before them have none)."""
    return int(m["pq"].get("coarse", 0)) if m.get("dtype") == "pq" else 0


def file_names(generation: int, scales: bool) -> Dict[str, str]:
    """Logical data file -> file name for one generation (generation 0 uses the plain names)."""
    suffix = "" if generation == 0 else f".g{generation}"
    names = ["prototypes", "pooled", "masks", "ids"] + (["scales"] if scales else [])
    return {n: f"{n}{suffix}.bin" for n in names}


PQ_POOLED = ("int8", "float16")  # pooled vectors of a pq index (manifest pq.pooled; first = the default)
PQ_SCALES = ("float16", "float32")  # per-prototype scales of a pq index (manifest pq.scales; first = the default)


def pq_storage(m: dict) -> Dict[str, str]:
    """{"pooled", "scales"} storage dtypes of a manifest's pq index (manifests written before these fields
    existed: float16 pooled, float32 scales)."""
    p = m.get("pq") or {}
    return {"pooled": p.get("pooled", "float16"), "scales": p.get("scales", "float32")}


def layout(k: int, d: int, dtype: str, m: int = 0, pq_pooled: str = "float16", pq_scales: str = "float32"):
    """Logical file -> (numpy dtype, per-item shape); ``m``: codes per prototype (dtype "pq"), ``pq_pooled`` /
    ``pq_scales``: the pq index's storage of pooled vectors and scales (`pq_storage`)."""
    store = {"int8": np.int8, "pq": np.uint8}.get(dtype) or np.dtype(dtype)
    pooled = np.float32 if dtype == "float32" else np.float16
    if dtype == "pq":
        pooled = np.dtype(pq_pooled)
    out = {
        "prototypes": (np.dtype(store), (k, m) if dtype == "pq" else (k, d)),
        "pooled": (np.dtype(pooled), (d,)),
        "masks": (np.dtype(np.uint8), (k,)),
        "ids": (np.dtype(np.int64), ()),
    }
    if has_scales(dtype):
        out["scales"] = (np.dtype(pq_scales if dtype == "pq" else np.float32), (k,))
    return out


def manifest_layout(m: dict) -> Dict[str, tuple]:
    extra = {f"pq_{k}": v for k, v in pq_storage(m).items()} if m.get("dtype") == "pq" else {}
    return layout(m["K"], m["D"], m["dtype"], pq_m(m), **extra)


def _bytes(lay: Dict[str, tuple]) -> Dict[str, int]:
    return {n: dt.itemsize * int(np.prod(shape, dtype=np.int64)) for n, (dt, shape) in lay.items()}


def item_bytes(k: int, d: int, dtype: str, m: int = 0, **storage) -> Dict[str, int]:
    return _bytes(layout(k, d, dtype, m, **storage))


def manifest_item_bytes(m: dict) -> Dict[str, int]:
    return _bytes(manifest_layout(m))


def int8_pooled(h) -> np.ndarray:
    """Unit pooled vectors [n, D] (float32) -> int8 rows ``round(h / s)``, ``s = max|h| / 127`` per row (the
    stored form of a pq index's pooled vectors; `pooled_values` decodes them)."""
    h = torch.as_tensor(h, dtype=torch.float32)
    s = h.abs().amax(-1, keepdim=True) / 127.0
    return torch.round(h / torch.where(s > 0, s, torch.ones_like(s))).clamp_(-127, 127).to(torch.int8).numpy()


def pooled_values(a: np.ndarray) -> np.ndarray:
    """Stored pooled rows as the unit float32 vectors the scores use: float16/float32 as they are; int8 rows
    ``r`` (pq indexes) decode to ``r / ||r||`` (0 for a zero row), so no per-row scale is stored."""
    if a.dtype != np.int8:
        return a.astype(np.float32)
    return unit_int8_rows_(torch.from_numpy(a).float()).numpy()


def unit_int8_rows_(f: torch.Tensor) -> torch.Tensor:
    """In place: float32 rows holding int8 pooled values -> r / ||r|| (0 for a zero row); returns ``f``."""
    n2 = f.square().sum(-1, keepdim=True)
    return f.mul_(torch.where(n2 > 0, n2.rsqrt(), torch.zeros_like(n2)))


def check_regular_files(root: str, names) -> None:
    """Writer: every existing index file must be a regular file (not a symlink, FIFO or directory), so
    no write of the index can land outside its directory."""
    for name in names:
        p = os.path.join(root, name)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise IndexCorruptError(f"index: {p} is not a regular file (a symbolic link?); refusing to write to it")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data) -> None:
    """os.write until every byte is written (a short write is retried, an error raises)."""
    view = memoryview(data).cast("B")
    while len(view):
        view = view[os.write(fd, view) :]


def write_file(path: str, data) -> None:
    """Create (or truncate) ``path`` without following a symlink, write every byte and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NOFOLLOW, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def id_array(ids) -> np.ndarray:
    """Item ids as int64 [n]: TypeError for non-integer ids, ValueError beyond the int64 range."""
    a = np.asarray(ids)
    if a.dtype.kind not in "iu" and not (a.size == 0 and a.dtype.kind == "f"):
        raise TypeError(f"ids: expected integer ids, got dtype {a.dtype}")
    if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
        raise ValueError("ids: out of the int64 range")
    return a.astype(np.int64).reshape(-1)


def write_manifest(root: str, manifest: dict) -> None:
    """Atomic replace: write a temp file, fsync it, os.replace, fsync the directory."""
    tmp = os.path.join(root, f".{MANIFEST}.{os.getpid()}.tmp")
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    try:
        write_file(tmp, data)
        os.replace(tmp, os.path.join(root, MANIFEST))
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    fsync_dir(root)


MAX_K = 4096  # prototypes per item
MAX_D = 65536  # prototype dimension
MAX_MANIFEST_BYTES = 1 << 30


def _int(m: dict, key: str, lo: int, hi: int, path: str) -> int:
    v = m.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise IndexCorruptError(f"index: {path}: field {key!r} must be an int in [{lo}, {hi}], got {v!r}")
    return v


def _crc(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 32


def validate_manifest(m: dict, path: str) -> dict:
    """Type and range checks of every manifest field (a damaged manifest never opens).

    Data file names are not trusted: they must be exactly `file_names` of the manifest's generation,
    so a manifest can never make a reader, `add` or `compact` touch a file outside the index.
    """
    needed = ("K", "D", "dtype", "count", "weights", "files", "checksums", "tombstones", "next_id", "generation")
    missing = [x for x in needed if x not in m]
    if missing:
        raise IndexCorruptError(f"index: {path} lacks fields {missing}")
    k = _int(m, "K", 1, MAX_K, path)
    d = _int(m, "D", 1, MAX_D, path)
    if m["dtype"] not in DTYPES:
        raise IndexCorruptError(f"index: {path}: field 'dtype' must be one of {DTYPES}, got {m['dtype']!r}")
    _validate_pq(m, path, d)
    limit = (1 << 62) // max(manifest_item_bytes(m).values())
    count = _int(m, "count", 0, limit, path)
    next_id = _int(m, "next_id", count, 1 << 62, path)
    gen = _int(m, "generation", 0, 1 << 62, path)
    w = m["weights"]
    if (
        not isinstance(w, list)
        or len(w) != k
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 for x in w)
    ):
        raise IndexCorruptError(f"index: {path}: field 'weights' must be a list of K={k} finite numbers >= 0")
    want = file_names(gen, has_scales(m["dtype"]))
    if m["files"] != want:
        raise IndexCorruptError(
            f"index: {path}: field 'files' must name this generation's data files {sorted(want.values())}, "
            f"got {m['files']!r}"
        )
    recs, start = m["checksums"], 0
    if not isinstance(recs, list):
        raise IndexCorruptError(f"index: {path}: field 'checksums' must be a list")
    for j, r in enumerate(recs):
        ok = isinstance(r, dict) and isinstance(r.get("crc32"), dict) and set(r["crc32"]) == set(want)
        ok = ok and r.get("start") == start and isinstance(r.get("count"), int) and not isinstance(r["count"], bool)
        ok = ok and r["count"] >= 1 and all(_crc(v) for v in r["crc32"].values())
        ok = ok and ("meta_crc32" not in r or _crc(r["meta_crc32"]))
        if not ok:
            raise IndexCorruptError(f"index: {path}: field 'checksums': record {j} is malformed (rows from {start})")
        start += r["count"]
    if start != count:
        raise IndexCorruptError(f"index: {path}: field 'count' is {count}, the checksum records cover {start} rows")
    _validate_ann(m, path, count, gen)
    _validate_defaults(m, path)
    t = m["tombstones"]
    if not isinstance(t, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in t):
        raise IndexCorruptError(f"index: {path}: field 'tombstones' must be a list of ints")
    if t and (min(t) < 0 or max(t) >= next_id or len(set(t)) != len(t)):
        raise IndexCorruptError(f"index: {path}: field 'tombstones' holds ids outside [0, {next_id}) or repeats")
    return m


def pq_codebook_bytes(m: dict) -> int:
    p = m["pq"]
    return 4 * ((m["K"] if p["per_slot"] else 1) + m["K"] * pq_coarse(m)) * m["D"] * 256


def _validate_pq(m: dict, path: str, d: int) -> None:
    p = m.get("pq")
    if m["dtype"] != "pq":
        if p is not None:
            raise IndexCorruptError(f"index: {path}: field 'pq' belongs to dtype 'pq' only")
        return
    bad = f"index: {path}: field 'pq'"
    keys = {"m", "per_slot", "coarse", "codebook", "pooled", "scales"}
    if not isinstance(p, dict) or set(p) - keys or not isinstance(p.get("per_slot"), bool):
        raise IndexCorruptError(f"{bad} must be an object with m, per_slot, coarse, pooled, scales and codebook")
    st = pq_storage(m)
    if st["pooled"] not in PQ_POOLED or st["scales"] not in PQ_SCALES:
        raise IndexCorruptError(f"{bad}: pooled must be one of {PQ_POOLED} and scales one of {PQ_SCALES}, got {st}")
    r = p.get("coarse", 0)
    if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r <= MAX_COARSE:
        raise IndexCorruptError(f"{bad}: coarse must be an int in [0, {MAX_COARSE}], got {r!r}")
    mm = p.get("m")
    if not isinstance(mm, int) or isinstance(mm, bool) or not 1 <= mm <= d or d % mm:
        raise IndexCorruptError(f"{bad}: m must be an int in [1, D={d}] dividing D, got {mm!r}")
    cb = p.get("codebook")
    if cb is None:
        if m["count"]:
            raise IndexCorruptError(f"{bad}: an index with items must have a codebook")
        return
    if not isinstance(cb, dict) or cb.get("file") != PQ_CODEBOOK or not _crc(cb.get("crc32")):
        raise IndexCorruptError(f"{bad}: codebook must name {PQ_CODEBOOK} with its crc32")
    if cb.get("bytes") != pq_codebook_bytes(m):
        raise IndexCorruptError(f"{bad}: codebook bytes must be {pq_codebook_bytes(m)}, got {cb.get('bytes')!r}")


def _validate_ann(m: dict, path: str, count: int, gen: int) -> None:
    a = m.get("ann")
    if a is None:
        return
    from .ann import FILE_RE, KINDS

    bad = f"index: {path}: field 'ann'"
    if not isinstance(a, dict) or not isinstance(a.get("file"), str):
        raise IndexCorruptError(f"{bad} must be an object naming its file")
    name = FILE_RE.match(a["file"])
    if name is None or int(name.group(1)) != gen:
        raise IndexCorruptError(f"{bad}: file must be ann.g{gen}.s<n>.faiss of this generation, got {a['file']!r}")
    ints = ("rows", "bytes", "crc32")
    if a.get("kind") not in KINDS or not all(isinstance(a.get(x), int) and not isinstance(a[x], bool) for x in ints):
        raise IndexCorruptError(f"{bad}: kind must be one of {KINDS} and rows/bytes/crc32 ints")
    if not 1 <= a["rows"] <= count or a["bytes"] < 1 or not _crc(a["crc32"]):
        raise IndexCorruptError(f"{bad}: rows must be in [1, count={count}], bytes >= 1, crc32 a 32-bit value")
    p = a.get("params")
    if not isinstance(p, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in p.values()
    ):
        raise IndexCorruptError(f"{bad}: params must map names to ints >= 0")


def _validate_defaults(m: dict, path: str) -> None:
    t = m.get("search_defaults")
    if t is None:
        return
    bad = IndexCorruptError(f"index: {path}: field 'search_defaults' is malformed")
    if not isinstance(t, dict) or t.get("mode", "exhaustive") not in ("exhaustive", "two_stage", "ann"):
        raise bad
    for mode in ("two_stage", "ann"):
        e = t.get(mode)
        if e is None:
            continue
        ok = isinstance(e, dict) and set(e) <= {"shortlist", "nprobe"}
        if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 31 for v in e.values()):
            raise bad
    if set(t) - {"mode", "two_stage", "ann"}:
        raise bad


def read_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"index: no such directory {root!r}")
    if not os.path.exists(path):
        raise IndexCorruptError(f"index: {root!r} has no {MANIFEST} (not a pecm index, or never committed)")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise IndexCorruptError(f"index: {path} is larger than {MAX_MANIFEST_BYTES} bytes")
        m = json.loads(data.decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise IndexCorruptError(f"index: {path} is unreadable: {type(e).__name__}: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise IndexCorruptError(f"index: {path} is not a {FORMAT_NAME} manifest")
    if m.get("version") != FORMAT_VERSION:
        v = m.get("version")
        raise IndexCorruptError(f"index: format version {v!r} is not supported (expected {FORMAT_VERSION})")
    return validate_manifest(m, path)


def open_files(root: str, m: dict) -> Dict[str, int]:
    """Read-only descriptors of one generation's data files (a handle's snapshot: files removed by a
    later `compact` stay readable through them)."""
    fds: Dict[str, int] = {}
    names = dict(m["files"])
    if m.get("ann"):
        names["ann"] = m["ann"]["file"]
    if (m.get("pq") or {}).get("codebook"):
        names["codebook"] = PQ_CODEBOOK
    try:
        for logical, name in names.items():
            fds[logical] = os.open(os.path.join(root, name), os.O_RDONLY | NOFOLLOW)
    except OSError as e:
        for fd in fds.values():
            os.close(fd)
        name = os.path.basename(e.filename or "")
        raise IndexCorruptError(f"index: data file {name} is missing ({e})") from e
    return fds


def check_sizes(m: dict, fds: Dict[str, int]) -> None:
    """Cheap check on every open: every data file holds at least the committed bytes."""
    sizes = manifest_item_bytes(m)
    for logical, name in m["files"].items():
        need = m["count"] * sizes[logical]
        have = os.fstat(fds[logical]).st_size
        if have < need:
            raise IndexCorruptError(f"index: {name} is truncated: {have} bytes, the manifest commits {need}")
    cb = (m.get("pq") or {}).get("codebook")
    if cb and os.fstat(fds["codebook"]).st_size != cb["bytes"]:
        raise IndexCorruptError(
            f"index: {PQ_CODEBOOK} has {os.fstat(fds['codebook']).st_size} bytes, the manifest {cb['bytes']}"
        )
    a = m.get("ann")
    if a and os.fstat(fds["ann"]).st_size != a["bytes"]:
        raise IndexCorruptError(
            f"index: {a['file']} has {os.fstat(fds['ann']).st_size} bytes, the manifest {a['bytes']}"
        )


def crc_range(fd: int, offset: int, length: int, block: int = 1 << 24) -> int:
    crc = 0
    left = length
    while left > 0:
        buf = os.pread(fd, min(block, left), offset)
        if not buf:
            break
        crc = zlib.crc32(buf, crc)
        left -= len(buf)
        offset += len(buf)
    return crc


def verify_checksums(m: dict, fds: Dict[str, int]) -> None:
    sizes = manifest_item_bytes(m)
    for rec in m["checksums"]:
        for logical, crc in rec["crc32"].items():
            name = m["files"][logical]
            got = crc_range(fds[logical], rec["start"] * sizes[logical], rec["count"] * sizes[logical])
            if got != crc:
                raise IndexCorruptError(
                    f"index: checksum mismatch in {name} for rows [{rec['start']}, {rec['start'] + rec['count']}) "
                    f"(crc32 {got:#010x}, manifest {crc:#010x})"
                )
    cb = (m.get("pq") or {}).get("codebook")
    if cb:
        got = crc_range(fds["codebook"], 0, cb["bytes"])
        if got != cb["crc32"]:
            raise IndexCorruptError(
                f"index: checksum mismatch in {PQ_CODEBOOK} (crc32 {got:#010x}, manifest {cb['crc32']:#010x})"
            )
    a = m.get("ann")
    if a:
        got = crc_range(fds["ann"], 0, a["bytes"])
        if got != a["crc32"]:
            raise IndexCorruptError(
                f"index: checksum mismatch in {a['file']} (crc32 {got:#010x}, manifest {a['crc32']:#010x})"
            )


def _given_pooled(pooled) -> torch.Tensor:
    """Caller-given pooled vectors as float32 (not yet normalised); NaN/inf is an error."""
    h = torch.from_numpy(np.array(pooled, dtype=np.float32))
    if not bool(torch.isfinite(h).all()):
        raise ValueError("pooled: contains NaN or inf values")
    return h


def _native_encoder():
    """`pecm._C.encode_items` when the extension is built and not disabled (PECM_INDEX_ENCODER=torch)."""
    choice = os.environ.get("PECM_INDEX_ENCODER", "auto").strip().lower() or "auto"
    if choice not in ("auto", "cpp", "torch"):
        raise ValueError(f"PECM_INDEX_ENCODER: expected 'auto', 'cpp' or 'torch', got {choice!r}")
    if choice == "torch":
        return None
    try:
        from .. import _C

        return _C.encode_items
    except ImportError:
        if choice == "cpp":
            raise ImportError("PECM_INDEX_ENCODER=cpp but pecm._C is not built (pip install -e .)") from None
        return None


class BlockEncoder:
    """Normalises blocks of items into the stored arrays, reusing preallocated buffers.

    Fresh multi-hundred-MB allocations cost more than the arithmetic (page faults), so the float32
    work buffers live as long as one `ArchiveIndex.add` call. The arrays returned by `encode` are
    views of those buffers: write them out before the next call.

    float16 indexes (the default) use the one-pass C++ encoder `pecm._C.encode_items` when the
    extension is built (~4x the items/s of the torch ops on 2 cores; ``PECM_INDEX_ENCODER=torch``
    forces the torch path, which float32 and int8 indexes always use). Both produce the same
    arrays up to float32 rounding (tested).
    """

    def __init__(self, k: int, d: int, weights: np.ndarray, dtype: str, block: int, codebook=None, storage=None):
        self.k, self.d, self.dtype, self.codebook = k, d, dtype, codebook  # codebook: pecm.pq.Codebook (pq)
        self.storage = storage or pq_storage({})  # dtype "pq": the storage of pooled vectors and scales
        self.native = _native_encoder() if dtype == "float16" else None
        self.w = torch.as_tensor(np.asarray(weights), dtype=torch.float32)
        self.x32 = torch.empty((block, k, d))
        self.nrm = torch.empty((block, k))
        self.pool = torch.empty((block, 1, d))
        self.u32 = None  # float32 scratch for float16 output when the input is the caller's float32 array
        self.out = torch.empty((block, k, d), dtype=torch.float16 if dtype == "float16" else torch.float32)

    def _input(self, protos, n: int) -> torch.Tensor:
        if isinstance(protos, torch.Tensor):
            t = protos.detach().cpu()
        else:
            a = np.asarray(protos)
            if a.dtype not in (np.float16, np.float32, np.float64):
                a = a.astype(np.float32)
            with warnings.catch_warnings():  # read-only memmaps: we only read from the tensor
                warnings.simplefilter("ignore")
                t = torch.from_numpy(a)
        if t.dtype == torch.float32 and t.is_contiguous():
            return t
        x = self.x32[:n]
        x.copy_(t)
        return x

    def _encode_native(self, protos, m: Optional[np.ndarray], pooled) -> Dict[str, np.ndarray]:
        n = len(protos)
        t = protos.detach().cpu() if isinstance(protos, torch.Tensor) else None
        a = t.numpy() if t is not None and t.dtype in (torch.float16, torch.float32) else np.asarray(protos)
        if a.dtype not in (np.float16, np.float32) or not a.flags.c_contiguous:
            a = self._input(protos, n).numpy()  # float64 / strided -> a float32 copy in the work buffer
        unit = self.out[:n].numpy()
        pool = self.pool[:n].view(n, self.d).numpy() if pooled is None else None
        if not self.native(a, self.w.numpy(), m, unit, pool, EPS):  # EPS: ignored (kept in the signature)
            raise ValueError("prototypes: contain NaN or inf values")
        h = pool if pooled is None else unit_vectors(_given_pooled(pooled)).numpy()
        return {
            "masks": np.ones((n, self.k), dtype=np.uint8) if m is None else m,
            "prototypes": unit,
            "pooled": h.astype(np.float16),
        }

    def encode(self, protos, masks: Optional[np.ndarray], pooled) -> Dict[str, np.ndarray]:
        if self.native is not None:
            return self._encode_native(
                protos, None if masks is None else np.array(masks, dtype=bool).view(np.uint8), pooled
            )
        n = len(protos)
        x = self._input(protos, n)
        nrm = torch.linalg.vector_norm(x, dim=-1, out=self.nrm[:n])
        m = np.ones((n, self.k), dtype=np.uint8) if masks is None else np.array(masks, dtype=bool).astype(np.uint8)
        # Norms the one float32 scale handles exactly; the rest (exact zeros, tiny, huge or overflowed
        # norms) are normalised separately with a power-of-two pre-scale (pecm.operands.unit): no eps.
        good = (nrm >= NORM_LO**0.5) & (nrm <= NORM_HI**0.5)
        fix = None
        if not bool(good.all()):
            if not bool(torch.isfinite(x).all()):
                raise ValueError("prototypes: contain NaN or inf values")
            bad = (~good).nonzero(as_tuple=True)
            fix = unit_vectors(x[bad]) * torch.from_numpy(m)[bad].unsqueeze(-1).float()
            nrm[bad] = float("inf")  # scale 0 below; the fixed unit vectors are put in afterwards
        sc = nrm.reciprocal_()
        if masks is not None:
            sc.mul_(torch.from_numpy(m))
        if pooled is None:
            h = torch.bmm((sc * self.w).unsqueeze(1), x, out=self.pool[:n]).squeeze(1)
            if fix is not None:
                h.index_put_((bad[0],), fix * self.w[bad[1]].unsqueeze(-1), accumulate=True)
        else:
            h = _given_pooled(pooled)
        h = unit_vectors(h)
        if self.out.dtype == torch.float16:  # f32 multiply + f16 copy is ~2x faster than a mixed-dtype mul
            own = x.data_ptr() == self.x32.data_ptr()
            if not own and self.u32 is None:
                self.u32 = torch.empty_like(self.x32)
            tmp = x if own else self.u32[:n]
            torch.mul(x, sc.unsqueeze(-1), out=tmp)
            unit = self.out[:n]
            unit.copy_(tmp)
        else:
            unit = torch.mul(x, sc.unsqueeze(-1), out=self.out[:n])
        if fix is not None:
            unit[bad] = fix.to(unit.dtype)
        out = {"masks": m}
        if self.dtype == "pq":  # unit float32 prototypes -> codes + 1/||decoded|| (masked: code 0, scale 0)
            from .. import pq

            out["prototypes"], scales = pq.encode(unit.numpy(), m, self.codebook, self.storage["scales"])
            out["scales"] = scales
            out["pooled"] = int8_pooled(h) if self.storage["pooled"] == "int8" else h.half().numpy()
        elif self.dtype == "int8":
            scale = unit.abs().amax(-1) / 127.0
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            out["prototypes"] = torch.round(unit / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8).numpy()
            out["scales"] = scale.numpy()
            out["pooled"] = h.half().numpy()
        else:
            out["prototypes"] = unit.numpy()
            out["pooled"] = h.to(unit.dtype).numpy()
        return out
