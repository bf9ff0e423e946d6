"""Validation runs of the demo's training (issue 14): `pecm demo`'s split, model, cached features, schedule and
epoch selection, with one setting changed; prints and writes the **validation** metrics only (sim only, R =
sim·C and C only: Recall@1/5/10 both ways, RSUM, CUI@10, CBIR P@10, and the raw backbone's CBIR P@10).

    python bench/demo_val.py --name P --out bench/results/demo_val/        # the current demo defaults
    python bench/demo_val.py --name R --rho 1 ...                         # + L_img

Needs the feature cache of a finished `pecm demo` (``--demo runs/demo``; it stops when the cache files are
missing or stale, and never writes them); a run is then ~1.5 min of training on one thread. The run with no
option reproduces the validation history of ``runs/demo/checkpoint/metrics.json`` exactly.
``--image-backbone NAME --image-weights FILE --image-sha256 HEX --image-size S --cache DIR`` runs the same
with another image backbone (its features are extracted once into DIR, the report side copied from the demo's
cache). ``--feat-dropout P`` is
``TrainConfig(feature_dropout=P)``. ``--unfreeze image|text|both [--backbone-lr M]`` trains that backbone end to end
(no feature cache for the training steps: images decoded once and kept in memory, both encoders run in every
step, the validation features re-extracted after every epoch for the epoch selection; ``TrainConfig(backbone_lr=M)``
scales the backbones' learning rate). Two experiment-only settings are not library options:
``--img-loss-on sim`` (L_img over the pooled image–image sim instead of R) and ``--hard F`` (a fraction F of
each epoch's items go into batches of one k-means cluster of the training pairs' raw global image + report
features, i.e. hard in-batch negatives; the rest are random batches, in shuffled order).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F

import pecm.losses as L
import pecm.train as PT
from pecm.commands.demo import _cached_features
from pecm.data import default_data_dir, load_pairs, split_pairs
from pecm.model import PECM, PECMConfig
from pecm.train import TrainConfig, evaluate_features, train


def demo_split(with_test: bool = False):
    """`pecm demo`'s default split of the shipped pairs: (train, val); the test split only with ``with_test``
    (`bench/demo_seeds.py`, which reports test numbers and chooses nothing), as (train, val, test)."""
    rest, test = split_pairs(load_pairs(default_data_dir()), 0.2, 0)  # --test-fraction 0.2, --seed 0
    train_set, val = split_pairs(rest, 0.05 / 0.8, 1)  # --val-fraction 0.05 of all pairs
    return (train_set, val, test) if with_test else (train_set, val)


def demo_model(train_set, seed: int = 0, **over) -> PECM:
    """The demo's model (current demo defaults, `over` changing config fields), Doc2Vec fitted on train."""
    cfg = PECMConfig.demo_cpu(seed=seed, group_threshold=1.0, image_slots="attend", text_units="clauses", **over)
    model = PECM(cfg)
    model.text.fit(train_set.texts)
    return model


def demo_features(model, train_set, val_set, demo: str, cache=None, test_set=None):
    """((train, val[, test]) raw features, all read from the cache; test only with ``test_set``). ``cache`` None:
    ``DEMO/cache``, read only: a missing or stale file stops the run (SystemExit) instead of being re-extracted
    over the demo's cache. Another folder is filled on first use."""
    path = cache or os.path.join(demo, "cache")
    if cache is None:

        def refuse(*_a, **_k):
            raise SystemExit(f"--demo: the feature cache in {path} is missing or stale; run `pecm demo --out {demo}`")

        real, PT.extract_features = PT.extract_features, refuse  # what `_cached_features` calls on a miss
    sides = [("train", train_set), ("val", val_set)] + ([("test", test_set)] if test_set is not None else [])
    try:
        ids = [p.id for p in train_set.pairs]
        got = [_cached_features(model, pairs, os.path.join(path, side), False, ids) for side, pairs in sides]
    finally:
        if cache is None:
            PT.extract_features = real
    return tuple(f for f, _ in got), all(h for _, h in got)


