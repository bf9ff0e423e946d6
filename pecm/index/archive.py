"""`ArchiveIndex`: the on-disk PECM archive (create / open / add / get / delete / compact / search).

Crash safety (append): (1) truncate every data file to its committed size, (2) write the new rows
at the end and fsync, (3) insert and commit the metadata rows, (4) replace ``manifest.json``
atomically (temp file, fsync, ``os.replace``, fsync the directory). Only step 4 commits; a crash
before it leaves the previous index: readers use only the manifest's ``count`` rows, and metadata
rows with id >= ``next_id`` are invisible; the next `add` (same handle or a new writer) deletes
them in the transaction that inserts its own rows. A failed `add` (e.g. ENOSPC) rolls its bytes
and rows back before raising, so the handle stays usable and ids are never given twice.

Concurrency: one writer (``mode="a"``) holds an exclusive ``fcntl.flock`` on ``write.lock``; a
second writer gets `IndexLockedError`. Readers take no lock. A handle holds read-only descriptors
of its generation's data files (a snapshot: a concurrent `compact` that removes them cannot break
a search under way); `search`, `get`, `len()` and `stats()` of a reader first look at the manifest
(one ``stat``) and move to the latest commit when it changed, so deleted items are never returned
after the `delete` committed. `refresh()` does the same explicitly.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import os
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

import numpy as np

from . import format as fmt
from .format import IndexCorruptError, IndexLockedError
from .meta import MetaStore

ADD_BLOCK = 8192  # items encoded and written per block


DROP_CACHE_BYTES = 64 << 20  # appends at least this large drop their (fsynced) pages from the page cache
WRITE_CHUNK = 4 << 20  # bytes per pwrite: 1-4 MB writes streamed 1.7-2.0 GB/s to this VM's disk, 128 MB ones 0.8


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    while len(view):
        n = os.pwrite(fd, view[:WRITE_CHUNK], offset)
        view, offset = view[n:], offset + n


class _Files:
    """Read-only descriptors of one generation's data files, closed when the last user drops them."""

    def __init__(self, fds: Dict[str, int]):
        self.fds = fds
        self.ann = None  # the loaded FAISS index of this generation's ANN file (ArchiveIndex.ann)

    def close(self) -> None:
        fds, self.fds = self.fds, {}
        self.ann = None
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self):
        self.close()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _manifest_stamp(root: str):
    try:
        st = os.stat(os.path.join(root, fmt.MANIFEST))
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _verify_meta(root: str, m: dict, fds: Dict[str, int]) -> None:
    """Recompute ``meta_crc32`` of every append record (records of indexes written before it existed have
    none and are skipped); the ids of a record's rows are read through the snapshot's ``ids.bin``."""
    recs = [r for r in m["checksums"] if "meta_crc32" in r]
    if not recs:
        return
    store = MetaStore(os.path.join(root, fmt.META_DB), writable=False)
    try:
        for r in recs:
            raw = os.pread(fds["ids"], r["count"] * 8, r["start"] * 8)
            ids = np.frombuffer(raw, dtype=np.int64)
            got = store.rows_crc(ids.tolist())
            if got != r["meta_crc32"]:
                raise IndexCorruptError(
                    f"index: metadata of rows [{r['start']}, {r['start'] + r['count']}) in {fmt.META_DB} was changed "
                    f"or lost (crc32 {got:#010x}, manifest {r['meta_crc32']:#010x})"
                )
    finally:
        store.close()


