"""`meta.sqlite`: one metadata row per item (standard-library sqlite3, WAL mode).

Columns: id (INTEGER PRIMARY KEY = the global item id), modality, source, text, extras (JSON of the
remaining keys). Rows of an uncommitted append (id >= the manifest's ``next_id``) may exist after a
crash: readers never ask for them and the next writer deletes them (`MetaStore.rollback_to`).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Dict, Iterable, List, Optional, Sequence

COLUMNS = ("modality", "source", "text")


def _split(row: dict) -> tuple:
    if not isinstance(row, dict):
        raise TypeError(f"metadata: expected a dict per item, got {type(row).__name__}")
    extras = {k: v for k, v in row.items() if k not in COLUMNS and k != "id"}
    vals = [row.get(c) for c in COLUMNS]
    for c, v in zip(COLUMNS, vals):
        if v is not None and not isinstance(v, str):
            raise TypeError(f"metadata: field {c!r} must be a string, got {type(v).__name__}")
    return (*vals, json.dumps(extras) if extras else None)


class MetaStore:
    def __init__(self, path: str, writable: bool):
        self.path = path
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
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0, check_same_thread=False)

    def close(self) -> None:
        self.db.close()

    def insert(self, ids: Sequence[int], rows: Iterable[Optional[dict]]) -> None:
        data = [(int(i), *_split(r)) for i, r in zip(ids, rows) if r is not None]
        if data:
            self.db.executemany("INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?)", data)

    def commit(self) -> None:
        self.db.commit()

    def rollback_to(self, next_id: int) -> None:
        """Delete rows of uncommitted appends (id >= next_id)."""
        self.db.execute("DELETE FROM items WHERE id >= ?", (int(next_id),))
        self.db.commit()

    def delete(self, ids: Sequence[int]) -> None:
        self.db.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in ids])

    def fetch(self, ids: Sequence[int]) -> Dict[int, dict]:
        """id -> row dict for the ids that have a row (others are absent)."""
        want = sorted({int(i) for i in ids if int(i) >= 0})
        out: Dict[int, dict] = {}
        for s in range(0, len(want), 500):
            part = want[s : s + 500]
            q = f"SELECT id, modality, source, text, extras FROM items WHERE id IN ({','.join('?' * len(part))})"
            for i, mod, src, txt, ext in self.db.execute(q, part):
                row = {"id": i, "modality": mod, "source": src, "text": txt}
                if ext:
                    row.update(json.loads(ext))
                out[i] = row
        return out

    def rows(self, ids: Sequence[int]) -> List[Optional[dict]]:
        """A row per id (a bare ``{"id": i}`` when the item has no metadata; None for id -1)."""
        found = self.fetch(ids)
        return [None if int(i) < 0 else found.get(int(i), {"id": int(i)}) for i in ids]
