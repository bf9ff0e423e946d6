"""What `pecm serve` holds open: the checkpoint's encoder and, per served index, a reader handle (searches,
``GET``), the single writer handle (``POST /items``, ``DELETE``) and the folders its images may be read from.

Consistency: the server is the index's only writer (``mode="a"``, an exclusive lock: a second `pecm serve` or
`pecm index add` on the same index gets `IndexLockedError`). Writes run one at a time per index (a lock) and
commit through the index's manifest replace; searches and reads go through the reader handle, which moves to
the latest commit at the start of each call (`ArchiveIndex._current`), so a request sees an item only once
its append committed, all of it (prototypes and metadata), and never an item after its delete committed.

Encoder calls are serialised by one lock (the Hugging Face fast tokenizer refuses concurrent use).

Image roots (``GET /items/{id}/image``): the folders given with ``--image-root``, else the folders of the
``source`` files of the items present when the server started (relative sources resolved against the
server's working directory), plus the upload folder of ingested images. A source is served only when its
real path (symlinks resolved) lies under a root's real path, it is a regular file and starts like a JPEG or
PNG; the opened descriptor's path is checked again, so a symlink swapped in after the check is refused too.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..index import ArchiveIndex
from ..query import encode
from .errors import bad
from .parse import Item

MAX_IMAGE_BYTES = 64 << 20  # a stored image larger than this is not served
MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _collapse(roots) -> List[str]:
    """Distinct real paths, dropping those under another root."""
    out: List[str] = []
    for r in sorted({os.path.realpath(r) for r in roots}, key=len):
        if not any(_under(r, o) for o in out):
            out.append(r)
    return out


def index_name(path: str) -> str:
    """The name an index directory is served under: its basename."""
    return os.path.basename(os.path.abspath(path).rstrip(os.sep))


class ServedIndex:
    """One index directory behind the server (``name`` = `index_name`)."""

    def __init__(self, path: str, image_roots: Optional[Sequence[str]] = None, upload_dir: Optional[str] = None):
        self.path = os.path.abspath(path)
        self.name = index_name(self.path)
        self.writer = ArchiveIndex.open(self.path, mode="a")
        try:
            self.reader = ArchiveIndex.open(self.path)
        except BaseException:
            self.writer.close()
            raise
        self.write_lock = threading.Lock()
        self.K, self.D = self.reader.K, self.reader.D
        self.upload_dir = os.path.abspath(upload_dir or os.path.join(self.path, "uploads"))
        base = list(image_roots) if image_roots else self._source_dirs()
        self.roots = _collapse([*base, self.upload_dir])

    def _source_dirs(self) -> List[str]:
        """Folders of the committed items' ``source`` files (one SQL query at start-up)."""
        rows = self.reader.meta._query(
            "SELECT DISTINCT source FROM items WHERE source IS NOT NULL AND id < ?", [self.reader.manifest["next_id"]]
        )
        return sorted({os.path.dirname(os.path.abspath(s)) for (s,) in rows if s})

    def describe(self) -> dict:
        """``GET /indexes`` entry: name, K, D, dtype, live item count and live items per ``modality`` (``"null"``:
        items stored without one), as of the latest commit. Two grouped SQL counts (all rows, tombstoned rows)."""
        v = self.reader._current()
        meta, next_id = self.reader.meta, int(v.manifest["next_id"])
        counts: Dict[str, int] = {}
        sql = "SELECT modality, COUNT(*) FROM items WHERE id < ? GROUP BY modality"
        for m, n in meta._query(sql, [next_id]):
            if m is not None:
                counts[str(m)] = counts.get(str(m), 0) + int(n)
        dead = [int(i) for i in v.tombstones]
        for lo in range(0, len(dead), 500):  # deletes keep the metadata rows: subtract the tombstoned ones
            part = dead[lo : lo + 500]
            sql = f"SELECT modality, COUNT(*) FROM items WHERE id IN ({','.join('?' * len(part))}) GROUP BY modality"
            for m, n in meta._query(sql, part):
                if m is not None:
                    counts[str(m)] -= int(n)
        live = len(v)
        counts = {m: n for m, n in sorted(counts.items()) if n > 0}
        if live > sum(counts.values()):
            counts["null"] = live - sum(counts.values())
        return {
            "name": self.name,
            "K": int(self.K),
            "D": int(self.D),
            "dtype": str(v.dtype),
            "count": live,
            "modalities": counts,
        }

    def close(self) -> None:
        self.reader.close()
        self.writer.close()

    # ------------------------------------------------------------------ images
    def read_image(self, item_id: int, source: Optional[str]):
        """(bytes, MIME type) of an item's source image when it lies under the image roots; `APIError`."""
        if not source:
            raise bad("id", f"item {item_id} has no source image", 404)
        real = os.path.realpath(os.path.abspath(source))
        if not any(_under(real, r) for r in self.roots):
            raise bad("id", f"item {item_id}: its source is outside the served image folders", 403)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            raise bad("id", f"item {item_id}: its source image is missing or unreadable", 404) from None
        try:
            link = f"/proc/self/fd/{fd}"
            opened = os.readlink(link) if os.path.islink(link) else real
            st = os.fstat(fd)
            import stat

            if not any(_under(opened, r) for r in self.roots) or not stat.S_ISREG(st.st_mode):
                raise bad("id", f"item {item_id}: its source is outside the served image folders", 403)
            if st.st_size > MAX_IMAGE_BYTES:
                raise bad("id", f"item {item_id}: its source image is larger than {MAX_IMAGE_BYTES} bytes", 413)
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(MAX_IMAGE_BYTES + 1)
        finally:
            os.close(fd)
        for magic, mime in MAGIC:
            if data.startswith(magic):
                return data, mime
        raise bad("id", f"item {item_id}: its source is not a JPEG or PNG file", 415)

    def store_upload(self, raw: bytes) -> str:
        """Write an ingested image (JPEG / PNG bytes, decoded once by `parse.parse_image`) into the upload
        folder under a content-addressed name, fsynced; returns its path."""
        os.makedirs(self.upload_dir, exist_ok=True)
        ext = ".png" if raw.startswith(MAGIC[0][0]) else ".jpg"
        path = os.path.join(self.upload_dir, hashlib.sha256(raw).hexdigest()[:32] + ext)
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return path