def _as_array(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class ArchiveIndex:
    """An on-disk archive of PECM items; see the module docstring and docs/index.md."""

    def __init__(self, root: str, manifest: dict, mode: str, lock_fd: Optional[int], files: _Files, stamp=None):
        self.root, self.mode, self._lock_fd = root, mode, lock_fd
        self._meta: Optional[MetaStore] = None
        self._switch = threading.RLock()  # a refresh and the views taken by concurrent calls do not interleave
        self._load(manifest, files, stamp)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        path,
        K: int,
        D: int,
        dtype: str = "float16",
        weights=None,
        overwrite: bool = False,
        pq_m: Optional[int] = None,
        pq_per_slot: bool = False,
        pq_coarse: Optional[int] = None,
        pq_pooled: Optional[str] = None,
        pq_scales: Optional[str] = None,
    ):
        """Create an empty index at ``path`` and return it open for appending.

        ``dtype="pq"``: product-quantised prototypes (`pecm.pq`): ``pq_m`` codes of 8 bits per prototype
        (default D / 4: 64 bytes at D = 256), one codebook shared by every slot or, with ``pq_per_slot``,
        one per slot, after ``pq_coarse`` residual stages of 256 full-dimensional centroids per slot (1 byte
        each per prototype; default `pecm.pq.DEFAULT_COARSE`); the codebook is trained on the first `add` (or
        `train_pq`). ``pq_pooled``: the pooled vectors as ``"int8"`` (default; D bytes, decoded as r / ||r||)
        or ``"float16"``; ``pq_scales``: the per-prototype scales as ``"float16"`` (default) or ``"float32"``.
        Needs faiss-cpu.
        """
        path = os.fspath(path)
        for name, v, hi in (("K", K, fmt.MAX_K), ("D", D, fmt.MAX_D)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= int(v) <= hi:
                raise ValueError(f"{name}: expected an int in [1, {hi}], got {v!r}")
        if dtype not in fmt.DTYPES:
            raise ValueError(f"dtype: expected one of {fmt.DTYPES}, got {dtype!r}")
        pq_entry = None
        if dtype == "pq":
            from .. import pq

            m_sub = pq.default_m(int(D)) if pq_m is None else pq.check_m(pq_m, int(D))
            if not isinstance(pq_per_slot, bool):
                raise TypeError(f"pq_per_slot: expected a bool, got {pq_per_slot!r}")
            r = pq.DEFAULT_COARSE if pq_coarse is None else pq.check_coarse(pq_coarse)
            pq._faiss()  # fail now, not at the first add, when FAISS is missing
            pooled_dt = fmt.PQ_POOLED[0] if pq_pooled is None else pq_pooled
            scales_dt = fmt.PQ_SCALES[0] if pq_scales is None else pq_scales
            if pooled_dt not in fmt.PQ_POOLED:
                raise ValueError(f"pq_pooled: expected one of {fmt.PQ_POOLED}, got {pq_pooled!r}")
            if scales_dt not in fmt.PQ_SCALES:
                raise ValueError(f"pq_scales: expected one of {fmt.PQ_SCALES}, got {pq_scales!r}")
            pq_entry = {
                "m": m_sub,
                "per_slot": pq_per_slot,
                "coarse": r,
                "pooled": pooled_dt,
                "scales": scales_dt,
                "codebook": None,
            }
        elif pq_m is not None or pq_per_slot or pq_coarse is not None or pq_pooled is not None or pq_scales is not None:
            raise ValueError(
                f"pq_m / pq_per_slot / pq_coarse / pq_pooled / pq_scales: only for dtype 'pq', got dtype {dtype!r}"
            )
        w = np.ones(K, dtype=np.float64) if weights is None else _as_array(weights, "weights").astype(np.float64)
        if w.shape != (K,):
            raise ValueError(f"weights: expected shape [K={K}], got {list(w.shape)}")
        if not np.all(np.isfinite(w)) or (w < 0).any():
            raise ValueError("weights: must be finite and non-negative")
        if os.path.exists(os.path.join(path, fmt.MANIFEST)):
            if not overwrite:
                raise FileExistsError(f"index: {path!r} already holds an index (use overwrite=True)")
            shutil.rmtree(path)
        os.makedirs(path, exist_ok=True)
        files = fmt.file_names(0, fmt.has_scales(dtype))
        for name in files.values():
            open(os.path.join(path, name), "wb").close()
        MetaStore(os.path.join(path, fmt.META_DB), writable=True).close()
        manifest = {
            "format": fmt.FORMAT_NAME,
            "version": fmt.FORMAT_VERSION,
            "K": int(K),
            "D": int(D),
            "dtype": dtype,
            "count": 0,
            "next_id": 0,
            "generation": 0,
            "normalized": True,
            "weights": [float(x) for x in w],
            "files": files,
            "item_bytes": fmt.manifest_item_bytes({"K": K, "D": D, "dtype": dtype, "pq": pq_entry}),
            "sizes": {n: 0 for n in files},
            "checksums": [],
            "tombstones": [],
        }
        if pq_entry:
            manifest["pq"] = pq_entry
        fmt.write_manifest(path, manifest)
        return cls.open(path, mode="a")

    @classmethod
    def open(cls, path, verify: bool = False, mode: str = "r"):
        """Open an index for reading (``"r"``) or appending (``"a"``, exclusive).

        Always checks the manifest and the data file sizes; ``verify=True`` also recomputes every
        checksum. Problems raise `IndexCorruptError` (a ValueError).
        """
        path = os.fspath(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode: expected 'r' or 'a', got {mode!r}")
        lock_fd = None
        if mode == "a":
            if not os.path.isdir(path):
                raise FileNotFoundError(f"index: no such directory {path!r}")
            try:
                lock_fd = os.open(os.path.join(path, fmt.LOCK_FILE), os.O_RDWR | os.O_CREAT | fmt.NOFOLLOW, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise IndexCorruptError(f"index: {path!r}: {fmt.LOCK_FILE} is a symbolic link") from e
                raise OSError(e.errno, f"index: {path!r} cannot be opened for writing: {e.strerror}") from e
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock_fd)
                raise IndexLockedError(f"index: {path!r} is open for writing by another process") from None
        try:
            m, files, stamp = cls._read_consistent(path, verify)
            idx = cls(path, m, mode, lock_fd, files, stamp)
            if mode == "a":
                db = fmt.META_DB
                fmt.check_regular_files(path, [*m["files"].values(), fmt.MANIFEST, db, db + "-wal", db + "-shm"])
                idx._recover()
            return idx
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise

    @staticmethod
    def _read_consistent(path: str, verify: bool):
        """(manifest, its data files, manifest stamp) of one commit, retrying while a concurrent commit
        (`compact`, `build_ann`) replaces files between our reads."""
        for _ in range(20):
            stamp = _manifest_stamp(path)
            m = fmt.read_manifest(path)
            files = None
            try:
                files = _Files(fmt.open_files(path, m))
                fmt.check_sizes(m, files.fds)
                if verify:
                    fmt.verify_checksums(m, files.fds)
                    _verify_meta(path, m, files.fds)
            except IndexCorruptError:
                if files is not None:
                    files.close()
                if fmt.read_manifest(path) != m:  # a commit replaced (and removed) files we had not opened yet
                    continue
                raise
            return m, files, stamp
        raise IndexCorruptError(f"index: {path!r} keeps changing generation while opening")

    def _load(self, m: dict, files: _Files, stamp=None) -> None:
        self.manifest = m
        self.K, self.D, self.dtype, self.count = m["K"], m["D"], m["dtype"], m["count"]
        self.weights = np.asarray(m["weights"], dtype=np.float32)
        self.layout = fmt.manifest_layout(m)
        self.item_bytes = fmt.manifest_item_bytes(m)
        entry = (m.get("pq") or {}).get("codebook")
        if entry is None or entry != getattr(self, "_pq_entry", None):  # (committed codebooks never change)
            self.codebook = None if entry is None else self._read_codebook(m, files)  # pecm.pq.Codebook
        self._pq_entry = entry
        self.paths = {k: os.path.join(self.root, v) for k, v in m["files"].items()}
        self.tombstones = np.asarray(sorted(m["tombstones"]), dtype=np.int64)
        self._files = files
        self._stamp = stamp
        self._mm: Dict[str, np.memmap] = {}

    def _read_codebook(self, m: dict, files: _Files):
        from .. import pq

        p = m["pq"]
        raw = os.pread(files.fds["codebook"], p["codebook"]["bytes"], 0)
        s_groups, r = (self.K if p["per_slot"] else 1), fmt.pq_coarse(m)
        flat = np.frombuffer(raw, dtype="<f4")
        n_pq = s_groups * p["m"] * pq.KSUB * (self.D // p["m"])
        cent = flat[:n_pq].reshape(s_groups, p["m"], pq.KSUB, self.D // p["m"])
        coarse = flat[n_pq:].reshape(self.K, r, pq.KSUB, self.D).astype(np.float32) if r else None
        try:
            return pq.Codebook(cent.astype(np.float32), coarse)
        except ValueError as e:
            raise IndexCorruptError(f"index: {fmt.PQ_CODEBOOK}: {e}") from e

    def _reload(self, m: dict) -> None:
        """Writer: switch this handle to a manifest it just committed."""
        self._load(m, _Files(fmt.open_files(self.root, m)), _manifest_stamp(self.root))

    def _recover(self) -> None:
        """Writer only: drop bytes and metadata rows of an interrupted append or compact."""
        self._truncate_uncommitted()
        keep = set(self.manifest["files"].values()) | {fmt.META_DB, fmt.MANIFEST, fmt.LOCK_FILE}
        if self.manifest.get("ann"):
            keep.add(self.manifest["ann"]["file"])
        if (self.manifest.get("pq") or {}).get("codebook"):
            keep.add(fmt.PQ_CODEBOOK)
        for name in os.listdir(self.root):
            stray = name.endswith((".bin", ".faiss")) and name not in keep
            if stray or name.startswith(f".{fmt.MANIFEST}"):
                os.remove(os.path.join(self.root, name))
        self.meta.rollback_to(self.manifest["next_id"])

    def _truncate_uncommitted(self) -> None:
        for logical, p in self.paths.items():
            need = self.count * self.item_bytes[logical]
            if os.path.getsize(p) != need:
                fd = os.open(p, os.O_WRONLY | fmt.NOFOLLOW)
                try:
                    os.ftruncate(fd, need)
                finally:
                    os.close(fd)

    @property
    def meta(self) -> MetaStore:
        if self._meta is None:
            self._meta = MetaStore(os.path.join(self.root, fmt.META_DB), writable=self.mode == "a")
        return self._meta

    def refresh(self) -> "ArchiveIndex":
        """Reader: re-read the manifest to see commits (appends, deletes, compacts) made since opening."""
        with self._switch:
            m, files, stamp = self._read_consistent(self.root, verify=False)
            self._load(m, files, stamp)
        return self

    def _current(self) -> "ArchiveIndex":
        """A consistent view for one call: a reader first moves to the latest commit if the manifest
        changed (one stat); the view keeps its generation's files open however long the call runs."""
        if not self._files.fds:
            raise ValueError(f"index: {self.root!r} is closed")
        with self._switch:
            if self.mode != "a" and _manifest_stamp(self.root) != self._stamp:
                self.refresh()
            return copy.copy(self)

    def close(self) -> None:
        self._mm = {}
        self._files.close()
        if self._meta is not None:
            self._meta.close()
            self._meta = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        """Number of live items (committed minus deleted), as of the latest commit."""
        v = self._current()
        return v.count - len(v.tombstones)

    def __repr__(self) -> str:
        return f"ArchiveIndex({self.root!r}, K={self.K}, D={self.D}, dtype={self.dtype}, items={len(self)})"

    # ------------------------------------------------------------------ raw access
    def array(self, logical: str) -> np.ndarray:
        """Read-only memmap of the committed rows of one data file (empty array when count is 0)."""
        if logical not in self._mm:
            dt, shape = self.layout[logical]
            if self.count == 0:
                self._mm[logical] = np.zeros((0, *shape), dtype=dt)
            else:
                with open(self._files.fds[logical], "rb", closefd=False) as f:  # the snapshot's file
                    self._mm[logical] = np.memmap(f, dtype=dt, mode="r", shape=(self.count, *shape))
        return self._mm[logical]

    def ids(self) -> np.ndarray:
        return self.array("ids")

    def rows_of(self, ids) -> np.ndarray:
        """Row positions of global ids; KeyError for unknown or deleted ids."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        all_ids = self.ids()
        rows = np.searchsorted(all_ids, ids)
        if self.count == 0:
            ok = np.zeros(ids.shape, dtype=bool)
        else:
            ok = (rows < self.count) & (all_ids[np.minimum(rows, self.count - 1)] == ids)
        ok &= ~np.isin(ids, self.tombstones)
        if not np.all(ok):
            raise KeyError(f"ids: unknown or deleted ids {ids[~ok][:10].tolist()}")
        return rows

    def read_rows(self, logical: str, rows: np.ndarray) -> np.ndarray:
        """Rows of one data file by positioned reads (no mapping: memory use stays the result's size)."""
        dt, shape = self.layout[logical]
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((rows.size, *shape), dtype=dt)
        if rows.size and (rows.min() < 0 or rows.max() >= self.count):
            raise ValueError(f"rows: expected 0 <= row < {self.count}")
        size = self.item_bytes[logical]
        flat = memoryview(out.reshape(-1).view(np.uint8))
        fd = self._files.fds[logical]
        j = 0
        while j < rows.size:  # coalesce runs of consecutive rows into one read
            e = j + 1
            while e < rows.size and rows[e] == rows[e - 1] + 1:
                e += 1
            want, got = (e - j) * size, 0
            while got < want:
                n = os.preadv(fd, [flat[j * size + got : e * size]], int(rows[j]) * size + got)
                if n <= 0:
                    raise IndexCorruptError(f"index: {self.paths[logical]} ended early at row {rows[j]}")
                got += n
            j = e
        return out

    def dequantize(self, rows: np.ndarray) -> np.ndarray:
        """Stored prototypes of some rows as float32/float16 (int8 is dequantised per row, pq decoded)."""
        p = self.read_rows("prototypes", rows)
        if self.dtype == "pq":
            from .. import pq

            return pq.decode(p, self.read_rows("scales", rows), self.codebook)
        if self.dtype != "int8":
            return p
        return p.astype(np.float32) * self.read_rows("scales", rows)[..., None]

    def get(self, ids, vectors: bool = False) -> List[dict]:
        """Metadata rows of the given ids; with ``vectors=True`` each row also holds ``prototypes``
        (unit, float32 [K, D]; a pq index returns the decoded prototypes, the ones its scores use),
        ``mask`` (bool [K]) and ``pooled`` (float32 [D])."""
        v = self._current()
        ids = fmt.id_array(ids)
        rows = v.rows_of(ids)
        out = v.meta.rows(ids.tolist())
        if vectors:
            protos = v.dequantize(rows).astype(np.float32)
            masks = v.read_rows("masks", rows).astype(bool)
            pooled = fmt.pooled_values(v.read_rows("pooled", rows))
            for j, row in enumerate(out):
                row.update(prototypes=protos[j], mask=masks[j], pooled=pooled[j])
        return out

    # ------------------------------------------------------------------ writing
    def _require_writer(self) -> None:
        if self.mode != "a" or self._lock_fd is None:
            raise ValueError("index: opened read-only; use ArchiveIndex.open(path, mode='a') to modify it")

    def add(self, prototypes, masks=None, metadata=None, pooled=None, progress=None) -> np.ndarray:
        """Append items; returns their global ids (int64 [n]). One crash-safe commit per call.

        prototypes: [n, K, D] (or [K, D]) any float; masks: bool [n, K]; metadata: a list of n dicts
        (keys modality/source/text, anything else goes to extras) or None; pooled: [n, D] to use
        instead of Eq. 4 with the index weights.
        """
        self._require_writer()
        x = _as_array(prototypes, "prototypes")
        if x.ndim == 2:
            x = x[None]
            masks = None if masks is None else _as_array(masks, "masks")[None]
            pooled = None if pooled is None else _as_array(pooled, "pooled")[None]
        if x.ndim != 3 or x.shape[1:] != (self.K, self.D):
            raise ValueError(f"prototypes: expected shape [n, K={self.K}, D={self.D}], got {list(x.shape)}")
        if x.dtype.kind != "f":
            raise TypeError(f"prototypes: expected a float array, got dtype {x.dtype}")
        n = x.shape[0]
        if masks is not None:
            masks = _as_array(masks, "masks")
            if masks.shape != (n, self.K):
                raise ValueError(f"masks: expected shape [n={n}, K={self.K}], got {list(masks.shape)}")
            if masks.dtype.kind == "f":
                raise TypeError(f"masks: expected a bool array, got dtype {masks.dtype}")
        if pooled is not None:
            pooled = _as_array(pooled, "pooled")
            if pooled.shape != (n, self.D):
                raise ValueError(f"pooled: expected shape [n={n}, D={self.D}], got {list(pooled.shape)}")
        if metadata is not None and len(metadata) != n:
            raise ValueError(f"metadata: expected {n} rows, got {len(metadata)}")
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        if metadata is not None:
            metadata = list(metadata)
        m = dict(self.manifest)
        start, first_id = self.count, m["next_id"]
        new_ids = np.arange(first_id, first_id + n, dtype=np.int64)
        try:
            self._truncate_uncommitted()  # bytes of an earlier failed append on this handle
            codebook = self.codebook
            if self.dtype == "pq" and codebook is None:  # the first add trains the codebook on its items
                codebook = self._train_codebook(m, x, masks)
            crcs = self._write_rows(x, masks, pooled, new_ids, start, progress, codebook)
            # one transaction: rows left by failed/interrupted appends (id >= next_id) go, ours come in
            meta_crc = self.meta.replace_from(first_id, new_ids.tolist(), metadata)
            m["count"] = start + n
            m["next_id"] = first_id + n
            m["sizes"] = {k: (start + n) * self.item_bytes[k] for k in self.paths}
            m["checksums"] = m["checksums"] + [{"start": start, "count": n, "crc32": crcs, "meta_crc32": meta_crc}]
            fmt.write_manifest(self.root, m)
        except BaseException:
            self._after_failed_commit(m)
            raise
        self._reload(m)
        return new_ids

    def _after_failed_commit(self, m: dict) -> None:
        """An append, delete or compact raised before or during its manifest replace. If the new manifest
        is in place anyway (the directory fsync failed after the rename) the handle moves to it;
        otherwise the uncommitted bytes and metadata rows are dropped now (best effort: the next writer
        operation and the next writer's recovery drop them too)."""
        try:
            if m != self.manifest and fmt.read_manifest(self.root) == m:
                self._reload(m)
                return
        except (OSError, ValueError):
            pass
        for step in (self._truncate_uncommitted, lambda: self.meta.rollback_to(self.manifest["next_id"])):
            try:
                step()
            except (OSError, ValueError):
                pass

    def train_pq(self, prototypes, masks=None, seed: int = 0) -> None:
        """Writer, pq index without items: train and commit the codebook on a sample of prototypes
        ([n, K, D], any float; they are not added). Without it the first `add` trains on its own items."""
        self._require_writer()
        if self.dtype != "pq":
            raise ValueError(f"index: train_pq is for dtype 'pq' indexes, this one is {self.dtype!r}")
        if self.codebook is not None:
            raise ValueError("index: the pq codebook is already trained (it is fixed once items use it)")
        x = _as_array(prototypes, "prototypes")
        if x.ndim != 3 or x.shape[1:] != (self.K, self.D) or x.dtype.kind != "f":
            raise ValueError(f"prototypes: expected a float array [n, K={self.K}, D={self.D}], got {list(x.shape)}")
        if masks is not None:
            masks = _as_array(masks, "masks")
            if masks.shape != x.shape[:2]:
                raise ValueError(f"masks: expected shape {list(x.shape[:2])}, got {list(masks.shape)}")
        m = dict(self.manifest)
        try:
            self._train_codebook(m, x, masks, seed)
            fmt.write_manifest(self.root, m)
        except BaseException:
            self._after_failed_commit(m)
            raise
        self._reload(m)

    def _train_codebook(self, m: dict, x, masks, seed: int = 0):
        """Train a pq codebook on (a sample of) items ``x``, write and fsync it, and put its entry in ``m``
        (not yet committed). Returns the `pecm.pq.Codebook`."""
        from .. import pq

        p = dict(m["pq"])
        rng = np.random.default_rng(seed)
        want = -(-pq.TRAIN_SAMPLE // (1 if p["per_slot"] else self.K))  # items giving TRAIN_SAMPLE prototypes
        if fmt.pq_coarse(m):
            want = max(want, pq.COARSE_SAMPLE)  # the coarse stages train per slot
        pick = np.sort(rng.choice(len(x), size=want, replace=False)) if len(x) > want else np.arange(len(x))
        enc = fmt.BlockEncoder(self.K, self.D, self.weights, "float32", len(pick))
        blk = enc.encode(np.asarray(x[pick]), None if masks is None else np.asarray(masks)[pick], None)
        mk = blk["masks"].astype(bool)
        cb = pq.train(blk["prototypes"], mk, p["m"], p["per_slot"], seed, coarse=fmt.pq_coarse(m))
        parts = [cb.centroids.ravel()] + ([] if cb.coarse is None else [cb.coarse.ravel()])
        data = np.ascontiguousarray(np.concatenate(parts), dtype="<f4")
        fmt.write_file(os.path.join(self.root, fmt.PQ_CODEBOOK), memoryview(data).cast("B"))
        fmt.fsync_dir(self.root)
        p["codebook"] = {
            "file": fmt.PQ_CODEBOOK,
            "bytes": data.nbytes,
            "crc32": fmt.zlib.crc32(memoryview(data).cast("B")),
            "trained_on": int(len(pick)),
        }
        m["pq"] = p
        return cb

    def _write_rows(self, x, masks, pooled, new_ids, start: int, progress, codebook=None) -> Dict[str, int]:
        """Encode and write rows ``start..`` of every data file (fsynced); returns their crc32s."""
        n = len(new_ids)
        crcs = {k: 0 for k in self.paths}
        show = sys.stderr.isatty() if progress is None else bool(progress)
        nslots = 2 if n > ADD_BLOCK else 1
        encs = [
            fmt.BlockEncoder(
                self.K, self.D, self.weights, self.dtype, min(n, ADD_BLOCK), codebook, fmt.pq_storage(self.manifest)
            )
            for _ in range(nslots)
        ]
        fds: Dict[str, int] = {}

        def write(blk: dict, s: int) -> None:  # runs on the writer thread, in block order
            for logical, arr in blk.items():
                buf = np.ascontiguousarray(arr)
                crcs[logical] = fmt.zlib.crc32(memoryview(buf).cast("B"), crcs[logical])
                _pwrite_all(fds[logical], buf, (start + s) * self.item_bytes[logical])

        try:
            for k, p in self.paths.items():
                fds[k] = os.open(p, os.O_WRONLY | fmt.NOFOLLOW)
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="pecm index add", unit="item", disable=not show or n < ADD_BLOCK)
            # encode block j+1 while the writer thread writes block j (two buffer slots)
            with ThreadPoolExecutor(1) as pool:
                pending: list = [None] * nslots
                try:
                    for j, s in enumerate(range(0, n, ADD_BLOCK)):
                        e, slot = min(n, s + ADD_BLOCK), j % nslots
                        if pending[slot] is not None:
                            pending[slot].result()
                        blk = encs[slot].encode(
                            x[s:e], None if masks is None else masks[s:e], None if pooled is None else pooled[s:e]
                        )
                        blk["ids"] = new_ids[s:e]
                        pending[slot] = pool.submit(write, blk, s)
                        bar.update(e - s)
                finally:
                    for f in pending:  # wait for every submitted write (and raise the first failure)
                        if f is not None:
                            f.result()
            bar.close()
            for logical, fd in fds.items():
                os.fsync(fd)
                nbytes = n * self.item_bytes[logical]
                if nbytes >= DROP_CACHE_BYTES and hasattr(os, "posix_fadvise"):
                    # the appended pages are clean now; keeping them cached made every later append of a
                    # bulk ingest pay for page reclaim (2.0 -> 0.4 GB/s after ~3 GB on the dev VM)
                    os.posix_fadvise(fd, start * self.item_bytes[logical], nbytes, os.POSIX_FADV_DONTNEED)
        finally:
            for fd in fds.values():
                os.close(fd)
        return crcs

    def delete(self, ids) -> int:
        """Tombstone items (search never returns them; `compact` reclaims the space). Returns the count."""
        self._require_writer()
        ids = np.unique(fmt.id_array(ids))
        self.rows_of(ids)  # KeyError for unknown / already deleted
        m = dict(self.manifest)
        m["tombstones"] = sorted(set(m["tombstones"]) | set(ids.tolist()))
        self._commit(m)
        return int(ids.size)

    def compact(self, progress=None) -> None:
        """Rewrite the data files without tombstoned rows (ids are kept), as a new generation.

        Crash-safe: new files are written and fsynced under new names, then the manifest switches
        to them atomically; the old files and the deleted items' metadata rows are removed afterwards
        (or the files by the next writer's recovery). Readers that hold the old generation keep reading
        it until their next call.
        """
        self._require_writer()
        from .compact import compact_index

        compact_index(self, progress)
        self._recover()

    # ------------------------------------------------------------------ ANN first stage
    def build_ann(self, kind: Optional[str] = None, progress=None, **params) -> dict:
        """Writer: build the FAISS first stage of ``search(mode="ann")`` over every committed row and
        commit it (crash-safe, replacing the previous one). ``kind``: None (chosen from N), "flat",
        "ivf_flat", "ivf_pq" or "hnsw"; ``params``: nlist / nprobe / m / nbits (IVF, PQ), M /
        ef_construction / nprobe (HNSW: nprobe is efSearch), seed. Returns the manifest's ``ann``
        entry. See `pecm.index.ann`."""
        self._require_writer()
        if self.count == 0:
            raise ValueError("index: build_ann needs at least one item")
        from . import ann

        kind, params = ann.check_params(kind, params, self.count, self.D)
        m = dict(self.manifest)
        tuned = dict(m.get("search_defaults") or {})
        if "ann" in tuned:  # tuned for the ANN being replaced
            tuned.pop("ann")
            if tuned.get("mode") == "ann":
                tuned.pop("mode")
            m["search_defaults"] = tuned or None
        seq = (m["ann"]["seq"] if m.get("ann") else 0) + 1
        name = f"ann.g{m['generation']}.s{seq}.faiss"
        try:
            pooled = lambda r: fmt.pooled_values(self.read_rows("pooled", r))  # noqa: E731
            m["ann"] = self._write_ann(name, seq, kind, params, self.count, pooled, progress)
            fmt.write_manifest(self.root, m)
        except BaseException:
            self._after_failed_commit(m)
            if (self.manifest.get("ann") or {}).get("file") != name:
                _remove(os.path.join(self.root, name))
            raise
        old = self.manifest.get("ann")
        self._reload(m)
        if old and old["file"] != name:
            _remove(os.path.join(self.root, old["file"]))
        return dict(m["ann"])

    def tune(
        self,
        target: float = 0.95,
        k: int = 10,
        queries=None,
        q_mask=None,
        n_queries: int = 64,
        seed: int = 0,
        store: bool = True,
        backend: str = "auto",
        progress=None,
    ) -> dict:
        """Writer: recall@k and latency of two_stage / ann settings against exhaustive search (queries:
        ``n_queries`` sampled stored items, or ``queries``), and, with ``store``, commit the cheapest
        setting reaching ``target`` as the index's search defaults. See `pecm.index.tune`."""
        self._require_writer()
        from . import tune as tn

        res = tn.tune(self, target, k, queries, q_mask, n_queries, seed, backend, progress)
        if store:
            m = dict(self.manifest)
            m["search_defaults"] = tn.defaults_entry(res["chosen"])
            self._commit(m)
        return res

    def _commit(self, m: dict) -> None:
        try:
            fmt.write_manifest(self.root, m)
        except BaseException:
            self._after_failed_commit(m)
            raise
        self._reload(m)

    def _write_ann(self, name, seq, kind, params, rows, pooled_rows, progress) -> dict:
        """Build, serialise, write and fsync an ANN file (not yet committed); its manifest entry."""
        from tqdm.auto import tqdm

        from . import ann

        show = sys.stderr.isatty() if progress is None else bool(progress)
        bar = tqdm(total=rows, desc=f"pecm index build_ann ({kind})", unit="item", disable=not show)
        index = ann.build(pooled_rows, rows, self.D, kind, params, progress=bar.update)
        bar.close()
        data = ann.serialize(index)
        del index
        fmt.write_file(os.path.join(self.root, name), data)
        fmt.fsync_dir(self.root)
        return {
            "file": name,
            "seq": seq,
            "kind": kind,
            "params": params,
            "rows": rows,
            "bytes": int(data.size),
            "crc32": fmt.zlib.crc32(data),
        }

    def ann(self):
        """The committed FAISS index of this handle's snapshot (loaded once per snapshot), or None."""
        a = self.manifest.get("ann")
        if not a:
            return None
        files = self._files
        if getattr(files, "ann", None) is None:
            from . import ann

            files.ann = ann.load(files.fds["ann"], a["bytes"], a["crc32"], a["file"])
        return files.ann

    def add_filter_index(self, keys) -> None:
        """Writer: SQLite expression indexes on metadata keys used in ``search(where=...)`` (columns
        ``modality``/``source``/``text`` or extras keys), so a filter on them does not scan every row."""
        self._require_writer()
        from . import filters

        for key in [keys] if isinstance(keys, str) else list(keys):
            filters.check_where({key: None})
            name = "ix_" + fmt.zlib.crc32(key.encode()).to_bytes(4, "big").hex()
            self.meta.add_filter_index(filters.key_expr(key), name)

    def stats(self) -> dict:
        self = self._current()
        return {
            "path": self.root,
            "K": self.K,
            "D": self.D,
            "dtype": self.dtype,
            "count": self.count,
            "live": len(self),
            "deleted": int(len(self.tombstones)),
            "next_id": self.manifest["next_id"],
            "generation": self.manifest["generation"],
            "appends": len(self.manifest["checksums"]),
            "ann": None
            if not self.manifest.get("ann")
            else {k: self.manifest["ann"][k] for k in ("kind", "params", "rows", "bytes")},
            "normalized": True,
            "weights": [float(x) for x in self.weights],
            "bytes": {k: self.count * self.item_bytes[k] for k in self.paths},
            "pq": None
            if self.dtype != "pq"
            else {
                "m": self.manifest["pq"]["m"],
                "per_slot": self.manifest["pq"]["per_slot"],
                "coarse": fmt.pq_coarse(self.manifest),
                **fmt.pq_storage(self.manifest),
                "codebook_bytes": (self.manifest["pq"]["codebook"] or {}).get("bytes", 0),
            },
            "files": dict(self.manifest["files"]),
        }

    def search(self, queries, k: int = 10, **kw):
        """Top-k search; see `pecm.index.search.search` for the arguments."""
        from .search import search

        return search(self._current(), queries, k, **kw)
