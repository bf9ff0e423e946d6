"""`meta.sqlite`: one metadata row per item (standard-library sqlite3).

Columns: id (INTEGER PRIMARY KEY = the global item id), modality, source, text, extras (JSON of the
remaining keys). Rows of an uncommitted append (id >= the manifest's ``next_id``) may exist after a
crash or a failed `add`: readers never ask for them, and every `add` (and the next writer) deletes
them in the transaction that inserts its own rows, so a later append never inherits them.

Integrity: each append record of the manifest holds ``meta_crc32``, the CRC-32 of the canonical
text of its rows (`rows_crc`, one line per item id in row order: the stored columns, or the bare id
when the item has no row); ``verify=True`` recomputes it. A database that SQLite cannot read, or a
row that does not decode, raises `IndexCorruptError` when it is read.

Journal: WAL (a reader keeps reading while the writer commits, and after a writer crash). Every
writer commit ends with ``wal_checkpoint(TRUNCATE)``, so at rest ``meta.sqlite`` alone holds every
committed row. Readers open it ``mode=ro``; on a read-only file system (an archive mounted
read-only) they add ``immutable=1`` and create no file, so such an index can be searched (if a
non-empty ``-wal`` file is there too, they read it through SQLite or fail with `IndexCorruptError`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import zlib
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from .format import IndexCorruptError

COLUMNS = ("modality", "source", "text")
BATCH = 500  # ids per SELECT


def _split(row: dict) -> tuple:
    if not isinstance(row, dict):
        raise TypeError(f"metadata: expected a dict per item, got {type(row).__name__}")
    extras = {k: v for k, v in row.items() if k not in COLUMNS and k != "id"}
    vals = [row.get(c) for c in COLUMNS]
    for c, v in zip(COLUMNS, vals):
        if v is not None and not isinstance(v, str):
            raise TypeError(f"metadata: field {c!r} must be a string, got {type(v).__name__}")
    try:
        ext = json.dumps(extras, allow_nan=False) if extras else None
    except (TypeError, ValueError) as e:
        raise TypeError(f"metadata: extra fields must be JSON-serialisable (no NaN/inf): {e}") from e
    return (*vals, ext)


def _line(i: int, stored: Optional[tuple]) -> bytes:
    """Canonical text of one item's stored row (what `meta_crc32` covers)."""
    return (json.dumps([i] if stored is None else [i, *stored]) + "\n").encode()