class State:
    """The encoder and the served indexes (by name), plus the request limits."""

    def __init__(
        self,
        encoder,
        indexes: Sequence[ServedIndex],
        max_k: int = 1000,
        max_body: int = 16 << 20,
        max_items: int = 256,
    ):
        self.encoder = encoder
        self.encode_lock = threading.Lock()
        self.indexes: Dict[str, ServedIndex] = {}
        self.max_k, self.max_body, self.max_items = int(max_k), int(max_body), int(max_items)
        self.world_size = 1  # ranks searching the indexes (`pecm serve --distributed` sets it)
        for s in indexes:
            if s.name in self.indexes:
                raise ValueError(f"INDEX: two served indexes are named {s.name!r} (names are directory basenames)")
            if (s.K, s.D) != (int(encoder.K), int(encoder.D)):
                raise ValueError(
                    f"INDEX: {s.path!r} holds K={s.K}, D={s.D} prototypes, the checkpoint encodes "
                    f"K={encoder.K}, D={encoder.D}"
                )
            self.indexes[s.name] = s

    @classmethod
    def open(cls, paths: Sequence[str], checkpoint: str, image_roots=None, **limits) -> "State":
        from ..commands.index import load_encoder

        enc = load_encoder(checkpoint)
        served: List[ServedIndex] = []
        try:
            for p in paths:
                if not os.path.isdir(p):
                    raise FileNotFoundError(f"INDEX: no such directory {p!r}")
                served.append(ServedIndex(p, image_roots))
            return cls(enc, served, **limits)
        except BaseException:
            for s in served:
                s.close()
            raise

    def close(self) -> None:
        for s in self.indexes.values():
            s.close()

    def index_for(self, name) -> ServedIndex:
        if name is None:
            if len(self.indexes) == 1:
                return next(iter(self.indexes.values()))
            raise bad("index", f"required when several indexes are served (one of {sorted(self.indexes)})")
        if not isinstance(name, str) or name not in self.indexes:
            raise bad("index", f"unknown index {name!r} (served: {sorted(self.indexes)})", 404)
        return self.indexes[name]

    def encode(self, kind: str, payloads: Sequence, name: str):
        """`pecm.query.encode` of text strings or image bytes, one encoder call (serialised)."""
        items = [io.BytesIO(p) for p in payloads] if kind == "image" else list(payloads)
        with self.encode_lock:
            return encode(self.encoder, kind, items, name)

    # ------------------------------------------------------------------ writes (one at a time per index)
    def ingest(self, served: ServedIndex, items: List[Item]) -> np.ndarray:
        """Encode and append ``items`` in one commit; returns their ids."""
        K, D = served.K, served.D
        protos = np.zeros((len(items), K, D), dtype=np.float32)
        masks = np.ones((len(items), K), dtype=bool)
        meta = [dict(it.metadata) for it in items]
        for kind in ("text", "image"):
            pos = [i for i, it in enumerate(items) if it.kind == kind]
            if not pos:
                continue
            p, m = self.encode(kind, [items[i].payload for i in pos], f"items.{kind}")
            protos[pos], masks[pos] = p, m
            for i in pos:
                meta[i].setdefault("modality", kind)
                if kind == "text":
                    meta[i]["text"] = items[i].payload
                else:
                    meta[i]["source"] = served.store_upload(items[i].payload)
        for i, it in enumerate(items):
            if it.kind == "prototypes":
                protos[i] = it.payload
                if it.mask is not None:
                    masks[i] = it.mask
        with served.write_lock:
            return served.writer.add(protos, masks, metadata=meta, progress=False)

    def delete(self, served: ServedIndex, item_id: int) -> None:
        with served.write_lock:
            served.writer.delete([item_id])
