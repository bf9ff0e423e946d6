"""Archive index benchmark (source-tree entry point): the code is `pecm.bench.index_bench`.

    python bench/bench_index.py --n 1000000             # = pecm bench index --n 1000000
    python bench/bench_index.py --n 20000 --out /tmp/x.json

Default paths are anchored at the repository root (bench/_index_bench_tmp, bench/results/index_cpu.json).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pecm.bench.index_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(root=ROOT, prog="bench/bench_index.py"))
