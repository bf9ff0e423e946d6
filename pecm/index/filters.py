"""Metadata filters of `ArchiveIndex.search`: ``where={...}`` (AND of equalities) and an ``ids=`` allow-list.

``where`` keys are the metadata columns (``modality``, ``source``, ``text``) or keys of the JSON
``extras`` (every other key given to `add`); values are str, int, float (finite) or bool, compared
for equality (``None`` matches an item that lacks the key). The filter is evaluated once per search
in SQLite (``json_extract`` for extras keys; `MetaStore.add_filter_index` creates an expression index
for a key), giving the sorted ids that pass; the search then scores only those rows (see
`pecm.index.search`): the result is the exact top-k of the items that pass, padded with (-inf, -1).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .format import id_array
from .meta import COLUMNS

KINDS = (str, int, float, bool)


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def key_expr(key: str) -> str:
    """The SQL expression of one filter key (a column, or ``json_extract`` of the extras key)."""
    if key in COLUMNS:
        return key
    path = '$."' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"json_extract(extras, {_sql_str(path)})"


def check_where(where) -> Optional[dict]:
    if where is None:
        return None
    if not isinstance(where, dict):
        raise TypeError(f"where: expected a dict of metadata key -> value, got {type(where).__name__}")
    for key, v in where.items():
        if not isinstance(key, str) or not key or key == "id":
            raise ValueError(f"where: keys must be non-empty metadata key strings other than 'id', got {key!r}")
        if v is not None and not isinstance(v, KINDS):
            raise TypeError(f"where[{key!r}]: expected a str, int, float, bool or None, got {type(v).__name__}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"where[{key!r}]: expected a finite number, got {v}")
        if key in COLUMNS and v is not None and not isinstance(v, str):
            raise TypeError(f"where[{key!r}]: the {key!r} column holds strings, got {type(v).__name__}")
    return where


def check_ids(ids) -> Optional[np.ndarray]:
    if ids is None:
        return None
    if np.ndim(ids) > 1:
        raise TypeError(f"ids: expected a 1-D list of integer item ids, got shape {list(np.shape(ids))}")
    return np.unique(id_array(ids))


def where_sql(where: dict) -> tuple:
    """(SQL condition, parameters) of an AND of equalities."""
    parts, args = [], []
    for key, v in where.items():
        e = key_expr(key)
        if v is None:
            parts.append(f"{e} IS NULL")
        else:
            parts.append(f"{e} = ?")
            args.append(int(v) if isinstance(v, bool) else v)  # JSON true/false come back as 1/0
    return " AND ".join(parts) or "1", args


def allowed_ids(index, where: Optional[dict], ids: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """Sorted int64 ids that pass ``where`` and the ``ids`` allow-list (None: no filter). Ids that are
    not committed (>= next_id) never pass; items without a metadata row pass only ``where`` = {} or
    conditions that are all ``None``."""
    if where is None and ids is None:
        return None
    out = ids
    if where:
        cond, args = where_sql(where)
        next_id = index.manifest["next_id"]
        found = index.meta.ids_where(cond, args, next_id)
        if all(v is None for v in where.values()):  # items without any metadata row match too
            committed = np.asarray(index.ids())
            found = np.union1d(found, np.setdiff1d(committed, index.meta.ids_where("1", [], next_id)))
        out = found if out is None else np.intersect1d(out, found)
    return np.asarray(out, dtype=np.int64)
