"""`pecm demo [--data DIR] [--out runs/demo] [--epochs N]`: the end-to-end PECM demo on ROCO pairs.

Steps: load the pairs (``../shared/data/roco`` when present beside the source tree, else the shipped sample
``pecm/data/roco_sample``, package data), seeded train/val/test split (75/5/20 %); build `PECM` with the packaged
pretrained backbones (efficientnet_lite0 ImageNet, all-MiniLM-L6-v2), frozen; extract and cache their features;
train heads + θ + logit scale (`pecm.train`, paper schedule) and keep the epoch with the best validation RSUM; save
``OUT/checkpoint``; index the test images and reports in ``OUT/index/{images,reports}`` (`pecm.index.ArchiveIndex`);
run example report→image and image→report searches; print the evaluation table on the test pairs (sim only vs
R = sim·C), chance levels and the wall time. Demo defaults chosen on the validation split (issue 14, docs/model.md
§6 runs G–P): ``--image-slots attend --text-units clauses --group-threshold 1.0 --nu 1 --kappa 1``; the paper's
form of the demo is ``--image-slots regions --text-units sentences --group-threshold 0.95 --nu 0 --kappa 0``.
``--quick``: a tiny random model on 60 shipped pairs (tests; needs
only the ``[model]`` extra, no pretrained-weights packages).
See docs/model.md for the measured results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

from ._common import add_progress_flags, show_progress

IMAGE_KEYS = ("image_backbone", "image_size", "image_weights", "grid", "K")
TEXT_KEYS = ("text_encoder", "text_hidden", "text_layers", "text_heads", "text_max_len", "doc2vec_dim")
TEXT_KEYS += ("doc2vec_epochs", "doc2vec_min_count", "group_threshold", "K", "seed", "text_units")


def _cached_features(model, pairs, path: str, progress: bool, train_ids):
    """Raw frozen-backbone features of ``pairs``, cached per side in ``path``.{image,text}.pt. A side is reused
    only when its key matches: the config fields that change its features, the pair ids and (report side:
    Doc2Vec is fitted on the training reports) the training ids. Returns (features, all sides cached)."""
    import torch

    from ..train import extract_features

    cfg = model.config.to_dict()
    ids = [p.id for p in pairs.pairs]
    keys = {
        "image": [{k: cfg[k] for k in IMAGE_KEYS}, ids],
        "text": [{k: cfg[k] for k in TEXT_KEYS}, ids, list(train_ids)],
    }
    feats, todo = {}, []
    for side, key in keys.items():
        key = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()
        keys[side] = key
        f = f"{path}.{side}.pt"
        st = torch.load(f, map_location="cpu", weights_only=True) if os.path.isfile(f) else {}
        if st.get("key") == key:
            feats.update({k: v for k, v in st.items() if k != "key"})
        else:
            todo.append(side)
    if todo:
        new = extract_features(model, pairs, 32, progress, parts=tuple(todo))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for side, names in (("image", ("img",)), ("text", ("txt", "txt_mask"))):
            if side in todo:
                torch.save({**{k: new[k] for k in names}, "key": keys[side]}, f"{path}.{side}.pt")
        feats.update(new)
    return feats, not todo


def _short(text: str, n: int = 90) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _run(a) -> int:
    import numpy as np
    import torch

    from ..data import default_data_dir, load_pairs, split_pairs
    from ..data.layouts import SAMPLE_ROCO
    from ..index import ArchiveIndex
    from ..metrics import chance_levels
    from ..model import PECM, PECMConfig
    from ..train import TrainConfig, evaluate_features, prototypes_from_features, train
    from .eval import eval_summary, format_table

    t0 = time.time()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("gensim", "transformers", "httpx", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if a.quick:  # tests / smoke check: tiny random-init model on a few shipped pairs
        a.data = a.data or SAMPLE_ROCO
        a.limit = a.limit or 60
        a.epochs, a.batch_size, a.lr = min(a.epochs, 3), min(a.batch_size, 8), max(a.lr, 1e-3)
    if a.epochs < 1:
        raise ValueError(f"--epochs: expected an int >= 1, got {a.epochs}")
    if a.batch_size < 2:
        raise ValueError(f"--batch-size: expected an int >= 2, got {a.batch_size}")
    if not 0.0 < a.test_fraction < 1.0 or not 0.0 <= a.val_fraction < 1.0 - a.test_fraction:
        raise ValueError(
            f"--test-fraction/--val-fraction: expected 0 < test < 1 and 0 <= val < 1 - test,"
            f" got {a.test_fraction}/{a.val_fraction}"
        )
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data = a.data or default_data_dir()
    pairs = load_pairs(data, limit=a.limit)
    # seeded train / val / test split; val only monitors training, every reported number is on test
    rest, test_set = split_pairs(pairs, a.test_fraction, a.seed)
    val_set = None
    train_set = rest
    if a.val_fraction > 0:
        train_set, val_set = split_pairs(rest, a.val_fraction / (1.0 - a.test_fraction), a.seed + 1)
    print(
        f"data: {data}: {len(pairs)} pairs ({len(pairs.skipped)} skipped) -> train {len(train_set)},"
        f" val {len(val_set) if val_set else 0}, test {len(test_set)} (seed {a.seed})"
    )
    over = {"seed": a.seed}
    if a.group_threshold is not None:
        over["group_threshold"] = a.group_threshold
    if a.head_hidden is not None:
        over["head_hidden"] = a.head_hidden
    if a.image_slots is not None:
        over["image_slots"] = a.image_slots
    if a.text_units is not None:
        over["text_units"] = a.text_units
    cfg = PECMConfig.tiny(**over) if a.quick else PECMConfig.demo_cpu(**over)
    model = PECM(cfg)
    model.text.fit(train_set.texts)
    progress = show_progress(a)
    t = time.time()
    cache = os.path.join(a.out, "cache")
    tr_ids = [p.id for p in train_set.pairs]
    tr_f, hit1 = _cached_features(model, train_set, os.path.join(cache, "train"), progress, tr_ids)
    te_f, hit2 = _cached_features(model, test_set, os.path.join(cache, "test"), progress, tr_ids)
    va_f = None
    if val_set is not None:
        va_f, _ = _cached_features(model, val_set, os.path.join(cache, "val"), progress, tr_ids)
    groups = te_f["txt_mask"].sum(1).float() - 1
    print(
        f"features: {time.time() - t:.1f}s ({'cached' if hit1 and hit2 else 'extracted'}, frozen backbones); "
        f"sentence groups per test report: mean {groups.mean():.2f}, max {int(groups.max())}"
    )
    ckpt = os.path.join(a.out, "checkpoint")
    t = time.time()
    tc = TrainConfig(
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        progress=progress,
        save_every=a.epochs,
        select_best=val_set is not None,
        lam=a.lam,
        nu=a.nu,
        kappa=a.kappa,
        rho=a.rho,
        feature_dropout=a.feature_dropout,
        theta_lr=a.theta_lr,
    )
    # small per-step ops (B*K rows): one intra-op thread avoids OpenMP synchronisation overhead, which on a
    # shared 2-core machine cost 1.5-5x per step in our measurements (docs/model.md)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, a.train_threads))
    try:
        hist = train(model, train_set, ckpt, tc, val_pairs=val_set, train_feats=tr_f, val_feats=va_f)
    finally:
        torch.set_num_threads(threads)
    sel = [h["epoch"] for h in hist if h.get("selected")]
    chosen = f"; kept epoch {sel[0]} (best validation RSUM)" if sel else ""
    print(f"training: {a.epochs} epochs in {time.time() - t:.1f}s{chosen} -> {ckpt}")

    # ---- archive index of both modalities (test split)
    img, im, txt, tm, w = prototypes_from_features(model, te_f)
    idx_root = os.path.join(a.out, "index")
    with ArchiveIndex.create(
        os.path.join(idx_root, "images"), model.config.K, model.config.D, weights=w.numpy(), overwrite=True
    ) as ix:
        ix.add(
            img.numpy(),
            im.numpy(),
            [{"modality": "image", "source": p.image, "text": p.text, "pair_id": p.id} for p in test_set.pairs],
            progress=False,
        )
    with ArchiveIndex.create(
        os.path.join(idx_root, "reports"), model.config.K, model.config.D, weights=w.numpy(), overwrite=True
    ) as ix:
        ix.add(
            txt.numpy(),
            tm.numpy(),
            [{"modality": "report", "source": p.image, "text": p.text, "pair_id": p.id} for p in test_set.pairs],
            progress=False,
        )
    print(f"index: {len(test_set)} images + {len(test_set)} reports in {idx_root}")
    rng = np.random.default_rng(a.seed)
    ex = rng.choice(len(test_set), size=min(2, len(test_set)), replace=False)
    with (
        ArchiveIndex.open(os.path.join(idx_root, "images")) as images,
        ArchiveIndex.open(os.path.join(idx_root, "reports")) as reports,
    ):
        for i in ex:
            p = test_set.pairs[int(i)]
            s, _, meta = images.search(txt[int(i) : int(i) + 1].numpy(), 3, q_mask=tm[int(i) : int(i) + 1].numpy())
            print(f"\nreport -> image  query [{p.id}]: {_short(p.text)}")
            for r, (sc, row) in enumerate(zip(s[0], meta[0]), 1):
                mark = "  <- the matching image" if row["pair_id"] == p.id else ""
                print(f"  {r}. R={sc:.3f} {row['pair_id']} {os.path.basename(row['source'])}{mark}")
            s, _, meta = reports.search(img[int(i) : int(i) + 1].numpy(), 3, q_mask=im[int(i) : int(i) + 1].numpy())
            print(f"image -> report  query [{p.id}] {os.path.basename(p.image)}")
            for r, (sc, row) in enumerate(zip(s[0], meta[0]), 1):
                mark = "  <- the matching report" if row["pair_id"] == p.id else ""
                print(f"  {r}. R={sc:.3f} {row['pair_id']}: {_short(row['text'], 70)}{mark}")

    # ---- evaluation
    res = evaluate_features(model, te_f, test_set.cuis)
    n = len(test_set)
    print(f"\nEvaluation on the {n} held-out test pairs (percent; i2r = image->report, r2i = report->image):")
    print(format_table(res, n))
    ch = chance_levels(n)
    cc = res.get("chance", {})
    print(
        f"chance (random ranking of {n}): R@1 {ch[1]:.2f}, R@5 {ch[5]:.2f}, R@10 {ch[10]:.2f}"
        + (f"; CUI@K {cc['cui']:.1f}; CBIR P@K {cc['cbir_cui']:.1f}" if cc else "")
    )
    summary = {by: eval_summary(res, by, n) for by in ("sim", "score", "conf")}
    wall = time.time() - t0
    with open(os.path.join(a.out, "eval.json"), "w") as f:
        out = {"results": summary, "chance": {**{f"R@{k}": v for k, v in ch.items()}, **cc}, "wall_seconds": wall}
        json.dump({**out, "data": data, "n_train": len(train_set)}, f, indent=1, default=float)
    print(f"wall time: {wall:.1f}s (results in {os.path.join(a.out, 'eval.json')})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="end-to-end demo: train on ROCO, index, search, evaluate")
    p.add_argument(
        "--data", help="pairs folder (default ../shared/data/roco beside the source tree, else the shipped sample)"
    )
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out test pairs (all reported numbers)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="pairs held out to monitor training")
    p.add_argument(
        "--group-threshold",
        type=float,
        default=1.0,
        help="grouping cosine threshold (demo default 1.0: clauses merge only down to K-1 groups; paper form 0.95)",
    )
    p.add_argument("--head-hidden", type=int, help="projection head width (demo default 256)")
    p.add_argument("--lam", type=float, default=1.0, help="weight of L_conf")
    p.add_argument("--nu", type=float, default=1.0, help="weight of L_rank (InfoNCE over R; 0 = paper)")
    p.add_argument("--kappa", type=float, default=1.0, help="weight of L_cnce (InfoNCE over C; demo 1; 0 = paper)")
    p.add_argument(
        "--rho", type=float, default=0.0, help="weight of L_img, SupCon over image-image R on shared CUIs (0 = paper)"
    )
    p.add_argument(
        "--feature-dropout", type=float, default=0.0, help="dropout on the raw features of each batch (augmentation)"
    )
    p.add_argument("--theta-lr", type=float, default=1.0, help="learning-rate multiplier of the weight logits theta")
    p.add_argument(
        "--image-slots", choices=("regions", "attend"), default="attend", help="image slots 1..K-1 (paper: regions)"
    )
    p.add_argument(
        "--text-units", choices=("sentences", "clauses"), default="clauses", help="report units (paper: sentences)"
    )
    p.add_argument("--train-threads", type=int, default=1, help="torch threads while training the heads")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny random model, 60 shipped pairs, 3 epochs")
    p.add_argument("--limit", type=int, help="use at most this many pairs")
    p.add_argument("--seed", type=int, default=0)
    add_progress_flags(p)
    p.set_defaults(func=_run)
