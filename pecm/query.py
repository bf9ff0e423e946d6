"""One query path for `pecm search` and `pecm serve`: encode queries with a checkpoint's encoder, search an
`ArchiveIndex` snapshot, and give every hit its id, ranking score, sim, conf and metadata.

``search_hits`` searches one consistent snapshot of the index (`ArchiveIndex._current`): the search, the
sim/conf of the hits (`hit_scores`) and their metadata all read the same commit, so a delete or an append
committed meanwhile cannot make a returned id unreadable. ``score`` of a hit is the value it was ranked by
(``by``: R = sim · C, sim or conf), exactly what ``pecm search --json`` prints as ``scores``; ``sim`` and
``conf`` are recomputed for the hit with `pecm.ops.pecm_scores` from the stored prototypes, masks and pooled
vector (the ones the index scores; a pq index's decoded prototypes); sim · conf agrees with the fused R of the
search to about 1e-5 (measured on a float16 index with the cpp backend), not bit for bit.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    import numpy as np

# numpy, torch and pecm.ops are imported where they are used: the command line checks its arguments and
# input files with this module before anything heavy loads (`pecm search --help` / a missing file: no torch)

MAX_K = 2**31 - 1  # == pecm.ops.MAX_K (tests/test_cli_query.py checks); here so check_k needs no torch


def check_k(k, name: str = "k", limit: Optional[int] = None) -> int:
    """k as an int in [1, limit] (limit: `pecm.ops.MAX_K` when None); ValueError naming ``name``."""
    hi = MAX_K if limit is None else int(limit)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):  # numpy integers are Integral
        raise TypeError(f"{name}: expected an int, got {type(k).__name__}")
    if not 1 <= int(k) <= hi:
        raise ValueError(f"{name}: expected an int in [1, {hi}], got {k}")
    return int(k)


def check_finite(q: np.ndarray, name: str, what: str = "contains") -> None:
    """Non-finite query values would score NaN (never ranked): refuse them up front, naming the input."""
    import numpy as np

    bad = ~np.isfinite(q)
    if bad.any():
        b = int(np.argwhere(bad)[0][0]) if q.ndim == 3 else 0
        raise ValueError(f"{name}: {what} NaN or inf values ({int(bad.sum())} of {q.size}, first in query {b})")


def check_results(scores: np.ndarray, ids: np.ndarray) -> None:
    """A returned item must carry a finite score; padding (id -1) is the only null in the output."""
    import numpy as np

    bad = (ids >= 0) & ~np.isfinite(scores)
    if bad.any():
        b, r = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"index: item id={int(ids[b, r])} scored {scores[b, r]} for query {b} (damaged prototypes?); "
            "run `pecm index verify`"
        )


def json_float(x: float):
    """A float for JSON output: None for -inf padding and other non-finite values."""
    return None if not math.isfinite(x) else float(x)


def encode(enc, kind: str, items: Sequence, name: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Prototypes float32 [B, K, D] and masks bool [B, K] of ``items`` encoded by ``enc``
    (`pecm.model.encode.Encoder`) in one call: ``kind`` "image" (paths or binary file objects) or "text"
    (report strings). Non-finite encodings are a ValueError naming ``name`` (default the kind)."""
    import numpy as np

    if kind == "image":
        protos, masks = enc.encode_images(list(items))
    elif kind == "text":
        protos, masks = enc.encode_texts(list(items))
    else:
        raise ValueError(f"kind: expected 'image' or 'text', got {kind!r}")
    q = np.asarray(protos, dtype=np.float32)
    check_finite(q, name or kind, "the checkpoint encoded it to")
    return q, np.asarray(masks, dtype=bool)


