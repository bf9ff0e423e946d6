"""Validation runs (issue 14) with partial backbone fine-tuning: efficientnet_lite0's ``conv_head`` (the 1x1
conv 320 -> 1280 before the pooling; its BatchNorm stays frozen in eval mode) trains together with the demo's
heads, on cached trunk features (the output of ``blocks``, [N, 320, 7, 7]), with the demo's schedule and epoch
selection; validation metrics only (the test split is not read). Experiment-only: it patches `pecm.train`'s
feature evaluation, its best-epoch snapshot (which must include the tuned conv_head) and, with ``--tail-lr``
(a learning-rate multiplier for the conv_head), the Adam parameter groups.

    python bench/demo_val_tail.py --extract                 # trunk features of the train/val images (~1 min)
    python bench/demo_val_tail.py --name Y --out bench/results/demo_val
    python bench/demo_val_tail.py --name Z --tail-lr 0.1 --out bench/results/demo_val
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import pecm.train as PT
from pecm.train import TrainConfig, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_val import demo_features, demo_model, demo_split, summarise  # noqa: E402  (bench/demo_val.py)

ap = argparse.ArgumentParser()
ap.add_argument("--name", default="tail")
ap.add_argument("--out")
ap.add_argument("--work", default="/tmp/pecm-demo-val-tail")
ap.add_argument("--demo", default="runs/demo")
ap.add_argument("--tail-lr", type=float, default=1.0)
ap.add_argument("--extract", action="store_true")
a = ap.parse_args()
torch.set_num_threads(2 if a.extract else 1)
tr, va = demo_split()
model = demo_model(tr)
(tr_f, va_f), _ = demo_features(model, tr, va, a.demo)
bb = model.image.backbone


def trunk(x):
    x = x.contiguous(memory_format=torch.channels_last)
    x = bb.bn1(bb.conv_stem(x))
    return bb.blocks(x)


if a.extract:
    os.makedirs(a.work, exist_ok=True)
    for name, ps in (("train", tr), ("val", va)):
        out = []
        with torch.no_grad():
            for s in range(0, len(ps), 32):
                out.append(trunk(model.load_image_paths([p.image for p in ps.pairs[s : s + 32]])).float().contiguous())
        torch.save(torch.cat(out), os.path.join(a.work, f"trunk_{name}.pt"))
    raise SystemExit(0)
ttr, tva = torch.load(os.path.join(a.work, "trunk_train.pt")), torch.load(os.path.join(a.work, "trunk_val.pt"))
grid = model.image.grid


def tail(t):
    f = bb.bn2(bb.conv_head(t))
    reg = F.adaptive_avg_pool2d(f.float(), grid).flatten(2).transpose(1, 2)
    return torch.cat([f.mean((2, 3))[:, None], reg], 1)


with torch.no_grad():
    chk = tail(tva[:16])
    print("tail check max|diff|", float((chk - va_f["img"][:16]).abs().max()))
orig = model.encode_image_features


def enc(feats):
    if feats.dim() == 4:
        feats = tail(feats.float())
    return orig(feats)


model.encode_image_features = enc
params = list(bb.conv_head.parameters())
for p in params:
    p.requires_grad_(True)


def save_all(m, path):
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(
        {k: v.detach().contiguous() for k, v in m.state_dict().items() if not k.startswith("text.")}, path + ".tmp.st"
    )
    os.replace(path + ".tmp.st", path)


PT._save_trainable = save_all
_ev = PT.evaluate_features


def ev(model, feats, cuis=None, by_list=("sim", "score", "conf")):
    with torch.no_grad():
        f = {**feats, "img": torch.cat([tail(feats["img"][s : s + 128]) for s in range(0, len(feats["img"]), 128)])}
    return _ev(model, f, cuis, by_list=by_list)


PT.evaluate_features = ev
evaluate_features = ev
trf = dict(tr_f)
trf["img"] = ttr
vaf = dict(va_f)
vaf["img"] = tva
tc = TrainConfig(
    epochs=30,
    batch_size=32,
    lr=1e-4,
    seed=0,
    progress=False,
    save_every=30,
    select_best=True,
    lam=1.0,
    nu=1.0,
    kappa=1.0,
)
if a.tail_lr != 1.0:  # separate lr for the tail: patch Adam groups
    real = torch.optim.Adam

    def adam(groups, lr, **kw):
        g0 = groups[0]["params"]
        tailset = {id(p) for p in params}
        groups = [
            {"params": [p for p in g0 if id(p) not in tailset]},
            {"params": params, "lr": lr * a.tail_lr},
        ] + groups[1:]
        return real(groups, lr=lr, **kw)

    PT.torch.optim.Adam = adam
t = time.time()
hist = train(model, tr, os.path.join(a.work, "ck_" + a.name), tc, val_pairs=va, train_feats=trf, val_feats=vaf)
res = evaluate_features(model, vaf, va.cuis, by_list=("sim", "score"))
out = {
    "name": a.name,
    "tail_check_max_abs_diff": float((chk - va_f["img"][:16]).abs().max()),
    "epoch": [h["epoch"] for h in hist if h.get("selected")],
    "train_s": time.time() - t,
    "hist": [round(h["val"]["rsum"], 1) for h in hist],
}
for by in ("sim", "score"):
    out[by] = summarise(res[by])
out["args"] = vars(a)
print(json.dumps(out))
if a.out:
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, a.name + ".json"), "w") as f:
        json.dump(out, f, indent=1)