def summarise(r: dict) -> dict:
    """The table row of one ranking of `pecm.train.evaluate_features`: R@1/5/10 both ways, RSUM, CUI@10, CBIR."""
    i2r, r2i = r["image_to_report"], r["report_to_image"]
    return {
        "i2r": [round(i2r[k], 1) for k in ("R@1", "R@5", "R@10")],
        "r2i": [round(r2i[k], 1) for k in ("R@1", "R@5", "R@10")],
        "rsum": round(sum(i2r.values()) + sum(r2i.values()), 1),
        "r10sum": round(i2r["R@10"] + r2i["R@10"], 1),
        "cui10": round(r["cui"]["@10"], 1),
        "cbir10": round(r["cbir_cui"]["@10"], 1),
    }


def _supcon_on_sim(img, img_mask, w, labels, scale, backend):
    """L_img of `pecm.losses.supcon`, over the pooled image-image sim instead of R."""
    from pecm import ops

    s, _, _ = ops.pecm_scores(img, img, w, q_mask=img_mask, c_mask=img_mask, backend=backend)
    eye = torch.eye(s.shape[0], dtype=torch.bool)
    lab = labels.to(s.dtype)
    pos = ((lab @ lab.t()) > 0) & ~eye
    lg = (scale * s).masked_fill(eye, float("-inf"))
    lp = lg - torch.logsumexp(lg, 1, keepdim=True)
    n = pos.sum(1)
    h = n > 0
    return (-(lp.masked_fill(~pos, 0).sum(1)[h] / n[h])).mean()


