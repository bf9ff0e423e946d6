"""`pecm search INDEX ...`: top-k search of an archive index (optionally sharded with torchrun).

Queries: ``--query-file Q.npy`` (stored prototypes [B, K, D]), or with ``--checkpoint CKPT`` one ``--text`` /
``--image``, a batch ``--texts-file F`` (one report per line; ``.jsonl``: one object with a ``"text"`` per line)
or ``--images IMG [IMG ...]``. A batch is encoded by one encoder call and searched by one search call; the
results are printed per query. Every argument and input file is checked before torch or the model loads (a
missing file: one ``pecm: error:`` line, exit 2, in well under a second).

``--json`` prints one object: ``scores`` / ``ids`` / ``sim`` / ``conf`` / ``metadata``, each a list per query
of k entries (padding: id -1, score null), and ``queries``, a list per query of ``{"query", "hits"}`` with the
hits as `pecm serve` returns them (``{"id", "score", "sim", "conf", "metadata"}``, padding left out).
"""

from __future__ import annotations

import json
import os

from ..query import check_files, check_index_dir, check_k, read_texts, shorten


def _plan(a):
    """The queries, checked without loading torch or the model: ``(kind, items, labels)`` with kind "file"
    (items: the .npy paths), "text" or "image"."""
    check_k(a.k, "-k")
    check_index_dir(a.index)
    if a.batch_size < 1:
        raise ValueError(f"--batch-size: expected an int >= 1, got {a.batch_size}")
    if a.query_file:
        if a.checkpoint:
            raise ValueError("--checkpoint: not used with --query-file (the query prototypes are given)")
        check_files([a.query_file], "--query-file")
        if a.query_masks:
            check_files([a.query_masks], "--query-masks")
        return "file", [a.query_file, a.query_masks], None
    if a.query_masks:
        raise ValueError("--query-masks: only with --query-file")
    if a.text is not None:
        if not a.text.strip():
            raise ValueError("--text: expected a non-empty report")
        kind, items = "text", [a.text]
    elif a.texts_file:
        kind, items = "text", read_texts(a.texts_file, "--texts-file")
    elif a.image:
        kind, items = "image", check_files([a.image], "--image")
    elif a.images:
        kind, items = "image", check_files(a.images, "--images")
    else:
        raise ValueError(
            "search: give --query-file F.npy, or --checkpoint with --text, --texts-file, --image or --images"
        )
    if not a.checkpoint:
        flag = {"text": "--text / --texts-file", "image": "--image / --images"}[kind]
        raise ValueError(f"{flag}: needs --checkpoint CKPT (the model that encodes the queries)")
    if not os.path.exists(a.checkpoint):
        raise FileNotFoundError(f"--checkpoint: no such file or directory {a.checkpoint!r}")
    return kind, items, list(items)


def _load_queries(a, kind, items):
    import numpy as np

    from ..query import check_finite, encode
    from .index import _load_npy, load_encoder

    if kind == "file":
        q = np.asarray(_load_npy(items[0], "--query-file"))
        if q.dtype.kind != "f":
            raise TypeError(f"--query-file: expected a float array [B, K, D], got dtype {q.dtype}")
        if q.ndim not in (2, 3):
            raise ValueError(f"--query-file: expected shape [B, K, D], got {list(q.shape)}")
        check_finite(q, "--query-file")
        m = None if items[1] is None else np.asarray(_load_npy(items[1], "--query-masks")).astype(bool)
        if q.ndim == 2:  # one query [K, D]: searched (and printed) as a batch of one
            q, m = q[None], None if m is None else m.reshape(1, -1)
        return q, m
    enc = load_encoder(a.checkpoint)
    if hasattr(enc, "batch_size"):
        enc.batch_size = a.batch_size
    name = {"text": "--texts-file" if a.texts_file else "--text", "image": "--images" if a.images else "--image"}
    return encode(enc, kind, items, name[kind])  # one encoder call for the whole batch


def parse_where(items) -> dict:
    """``--where key=value`` (repeatable) -> dict; a value that parses as JSON (2, 2.5, true, null, "2")
    is that value, anything else is a string."""
    out = {}
    for it in items:
        key, sep, raw = it.partition("=")
        if not sep or not key:
            raise ValueError(f"--where: expected key=value, got {it!r}")
        try:
            v = json.loads(raw)
        except ValueError:
            v = raw
        if isinstance(v, (list, dict)):
            raise ValueError(f"--where: {key}: expected a string, number, true/false or null, got {raw!r}")
        out[key] = v
    return out


def _parse_ids(spec: str) -> list:
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--ids: expected comma-separated integer ids, got {spec!r}") from None


def _search_kw(a) -> dict:
    kw = dict(mode=a.mode, shortlist=a.shortlist, by=a.by, chunk_size=a.chunk_size, backend=a.backend)
    if a.where:
        kw["where"] = parse_where(a.where)
    if a.nprobe is not None:
        kw["nprobe"] = a.nprobe
    if a.ids is not None:
        kw["ids"] = _parse_ids(a.ids)
    if a.device:
        kw["device"] = a.device
    return kw


