"""Archive index benchmark (source-tree entry point): the code is `pecm.bench.index_bench`.

    python bench/bench_index.py --n 1000000 --dir /data/scratch   # = pecm bench index --n 1000000 --dir ...
    python bench/bench_index.py --n 20000 --out /tmp/x.json

Same defaults as `pecm bench index`: the index is built in a fresh folder under the system temporary directory
(or --dir) and removed afterwards; the JSON goes to --out (default ./pecm-bench-index-<UTC time>.json), never
over an existing file without --force. Nothing is written into the source tree unless you ask for it.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pecm.bench.index_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="bench/bench_index.py"))
