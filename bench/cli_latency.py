"""End-to-end latency of the `pecm` command line (issue 13 item 6): wall clock of a fresh process, as a user sees it.

Cases: ``pecm --help``; two argument errors (argparse: ``pecm search`` without INDEX; a missing input:
``pecm search NO_SUCH_DIR --checkpoint CKPT --text ...``); ``pecm search INDEX --checkpoint CKPT --text ...``
(one query, human output and ``--json``); and a batch of B reports, ``--texts-file`` (after only: the flag is
new) against B separate ``--text`` processes (B times the one-query median). Each case runs ``--runs`` times,
"before" (``PYTHONPATH=--before``, default /work/main: the code without lazy imports) and "after"
(``PYTHONPATH=--after``, default this checkout), interleaved, and reports the median.

Index / checkpoint: the demo's (``--demo DIR`` holding checkpoint/ and index/reports; the index is copied to a
temporary folder, the checkpoint is only read); without one, a tiny random checkpoint and a 6-report index built
here. The output says which.

    nice -n 19 python bench/cli_latency.py --out bench/results/cli_latency_cpu_zen4.json
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
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

from pecm.bench.timing import cpu_model  # noqa: E402

SAMPLE = os.path.join(HERE, "pecm", "data", "roco_sample", "pairs.jsonl")


def _reports(n: int):
    out = []
    with open(SAMPLE, encoding="utf-8") as f:
        for line in f:
            t = " ".join(json.loads(line).get("caption", "").split())
            if t:
                out.append(t[:400])
            if len(out) == n:
                break
    return out


def _time(py: str, path: str, argv, env_extra=None):
    env = dict(os.environ, PYTHONPATH=path, **(env_extra or {}))
    t = time.perf_counter()
    r = subprocess.run([py, "-m", "pecm", *argv], capture_output=True, text=True, env=env, cwd=path)
    return time.perf_counter() - t, r.returncode, r.stdout, r.stderr


def _imports(py: str, path: str, argv):
    """Modules imported (``-X importtime``) by a run: count and whether torch / transformers / timm are among them."""
    env = dict(os.environ, PYTHONPATH=path)
    r = subprocess.run([py, "-X", "importtime", "-m", "pecm", *argv], capture_output=True, text=True, env=env, cwd=path)
    mods = [ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")]
    top = set(mods)
    return {"modules": len(mods), **{m: m in top for m in ("numpy", "torch", "transformers", "timm")}}


def _fixture(tmp: str, demo: str, py: str):
    ck, ix = os.path.join(demo, "checkpoint"), os.path.join(demo, "index", "reports")
    if os.path.isfile(os.path.join(ck, "config.json")) and os.path.isfile(os.path.join(ix, "manifest.json")):
        dst = os.path.join(tmp, "reports")
        shutil.copytree(ix, dst, ignore=shutil.ignore_patterns("write.lock"))
        return ck, dst, f"demo checkpoint {ck} (read only) and a copy of {ix}"
    code = (
        "import sys, torch\n"
        "from pecm.model.config import PECMConfig\nfrom pecm.model.pecm import PECM\nfrom pecm.cli import main\n"
        "torch.manual_seed(0); texts = open(sys.argv[2]).read().splitlines()\n"
        "m = PECM(PECMConfig.tiny(), load_pretrained=False); m.text.fit(texts * 3); m.save(sys.argv[1] + '/ckpt')\n"
        "assert main(['index', 'create', sys.argv[1] + '/reports', '--checkpoint', sys.argv[1] + '/ckpt']) == 0\n"
        "assert main(['index', 'add', sys.argv[1] + '/reports', '--checkpoint', sys.argv[1] + '/ckpt',"
        " '--texts-file', sys.argv[2]]) == 0\n"
    )
    with open(os.path.join(tmp, "r6.txt"), "w") as f:
        f.write("\n".join(_reports(6)) + "\n")
    subprocess.run(
        [py, "-c", code, tmp, os.path.join(tmp, "r6.txt")], check=True, env=dict(os.environ, PYTHONPATH=HERE)
    )
    return os.path.join(tmp, "ckpt"), os.path.join(tmp, "reports"), "tiny random checkpoint, 6-report index"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", default="/work/main", help="PYTHONPATH of the code before (default /work/main)")
    ap.add_argument("--after", default=HERE, help="PYTHONPATH of the code after (default this checkout)")
    ap.add_argument("--demo", default="/work/demo_run", help="folder with checkpoint/ and index/reports")
    ap.add_argument("--runs", type=int, default=5, help="runs of the fast cases (default 5)")
    ap.add_argument("--search-runs", type=int, default=3, help="runs of the cases that load the model (default 3)")
    ap.add_argument("--batch", type=int, default=16, help="reports of the --texts-file case (default 16)")
    ap.add_argument("--out", default=os.path.join(HERE, "bench", "results", "cli_latency_cpu_zen4.json"))
    a = ap.parse_args(argv)
    py = sys.executable
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, index, fixture = _fixture(tmp, a.demo, py)
        texts = _reports(a.batch)
        tf = os.path.join(tmp, "queries.txt")
        with open(tf, "w") as f:
            f.write("\n".join(texts) + "\n")
        q = "Axial CT of the chest shows a mass in the right lower lobe."
        cases = {
            "help": (["--help"], a.runs, ("before", "after")),
            "search_help": (["search", "--help"], a.runs, ("before", "after")),
            "argparse_error": (["search"], a.runs, ("before", "after")),
            "missing_index": (
                ["search", os.path.join(tmp, "nope"), "--checkpoint", ckpt, "--text", q],
                a.runs,
                ("before", "after"),
            ),
            "search_text": (
                ["search", index, "--checkpoint", ckpt, "--text", q, "-k", "5"],
                a.search_runs,
                ("before", "after"),
            ),
            "search_text_json": (
                ["search", index, "--checkpoint", ckpt, "--text", q, "-k", "5", "--json"],
                a.search_runs,
                ("before", "after"),
            ),
            "search_texts_file": (
                ["search", index, "--checkpoint", ckpt, "--texts-file", tf, "-k", "5", "--json"],
                a.search_runs,
                ("after",),
            ),
        }
        res = {}
        for name, (args, runs, sides) in cases.items():
            res[name] = {"argv": ["pecm", *[os.path.basename(x) if os.sep in x else x for x in args]]}
            times = {s: [] for s in sides}
            rcs = {s: set() for s in sides}
            last = {}
            for _ in range(runs):  # interleaved: a load change hits both sides alike
                for s in sides:
                    dt, rc, out, err = _time(py, a.before if s == "before" else a.after, args)
                    times[s].append(round(dt, 3))
                    rcs[s].add(rc)
                    last[s] = (out, err)
            for s in sides:
                out, err = last[s]
                res[name][s] = {
                    "median_s": round(statistics.median(times[s]), 3),
                    "runs_s": times[s],
                    "exit": sorted(rcs[s]),
                    "stderr_lines": len(err.strip().splitlines()) if err.strip() else 0,
                }
                if name == "search_texts_file" and rcs[s] == {0}:
                    res[name][s]["queries"] = len(json.loads(out)["queries"])
            if "before" in sides and "after" in sides:
                res[name]["speedup"] = round(res[name]["before"]["median_s"] / res[name]["after"]["median_s"], 2)
            print(name, {s: res[name][s]["median_s"] for s in sides}, file=sys.stderr, flush=True)
        one = res["search_text_json"]["after"]["median_s"]
        res["search_texts_file"]["vs_separate_processes"] = {
            "batch": a.batch,
            "separate_text_processes_s": round(a.batch * one, 3),
            "note": f"{a.batch} x the median of one `--text` run (after)",
        }
        imports = {
            s: {
                "help": _imports(py, p, ["--help"]),
                "missing_index": _imports(py, p, cases["missing_index"][0]),
            }
            for s, p in (("before", a.before), ("after", a.after))
        }
    out = {
        "what": "wall clock of a fresh `python -m pecm ...` process (subprocess.run), median of the runs",
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "nice": os.nice(0),
        "load_note": "run under `nice -n 19` on a shared 2-core machine that was running other timing benchmarks "
        "at the same time (loadavg below): absolute numbers are inflated and noisy; before/after are interleaved "
        "run by run so the comparison sees the same load",
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "fixture": fixture,
        "before": a.before,
        "after": a.after,
        "cases": res,
        "imports": imports,
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: {s: v[s]["median_s"] for s in ("before", "after") if s in v} for k, v in res.items()}))
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