def _run(a) -> int:
    kind, items, labels = _plan(a)  # light: a bad argument or a missing file fails here, before torch loads
    kw = _search_kw(a)
    from ..index import ArchiveIndex
    from ..query import score_hits, search_hits

    rank = 0
    with ArchiveIndex.open(a.index, verify=a.verify) as idx:  # a damaged index fails before the model loads
        q, qm = _load_queries(a, kind, items)
        if a.distributed:
            from ..distributed import CollectiveError, init_from_env, sharded_search, shutdown

            rank, _ = init_from_env()
            sync = True
            try:
                scores, ids, meta = sharded_search(idx, q, a.k, with_metadata=rank == 0, q_mask=qm, **kw)
            except CollectiveError:
                sync = False  # a rank is gone or stuck: no barrier
                raise
            finally:
                shutdown(sync)
            if rank == 0:
                scores, ids, meta, sim, conf = score_hits(idx._current(), q, qm, scores, ids, meta)
        else:
            scores, ids, meta, sim, conf = search_hits(idx, q, a.k, q_mask=qm, **kw)
    if rank != 0:
        return 0
    if labels is None:  # a query file: query b of the file
        labels = [f"{a.query_file}[{b}]" for b in range(ids.shape[0])]
    _print(a, labels, scores, ids, meta, sim, conf)
    return 0


def _print(a, labels, scores, ids, meta, sim, conf) -> None:
    from ..query import hits_json, json_float

    if a.json:
        hits = hits_json(scores, ids, meta, sim, conf)
        out = {
            "scores": [[json_float(x) for x in row] for row in scores.tolist()],
            "ids": ids.tolist(),
            "sim": [[json_float(x) for x in row] for row in sim.tolist()],
            "conf": [[json_float(x) for x in row] for row in conf.tolist()],
            "metadata": meta,
            "queries": [{"query": lab, "hits": h} for lab, h in zip(labels, hits)],
        }
        print(json.dumps(out))
        return
    width = max(40, a.width)
    n = len(labels)
    for b in range(ids.shape[0]):
        live = [r for r in range(ids.shape[1]) if ids[b, r] >= 0]
        print(f"query {b + 1}/{n}: {shorten(labels[b], width)}  ({len(live)} hits)")
        for r in live:
            row = (meta[b][r] if meta is not None else None) or {}
            head = f"  {r + 1:3d}  id={int(ids[b, r]):<8d} {a.by}={scores[b, r]:.4f}"
            head += f" sim={sim[b, r]:.4f} conf={conf[b, r]:.4f}"
            src = row.get("source")
            print(
                head
                + (f"  {os.path.basename(str(src))}" if src else "")
                + (f"  [{row['modality']}]" if row.get("modality") else "")
            )
            if row.get("text"):
                print(f"       {shorten(row['text'], width)}")
        if b + 1 < ids.shape[0]:
            print()


def register(sub) -> None:
    p = sub.add_parser("search", help="top-k search of an archive index (one query or a batch)")
    p.add_argument("index", help="index directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--query-file", help="float array [B, K, D] (.npy) of query prototypes")
    src.add_argument("--text", help="one query report (needs --checkpoint)")
    src.add_argument(
        "--texts-file",
        metavar="F",
        help='query reports, one per line; F.jsonl: one JSON object with a "text" per line (needs --checkpoint)',
    )
    src.add_argument("--image", help="one query image (needs --checkpoint)")
    src.add_argument("--images", nargs="+", metavar="IMG", help="query images (needs --checkpoint)")
    p.add_argument("--query-masks", help="bool array [B, K] (.npy), with --query-file")
    p.add_argument("--checkpoint", help="model checkpoint encoding --text / --texts-file / --image / --images")
    p.add_argument("--batch-size", type=int, default=64, help="queries per encoder forward (default 64)")
    p.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    p.add_argument(
        "--mode", choices=("exhaustive", "two_stage", "ann", "auto"), default="exhaustive", help="auto: as tuned"
    )
    p.add_argument("--nprobe", type=int, help="ann: IVF lists probed (HNSW: efSearch); default: the ANN's stored value")
    p.add_argument("--shortlist", type=int, help="two_stage: candidates kept by pooled sim (default max(10k, 100))")
    p.add_argument("--by", choices=("score", "sim", "conf"), default="score")
    p.add_argument("--chunk-size", type=int, help="items scored per chunk (bounds memory)")
    p.add_argument("--backend", default="auto", help="scoring backend: auto, torch, cpp, triton")
    p.add_argument("--device", help="score the chunks on this torch device (e.g. cuda:0); default: the host")
    p.add_argument(
        "--where",
        action="append",
        metavar="KEY=VALUE",
        help="only items whose metadata KEY equals VALUE (repeatable, all must hold; VALUE is JSON if it parses)",
    )
    p.add_argument("--ids", help="only these item ids (comma-separated)")
    p.add_argument("--verify", action="store_true", help="verify every checksum before searching")
    p.add_argument("--distributed", action="store_true", help="shard across torchrun ranks (rank 0 prints)")
    p.add_argument(
        "--width", type=int, default=100, help="human output: characters of a hit's text shown (default 100)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object: "scores", "ids", "sim", "conf", "metadata" (a list per query) and '
        '"queries" ([{"query", "hits"}] per query)',
    )
    p.set_defaults(func=_run)
