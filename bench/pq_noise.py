"""pq recall on the synthetic clustered data, against an ideal Gaussian code of the same rate (issue 12).

The synthetic benchmark (`pecm bench index`) draws items as ``centre + 0.8·N(0, 1)`` per prototype around 2000
centres (500 items per centre at 1M) and queries as an item + 0.3·N(0, 1); a query's exact top 10 are items of
its own centre, ranked by how their i.i.d. noise correlates with the query's. On a smaller set with the same
500 items per centre (default 40 centres, 20K items) this script measures recall@10 against exact search of

- the default pq index (`ArchiveIndex.create(dtype="pq")`) of the items, and
- the items with each prototype's noise replaced by the output of the Gaussian rate–distortion test channel
  at R bits per coordinate (X̂ = a·X + W, a = 1 - D/σ², W ~ N(0, a·D), D = σ²·2^(-2R): the least squared
  error any code of R bits per coordinate reaches on a Gaussian source), the centres kept exact.

The second is a comparison, not a bound: measured, it keeps *less* recall than the real pq code at the same
rate (a squared-error optimum does not order near-ties best), so it says nothing about what a 2 KB code cannot
reach.

    python bench/pq_noise.py      # -> bench/results/pq_noise_cpu_zen4.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pecm import ops  # noqa: E402
from pecm.bench.timing import cpu_model, git_commit  # noqa: E402
from pecm.index import ArchiveIndex  # noqa: E402

K, D, SIGMA = 26, 256, 0.8


def _topk(q, x, w, k):
    cs = ops.prepare_candidates(torch.from_numpy(x), torch.from_numpy(w))
    return ops.pecm_topk(torch.from_numpy(q), cs, None, k)[1].numpy()


def _recall(a, b, k):
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(a, b)]))


def run(per_centre: int, centres: int, queries: int, k: int, rates, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cen = torch.randn((centres, K, D), generator=g)
    w = (torch.softmax(torch.randn(K, generator=g), 0) * K).numpy().astype(np.float32)
    n = per_centre * centres
    cid = torch.randint(0, centres, (n,), generator=g)
    noise = SIGMA * torch.randn((n, K, D), generator=g)
    x = (cen[cid] + noise).numpy()
    pick = np.random.default_rng(seed + 1).integers(0, n, queries)
    q = x[pick] + 0.3 * torch.randn((queries, K, D), generator=g).numpy()
    exact = _topk(q, x.astype(np.float16).astype(np.float32), w, k)
    out = {"items": n, "centres": centres, "items_per_centre": per_centre, "queries": queries, "k": k}
    with tempfile.TemporaryDirectory() as tmp:
        idx = ArchiveIndex.create(os.path.join(tmp, "pq"), K, D, dtype="pq", weights=w)
        idx.add(x, progress=False)
        _, got, _ = idx.search(q, k, with_metadata=False)
        codes = idx.manifest["pq"]["m"] + idx.manifest["pq"]["coarse"]
        out["pq_default"] = {
            "codes_per_prototype": codes,
            "bits_per_coordinate": 8 * codes / D,
            "item_bytes": int(sum(idx.item_bytes.values())),
            "recall_at_k": _recall(exact, got, k),
        }
        idx.close()
    print(
        f"pq default index ({out['pq_default']['bits_per_coordinate']:.2f} bits/coordinate): recall@{k} "
        f"{out['pq_default']['recall_at_k']:.3f}",
        flush=True,
    )
    out["gaussian_test_channel"] = []
    var = SIGMA**2
    for r in rates:
        dist = var * 2.0 ** (-2 * r)
        a = 1 - dist / var
        xh = cen[cid] + a * noise + (a * dist) ** 0.5 * torch.randn((n, K, D), generator=g)
        rec = _recall(exact, _topk(q, xh.numpy(), w, k), k)
        out["gaussian_test_channel"].append({"bits_per_coordinate": r, "recall_at_k": rec})
        print(f"Gaussian test channel, {r} bits/coordinate (centres exact): recall@{k} {rec:.3f}", flush=True)
        del xh
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-centre", type=int, default=500, help="items per centre (1M / 2000 centres: 500)")
    ap.add_argument("--centres", type=int, default=40)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--rates", default="1,2.03125,3,4", help="bits per coordinate of the test channel")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "pq_noise_cpu_zen4.json"))
    a = ap.parse_args(argv)
    res = {
        "benchmark": "bench/pq_noise.py",
        "cpu_model": cpu_model(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "generator": "centre + 0.8*N(0,1) per prototype, queries = item + 0.3*N(0,1) (as pecm bench index)",
        **run(a.per_centre, a.centres, a.queries, 10, [float(r) for r in a.rates.split(",")]),
    }
    with open(a.out, "w") as f:
        f.write(json.dumps(res, indent=1) + "\n")
    print(f"pq_noise: wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
