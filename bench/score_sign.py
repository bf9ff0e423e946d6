"""The sign of R = sim · C (issue 14, item 2): how often a pair with sim < 0 *and* C < 0 gets R > 0 and so ranks
above every pair with sim ≈ 0 or C ≈ 0, and what removing that does to retrieval.

    make demo                                        # writes runs/demo/{index,cache,checkpoint}
    nice -n 19 python bench/score_sign.py --demo runs/demo   # -> bench/results/score_sign_<cpu tag>.json

Data sets (each: N images × N reports, image i ↔ report i matched):

- ``demo_trained``: the demo's encoded ROCO test items as stored in ``DEMO/index/{images,reports}`` (float16 unit
  prototypes, masks, pooled vectors, weights from the manifest; opened read-only); reports are put in the
  images' order by their ``pair_id`` metadata.
- ``demo_untrained``: the same test pairs through a freshly initialised PECM (the demo's config, heads seeded
  with ``--seed``, θ = 0 so w = 1) applied to the demo's cached frozen-backbone features ``DEMO/cache/test.*``.
  The cache rows are in the test split's order, as the index rows are; the script checks that by re-encoding
  them with ``DEMO/checkpoint`` and comparing with the index's prototypes.
- ``random_unit``: Gaussian prototypes (unit after normalisation), K = 26, D = 256, no masks, w = 1: no
  pairing signal (its recalls are chance), only the sign statistics mean something.

Scores are `pecm.reference.scores` (float64). For every data set: the fractions of all N² pairs with sim < 0,
C < 0 and both, the matched pairs with both negative, and, per direction (image→report, report→image), the
mean fraction of each query's top 10 by R made of both-negative pairs and the fraction of queries with at
least one. Then Recall@1/5/10 both ways (`pecm.metrics.recall_at_k`, pessimistic ties) for the rankings in
``RANKINGS``: R itself, three variants without the quirk, and sim / C alone for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pecm import reference  # noqa: E402
from pecm.bench.timing import cpu_simd, environment  # noqa: E402
from pecm.metrics import recall_at_k, score_pos, topk_ids  # noqa: E402

TOP = 10
KS = (1, 5, 10)
# ranking key name -> (sim, conf) -> matrix; R is in [-1, 1], so R - 3 < every R of a sim >= 0 pair
RANKINGS = {
    "R = sim*C": lambda s, c: s * c,
    "sim*max(C,0)": score_pos,  # R+, the evaluation-time option (pecm eval --by score_pos)
    "sim*(1+C)/2": lambda s, c: s * (1.0 + c) / 2.0,
    "sim<0 last, then R": lambda s, c: np.where(s >= 0, s * c, s * c - 3.0),
    "sim only": lambda s, c: s,
    "C only": lambda s, c: c,
}


def cpu_tag() -> str:
    return "cpu_zen4" if "avx512f" in cpu_simd()["cpu_flags"] else "cpu_avx2"


def sign_stats(sim: np.ndarray, conf: np.ndarray) -> dict:
    """Sign statistics of the [N, N] sim / C matrices of a paired set (rows = images, columns = reports)."""
    both = (sim < 0) & (conf < 0)
    score = sim * conf
    out = {
        "n": int(sim.shape[0]),
        "frac_pairs_sim_neg": float((sim < 0).mean()),
        "frac_pairs_conf_neg": float((conf < 0).mean()),
        "frac_pairs_both_neg": float(both.mean()),
        "frac_of_positive_R_pairs_both_neg": float(both[score > 0].mean()) if (score > 0).any() else 0.0,
        "corr_sim_conf": float(np.corrcoef(sim.ravel(), conf.ravel())[0, 1]),
        "sim_quantiles_5_50_95": [float(v) for v in np.percentile(sim, [5, 50, 95])],
        "conf_quantiles_5_50_95": [float(v) for v in np.percentile(conf, [5, 50, 95])],
        "matched_pairs_both_neg": int(np.diag(both).sum()),
        "matched_pairs_sim_neg": int((np.diag(sim) < 0).sum()),
    }
    for name, (s_, b_) in {"image_to_report": (score, both), "report_to_image": (score.T, both.T)}.items():
        top = topk_ids(s_, TOP)
        hit = np.take_along_axis(b_, top, axis=1)
        out[name] = {
            f"mean_frac_top{TOP}_both_neg": float(hit.mean()),
            f"frac_queries_with_both_neg_in_top{TOP}": float(hit.any(axis=1).mean()),
            f"both_neg_entries_in_top{TOP}": int(hit.sum()),
            "frac_queries_with_both_neg_at_rank1": float(hit[:, 0].mean()),
        }
    return out


def recalls(sim: np.ndarray, conf: np.ndarray) -> dict:
    out = {}
    for name, f in RANKINGS.items():
        m = f(sim, conf)
        i2r, r2i = recall_at_k(m, KS), recall_at_k(m.T, KS)
        out[name] = {
            "image_to_report": {f"R@{k}": i2r[k] for k in KS},
            "report_to_image": {f"R@{k}": r2i[k] for k in KS},
        }
    base = out["R = sim*C"]
    for r in out.values():  # percentage points against R = sim*C
        r["delta_vs_R"] = {d: {k: r[d][k] - base[d][k] for k in r[d]} for d in ("image_to_report", "report_to_image")}
    return out


def _index_items(path: str):
    from pecm.index import ArchiveIndex

    with ArchiveIndex.open(path, mode="r") as idx:
        rows = idx.get(np.asarray(idx.ids()), vectors=True)
        w = np.asarray(idx.weights, dtype=np.float64).copy()
    x = np.stack([r["prototypes"] for r in rows]).astype(np.float32)
    m = np.stack([r["mask"] for r in rows]).astype(bool)
    p = np.stack([r["pooled"] for r in rows]).astype(np.float32)
    return x, m, p, [r["pair_id"] for r in rows], w


def demo_trained(demo: str):
    xi, mi, pi, idi, w = _index_items(os.path.join(demo, "index", "images"))
    xt, mt, pt, idt, wt = _index_items(os.path.join(demo, "index", "reports"))
    if not np.array_equal(w, wt):
        raise ValueError("--demo: the image and report indexes store different weights")
    pos = {p: j for j, p in enumerate(idt)}
    if sorted(idi) != sorted(idt) or len(set(idi)) != len(idi):
        raise ValueError("--demo: the image and report indexes do not hold the same pair ids")
    order = np.array([pos[p] for p in idi])
    sim, conf, _ = reference.scores(xi, xt[order], w, mi, mt[order], pi, pt[order])
    return (
        sim,
        conf,
        {"items": (xi, mi), "pair_ids": idi, "reorder_identity": bool((order == np.arange(len(order))).all())},
    )


def demo_untrained(demo: str, seed: int, trained_items):
    import torch

    from pecm.model import PECM, PECMConfig

    cache = os.path.join(demo, "cache")
    fi = torch.load(os.path.join(cache, "test.image.pt"), map_location="cpu", weights_only=True)
    ft = torch.load(os.path.join(cache, "test.text.pt"), map_location="cpu", weights_only=True)
    ckpt = os.path.join(demo, "checkpoint")
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = PECMConfig.from_dict(json.load(f))
    # the cache rows are the index rows: the trained checkpoint re-encodes them to the stored prototypes
    trained = PECM.load(ckpt).eval()
    with torch.no_grad():
        ti, tim = trained.encode_image_features(fi["img"])
    xi, mi = trained_items
    tin = torch.nn.functional.normalize(ti.float(), dim=-1).numpy()
    order_err = float(np.abs(tin - xi).max())
    if order_err > 1e-2 or not np.array_equal(tim.numpy(), mi):
        raise ValueError(f"--demo: cache/test.image.pt does not match index/images (max |diff| {order_err:.3g})")
    del trained
    torch.manual_seed(seed)
    fresh = PECM(cfg, load_pretrained=False).eval()  # random heads; the backbones are not used (cached features)
    with torch.no_grad():
        img, im = fresh.encode_image_features(fi["img"])
        txt, tm = fresh.encode_text_features(ft["txt"], ft["txt_mask"])
        w = fresh.weights().double().numpy()
    sim, conf, _ = reference.scores(img.double().numpy(), txt.double().numpy(), w, im.numpy(), tm.numpy())
    return sim, conf, {"cache_vs_index_max_abs_diff": order_err}


def random_unit(n: int, k: int, d: int, seed: int):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, k, d))
    c = rng.standard_normal((n, k, d))
    sim, conf, _ = reference.scores(q, c, np.ones(k))
    return sim, conf


def run(demo: str, seed: int = 0) -> dict:
    t0 = time.time()
    out = {"benchmark": "bench/score_sign.py", "environment": environment("cpu"), "demo": os.path.abspath(demo)}
    out["rankings"] = {
        "R = sim*C": "the paper's Eq. 7 (what pecm.ops ranks by)",
        "sim*max(C,0)": "a negative confidence counts as 0: R' <= 0 whenever C <= 0",
        "sim*(1+C)/2": "C mapped to [0, 1]: sign(R') = sign(sim), |R'| grows with C",
        "sim<0 last, then R": "every pair with sim < 0 below every pair with sim >= 0, R within each group",
        "sim only": "the pooled cosine (ablation)",
        "C only": "the confidence (ablation)",
    }
    sets = {}
    sim, conf, info = demo_trained(demo)
    n, k = sim.shape[0], info["items"][0].shape[1]
    sets["demo_trained"] = {
        "what": f"{n} ROCO test pairs, the demo's trained prototypes as stored in {demo}/index (float16)",
        "reports_reordered_by_pair_id": not info["reorder_identity"],
        **sign_stats(sim, conf),
        "recall": recalls(sim, conf),
    }
    sim_u, conf_u, info_u = demo_untrained(demo, seed, info["items"])
    sets["demo_untrained"] = {
        "what": f"the same {n} pairs through a fresh PECM (demo config, seed {seed}) on the cached backbone features",
        **info_u,
        **sign_stats(sim_u, conf_u),
        "recall": recalls(sim_u, conf_u),
    }
    sim_r, conf_r = random_unit(n, k, 256, seed)
    sets["random_unit"] = {
        "what": f"{n} x {n} Gaussian prototypes, K={k}, D=256, no masks, w=1 (no pairing: recalls are chance)",
        **sign_stats(sim_r, conf_r),
        "recall": recalls(sim_r, conf_r),
    }
    out["sets"] = sets
    out["seconds"] = time.time() - t0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", default="runs/demo", help="the demo's --out directory (index/, cache/, checkpoint/)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the untrained heads and the random prototypes")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/score_sign_<cpu tag>.json)")
    a = ap.parse_args(argv)
    for sub in ("index/images", "index/reports", "cache/test.image.pt", "cache/test.text.pt", "checkpoint"):
        if not os.path.exists(os.path.join(a.demo, sub)):
            print(f"score_sign: error: --demo {a.demo!r} has no {sub} (run `make demo` first)", file=sys.stderr)
            return 2
    res = run(a.demo, a.seed)
    text = json.dumps(res, indent=1)
    path = a.out or os.path.join(ROOT, "bench", "results", f"score_sign_{cpu_tag()}.json")
    with open(path, "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"score_sign: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
