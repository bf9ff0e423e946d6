"""A/B of the B = 1 search latencies of two pecm source trees on one existing index, in alternating rounds.

    python bench/index_ab.py --index DIR/index --queries DIR/queries.npy --tree /work/main --tree /work/wt-old \\
        --rounds 2 --out FILE

``DIR`` is a ``pecm bench index --keep`` folder. Each (round, tree) runs in a fresh process with
``PYTHONPATH=TREE`` (each tree has its own built ``pecm._C``) and times, warm (best of R): ann (shortlist 1000)
for query 0 (20 repetitions) and queries 0-7 (5 each), two_stage (shortlist 1000, 4) and exhaustive (3) for
query 0. The JSON records each tree's git commit and the pecm module it imported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
import numpy as np
import pecm
from pecm.index import ArchiveIndex
idx = ArchiveIndex.open(sys.argv[1])
q = np.load(sys.argv[2])
def best(fn, r):
    b = float("inf")
    for _ in range(r):
        t = time.perf_counter(); fn(); b = min(b, time.perf_counter() - t)
    return b
kw = dict(with_metadata=False)
idx.search(q[:1], 10, mode="ann", shortlist=1000, **kw)
out = {"pecm": pecm.__file__}
out["ann_B1_q0_s"] = best(lambda: idx.search(q[:1], 10, mode="ann", shortlist=1000, **kw), 20)
out["ann_B1_q0to7_s"] = [
    best(lambda i=i: idx.search(q[i : i + 1], 10, mode="ann", shortlist=1000, **kw), 5) for i in range(8)
]
out["two_stage_B1_q0_s"] = best(lambda: idx.search(q[:1], 10, mode="two_stage", shortlist=1000, **kw), 4)
out["exhaustive_B1_q0_s"] = best(lambda: idx.search(q[:1], 10, **kw), 3)
print(json.dumps(out))
"""


def _commit(tree: str) -> str:
    r = subprocess.run(["git", "-C", tree, "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"], capture_output=True)
    return r.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--tree", action="append", required=True, help="a pecm source tree (repeat)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    res = {
        "benchmark": "bench/index_ab.py",
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "index": a.index,
        "trees": {t: _commit(t) for t in a.tree},
        "runs": [],
    }
    for r in range(a.rounds):
        for t in a.tree:
            env = {**os.environ, "PYTHONPATH": t}
            p = subprocess.run(
                [sys.executable, "-c", CHILD, a.index, a.queries], env=env, capture_output=True, text=True, cwd="/"
            )
            if p.returncode != 0:
                raise SystemExit(f"index_ab: tree {t} failed:\n{p.stderr[-3000:]}")
            row = {"round": r, "tree": t, **json.loads(p.stdout.strip().splitlines()[-1])}
            print(json.dumps(row), flush=True)
            res["runs"].append(row)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
