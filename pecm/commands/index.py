"""`pecm index create|add|info|verify|compact|delete`: manage an on-disk `pecm.index.ArchiveIndex`."""

from __future__ import annotations

import json
import os

from ._common import add_json_flag, add_progress_flags, emit, progress

# numpy, torch and pecm.index are imported inside the commands: `pecm --help` imports this module


def _load_npy(path: str, name: str):
    import numpy as np

    if not os.path.exists(path):
        raise FileNotFoundError(f"{name}: no such file {path!r}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{name}: {path!r} is not a readable .npy array ({e})") from e


def _load_jsonl(path: str) -> list:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"--meta: line {n} of {path!r} is not JSON ({e})") from e
    return rows


def load_encoder(ckpt: str):
    """The model's encoder (`pecm.model.encode.load_encoder`), imported lazily (after the path is checked)."""
    if not os.path.exists(ckpt):
        raise FileNotFoundError(f"--checkpoint: no such file {ckpt!r}")
    try:
        from pecm.model.encode import load_encoder as _load
    except ImportError as e:
        raise ValueError(f"--checkpoint: the model encoder (pecm.model.encode) is not available: {e}") from e
    return _load(ckpt)


def _weights(spec):
    import numpy as np

    if spec is None:
        return None
    if spec.endswith(".npy"):
        return np.asarray(_load_npy(spec, "--weights"), dtype=np.float64)
    try:
        return np.asarray([float(x) for x in spec.split(",")], dtype=np.float64)
    except ValueError as e:
        raise ValueError(f"--weights: expected a .npy file or comma-separated floats, got {spec!r}") from e


def _create(a) -> int:
    import numpy as np

    from ..index import ArchiveIndex

    k, d, w = a.K, a.D, _weights(a.weights)
    if a.checkpoint:  # K, D and the learned prototype weights of the model that will fill the index
        enc = load_encoder(a.checkpoint)
        k, d = int(enc.K), int(enc.D)
        w = np.asarray(enc.weights, dtype=np.float64) if w is None and hasattr(enc, "weights") else w
    pq_kw = {
        "pq_m": a.pq_m,
        "pq_per_slot": a.pq_per_slot,
        "pq_coarse": a.pq_coarse,
        "pq_pooled": a.pq_pooled,
        "pq_scales": a.pq_scales,
    }
    if a.dtype != "pq" and (a.pq_per_slot or any(v is not None for k, v in pq_kw.items() if k != "pq_per_slot")):
        raise ValueError("--pq-m / --pq-per-slot / --pq-coarse / --pq-pooled / --pq-scales: only with --dtype pq")
    pq_kw = pq_kw if a.dtype == "pq" else {}
    idx = ArchiveIndex.create(a.path, k, d, dtype=a.dtype, weights=w, overwrite=a.overwrite, **pq_kw)
    idx.close()
    emit(a, {"path": a.path, "K": k, "D": d, "dtype": a.dtype}, f"created {a.path} (K={k}, D={d}, dtype={a.dtype})")
    return 0


def _add_encoded(idx, a) -> int:
    import numpy as np

    if a.images:
        items, kind = list(a.images), "image"
        for p in items:
            if not os.path.exists(p):
                raise FileNotFoundError(f"--images: no such file {p!r}")
    else:
        if not os.path.isfile(a.texts_file):
            raise FileNotFoundError(f"--texts-file: no such file {a.texts_file!r}")
        with open(a.texts_file, encoding="utf-8") as f:
            items, kind = [line.strip() for line in f if line.strip()], "text"
    enc = load_encoder(a.checkpoint)  # after the inputs are checked: a missing file fails before the model loads
    total = 0
    for s in range(0, len(items), a.batch_size):
        part = items[s : s + a.batch_size]
        protos, masks = enc.encode_images(part) if kind == "image" else enc.encode_texts(part)
        meta = [{"modality": kind, "source": p} if kind == "image" else {"modality": kind, "text": p} for p in part]
        total += len(idx.add(np.asarray(protos), np.asarray(masks), metadata=meta, progress=progress(a, a.json)))
    return total


def _check_add_inputs(a) -> None:
    """The files `index add` reads, checked before torch / the model load (one `pecm: error:` line)."""
    if a.checkpoint and not os.path.exists(a.checkpoint):
        raise FileNotFoundError(f"--checkpoint: no such file {a.checkpoint!r}")
    for p in a.images or ():
        if not os.path.exists(p):
            raise FileNotFoundError(f"--images: no such file {p!r}")
    if a.texts_file and not os.path.isfile(a.texts_file):
        raise FileNotFoundError(f"--texts-file: no such file {a.texts_file!r}")
    for name in ("prototypes", "masks", "pooled", "meta"):
        v = getattr(a, name)
        if v is not None and not os.path.exists(v):
            raise FileNotFoundError(f"--{name}: no such file {v!r}")


