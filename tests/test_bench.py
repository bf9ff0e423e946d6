"""`pecm bench`: tiny sweeps end to end through the CLI, the results schema, plots, report merge,
the correctness gate (a wrong peer gets no time), every installed peer against the reference, and
clear errors for bad arguments. Nothing here asserts a speed (timings are measured in bench/)."""

from __future__ import annotations

import copy
import json
import os
import time

import numpy as np
import pytest
import torch

from pecm import cli
from pecm.bench import peers, runner, schema
from pecm.bench.timing import summarize, time_fn
from pecm.bench.workload import make_workload, work_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--sweep", "N=300,B=1,3", "M=40", "K=4", "D=16", "--repeats", "2", "--warmup", "0", "--quick-ceilings"]
FAST_PEERS = "eager,gemm,numpy,faiss"  # torch.compile costs ~10 s of compilation: see the slow test below


def _backends():
    from pecm.backends import available_backends

    return [b for b in available_backends() if b != "triton"]


def _run_cli(op, out, *extra):
    tiny = TINY if op != "rerank" else [a if a != "M=40" else "M=20,40" for a in TINY]  # also a sweep over M
    args = ["bench", op, *tiny, "--peers", FAST_PEERS, "--backend", ",".join(_backends()), "--out", str(out)]
    return cli.main(args + list(extra) + ["--quiet"])


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """One tiny sweep per op through the CLI: {op: (exit code, out dir)}."""
    base = tmp_path_factory.mktemp("bench")
    return {op: (_run_cli(op, base / op), base / op) for op in ("topk", "rerank", "scores")}


def _load(d):
    with open(os.path.join(d, "results.json")) as f:
        return json.load(f)


def _is_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    return os.path.getsize(path) > 1000 and head == PNG_MAGIC


@pytest.mark.parametrize("op", ["topk", "rerank", "scores"])
def test_tiny_sweep_end_to_end(tiny_runs, op, capsys):
    rc, out = tiny_runs[op]
    assert rc == 0
    res = _load(out)
    assert schema.validate(res) == []
    assert res["op"] == op and res["environment"]["cpu_count"] >= 1
    assert res["environment"]["git_commit"] and res["environment"]["versions"]["torch"] == torch.__version__
    impls = _backends() + [p for p in FAST_PEERS.split(",") if op in peers.PEERS[p][1]]
    rows = res["measurements"]
    # full grid: 2 values of B (x 2 of M for rerank) for every implementation, each row at its own grid point
    ms = (20, 40) if op == "rerank" else (None,)
    got = sorted((r["impl"], r["shape"]["B"], r["shape"].get("M")) for r in rows)
    assert got == sorted((i, b, m) for i in impls for b in (1, 3) for m in ms)
    for r in rows:
        assert r["shape"]["N"] == 300 and r["shape"]["K"] == 4 and r["shape"]["D"] == 16
        if op == "rerank":
            assert r["pairs"] == r["shape"]["B"] * r["shape"]["M"]
        else:
            assert r["pairs"] == r["shape"]["B"] * 300
        if peers.unavailable_reason(r["impl"], "cpu") is None:
            assert r["status"] == "ok", r
            assert len(r["samples_s"]) == 2 and r["median_s"] > 0
            assert r["pairs_per_s"] == pytest.approx(r["pairs"] / r["median_s"])
            assert r["frac_bw"] == pytest.approx(r["GBps"] / res["ceilings"]["copy_GBps"])
    ok_peers = [r for r in rows if r["kind"] == "peer" and r["status"] == "ok" and r["impl"] != "faiss"]
    for r in rows:
        if r["status"] == "ok" and ok_peers:
            same = [p for p in ok_peers if p["shape"] == r["shape"]]
            fastest = min(same, key=lambda p: p["median_s"])
            assert r["fastest_peer"] == fastest["impl"]
            assert r["ratio_vs_fastest_peer"] == pytest.approx(fastest["median_s"] / r["median_s"])
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert "roofline.png" in pngs and f"{op}_throughput_vs_B.png" in pngs
    assert (f"{op}_throughput_vs_M.png" in pngs) == (op == "rerank")
    assert all(_is_png(os.path.join(out, f)) for f in pngs)


