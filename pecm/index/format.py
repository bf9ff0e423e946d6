"""On-disk format of `pecm.index.ArchiveIndex`: manifest, data files, checksums, block encoding.

An index is a directory::

    manifest.json     the only source of truth (format version, K, D, dtype, count, weights, ...)
    prototypes.bin    [N, K, D] unit prototypes, masked-out prototypes exactly zero
                      (float16 default, float32, or int8 with scales.bin)
    scales.bin        [N, K] float32 per-prototype dequantisation scale (int8 only)
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
import os
import zlib
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

FORMAT_NAME = "pecm-archive-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
META_DB = "meta.sqlite"
LOCK_FILE = "write.lock"
DTYPES = ("float16", "float32", "int8")
EPS = 1e-12


class IndexCorruptError(ValueError):
    """The index directory is truncated, corrupt or not an index (never a silent wrong answer)."""


class IndexLockedError(RuntimeError):
    """Another process holds the index open for writing."""


def file_names(generation: int, int8: bool) -> Dict[str, str]:
    """Logical data file -> file name for one generation (generation 0 uses the plain names)."""
    suffix = "" if generation == 0 else f".g{generation}"
    names = ["prototypes", "pooled", "masks", "ids"] + (["scales"] if int8 else [])
    return {n: f"{n}{suffix}.bin" for n in names}


def layout(k: int, d: int, dtype: str) -> Dict[str, tuple]:
    """Logical file -> (numpy dtype, per-item shape)."""
    store = np.int8 if dtype == "int8" else np.dtype(dtype)
    pooled = np.float32 if dtype == "float32" else np.float16
    out = {
        "prototypes": (np.dtype(store), (k, d)),
        "pooled": (np.dtype(pooled), (d,)),
        "masks": (np.dtype(np.uint8), (k,)),
        "ids": (np.dtype(np.int64), ()),
    }
    if dtype == "int8":
        out["scales"] = (np.dtype(np.float32), (k,))
    return out


def item_bytes(k: int, d: int, dtype: str) -> Dict[str, int]:
    return {n: dt.itemsize * int(np.prod(shape, dtype=np.int64)) for n, (dt, shape) in layout(k, d, dtype).items()}


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(root: str, manifest: dict) -> None:
    """Atomic replace: write a temp file, fsync it, os.replace, fsync the directory."""
    tmp = os.path.join(root, f".{MANIFEST}.{os.getpid()}.tmp")
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, MANIFEST))
    fsync_dir(root)


def read_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"index: no such directory {root!r}")
    if not os.path.exists(path):
        raise IndexCorruptError(f"index: {root!r} has no {MANIFEST} (not a pecm index, or never committed)")
    try:
        with open(path, "rb") as f:
            m = json.loads(f.read().decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexCorruptError(f"index: {path} is unreadable: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise IndexCorruptError(f"index: {path} is not a {FORMAT_NAME} manifest")
    if m.get("version") != FORMAT_VERSION:
        v = m.get("version")
        raise IndexCorruptError(f"index: format version {v} is not supported (expected {FORMAT_VERSION})")
    needed = ("K", "D", "dtype", "count", "weights", "files", "checksums", "tombstones", "next_id", "generation")
    missing = [x for x in needed if x not in m]
    if missing:
        raise IndexCorruptError(f"index: {path} lacks fields {missing}")
    if sum(r["count"] for r in m["checksums"]) != m["count"]:
        raise IndexCorruptError(f"index: {path}: checksum records cover a different count than {m['count']}")
    return m


def check_sizes(root: str, m: dict) -> None:
    """Cheap check on every open: every data file holds at least the committed bytes."""
    sizes = item_bytes(m["K"], m["D"], m["dtype"])
    for logical, name in m["files"].items():
        p = os.path.join(root, name)
        need = m["count"] * sizes[logical]
        try:
            have = os.path.getsize(p)
        except OSError as e:
            raise IndexCorruptError(f"index: data file {name} is missing ({e})") from e
        if have < need:
            raise IndexCorruptError(f"index: {name} is truncated: {have} bytes, the manifest commits {need}")


def crc_range(path: str, offset: int, length: int, block: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            buf = f.read(min(block, left))
            if not buf:
                break
            crc = zlib.crc32(buf, crc)
            left -= len(buf)
    return crc


def verify_checksums(root: str, m: dict) -> None:
    sizes = item_bytes(m["K"], m["D"], m["dtype"])
    for rec in m["checksums"]:
        for logical, crc in rec["crc32"].items():
            name = m["files"][logical]
            got = crc_range(os.path.join(root, name), rec["start"] * sizes[logical], rec["count"] * sizes[logical])
            if got != crc:
                raise IndexCorruptError(
                    f"index: checksum mismatch in {name} for rows [{rec['start']}, {rec['start'] + rec['count']}) "
                    f"(crc32 {got:#010x}, manifest {crc:#010x})"
                )


def encode_block(protos, masks: Optional[np.ndarray], pooled, weights: np.ndarray, dtype: str) -> Dict[str, np.ndarray]:
    """Normalise one block of items into the stored arrays (vectorised; torch for threads).

    Returns logical file -> contiguous numpy array (without "ids").
    """
    a = protos.detach().cpu().numpy() if isinstance(protos, torch.Tensor) else np.asarray(protos)
    if a.dtype != np.float32 or not a.flags.writeable:
        a = np.array(a, dtype=np.float32)  # one copy; also makes read-only memmaps safe for torch
    x = torch.from_numpy(a)
    n, k, d = x.shape
    if not bool(torch.isfinite(x).all()):
        raise ValueError("prototypes: contain NaN or inf values")
    m = torch.ones((n, k), dtype=torch.bool) if masks is None else torch.from_numpy(np.array(masks, dtype=bool))
    unit = F.normalize(x, dim=-1, eps=EPS) * m.unsqueeze(-1)
    if pooled is None:
        w = torch.as_tensor(weights, dtype=torch.float32)
        p = F.normalize(torch.einsum("nkd,k->nd", unit, w), dim=-1, eps=EPS)
    else:
        p = torch.from_numpy(np.array(pooled, dtype=np.float32))
        if not bool(torch.isfinite(p).all()):
            raise ValueError("pooled: contains NaN or inf values")
        p = F.normalize(p, dim=-1, eps=EPS)
    out = {"masks": m.to(torch.uint8).numpy()}
    if dtype == "int8":
        scale = unit.abs().amax(-1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        out["prototypes"] = torch.round(unit / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8).numpy()
        out["scales"] = scale.numpy()
        out["pooled"] = p.half().numpy()
    else:
        tdt = torch.float16 if dtype == "float16" else torch.float32
        out["prototypes"] = unit.to(tdt).numpy()
        out["pooled"] = p.to(tdt).numpy()
    return out