def hit_scores(view, queries: np.ndarray, q_mask: Optional[np.ndarray], ids: np.ndarray):
    """(sim, conf), float32 [B, k], of each hit ``ids[b, r]`` (NaN where the id is -1) against query b,
    from the stored rows of the snapshot ``view``, with the index weights."""
    import numpy as np
    import torch

    from . import ops
    from .index.format import pooled_values

    q = np.array(queries, dtype=np.float32)  # a writable copy (a query file is a read-only memmap)
    if q.ndim == 2:
        q, q_mask = q[None], None if q_mask is None else np.asarray(q_mask)[None]
    sim = np.full(ids.shape, np.nan, dtype=np.float32)
    conf = np.full(ids.shape, np.nan, dtype=np.float32)
    w = torch.from_numpy(np.asarray(view.weights, dtype=np.float32))
    for b in range(ids.shape[0]):
        sel = ids[b] >= 0
        if not sel.any():
            continue
        rows = view.rows_of(ids[b][sel])
        c = torch.from_numpy(np.asarray(view.dequantize(rows), dtype=np.float32))
        cm = torch.from_numpy(view.read_rows("masks", rows).astype(bool))
        cp = torch.from_numpy(pooled_values(view.read_rows("pooled", rows)))
        qm = None if q_mask is None else torch.from_numpy(np.asarray(q_mask, dtype=bool)[b : b + 1])
        # normalized: the stored rows as they are (unit, masked zero), scored as the search scored them
        s, cf, _ = ops.pecm_scores(
            torch.from_numpy(q[b : b + 1]), c, w, q_mask=qm, c_mask=cm, c_pooled=cp, normalized=True
        )
        sim[b, sel] = s[0].float().numpy()
        conf[b, sel] = cf[0].float().numpy()
    return sim, conf


def search_hits(index, queries: np.ndarray, k: int, q_mask: Optional[np.ndarray] = None, **kw):
    """Search one snapshot of ``index`` (`pecm.index.search.search` arguments in ``kw``) and score the hits:
    ``(scores, ids, metadata, sim, conf)`` with scores/ids/metadata as `ArchiveIndex.search` returns them."""
    from .index.search import search

    view = index._current()
    scores, ids, meta = search(view, queries, k, q_mask=q_mask, **kw)
    return score_hits(view, queries, q_mask, scores, ids, meta)


def score_hits(view, queries: np.ndarray, q_mask: Optional[np.ndarray], scores, ids, meta=None):
    """``(scores, ids, metadata, sim, conf)`` of the search result ``(scores, ids)`` of the snapshot ``view``:
    `check_results`, `hit_scores` and, when ``meta`` is None, the hits' metadata rows read from ``view``
    (the sharded searches of `pecm.distributed` merge ids only)."""
    check_results(scores, ids)
    if meta is None:
        meta = [view.meta.rows(row.tolist()) for row in ids]
    sim, conf = hit_scores(view, queries, q_mask, ids)
    return scores, ids, meta, sim, conf


def hits_json(scores, ids, meta, sim, conf) -> List[List[dict]]:
    """Per query, its hits as ``{"id", "score", "sim", "conf", "metadata"}`` in rank order (padding left out)."""
    out = []
    for b in range(ids.shape[0]):
        row = []
        for r in range(ids.shape[1]):
            if ids[b, r] < 0:
                continue
            row.append(
                {
                    "id": int(ids[b, r]),
                    "score": json_float(float(scores[b, r])),
                    "sim": json_float(float(sim[b, r])),
                    "conf": json_float(float(conf[b, r])),
                    "metadata": meta[b][r] if meta is not None else None,
                }
            )
        out.append(row)
    return out


# ---- query inputs of the command line (`pecm search`): checked before the model or torch loads


def check_index_dir(path: str, name: str = "index") -> None:
    """FileNotFoundError unless ``path`` is a directory holding an index manifest (checked without torch;
    `ArchiveIndex.open` checks the rest)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{name}: no such directory {path!r}")
    if not os.path.isfile(os.path.join(path, "manifest.json")):
        raise FileNotFoundError(f"{name}: {path!r} is not a pecm index (no manifest.json)")


def check_files(paths: Sequence[str], name: str) -> List[str]:
    """The paths, each an existing file; FileNotFoundError naming ``name`` and the first missing one."""
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{name}: no such file {p!r}")
    return list(paths)


def read_texts(path: str, name: str = "--texts-file") -> List[str]:
    """Query reports from ``path``: JSON Lines when it ends in ``.jsonl`` (each non-blank line an object with a
    string ``"text"``), else plain text, one report per line. Blank lines are skipped; no report is an error."""
    check_files([path], name)
    jsonl = path.endswith(".jsonl")
    texts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not jsonl:
                texts.append(line.strip())
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{name}: line {n} of {path!r} is not JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
                raise ValueError(f'{name}: line {n} of {path!r}: expected an object with a non-empty string "text"')
            texts.append(row["text"])
    if not texts:
        raise ValueError(f"{name}: {path!r} holds no report")
    return texts


def shorten(text, n: int = 100) -> str:
    """``text`` on one line (white space runs collapsed), at most ``n`` characters ("..." marks a cut)."""
    s = " ".join(str(text).split())
    return s if len(s) <= n else s[: max(1, n - 3)].rstrip() + "..."
