"""PQ-compressed prototypes on real PECM prototypes: the demo's encoded ROCO test items (issue 12).

    make demo                                   # writes runs/demo/index/{images,reports} (float16)
    python bench/pq_real.py --demo runs/demo    # -> bench/results/pq_real_roco_<cpu>.json

For each modality index of the demo (float16, the model's prototypes of the ROCO test split), the same
items (their stored unit prototypes, masks and pooled vectors) are written into ``dtype="pq"`` indexes
for several settings (codes per prototype M, shared or per-slot codebooks). Queries are the other
modality's items (report -> image index and image -> report index, as the product searches), so the
numbers measure what compression does to the cross-modal ranking:

- recall@10 of pq exhaustive search against exact float16 search of the same items;
- Recall@1/5/10 of the matched pair (``pair_id``) by R with float16 and with pq prototypes;
- bytes per item of the prototype data, and the time to train + encode.

Codebooks: ``--codebook-from test`` trains each pq codebook on the indexed (test) items themselves, as a
first `add` does; ``--codebook-from train`` (default when the demo's feature cache and checkpoint are there)
trains it with `ArchiveIndex.train_pq` on the same modality's prototypes of the demo's *training* split
(the checkpoint applied to ``cache/train.*.pt``), so the test items are encoded with a codebook that never
saw them, as in an archive that grows after its codebook was trained.

The items are few (the demo's test split): this is a quality measurement, not a speed one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pecm.bench.timing import cpu_model, git_commit  # noqa: E402
from pecm.index import ArchiveIndex  # noqa: E402

SETTINGS = [  # (pq_m, per_slot, coarse stages, pooled, scales); the first is the default of a new pq index
    (64, False, 1, "int8", "float16"),
    (64, False, 1, "float16", "float32"),
    (64, False, 0, "int8", "float16"),
    (64, False, 2, "int8", "float16"),
    (32, False, 0, "float16", "float32"),
    (32, False, 1, "float16", "float32"),
    (32, False, 1, "int8", "float16"),
    (32, False, 2, "float16", "float32"),
    (32, True, 1, "float16", "float32"),
    (16, False, 1, "float16", "float32"),
]


def _items(idx):
    ids = np.asarray(idx.ids())
    rows = idx.get(ids, vectors=True)
    x = np.stack([r["prototypes"] for r in rows])
    m = np.stack([r["mask"] for r in rows])
    p = np.stack([r["pooled"] for r in rows])
    pair = [r.get("pair_id") for r in rows]
    return ids, x, m, p, pair


def _pair_recall(ids, qpair, tpair, ks=(1, 5, 10)):
    pos = {p: i for i, p in enumerate(tpair)}
    hits = {k: 0 for k in ks}
    for b, p in enumerate(qpair):
        row = [int(j) for j in ids[b] if j >= 0]
        target = pos.get(p)
        for k in ks:
            hits[k] += int(target is not None and target in row[:k])
    return {f"R@{k}": 100.0 * hits[k] / len(qpair) for k in ks}


def _train_split_prototypes(demo: str) -> dict:
    """{"images": (prototypes, masks), "reports": (...)} of the demo's training split: its checkpoint applied
    to the cached backbone features (``cache/train.{image,text}.pt``)."""
    import torch

    from pecm.model import PECM
    from pecm.train import prototypes_from_features

    feats = {}
    for side in ("image", "text"):
        st = torch.load(os.path.join(demo, "cache", f"train.{side}.pt"), map_location="cpu", weights_only=True)
        feats.update({k: v for k, v in st.items() if k != "key"})
    model = PECM.load(os.path.join(demo, "checkpoint"))
    img, im, txt, tm, _ = prototypes_from_features(model, feats)
    return {"images": (img.numpy(), im.numpy()), "reports": (txt.numpy(), tm.numpy())}


def run(demo: str, k: int = 10, codebook_from: str = "train") -> dict:
    root = os.path.join(demo, "index")
    out = {
        "benchmark": "bench/pq_real.py",
        "cpu_model": cpu_model(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "demo": os.path.abspath(demo),
        "k": k,
        "codebook_from": codebook_from,
        "directions": {},
    }
    train_protos = _train_split_prototypes(demo) if codebook_from == "train" else None
    if train_protos is not None:
        out["codebook_training_items"] = {name: int(len(v[0])) for name, v in train_protos.items()}
    mods = {}
    for name in ("images", "reports"):
        with ArchiveIndex.open(os.path.join(root, name)) as idx:
            mods[name] = (_items(idx), idx.K, idx.D, idx.weights.copy())
    for target, query in (("images", "reports"), ("reports", "images")):
        (tids, tx, tm, tp, tpair), K, D, w = mods[target]
        (_, qx, qm, _, qpair), *_ = mods[query]
        res = {"items": int(len(tids)), "queries": int(len(qx)), "K": K, "D": D, "settings": []}
        with tempfile.TemporaryDirectory() as tmp:
            f16 = ArchiveIndex.create(os.path.join(tmp, "f16"), K, D, weights=w)
            f16.add(tx, masks=tm, pooled=tp, progress=False)
            es, ei, _ = f16.search(qx, k, q_mask=qm, with_metadata=False)
            res["float16"] = {
                "prototype_bytes_per_item": f16.item_bytes["prototypes"],
                **_pair_recall(ei, qpair, tpair),
            }
            for m, per_slot, coarse, pooled, scales in SETTINGS:
                t = time.perf_counter()
                ix = ArchiveIndex.create(
                    os.path.join(tmp, f"pq{m}{per_slot}{coarse}{pooled}{scales}"),
                    K,
                    D,
                    dtype="pq",
                    weights=w,
                    pq_m=m,
                    pq_per_slot=per_slot,
                    pq_coarse=coarse,
                    pq_pooled=pooled,
                    pq_scales=scales,
                )
                setting = {"pq_m": m, "per_slot": per_slot, "coarse": coarse, "pooled": pooled, "scales": scales}
                try:
                    if train_protos is not None:
                        ix.train_pq(*train_protos[target])
                    ix.add(tx, masks=tm, pooled=tp, progress=False)
                except ValueError as e:  # e.g. per-slot codebooks: too few valid prototypes in a slot
                    res["settings"].append({**setting, "error": str(e)})
                    ix.close()
                    continue
                build = time.perf_counter() - t
                ps, pi, _ = ix.search(qx, k, q_mask=qm, with_metadata=False)
                rec = np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ei, pi)])
                res["settings"].append(
                    {
                        **setting,
                        f"recall_at_{k}_vs_exact_float16": float(rec),
                        "prototype_bytes_per_item": ix.item_bytes["prototypes"] + ix.item_bytes["scales"],
                        "item_bytes_total": int(sum(ix.item_bytes.values())),
                        "train_and_add_s": build,
                        **_pair_recall(pi, qpair, tpair),
                    }
                )
                ix.close()
            f16.close()
        out["directions"][f"{query}->{target}"] = res
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--demo", default="runs/demo", help="the demo's --out directory (holds index/images, index/reports)"
    )
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/pq_real_roco_<cpu>.json)")
    ap.add_argument(
        "--codebook-from",
        choices=("train", "test"),
        default="train",
        help="train the codebooks on the demo's training split (held out; default) or on the indexed test items",
    )
    a = ap.parse_args(argv)
    if not os.path.isdir(os.path.join(a.demo, "index", "images")):
        print(f"pq_real: error: --demo {a.demo!r} has no index/images (run `make demo` first)", file=sys.stderr)
        return 2
    res = run(a.demo, codebook_from=a.codebook_from)
    text = json.dumps(res, indent=1)
    print(text)
    path = a.out or os.path.join(ROOT, "bench", "results", "pq_real_roco_cpu_zen4.json")
    with open(path, "w") as f:
        f.write(text + "\n")
    print(f"pq_real: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
