"""`ArchiveIndex.compact`: rewrite the data files without tombstoned rows, as a new generation.

Protocol (crash-safe): write every kept row to *new* files (``<name>.g<gen+1>.bin``), fsync them,
then replace the manifest atomically so it names the new files (this is the commit; its single
checksum record also covers the kept items' metadata rows), then delete the tombstoned metadata
rows and remove the old files. A crash or an error (e.g. ENOSPC) before the commit leaves the old
generation intact (the partial new files are removed at once, or by the next writer's recovery); a
crash after it leaves stray old files, removed the same way, and metadata rows of deleted items,
which no id of the index refers to. Item ids are kept (``ids.bin`` is rewritten too).
"""

from __future__ import annotations

import os
import sys
import zlib

import numpy as np

from . import ann
from . import format as fmt

BLOCK = 65536


def _write_kept(index, paths: dict, progress) -> tuple:
    """Write the live rows to ``paths`` (fsynced); returns (kept rows, crc32 per file, kept ids)."""
    tomb = index.tombstones
    crcs = {k: 0 for k in paths}
    kept, kept_ids = 0, []
    show = sys.stderr.isatty() if progress is None else bool(progress)
    from tqdm.auto import tqdm

    files = {}
    try:
        for k, p in paths.items():
            files[k] = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | fmt.NOFOLLOW, 0o644)
        bar = tqdm(total=index.count, desc="pecm index compact", unit="item", disable=not show)
        for s in range(0, index.count, BLOCK):
            e = min(index.count, s + BLOCK)
            ids = np.asarray(index.array("ids")[s:e])
            keep = ~np.isin(ids, tomb) if tomb.size else np.ones(e - s, dtype=bool)
            kept_ids.append(ids[keep])
            for logical, f in files.items():
                arr = np.ascontiguousarray(np.asarray(index.array(logical)[s:e])[keep])
                data = memoryview(arr).cast("B")
                crcs[logical] = zlib.crc32(data, crcs[logical])
                fmt.write_all(f, data)
            kept += int(keep.sum())
            bar.update(e - s)
        bar.close()
        for f in files.values():
            os.fsync(f)
    finally:
        for f in files.values():
            os.close(f)
    fmt.fsync_dir(index.root)
    return kept, crcs, (np.concatenate(kept_ids) if kept_ids else np.zeros(0, np.int64))


def compact_index(index, progress=None) -> dict:
    m = index.manifest
    gen = m["generation"] + 1
    names = fmt.file_names(gen, fmt.has_scales(index.dtype))
    paths = {k: os.path.join(index.root, v) for k, v in names.items()}
    tomb = index.tombstones
    new = dict(m)
    ann_path = None
    try:
        kept, crcs, kept_ids = _write_kept(index, paths, progress)
        rec = {"start": 0, "count": kept, "crc32": crcs, "meta_crc32": index.meta.rows_crc(kept_ids.tolist())}
        new.pop("ann", None)
        if m.get("ann") and kept:  # rebuilt over the kept rows with the same kind and parameters
            a = m["ann"]
            dt, shape = index.layout["pooled"]
            pooled = np.memmap(paths["pooled"], dtype=dt, mode="r", shape=(kept, *shape))
            name = f"ann.g{gen}.s{a['seq'] + 1}.faiss"
            ann_path = os.path.join(index.root, name)
            params = dict(a["params"])
            if "nlist" in params:
                params["nlist"] = min(params["nlist"], max(1, kept))
                params["nprobe"] = min(params.get("nprobe", 1), params["nlist"])
            if ann.fits(a["kind"], params, kept):  # else too few items are left: no ANN until the next build
                rows_of = lambda r: fmt.pooled_values(pooled[r])  # noqa: E731
                new["ann"] = index._write_ann(name, a["seq"] + 1, a["kind"], params, kept, rows_of, progress)
            del pooled
        new.update(
            count=kept,
            generation=gen,
            files=names,
            tombstones=[],
            sizes={k: kept * index.item_bytes[k] for k in names},
            checksums=[rec] if kept else [],
        )
        fmt.write_manifest(index.root, new)
    except BaseException:
        index._after_failed_commit(new)
        if index.manifest["generation"] != gen:  # not committed: the partial new files go
            for p in [*paths.values(), *([ann_path] if ann_path else [])]:
                try:
                    os.remove(p)
                except OSError:
                    pass
        raise
    index._reload(new)
    if tomb.size:
        index.meta.delete(tomb.tolist())
    old_files = list(m["files"].values()) + ([m["ann"]["file"]] if m.get("ann") else [])
    for name in old_files:
        if name not in names.values():
            try:
                os.remove(os.path.join(index.root, name))
            except FileNotFoundError:
                pass
    return new