def read_only_fs(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class MetaStore:
    def __init__(self, path: str, writable: bool):
        self.path = path
        try:
            if writable:
                self.db = sqlite3.connect(path, timeout=30.0, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.execute(
                    "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, modality TEXT, source TEXT, "
                    "text TEXT, extras TEXT)"
                )
                self.db.commit()
            else:
                if not os.path.exists(path):
                    raise IndexCorruptError(f"index: {path} is missing")
                wal = path + "-wal"
                ro_fs = read_only_fs(os.path.dirname(path) or ".")
                clean = not os.path.exists(wal) or os.path.getsize(wal) == 0
                flags = "mode=ro&immutable=1" if ro_fs and clean else "mode=ro"
                self.db = sqlite3.connect(f"file:{path}?{flags}", uri=True, timeout=30.0, check_same_thread=False)
        except sqlite3.Error as e:
            raise IndexCorruptError(f"index: {path} cannot be opened: {e}") from e

    def close(self) -> None:
        self.db.close()

    def _checkpoint(self) -> None:
        """Writer: move committed WAL pages into meta.sqlite (a copy of the directory needs no -wal)."""
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error:
            pass  # a reader holds the WAL; SQLite checkpoints later, the commit is durable either way

    def _query(self, sql: str, args) -> list:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise IndexCorruptError(f"index: {self.path} is unreadable: {e}") from e

    def replace_from(self, first_id: int, ids: Sequence[int], rows: Optional[Iterable[Optional[dict]]]) -> int:
        """One transaction: delete every row with id >= first_id (leftovers of failed or interrupted
        appends), insert the rows of ``ids`` and commit. Returns `rows_crc` of what was inserted."""
        data = [] if rows is None else [(int(i), *_split(r)) for i, r in zip(ids, rows) if r is not None]
        stored = {d[0]: d[1:] for d in data}
        crc = 0
        for i in ids:
            crc = zlib.crc32(_line(int(i), stored.get(int(i))), crc)
        try:
            with self.db:
                self.db.execute("DELETE FROM items WHERE id >= ?", (int(first_id),))
                if data:
                    self.db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?)", data)
        except sqlite3.Error as e:  # e.g. "database or disk is full": an I/O failure, nothing committed
            raise OSError(f"index: {self.path}: metadata write failed: {e}") from e
        self._checkpoint()
        return crc

    def rollback_to(self, next_id: int) -> None:
        """Delete rows of uncommitted appends (id >= next_id)."""
        self.replace_from(next_id, [], None)

    def delete(self, ids: Sequence[int]) -> None:
        try:
            with self.db:
                self.db.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in ids])
        except sqlite3.Error as e:
            raise OSError(f"index: {self.path}: metadata delete failed: {e}") from e
        self._checkpoint()

    def stored(self, ids: Sequence[int]) -> Dict[int, tuple]:
        """id -> stored (modality, source, text, extras) for the ids that have a row."""
        want = sorted({int(i) for i in ids if int(i) >= 0})
        out: Dict[int, tuple] = {}
        for s in range(0, len(want), BATCH):
            part = want[s : s + BATCH]
            q = f"SELECT id, modality, source, text, extras FROM items WHERE id IN ({','.join('?' * len(part))})"
            for i, *cols in self._query(q, part):
                out[i] = tuple(cols)
        return out

    def rows_crc(self, ids: Sequence[int]) -> int:
        """CRC-32 of the canonical text of the rows of ``ids`` (in the given order)."""
        crc = 0
        for s in range(0, len(ids), 65536):
            part = [int(i) for i in ids[s : s + 65536]]
            found = self.stored(part)
            for i in part:
                crc = zlib.crc32(_line(i, found.get(i)), crc)
        return crc

    def ids_where(self, cond: str, args: list, next_id: int):
        """Sorted ids (< next_id) of the rows that satisfy an SQL condition built by `pecm.index.filters`."""
        rows = self._query(f"SELECT id FROM items WHERE id < ? AND ({cond}) ORDER BY id", [int(next_id), *args])
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def add_filter_index(self, key_expr: str, name: str) -> None:
        """Writer: an SQLite expression index on one filter key (makes ``where`` on it fast)."""
        try:
            with self.db:
                self.db.execute(f"CREATE INDEX IF NOT EXISTS {name} ON items({key_expr})")
        except sqlite3.Error as e:
            raise OSError(f"index: {self.path}: cannot create index {name}: {e}") from e

    def fetch(self, ids: Sequence[int]) -> Dict[int, dict]:
        """id -> row dict for the ids that have a row (others are absent)."""
        out: Dict[int, dict] = {}
        for i, (mod, src, txt, ext) in self.stored(ids).items():
            row = {"id": i, "modality": mod, "source": src, "text": txt}
            if ext:
                try:
                    extra = json.loads(ext)
                except (TypeError, ValueError, RecursionError) as e:
                    raise IndexCorruptError(f"index: {self.path}: extras of item {i} do not decode ({e})") from e
                if not isinstance(extra, dict):
                    raise IndexCorruptError(f"index: {self.path}: extras of item {i} are not a JSON object")
                row.update(extra)
            out[i] = row
        return out

    def rows(self, ids: Sequence[int]) -> List[Optional[dict]]:
        """A row per id (a bare ``{"id": i}`` when the item has no metadata; None for id -1)."""
        found = self.fetch(ids)
        return [None if int(i) < 0 else found.get(int(i), {"id": int(i)}) for i in ids]
