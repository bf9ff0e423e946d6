"""`pecm search INDEX ...`: top-k search of an archive index (optionally sharded with torchrun)."""

from __future__ import annotations

import json

import numpy as np

from ..query import check_finite, check_k, check_results, encode, hit_scores, json_float, search_hits
from .index import _load_npy, load_encoder


def _queries(a):
    if a.query_file:
        q = np.asarray(_load_npy(a.query_file, "--query-file"))
        if q.dtype.kind != "f":
            raise TypeError(f"--query-file: expected a float array [B, K, D], got dtype {q.dtype}")
        if q.ndim not in (2, 3):
            raise ValueError(f"--query-file: expected shape [B, K, D], got {list(q.shape)}")
        check_finite(q, "--query-file")
        m = None if a.query_masks is None else np.asarray(_load_npy(a.query_masks, "--query-masks")).astype(bool)
        return q, m
    if not a.checkpoint or not (a.image or a.text):
        raise ValueError("search: give --query-file F.npy, or --checkpoint with --image or --text")
    enc = load_encoder(a.checkpoint)
    if a.image:
        return encode(enc, "image", [a.image], "--image")
    return encode(enc, "text", [a.text], "--text")


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


def _run(a) -> int:
    from ..index import ArchiveIndex

    check_k(a.k, "-k")
    q, qm = _queries(a)
    kw = dict(mode=a.mode, shortlist=a.shortlist, by=a.by, q_mask=qm, chunk_size=a.chunk_size, backend=a.backend)
    if a.where:
        kw["where"] = parse_where(a.where)
    if a.nprobe is not None:
        kw["nprobe"] = a.nprobe
    if a.ids is not None:
        kw["ids"] = _parse_ids(a.ids)
    if a.device:
        kw["device"] = a.device
    rank = 0
    with ArchiveIndex.open(a.index, verify=a.verify) as idx:
        if a.distributed:
            from ..distributed import init_from_env, sharded_search, shutdown

            rank, _ = init_from_env()
            try:
                scores, ids, meta = sharded_search(idx, q, a.k, with_metadata=rank == 0, **kw)
            finally:
                shutdown()
            if rank == 0:
                check_results(scores, ids)
                sim, conf = hit_scores(idx._current(), q, qm, ids)
        else:
            kw.pop("q_mask")
            scores, ids, meta, sim, conf = search_hits(idx, q, a.k, q_mask=qm, **kw)
    if rank != 0:
        return 0
    if a.json:
        out = {
            "scores": [[json_float(x) for x in row] for row in scores.tolist()],
            "ids": ids.tolist(),
            "sim": [[json_float(x) for x in row] for row in sim.tolist()],
            "conf": [[json_float(x) for x in row] for row in conf.tolist()],
            "metadata": meta,
        }
        print(json.dumps(out))
        return 0
    for b in range(scores.shape[0]):
        print(f"query {b}:")
        for r in range(scores.shape[1]):
            if ids[b, r] < 0:
                continue
            row = meta[b][r] or {}
            label = row.get("source") or (row.get("text") or "")[:80]
            print(f"  {r + 1:3d}  id={ids[b, r]:<10d} {a.by}={scores[b, r]:.6f}  {label}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("search", help="top-k search of an archive index")
    p.add_argument("index", help="index directory")
    p.add_argument("--query-file", help="float array [B, K, D] (.npy) of query prototypes")
    p.add_argument("--query-masks", help="bool array [B, K] (.npy)")
    p.add_argument("--checkpoint", help="model checkpoint to encode --image / --text")
    p.add_argument("--image", help="query image (needs --checkpoint)")
    p.add_argument("--text", help="query report text (needs --checkpoint)")
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
    p.add_argument("--json", action="store_true", help='print {"scores", "ids", "sim", "conf", "metadata"} as JSON')
    p.set_defaults(func=_run)
