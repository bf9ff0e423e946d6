"""Seed spread of the demo on its **test** split (issue 14): `pecm demo`'s split (fixed, seed 0), model, schedule
and validation epoch selection, run once per model seed (Doc2Vec fit, head init, batch order), each evaluated on
the 444 test pairs. It chooses nothing: it reports how far one demo run's test numbers (seed 0 = `make demo`)
are from the mean over seeds, and whether "R = sim·C beats sim" holds seed by seed.

    python bench/demo_seeds.py --seeds 0 1 2 3 4 --out bench/results/demo_seeds_cpu_zen4.json

Needs the feature cache of a finished `pecm demo` (``--demo runs/demo``, read only). The image features do not
depend on the seed and are read from it; the report features do (Doc2Vec grouping), so each seed other than 0
extracts them once into ``--work/seed_S`` (about a minute on the 2-core CPU). Training runs on one thread, as
`pecm demo` does; a seed is then ~2.5 min.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import torch

from pecm.train import TrainConfig, evaluate_features, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_val import demo_features, demo_model, demo_split, summarise  # noqa: E402  (bench/demo_val.py)

SIDES = ("train", "val", "test")


def seed_features(model, sets, demo: str, work: str, seed: int):
    """(train, val, test) features. Seed 0 reads the demo's cache, read only (`demo_val.demo_features`: a stale
    file stops the run); another seed copies the demo's image-side files into ``work/seed_S`` and extracts its
    report side there."""
    cache = None
    if seed != 0:
        cache = os.path.join(work, f"seed_{seed}")
        os.makedirs(cache, exist_ok=True)
        for side in SIDES:
            dst = os.path.join(cache, f"{side}.image.pt")
            if not os.path.isfile(dst):
                shutil.copy(os.path.join(demo, "cache", f"{side}.image.pt"), dst)
    train_set, val_set, test_set = sets
    return demo_features(model, train_set, val_set, demo, cache, test_set=test_set)[0]


def _stats(xs):
    return {"mean": round(statistics.fmean(xs), 2), "sd": round(statistics.stdev(xs), 2) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs)}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--demo", default="runs/demo", help="a finished pecm demo's output folder (its cache/)")
    ap.add_argument("--work", default="/tmp/pecm-demo-seeds", help="report-feature caches of seeds other than 0")
    ap.add_argument("--out", default=None, help="JSON file (default: print only)")
    a = ap.parse_args(argv)
    sets = train_set, val_set, test_set = demo_split(with_test=True)
    runs = []
    for seed in a.seeds:
        t = time.time()
        torch.set_num_threads(2)  # report-feature extraction
        model = demo_model(train_set, seed)
        tr_f, va_f, te_f = seed_features(model, sets, a.demo, a.work, seed)
        torch.set_num_threads(1)  # = pecm demo --train-threads 1
        tc = TrainConfig(seed=seed, progress=False, save_every=30, select_best=True, nu=1.0, kappa=1.0)
        hist = train(model, train_set, f"/tmp/pecm-demo-seeds-ckpt-{seed}", tc, val_pairs=val_set,
                     train_feats=tr_f, val_feats=va_f)  # fmt: skip
        res = evaluate_features(model, te_f, test_set.cuis, by_list=("sim", "score", "conf"))
        run = {"seed": seed, "epoch": [h["epoch"] for h in hist if h.get("selected")], "s": round(time.time() - t)}
        run.update({by: summarise(res[by]) for by in ("sim", "score", "conf")})
        run["raw_cbir10"] = round(res["baseline"]["cbir_cui"]["@10"], 1)
        runs.append(run)
        print(json.dumps(run), flush=True)
    summary = {}
    for by in ("sim", "score"):
        summary[by] = {
            "i2r_R@10": _stats([r[by]["i2r"][2] for r in runs]),
            "r2i_R@10": _stats([r[by]["r2i"][2] for r in runs]),
            "rsum": _stats([r[by]["rsum"] for r in runs]),
            "r10sum": _stats([r[by]["r10sum"] for r in runs]),
            "cbir10": _stats([r[by]["cbir10"] for r in runs]),
        }
    margin = [round(r["score"]["r10sum"] - r["sim"]["r10sum"], 1) for r in runs]
    summary["R_minus_sim_r10sum"] = {**_stats(margin), "per_seed": margin, "seeds_ge_2": sum(m >= 2 for m in margin)}
    cb = [round(r["score"]["cbir10"] - r["raw_cbir10"], 1) for r in runs]
    summary["cbir10_R_minus_raw"] = {**_stats(cb), "per_seed": cb}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    out = {
        "what": "pecm demo (current defaults) per model seed, fixed split, epoch selected on validation; TEST numbers",
        "commit": commit, "cpu": cpu, "python": platform.python_version(), "torch": torch.__version__,
        "n_test": len(test_set), "runs": runs, "summary": summary,
    }  # fmt: skip
    print(json.dumps(summary, indent=1))
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
