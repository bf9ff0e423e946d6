"""How far can image→image search (CBIR P@10, relevance = shares a CUI) get from the demo's frozen image
features without the PECM model? On `pecm demo`'s training / validation split (the test split is not read):

- the raw backbone's global feature (the demo's "raw backbone" row), centred, square-rooted, and PCA-projected
  or PCA-whitened (fitted on the training images) at several widths;
- a **CUI-supervised linear probe**: a linear map of the global feature to 256 dimensions trained with SupCon
  (positives share a CUI: ``any``; or soft positives weighted by the IDF-weighted CUI overlap: ``idf``), Adam
  1e-3, batch 32, 30 epochs, logit scale 15; P@10 on the validation and the training images every 5 epochs.

    python bench/cbir_probe.py --demo runs/demo --out bench/results/cbir_probe_cpu_zen4.json

Needs the feature cache of a finished `pecm demo`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from pecm import metrics as M
from pecm.train import label_matrix

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_val import demo_split  # noqa: E402  (bench/demo_val.py: pecm demo's split)


def _p10(x, cuis) -> float:
    g = F.normalize(x.float(), dim=-1)
    return round(M.cbir_precision_at_k(g @ g.T, cuis, (10,))["micro"][10], 1)


def _probe(xtr, xva, tr, va, mode: str, seed: int = 0) -> list:
    torch.manual_seed(seed)
    lab = label_matrix(tr.cuis)
    idf = torch.log(lab.shape[0] / lab.sum(0).clamp_min(1))
    lin = torch.nn.Linear(xtr.shape[1], 256)
    opt = torch.optim.Adam(lin.parameters(), 1e-3)
    eye = torch.eye(32, dtype=torch.bool)
    curve = []
    for ep in range(30):
        perm = torch.randperm(len(xtr))
        for s in range(0, len(perm) - 31, 32):
            i = perm[s : s + 32]
            z = F.normalize(lin(xtr[i]), dim=-1)
            li = lab[i]
            pos = ((li @ li.T) > 0).float() if mode == "any" else (li * idf) @ li.T
            pos = pos.masked_fill(eye, 0)
            lp = (15 * z @ z.T).masked_fill(eye, -1e9).log_softmax(1)
            n = pos.sum(1)
            h = n > 0
            loss = -((lp * pos).sum(1)[h] / n[h]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ep % 5 == 4:
            with torch.no_grad():
                val, train = _p10(lin(xva), va.cuis), _p10(lin(xtr), tr.cuis)
                curve.append({"epoch": ep + 1, "val_p10": val, "train_p10": train})
    return curve


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", default="runs/demo")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    tr, va = demo_split()
    cache = os.path.join(a.demo, "cache")
    xtr = torch.load(os.path.join(cache, "train.image.pt"), weights_only=True)["img"][:, 0].double()
    xva = torch.load(os.path.join(cache, "val.image.pt"), weights_only=True)["img"][:, 0].double()
    if len(xtr) != len(tr) or len(xva) != len(va):
        raise SystemExit("--demo: the cached features do not match the demo's split")
    mu = xtr.mean(0)
    out = {
        "split": {"train": len(tr), "val": len(va)},
        "raw": {"val_p10": _p10(xva, va.cuis), "train_p10": _p10(xtr, tr.cuis)},
        "centred": _p10(xva - mu, va.cuis),
        "sqrt": _p10(xva.clamp_min(0).sqrt(), va.cuis),
        "pca": {},
    }
    _, s, v = torch.linalg.svd(xtr - mu, full_matrices=False)
    for d in (32, 64, 128, 256, 512):
        for p in (0.0, 0.5, 1.0):  # projection onto the top-d components, divided by s^p (p = 1: whitening)
            out["pca"][f"d{d}_whiten{p}"] = _p10((xva - mu) @ (v[:d].T / s[:d] ** p), va.cuis)
    xtr32, xva32 = xtr.float(), xva.float()
    out["probe"] = {m: _probe(xtr32, xva32, tr, va, m) for m in ("any", "idf")}
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