def test_table_printed_for_every_row(tmp_path, capsys):
    assert _run_cli("topk", tmp_path, "--no-plots") == 0
    text = capsys.readouterr().out
    res = _load(tmp_path)
    table = [ln for ln in text.splitlines() if ln.startswith("| topk |")]
    assert len(table) == len(res["measurements"])
    assert "x fastest" in text and "ceilings: copy" in text
    assert not any(f.endswith(".png") for f in os.listdir(tmp_path))


def test_schema_rejects_invalid_results(tiny_runs):
    good = _load(tiny_runs["topk"][1])
    assert schema.validate(good) == []

    def broken(edit):
        bad = copy.deepcopy(good)
        edit(bad)
        return schema.validate(bad)

    ok_row = next(i for i, r in enumerate(good["measurements"]) if r["status"] == "ok")
    assert any("missing required key 'ceilings'" in e for e in broken(lambda d: d.pop("ceilings")))
    assert any("schema_version" in e for e in broken(lambda d: d.update(schema_version=2)))
    assert any("cpu_count" in e for e in broken(lambda d: d["environment"].update(cpu_count="two")))
    assert any("status" in e for e in broken(lambda d: d["measurements"][ok_row].update(status="fast")))
    assert any("median_s" in e for e in broken(lambda d: d["measurements"][ok_row].pop("median_s")))
    assert any("pairs_per_s" in e for e in broken(lambda d: d["measurements"][ok_row].update(pairs_per_s="1e6")))
    assert any("'N'" in e for e in broken(lambda d: d["measurements"][ok_row]["shape"].pop("N")))
    assert any("without a reason" in e for e in broken(lambda d: d["measurements"][ok_row].update(status="failed")))
    assert any("expected number" in e for e in broken(lambda d: d["measurements"][ok_row].update(GBps=True)))
    assert schema.validate([]) and schema.validate("results") and schema.validate({})


def test_report_merges_results(tiny_runs, tmp_path, capsys):
    out = tmp_path / "report"
    rc = cli.main(
        ["bench", "report", str(tiny_runs["topk"][1]), str(tiny_runs["rerank"][1] / "results.json"), "--out", str(out)]
    )
    assert rc == 0
    md = (out / "report.md").read_text()
    assert "## topk on" in md and "## rerank on" in md and "**topk**" in md and "**rerank**" in md
    n_rows = sum(len(_load(tiny_runs[op][1])["measurements"]) for op in ("topk", "rerank"))
    assert md.count("| topk |") + md.count("| rerank |") == n_rows  # every measurement in the full tables
    for name in ("roofline.png", "topk_throughput_vs_B.png", "rerank_throughput_vs_B.png"):
        assert f"]({name})" in md and _is_png(out / name)