def _add(a) -> int:
    _check_add_inputs(a)
    from ..index import ArchiveIndex

    with ArchiveIndex.open(a.path, mode="a") as idx:
        first = idx.manifest["next_id"]
        if a.checkpoint:
            if not (a.images or a.texts_file):
                raise ValueError("--checkpoint: give --images or --texts-file to encode")
            n = _add_encoded(idx, a)
        else:
            if not a.prototypes:
                raise ValueError("add: give --prototypes F.npy, or --checkpoint with --images/--texts-file")
            protos = _load_npy(a.prototypes, "--prototypes")
            masks = None if a.masks is None else _load_npy(a.masks, "--masks")
            pooled = None if a.pooled is None else _load_npy(a.pooled, "--pooled")
            meta = None if a.meta is None else _load_jsonl(a.meta)
            n = len(idx.add(protos, masks, metadata=meta, pooled=pooled, progress=progress(a, a.json)))
        obj = {"path": a.path, "added": n, "first_id": first if n else None, "last_id": first + n - 1 if n else None}
        obj["live"] = len(idx)
        emit(a, obj, f"added {n} items (ids {first}..{first + n - 1}); {len(idx)} live items")
    return 0


def _info(a) -> int:
    from ..index import ArchiveIndex

    with ArchiveIndex.open(a.path) as idx:
        st = idx.stats()
    if a.json:
        print(json.dumps(st))
    else:
        for key, v in st.items():
            print(f"{key:11s} {v}")
    return 0


def _verify(a) -> int:
    from ..index import ArchiveIndex

    with ArchiveIndex.open(a.path, verify=True) as idx:
        rows, n = idx.count, len(idx.manifest["checksums"])
    emit(
        a, {"path": a.path, "ok": True, "rows": rows, "checksums": n}, f"ok: {rows} rows, {n} checksum records verified"
    )
    return 0


def _compact(a) -> int:
    from ..index import ArchiveIndex

    with ArchiveIndex.open(a.path, mode="a") as idx:
        before = idx.count
        idx.compact(progress=progress(a, a.json))
        after = idx.count
    emit(
        a, {"path": a.path, "rows_before": before, "rows_after": after}, f"compacted {a.path}: {before} -> {after} rows"
    )
    return 0


def _build_ann(a) -> int:
    from ..index import ArchiveIndex

    params = {k: getattr(a, k) for k in ("nlist", "nprobe", "m", "nbits", "M", "ef_construction", "seed")}
    params = {k: v for k, v in params.items() if v is not None}
    with ArchiveIndex.open(a.path, mode="a") as idx:
        ann = idx.build_ann(a.kind, progress=progress(a, a.json), **params)
    if a.json:
        print(json.dumps(ann))
    else:
        print(f"built {ann['kind']} ANN over {ann['rows']} rows ({ann['bytes']} bytes): {ann['params']}")
    return 0


def _tune(a) -> int:
    import numpy as np

    from ..index import ArchiveIndex
    from ..index.tune import format_table

    q = qm = None
    if a.query_file:
        q = np.asarray(_load_npy(a.query_file, "--query-file"), dtype=np.float32)
    with ArchiveIndex.open(a.path, mode="a") as idx:
        res = idx.tune(
            a.target_recall, a.k, q, qm, a.queries, a.seed, store=not a.dry_run, progress=progress(a, a.json)
        )
    if a.json:
        print(json.dumps(res))
    else:
        print(format_table(res))
        c = res["chosen"]
        print(
            f"{'would store' if a.dry_run else 'stored'} defaults: mode={c['mode']} shortlist={c['shortlist']} "
            f"nprobe={c['nprobe']} (search --mode auto uses them)"
        )
    return 0


def _delete(a) -> int:
    from ..index import ArchiveIndex

    with ArchiveIndex.open(a.path, mode="a") as idx:
        n = idx.delete(a.ids)
        live = len(idx)
    emit(a, {"path": a.path, "deleted": n, "live": live}, f"deleted {n} items; {live} live items")
    return 0