def _hard_batches(tr_f, frac: float, batch: int, seed: int):
    """Patch the epoch permutation of `pecm.train` (experiment only): cluster-ordered batches for a fraction."""
    import faiss

    x = torch.cat([F.normalize(tr_f["img"][:, 0], dim=-1), F.normalize(tr_f["txt"][:, 0], dim=-1)], 1)
    x = x.numpy().astype("float32")
    n = x.shape[0]
    km = faiss.Kmeans(x.shape[1], max(2, n // batch), niter=20, seed=seed)
    km.train(x)
    assign = km.index.search(x, 1)[1][:, 0]
    real = torch.randperm

    def randperm(m, generator=None, **kw):
        perm = real(m, generator=generator, **kw)
        if m != n:
            return perm
        ph = perm[: int(frac * n)]
        hard = ph[np.argsort(assign[ph.numpy()], kind="stable")]
        nb = len(hard) // batch
        hb = [hard[i * batch : (i + 1) * batch] for i in range(nb)]
        rest = torch.cat([hard[nb * batch :], perm[int(frac * n) :]])
        rb = [rest[i : i + batch] for i in range(0, len(rest), batch)]
        tail = [rb.pop()] if rb and len(rb[-1]) != batch else []  # a partial batch stays last (dropped)
        allb = hb + rb
        out = torch.cat([allb[i] for i in real(len(allb), generator=generator).tolist()] + tail)
        assert sorted(out.tolist()) == list(range(n))
        return out

    PT.torch.randperm = randperm


def _memo_images(model) -> None:
    """Decode each image once (end-to-end runs: every epoch reads every training image); same tensors as
    `PECM.load_image_paths`, which the model's instance attribute now shadows."""
    real, memo = model.load_image_paths, {}

    def load(paths):
        miss = [p for p in paths if p not in memo]
        if miss:
            memo.update(zip(miss, real(miss).unbind(0)))
        return torch.stack([memo[p] for p in paths])

    model.load_image_paths = load


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--demo", default="runs/demo", help="a finished pecm demo's output folder (its cache/)")
    ap.add_argument("--out", default=None, help="folder for NAME.json (default: print only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--nu", type=float, default=1.0)
    ap.add_argument("--kappa", type=float, default=1.0)
    ap.add_argument("--rho", type=float, default=0.0)
    ap.add_argument("--img-loss-on", choices=("score", "sim"), default="score")
    ap.add_argument("--hard", type=float, default=0.0)
    ap.add_argument("--feat-dropout", type=float, default=0.0, help="dropout on the raw features (augmentation)")
    ap.add_argument("--unfreeze", choices=("image", "text", "both"), help="train this backbone end to end")
    ap.add_argument("--backbone-lr", type=float, default=1.0, help="learning-rate multiplier of --unfreeze backbones")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training (the demo: 1)")
    ap.add_argument("--image-backbone", help="timm name (default: the demo's efficientnet_lite0)")
    ap.add_argument("--image-weights", help="local weights file for --image-backbone (checked: --image-sha256)")
    ap.add_argument("--image-sha256", help="expected sha256 of --image-weights (refused when it differs)")
    ap.add_argument("--image-size", type=int)
    ap.add_argument(
        "--cache", help="feature cache folder (default DEMO/cache, never written); another folder is filled once"
    )
    a = ap.parse_args(argv)
    if a.img_loss_on == "sim":
        L.supcon = _supcon_on_sim
    torch.set_num_threads(2 if a.cache else 1)  # feature extraction (a new --cache) on both cores
    train_set, val_set = demo_split()
    over = {}
    if a.image_backbone:
        if not (a.image_weights and a.image_sha256 and a.image_size and a.cache):
            raise SystemExit("--image-backbone needs --image-weights, --image-sha256, --image-size and --cache")
        with open(a.image_weights, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != a.image_sha256:
            raise SystemExit(f"--image-weights: sha256 {digest} differs from --image-sha256 {a.image_sha256}")
        over = {"image_backbone": a.image_backbone, "image_weights": a.image_weights, "image_size": a.image_size}
    if a.unfreeze:
        over.update(freeze_image=a.unfreeze == "text", freeze_text=a.unfreeze == "image")
    model = demo_model(train_set, a.seed, **over)
    if a.cache and not os.path.isfile(os.path.join(a.cache, "train.text.pt")):
        os.makedirs(a.cache, exist_ok=True)  # the report side is the demo's: reuse its cached features
        for side in ("train", "val"):
            shutil.copy(os.path.join(a.demo, "cache", f"{side}.text.pt"), os.path.join(a.cache, f"{side}.text.pt"))
    if a.unfreeze:
        (tr_f, va_f), cached = (None, None), False
        _memo_images(model)
    else:
        (tr_f, va_f), cached = demo_features(model, train_set, val_set, a.demo, a.cache)
    torch.set_num_threads(a.threads)  # 1 = pecm demo --train-threads 1
    if a.hard > 0:
        _hard_batches(tr_f, a.hard, a.batch, a.seed)
    tc = TrainConfig(
        epochs=a.epochs, batch_size=a.batch, lr=a.lr, seed=a.seed, progress=False, save_every=a.epochs,
        select_best=True, lam=1.0, nu=a.nu, kappa=a.kappa, rho=a.rho, feature_dropout=a.feat_dropout,
        backbone_lr=a.backbone_lr,
    )  # fmt: skip
    t = time.time()
    ckpt = os.path.join("/tmp", f"pecm-demo-val-{a.name}")
    hist = train(model, train_set, ckpt, tc, val_pairs=val_set, train_feats=tr_f, val_feats=va_f)
    if va_f is None:  # end to end: the selected epoch's backbones make the validation features
        va_f = PT.extract_features(model, val_set, progress=False)
    res = evaluate_features(model, va_f, val_set.cuis, by_list=("sim", "score", "conf"))
    out = {
        "name": a.name,
        "args": vars(a),
        "features_cached": cached,
        "epoch": [h["epoch"] for h in hist if h.get("selected")],
        "train_s": round(time.time() - t, 1),
        "val_rsum_history": [round(h["val"]["rsum"], 1) for h in hist],
        "epoch_s": [round(h["seconds"], 1) for h in hist],
        "raw_cbir10": round(res["baseline"]["cbir_cui"]["@10"], 1),
    }
    for by in ("sim", "score", "conf"):
        out[by] = summarise(res[by])
    print(json.dumps(out))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"{a.name}.json"), "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