def test_report_rejects_invalid_file(tmp_path, capsys):
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"schema_version": 1, "op": "topk"}))
    assert cli.main(["bench", "report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "does not match the results schema" in capsys.readouterr().err
    assert cli.main(["bench", "report", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2


# ---- the correctness gate ----------------------------------------------------------------------


def _sim_only(op, wl):
    qh, w, hq = peers._query(wl)
    sim = hq @ wl.cp.float().T
    if op == "scores":
        return lambda: sim
    if op == "topk":
        return lambda: torch.topk(sim, wl.topk, dim=1)
    return lambda: peers._rerank_finish(torch.gather(sim, 1, wl.cand.clamp_min(0)), wl.cand, wl.topk)


def _right_values_wrong_ids(op, wl):
    good = peers.make_gemm(op, wl)

    def run():
        v, i = good()
        return v, i.flip(1)

    return run


def _off_by_a_little(op, wl):
    good = peers.make_gemm(op, wl)

    def run():
        out = good()
        return out * 1.05 if op == "scores" else (out[0] * 1.05, out[1])

    return run


def _crashes(op, wl):
    def run():
        raise RuntimeError("boom")

    return run


@pytest.mark.parametrize("op", ["topk", "rerank", "scores"])
@pytest.mark.parametrize("wrong", [_sim_only, _right_values_wrong_ids, _off_by_a_little, _crashes])
def test_check_catches_wrong_implementations(op, wrong):
    if wrong is _right_values_wrong_ids and op == "scores":
        pytest.skip("no ids in scores")
    ok, msg = peers.check(wrong, op)
    assert not ok, msg


def test_wrong_peer_gets_no_time():
    res = runner.run_benchmark(
        "topk",
        backends=[],
        peers=["gemm"],
        sweep={"N": [300], "B": [2], "K": [4], "D": [16]},
        repeats=1,
        warmup=0,
        quick_ceilings=True,
        extra_peers={"sim_only": (_sim_only, "score")},
        log=lambda *a: None,
    )
    assert schema.validate(res) == []
    assert res["checks"]["sim_only"]["ok"] is False and res["checks"]["gemm"]["ok"] is True
    rows = {r["impl"]: r for r in res["measurements"]}
    assert rows["sim_only"]["status"] == "failed" and "max |error|" in rows["sim_only"]["reason"]
    assert not any(k in rows["sim_only"] for k in ("median_s", "samples_s", "pairs_per_s"))
    assert rows["gemm"]["status"] == "ok" and "sim_only" not in rows["gemm"]["speedup_vs"]


def test_monkeypatched_broken_peer_fails_through_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(peers.PEERS, "eager", (_right_values_wrong_ids, ("topk",), "score"))
    rc = cli.main(
        [
            "bench",
            "topk",
            *TINY,
            "--peers",
            "eager,gemm",
            "--backend",
            "torch",
            "--out",
            str(tmp_path),
            "--no-plots",
            "--quiet",
        ]
    )
    assert rc == 0
    rows = {r["impl"]: r for r in _load(tmp_path)["measurements"] if r["shape"]["B"] == 1}
    assert rows["eager"]["status"] == "failed" and rows["gemm"]["status"] == "ok"
    assert "eager" not in rows["torch"]["speedup_vs"] and rows["torch"]["fastest_peer"] == "gemm"


def _installed(op):
    out = [(p, m, by) for p, (m, ops_, by) in peers.PEERS.items() if op in ops_ and p != "compile"]
    out = [x for x in out if peers.unavailable_reason(x[0], "cpu") is None]
    return out + [(b, peers.make_backend(b), "score") for b in _backends()]


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
@pytest.mark.parametrize("op", ["topk", "rerank", "scores"])
def test_installed_peers_and_backends_match_reference(op, dtype):
    tol = 3e-3 if dtype != "bfloat16" else 2e-2
    for name, maker, by in _installed(op):
        ok, msg = peers.check(maker, op, by=by, dtype=dtype, tol=tol)
        assert ok, f"{name}: {msg}"


@pytest.mark.slow
@pytest.mark.parametrize("op", ["topk", "rerank", "scores"])
def test_compile_peer_matches_reference(op):
    ok, msg = peers.check(peers.make_compile, op)
    assert ok, msg


# ---- bad arguments: one line on stderr, exit code 2 --------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--sweep", "garbage"], "--sweep"),
        (["--sweep", "N=abc"], "--sweep: N values must be integers"),
        (["--sweep", "X=3"], "unknown parameter 'X'"),
        (["--sweep", "B=0"], "must be >= 1"),
        (["--peers", "eager,nosuchpeer"], "unknown peer 'nosuchpeer'"),
        (["--backend", "fortran"], "unknown backend 'fortran'"),
        (["--dtype", "float64"], "--dtype"),
        (["--repeats", "0"], "--repeats"),
        (["--k", "0"], "--k"),
        (["--budget", "0"], "--budget"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_arguments_exit_2(args, needle, tmp_path, capsys):
    rc = cli.main(["bench", "topk", "--out", str(tmp_path), "--quick-ceilings", "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("pecm: error:") and needle in err, err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_exit_2(tmp_path, capsys):
    rc = cli.main(["bench", "rerank", "--device", "cuda", "--out", str(tmp_path), "--quiet"])
    assert rc == 2 and "CUDA is not available" in capsys.readouterr().err


def test_bench_without_subcommand_prints_help(capsys):
    assert cli.main(["bench"]) == 2
    assert "topk" in capsys.readouterr().out


# ---- pieces with hand-computed answers -----------------------------------------------------------


def test_parse_sweep():
    assert runner.parse_sweep("N=1000,2000,B=1,64") == {"N": [1000, 2000], "B": [1, 64]}
    assert runner.parse_sweep("n=2e5 m=10,20") == {"N": [200000], "M": [10, 20]}
    assert runner.parse_sweep("") == {} and runner.parse_sweep(None) == {}
    grid = runner._grid("rerank", {"N": [10], "B": [1, 2], "M": [5, 6]})
    assert len(grid) == 4 and {(g["B"], g["M"]) for g in grid} == {(1, 5), (1, 6), (2, 5), (2, 6)}
    assert all("M" not in g for g in runner._grid("topk", {"M": [5, 6]}))


def test_work_model_by_hand():
    # B=2, N=3, K=4, D=8, float16: a candidate row is 4*8 + 8 = 40 values = 80 bytes
    assert work_model("topk", {"B": 2, "N": 3, "K": 4, "D": 8}, 2) == {"pairs": 6.0, "bytes": 240.0, "flops": 480.0}
    assert work_model("scores", {"B": 2, "N": 3, "K": 4, "D": 8}, 2)["bytes"] == 240.0 + 3 * 2 * 3 * 4
    rr = work_model("rerank", {"B": 2, "N": 3, "K": 4, "D": 8, "M": 5}, 4)
    assert rr == {"pairs": 10.0, "bytes": 10 * 40 * 4.0, "flops": 2 * 10 * 40.0}


def test_summarize_and_time_fn():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s == {"median_s": 3.0, "iqr_s": 2.0, "min_s": 1.0}
    calls = []
    t = time_fn(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and len(t["samples_s"]) == 3 and t["median_s"] >= 0
    with pytest.raises(ValueError, match="repeats"):
        time_fn(lambda: None, repeats=0)
    # budget: a 20 ms call, 10 repeats would take >= 0.2 s > 0.05 s budget -> the minimum of 3
    calls.clear()
    t = time_fn(lambda: (calls.append(1), time.sleep(0.02)), warmup=1, repeats=10, budget_s=0.05)
    assert len(t["samples_s"]) == 3 and len(calls) == 4
    t = time_fn(lambda: None, warmup=1, repeats=4, budget_s=10.0)
    assert len(t["samples_s"]) == 4


def test_ratios_exclude_faiss_from_fastest():
    rows = [
        {"op": "topk", "shape": {"N": 1}, "impl": i, "kind": k, "status": "ok", "median_s": t}
        for i, k, t in [("cpp", "backend", 1.0), ("eager", "peer", 4.0), ("gemm", "peer", 2.0), ("faiss", "peer", 0.5)]
    ]
    runner._add_ratios(rows)
    cpp = rows[0]
    assert cpp["fastest_peer"] == "gemm" and cpp["ratio_vs_fastest_peer"] == 2.0
    assert cpp["speedup_vs"] == {"eager": 4.0, "gemm": 2.0, "faiss": 0.5}


def test_workload_queries_are_near_candidates():
    wl = make_workload(4, 50, 3, 8, m=6, dtype="float32", topk=5, seed=1)
    assert wl.shape == {"B": 4, "N": 50, "K": 3, "D": 8, "M": 6}
    assert np.allclose(wl.c.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    assert int(wl.cand.min()) >= 0 and int(wl.cand.max()) < 50


# ---- pecm bench index: only its own files, a temporary index folder, no overwritten results ------

INDEX_TINY = ["--n", "300", "--queries", "2", "--shortlist", "50", "--clusters", "10", "--reps", "1", "--no-progress"]
DROP_CACHES = "/proc/sys/vm/drop_caches"


@pytest.fixture
def index_sandbox(tmp_path, monkeypatch):
    """TMPDIR and cwd inside tmp_path; every open() / os.open() and posix_fadvise() recorded; the search child
    run in this process (so the recording sees it); /proc/sys/vm/drop_caches can never be opened (we run as
    root on some machines: a regression must fail here, not drop the host's page cache)."""
    import builtins
    import contextlib
    import io
    import subprocess
    import tempfile

    from pecm.bench import index_bench

    tmpdir, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmpdir.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its answer
    monkeypatch.chdir(cwd)
    rec = {"opened": [], "written": [], "fadvised": []}

    def note(path, writing):
        if isinstance(path, int):
            return
        p = os.path.abspath(os.fsdecode(path))
        rec["opened"].append(p)
        if writing:
            rec["written"].append(p)
        if os.path.realpath(p) == DROP_CACHES:
            raise PermissionError(f"test: {DROP_CACHES} must never be opened")

    real_open, real_os_open, real_run = builtins.open, os.open, subprocess.run

    def fake_open(file, mode="r", *a, **kw):
        note(file, any(c in mode for c in "wax+"))
        return real_open(file, mode, *a, **kw)

    def fake_os_open(path, flags, *a, **kw):
        note(path, bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC)))
        return real_os_open(path, flags, *a, **kw)

    def fake_run(cmd, *a, **kw):
        if "--phase" not in cmd:  # git etc.
            return real_run(cmd, *a, **kw)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = index_bench.main(list(cmd[3:]))  # [python, -c, code, --phase, search, ...]
        return subprocess.CompletedProcess(cmd, rc, buf.getvalue(), "")

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(subprocess, "run", fake_run)
    if hasattr(os, "posix_fadvise"):
        real_fadvise = os.posix_fadvise

        def fake_fadvise(fd, offset, length, advice):
            rec["fadvised"].append(os.readlink(f"/proc/self/fd/{fd}"))
            return real_fadvise(fd, offset, length, advice)

        monkeypatch.setattr(os, "posix_fadvise", fake_fadvise)
    return tmpdir, cwd, rec


def _inside(path, folder) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


def test_index_bench_touches_only_its_own_files(index_sandbox, capsys):
    tmpdir, cwd, rec = index_sandbox
    assert cli.main(["bench", "index", *INDEX_TINY]) == 0
    assert DROP_CACHES not in rec["opened"]
    outs = list(cwd.iterdir())  # default --out: one new ./pecm-bench-index-<time>.json, nothing else in the cwd
    assert len(outs) == 1 and outs[0].name.startswith("pecm-bench-index-") and outs[0].suffix == ".json"
    assert list(tmpdir.iterdir()) == []  # the index folder was made under $TMPDIR and removed again
    built = [p for p in rec["written"] if _inside(p, tmpdir)]
    assert any(p.endswith("prototypes.bin") for p in built), rec["written"]
    stray = [p for p in rec["written"] if not _inside(p, tmpdir) and os.path.realpath(p) != str(outs[0].resolve())]
    assert stray == []
    res = json.loads(outs[0].read_text())
    assert res["add"]["n"] == 300 and "posix_fadvise" in res["search"]["cold"]
    assert res["search"]["cold_is_warm"] in (True, False, None)
    if hasattr(os, "posix_fadvise"):  # the cold reads evict the index's own files, and only those
        assert rec["fadvised"] and all(_inside(p, tmpdir) for p in rec["fadvised"])
        assert any(p.endswith("prototypes.bin") for p in rec["fadvised"])


def test_index_bench_refuses_to_overwrite_out(index_sandbox, capsys):
    tmpdir, cwd, _ = index_sandbox
    out = cwd / "committed.json"
    out.write_text("keep me\n")
    assert cli.main(["bench", "index", *INDEX_TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "--force" in err[0]
    assert out.read_text() == "keep me\n" and list(tmpdir.iterdir()) == []  # refused before anything was built

    from pecm.bench import index_bench

    args = index_bench._parser("x").parse_args(["--out", str(out), "--force"])
    assert index_bench._out_path(args) == str(out)
    assert index_bench._out_path(index_bench._parser("x").parse_args(["--out", "-"])) is None


@pytest.mark.parametrize("explicit_dir", [False, True])
def test_index_bench_checks_free_space(index_sandbox, monkeypatch, capsys, explicit_dir):
    import collections
    import shutil

    tmpdir, cwd, _ = index_sandbox
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 10**6, 10**6))
    extra = ["--dir", str(tmpdir)] if explicit_dir else []
    assert cli.main(["bench", "index", "--n", "1000", "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--n 1000" in err[0] and "--dir" in err[0] and str(tmpdir) in err[0], err
    assert list(tmpdir.iterdir()) == [] and list(cwd.iterdir()) == []


@pytest.mark.parametrize(
    "bad, name",
    [
        (["--n", "0"], "--n"),
        (["--n", "ten"], "--n"),
        (["--block", "-1"], "--block"),
        (["--queries", "0"], "--queries"),
        (["--reps", "0"], "--reps"),
        (["--chunk-size", "0"], "--chunk-size"),
        (["--dir", "/nonexistent/pecm"], "--dir"),
        (["--dtype", "float64"], "--dtype"),
        (["--path", "somewhere"], "--path"),
    ],
)
def test_index_bench_bad_arguments(index_sandbox, capsys, bad, name):
    from pecm.bench import index_bench

    tmpdir, cwd, _ = index_sandbox
    args = [*INDEX_TINY, *bad]  # the last --n wins; a regression that accepts `bad` must not build a 13 GB index
    assert cli.main(["bench", "index", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pecm: error:") and name in err[0], err
    assert index_bench.main(args, prog="bench/bench_index.py") == 2  # the scripts: the same one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench/bench_index.py: error:") and name in err[0], err
    assert list(tmpdir.iterdir()) == [] and list(cwd.iterdir()) == []


def test_no_host_wide_cache_drop_in_the_sources():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for sub in ("pecm", "bench"):
        for d, _, names in os.walk(os.path.join(root, sub)):
            for n in names:
                if n.endswith((".py", ".sh")):
                    with open(os.path.join(d, n), encoding="utf-8") as f:
                        assert DROP_CACHES not in f.read(), os.path.join(d, n)


@pytest.mark.slow  # ~10 s: a child process builds and searches a 300-item index
def test_index_smoke(tmp_path, capsys):
    out, work = tmp_path / "index.json", tmp_path / "work"
    work.mkdir()
    rc = cli.main(["bench", "index", *INDEX_TINY, "--dir", str(work), "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert "add" in res and "search" in res and res["git_commit"]
    assert "posix_fadvise" in res["search"]["cold"] and "cold_resident_fraction" in res["search"]
    assert list(work.iterdir()) == []  # the run's own index folder is removed


# ---- bench/throughput.py (the issue-3 wrapper): targets and README regeneration, no timing ------


def _throughput_module():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "throughput.py")
    spec = importlib.util.spec_from_file_location("pecm_bench_throughput", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(op, b, impl, t, frac_bw=0.1, speedup=None):
    return {
        "op": op,
        "shape": {"N": 10, "K": 2, "D": 4, "B": b},
        "impl": impl,
        "status": "ok",
        "median_s": t,
        "frac_bw": frac_bw,
        "speedup_vs": speedup or {},
    }


def test_throughput_targets_by_hand():
    tp = _throughput_module()
    runs = [
        {
            "measurements": [
                _row("topk", 1, "cpp", 1.0, frac_bw=0.6, speedup={"eager": 6.0, "gemm": 0.9}),
                _row("topk", 64, "cpp", 1.0, frac_bw=0.1, speedup={"eager": 2.5, "gemm": 0.8}),
                _row("rerank", 1, "cpp", 1.0, frac_bw=0.49),
            ]
        }
    ]
    got = {desc: (val, met) for desc, val, _, met in tp.targets(runs)}
    assert got["cpp topk B=1: speed vs peer (eager) >= 5x"] == (6.0, True)
    assert got["cpp topk B=1: speed vs peer (gemm) >= 1x"] == (0.9, False)
    assert got["cpp topk B=1: fraction of copy bandwidth >= 50%"] == (0.6, True)
    assert got["cpp topk B=64: speed vs peer (gemm) >= 0.8x"] == (0.8, True)
    assert got["cpp rerank B=1: fraction of copy bandwidth >= 50%"] == (0.49, False)
    assert got["cpp rerank B=64: fraction of copy bandwidth >= 50%"] == (None, None)
    table = tp.targets_table(runs)
    assert "| 0.90x | NO |" in table and "not measured" in table


def test_throughput_readme_from_saved_runs(tiny_runs, tmp_path, capsys):
    tp = _throughput_module()
    bundle = {
        "kind": "pecm-throughput",
        "command": "python bench/throughput.py --test",
        "wall_s": 60.0,
        "runs": [_load(tiny_runs[op][1]) for op in ("topk", "rerank")],
    }
    src = tmp_path / "ops.json"
    src.write_text(json.dumps(bundle))
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n<!-- throughput:cpu:begin -->\nold\n<!-- throughput:cpu:end -->\n\ntail text\n")
    tp.README = str(readme)
    assert tp.main(["--from", str(src), "--readme"]) == 0
    text = readme.read_text()
    assert text.startswith("# title") and text.rstrip().endswith("tail text") and "\nold\n" not in text
    assert text.count("<!-- throughput:cpu:begin -->") == 1 and "python bench/throughput.py --test" in text
    n_rows = sum(len(r["measurements"]) for r in bundle["runs"])
    issue_rows = [ln for ln in text.splitlines() if ln.startswith("| topk |") or ln.startswith("| rerank |")]
    assert len(issue_rows) == n_rows
    assert "| target | measured | met |" in capsys.readouterr().out
    # the same bundle is accepted by `pecm bench report`
    assert cli.main(["bench", "report", str(src), "--out", str(tmp_path / "rep")]) == 0
    assert "## rerank on" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.parametrize("dtype", ["float16", "pq"])
def test_index_bench_exact_recall_over_several_blocks(index_sandbox, dtype, tmp_path):
    """--exact-recall's reference over several add blocks keeps global ids: float16 exhaustive search is exact
    (recall 1), pq is close to it."""
    if dtype == "pq":
        pytest.importorskip("faiss")
    out = tmp_path / "r.json"
    argv = ["bench", "index", "--n", "1200", "--block", "400", "--queries", "8", "--reps", "1", "--ann", "none"]
    argv += ["--dtype", dtype, "--exact-recall", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    rec = json.loads(out.read_text())["search"]["recall_at_10_vs_exact_float16"]
    assert rec["exhaustive"] >= (0.99 if dtype == "float16" else 0.6), rec


def test_score_sign_statistics_on_a_hand_built_case():
    """bench/score_sign.py counts both-negative (sim < 0 and C < 0) pairs and their top-k / rank-1 places, and
    compares recalls under the rankings without the quirk. 3 pairs; the counts below follow from the matrices."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "score_sign.py")
    spec = importlib.util.spec_from_file_location("score_sign", path)
    ss = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ss)
    sim = np.array([[0.5, -0.2, 0.1], [-0.3, 0.1, 0.0], [0.2, -0.1, 0.6]])
    conf = np.array([[0.5, -0.4, 0.2], [-0.9, 0.2, 0.1], [0.1, 0.3, 0.5]])
    # both negative: (0, 1) and (1, 0). R = sim * C rows: [.25 .08 .02], [.27 .02 0], [.02 -.03 .30]
    st = ss.sign_stats(sim, conf)
    assert st["frac_pairs_both_neg"] == pytest.approx(2 / 9) and st["matched_pairs_both_neg"] == 0
    i2r, r2i = st["image_to_report"], st["report_to_image"]
    assert i2r["mean_frac_top10_both_neg"] == pytest.approx(2 / 9)  # k = 10 > N = 3: every pair is in the top
    assert i2r["frac_queries_with_both_neg_in_top10"] == pytest.approx(2 / 3)
    assert i2r["frac_queries_with_both_neg_at_rank1"] == pytest.approx(1 / 3)  # row 1: (1, 0) beats its match
    assert r2i["frac_queries_with_both_neg_at_rank1"] == pytest.approx(2 / 3)  # columns 0 and 1
    rec = ss.recalls(sim, conf)
    assert rec["R = sim*C"]["image_to_report"]["R@1"] == pytest.approx(200 / 3)
    for name in ("sim*max(C,0)", "sim<0 last, then R"):  # the quirk removed: row 1's match is first
        assert rec[name]["image_to_report"]["R@1"] == pytest.approx(100.0)
        assert rec[name]["delta_vs_R"]["image_to_report"]["R@1"] == pytest.approx(100 / 3)