def register(sub) -> None:
    p = sub.add_parser("index", help="create, fill and inspect an on-disk archive index")
    isub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    c = isub.add_parser("create", help="create an empty index")
    c.add_argument("path")
    c.add_argument("--K", "-K", type=int, default=26, help="prototypes per item (default 26)")
    c.add_argument("--D", "-D", type=int, default=256, help="prototype dimension (default 256)")
    c.add_argument(
        "--dtype",
        choices=("float16", "float32", "int8", "pq"),
        default="float16",
        help="prototype storage (default float16; pq: product-quantised codes, trained at the first add; needs faiss)",
    )
    c.add_argument("--pq-m", type=int, default=None, help="--dtype pq: 8-bit codes per prototype (default D/4)")
    c.add_argument("--pq-per-slot", action="store_true", help="--dtype pq: one codebook per slot (default shared)")
    c.add_argument(
        "--pq-coarse", type=int, default=None, help="--dtype pq: residual stages (256 centroids per slot) before the PQ"
    )
    c.add_argument(
        "--pq-pooled", choices=("int8", "float16"), default=None, help="--dtype pq: pooled vectors (default int8)"
    )
    c.add_argument(
        "--pq-scales", choices=("float16", "float32"), default=None, help="--dtype pq: scales (default float16)"
    )
    c.add_argument("--weights", help="prototype weights w: a .npy file or comma-separated floats (default ones)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing index")
    c.add_argument("--checkpoint", help="take K, D and the weights from this model checkpoint")
    add_json_flag(c, '{"path", "K", "D", "dtype"}')
    c.set_defaults(func=_create)

    ad = isub.add_parser("add", help="append items from .npy arrays or encode them with a checkpoint")
    ad.add_argument("path")
    ad.add_argument("--prototypes", help="float array [N, K, D] (.npy)")
    ad.add_argument("--masks", help="bool array [N, K] (.npy)")
    ad.add_argument("--pooled", help="float array [N, D] (.npy) used instead of Eq. 4")
    ad.add_argument("--meta", help="metadata, one JSON object per line (modality/source/text + extras)")
    ad.add_argument("--checkpoint", help="model checkpoint for --images / --texts-file")
    ad.add_argument("--images", nargs="+", help="image files to encode (needs --checkpoint)")
    ad.add_argument("--texts-file", help="text file, one report per line (needs --checkpoint)")
    ad.add_argument("--batch-size", type=int, default=32)
    add_progress_flags(ad)
    add_json_flag(ad, '{"path", "added", "first_id", "last_id", "live"}')
    ad.set_defaults(func=_add)

    i = isub.add_parser("info", help="print the index statistics")
    i.add_argument("path")
    add_json_flag(i, "the statistics")
    i.set_defaults(func=_info)

    v = isub.add_parser("verify", help="check sizes and every checksum")
    v.add_argument("path")
    add_json_flag(v, '{"path", "ok", "rows", "checksums"}')
    v.set_defaults(func=_verify)

    co = isub.add_parser("compact", help="rewrite the files without deleted items")
    co.add_argument("path")
    add_progress_flags(co)
    add_json_flag(co, '{"path", "rows_before", "rows_after"}')
    co.set_defaults(func=_compact)

    an = isub.add_parser("build-ann", help="build the FAISS first stage of `pecm search --mode ann`")
    an.add_argument("path")
    an.add_argument("--kind", choices=("flat", "ivf_flat", "ivf_pq", "hnsw"), help="default: chosen from N")
    an.add_argument("--nlist", type=int, help="IVF lists (default 4*sqrt(N))")
    an.add_argument("--nprobe", type=int, help="lists probed per search (IVF) / efSearch (HNSW), stored as default")
    an.add_argument("--m", type=int, help="PQ sub-quantisers (ivf_pq; default D/8)")
    an.add_argument("--nbits", type=int, help="bits per PQ code (ivf_pq; default 8)")
    an.add_argument("--M", type=int, help="HNSW neighbours per node (default 32)")
    an.add_argument("--ef-construction", type=int, help="HNSW build breadth (default 80)")
    an.add_argument("--seed", type=int, help="training sample seed (default 0)")
    add_json_flag(an, 'the ANN record {"kind", "rows", "bytes", "params", ...}')
    add_progress_flags(an)
    an.set_defaults(func=_build_ann)

    tu = isub.add_parser("tune", help="measure recall/latency of two_stage and ann, store the defaults")
    tu.add_argument("path")
    tu.add_argument("--target-recall", type=float, default=0.95)
    tu.add_argument("-k", type=int, default=10)
    tu.add_argument("--queries", type=int, default=64, help="stored items sampled as queries (default 64)")
    tu.add_argument("--query-file", help="float array [B, K, D] (.npy) of queries instead")
    tu.add_argument("--seed", type=int, default=0)
    tu.add_argument("--dry-run", action="store_true", help="print the table, store nothing")
    add_json_flag(tu, "the measured table and the chosen defaults")
    add_progress_flags(tu)
    tu.set_defaults(func=_tune)

    de = isub.add_parser("delete", help="delete items by id (tombstones)")
    de.add_argument("path")
    de.add_argument("ids", nargs="+", type=int)
    add_json_flag(de, '{"path", "deleted", "live"}')
    de.set_defaults(func=_delete)
