"""Packaging: the sdist builds a wheel on its own, and the installed wheel works outside the source tree.

One module fixture builds everything from scratch (nothing is cached between runs):

1. an sdist of this source tree (setuptools' PEP 517 ``build_sdist``, what ``python -m build --sdist`` calls);
2. a wheel from the *unpacked sdist* (``pip wheel --no-deps --no-build-isolation``: the build runs CMake for
   ``pecm._C`` there, so a file missing from MANIFEST.in fails the build);
3. a fresh venv in a temporary directory outside the source tree; a ``.pth`` file appends the dev venv's
   site-packages as a plain path, so torch, numpy, timm, ... are importable but the dev venv's editable pecm is
   not (a plain path line does not run that directory's own ``.pth`` files, which is where the editable finder
   is installed);
4. the wheel installed into it with ``--no-deps``.

The tests then run, with the venv's interpreter and from a working directory outside the repository:
``import pecm, pecm._C`` (both from the venv, same version), every op on the cpp and torch backends against
`pecm.reference`, ``pecm demo --quick`` and ``pecm bench index``. A failed build is a test failure, never a skip.
About 35-80 s on the 2-core CPU machine, depending on its load (half of it the sdist + C++ wheel build).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = len(os.listdir(ROOT / "pecm" / "data" / "roco_sample" / "images"))


def _run(cmd, cwd, env=None, timeout=900, what=""):
    """Run ``cmd``; on a non-zero exit fail the test with the command's output tail."""
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        pytest.fail(
            f"{what or cmd[0]} failed (exit {r.returncode}): {' '.join(map(str, cmd))}\n"
            f"--- stdout ---\n{r.stdout[-6000:]}\n--- stderr ---\n{r.stderr[-6000:]}",
            pytrace=False,
        )
    return r


class Env:
    """The fresh venv with the wheel installed."""

    def __init__(self, work: Path):
        self.work = work
        self.venv = work / "venv"
        self.python = self.venv / "bin" / "python"
        self.pecm = self.venv / "bin" / "pecm"
        self.cwd = work / "cwd"  # outside the repository: nothing there shadows the installed package
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        self.env.update(PYTHONNOUSERSITE="1", VIRTUAL_ENV=str(self.venv), PYTHONDONTWRITEBYTECODE="1")
        self.env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"

    def py(self, code: str, timeout=600, what="python in the wheel venv"):
        return _run([self.python, "-c", textwrap.dedent(code)], self.cwd, self.env, timeout, what)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    work = tmp_path_factory.mktemp("packaging")
    assert ROOT not in work.resolve().parents, f"{work} must be outside the source tree {ROOT}"
    dist = work / "dist"
    dist.mkdir()
    build_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    build_env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    # 1. sdist (setuptools writes pecm.egg-info/ into the tree while doing so: removed again if it was not there)
    had_egg_info = (ROOT / "pecm.egg-info").exists()
    try:
        code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(dist)!r}))"
        _run([sys.executable, "-c", code], ROOT, build_env, 300, "building the sdist")
    finally:
        if not had_egg_info:
            shutil.rmtree(ROOT / "pecm.egg-info", ignore_errors=True)
    sdists = glob.glob(str(dist / "pecm-*.tar.gz"))
    assert len(sdists) == 1, f"expected one sdist in {dist}, got {sdists}"
    # 2. wheel from the unpacked sdist
    src = work / "sdist"
    with tarfile.open(sdists[0]) as tf:
        tf.extractall(src, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (tree,) = [p for p in src.iterdir() if p.is_dir()]
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir"]
    _run([*cmd, "-w", dist, tree], work, build_env, 1200, "building the wheel from the sdist")
    wheels = glob.glob(str(dist / "pecm-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {dist}, got {wheels}"
    # 3. fresh venv outside the source tree; the dev venv's third-party packages as a plain path (no .pth run)
    env = Env(work)
    env.cwd.mkdir()
    _run([sys.executable, "-m", "venv", env.venv], work, build_env, 300, "creating the venv")
    site = _run([env.python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], work, env.env).stdout
    dev_site = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    Path(site.strip(), "pecm_test_dev_deps.pth").write_text("".join(f"{p}\n" for p in sorted(dev_site)))
    # 4. the wheel, and nothing else
    pip = [env.python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir"]
    _run([*pip, wheels[0]], work, env.env, 300, "installing the wheel")
    env.sdist, env.wheel = Path(sdists[0]), Path(wheels[0])
    return env


def test_sdist_holds_what_the_build_needs(built):
    with tarfile.open(built.sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    need = {
        "CMakeLists.txt",
        "LICENSE",
        "README.md",
        "MANIFEST.in",
        "pyproject.toml",
        "setup.py",
        "csrc/bindings.cpp",
        "csrc/kernel_avx512.cpp",
        "kernels/__init__.py",
        "kernels/pecm_topk.py",
        "pecm/_version.py",
        "pecm/py.typed",
        "pecm/data/roco_sample/pairs.jsonl",
        "pecm/data/roco_sample/ATTRIBUTION.tsv",
        "pecm/bench/index_bench.py",
        "pecm/serve/static/index.html",
        "pecm/serve/static/page.js",
        "pecm/serve/static/page.css",
    }
    assert need <= names, f"missing from the sdist: {sorted(need - names)}"
    assert sum(n.startswith("pecm/data/roco_sample/images/") for n in names) == SAMPLE_IMAGES
    assert not [n for n in names if n.endswith((".so", ".pyc"))]


def test_wheel_holds_everything_used_at_run_time(built):
    names = set(zipfile.ZipFile(built.wheel).namelist())
    need = {
        "pecm/py.typed",
        "pecm/_version.py",
        "pecm/kernels/__init__.py",
        "pecm/kernels/pecm_topk.py",
        "pecm/bench/index_bench.py",
        "pecm/data/roco_sample/pairs.jsonl",
        "pecm/data/roco_sample/ATTRIBUTION.tsv",
        "pecm/data/roco_sample/README.md",
        "pecm/serve/static/index.html",
        "pecm/serve/static/page.js",
        "pecm/serve/static/page.css",
    }
    assert need <= names, f"missing from the wheel: {sorted(need - names)}"
    assert [n for n in names if n.startswith("pecm/_C") and n.endswith(".so")], "no pecm/_C*.so in the wheel"
    assert sum(n.startswith("pecm/data/roco_sample/images/") for n in names) == SAMPLE_IMAGES
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not [n for n in names if n.startswith(("kernels/", "tests/", "csrc/"))]


def test_import_resolves_to_the_wheel_and_versions_agree(built):
    out = built.py(
        """
        import importlib.metadata, json, os
        import pecm, pecm._C
        from pecm.data import layouts
        print(json.dumps({
            "pecm": pecm.__file__, "C": pecm._C.__file__, "kernels": __import__("pecm.kernels").kernels.__file__,
            "version": pecm.__version__, "C_version": getattr(pecm._C, "__version__", None),
            "dist_version": importlib.metadata.version("pecm"),
            "dist_files": str(importlib.metadata.distribution("pecm").locate_file("pecm/__init__.py")),
            "direct_url": importlib.metadata.distribution("pecm").read_text("direct_url.json"),
            "typed": os.path.isfile(os.path.join(os.path.dirname(pecm.__file__), "py.typed")),
            "sample": layouts.SAMPLE_ROCO, "default_data": layouts.default_data_dir(),
            "repo_root": layouts.REPO_ROOT, "backends": pecm.ops.available_backends(),
        }))
        """
    ).stdout
    info = json.loads(out.strip().splitlines()[-1])
    venv = str(built.venv.resolve())
    for key in ("pecm", "C", "kernels", "sample", "dist_files"):
        assert os.path.realpath(info[key]).startswith(venv + os.sep), f"{key} resolved to {info[key]}, not the venv"
    assert info["version"] == info["C_version"] == info["dist_version"], info
    direct = json.loads(info["direct_url"] or "{}")  # the metadata is the wheel's, not the dev venv's editable one
    assert direct.get("url", "").endswith(".whl") and not direct.get("dir_info", {}).get("editable"), direct
    assert info["typed"] and info["repo_root"] is None and info["default_data"] == info["sample"]
    assert "cpp" in info["backends"] and "torch" in info["backends"]


def test_every_op_matches_the_reference_on_cpp_and_torch(built):
    out = built.py(
        """
        import numpy as np, torch
        from pecm import ops, reference
        assert ops.__file__.startswith(%r), ops.__file__
        g = torch.Generator().manual_seed(0)
        B, N, K, D, M, k = 3, 64, 5, 16, 20, 7
        q, c = torch.randn(B, K, D, generator=g), torch.randn(N, K, D, generator=g)
        w = torch.rand(K, generator=g) + 0.5
        qm, cm = torch.rand(B, K, generator=g) > 0.2, torch.rand(N, K, generator=g) > 0.2
        cand = torch.randint(0, N, (B, M), generator=g)
        cand[:, -3:] = -1
        ref = reference.scores(q, c, w, q_mask=qm, c_mask=cm)
        rv, ri = reference.rerank(ref[2], cand.numpy(), 5)
        for backend in ("cpp", "torch"):
            for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-2)):
                cc = c.to(dtype)
                refd = reference.scores(q, cc, w, q_mask=qm, c_mask=cm)
                got = ops.pecm_scores(q, cc, w, q_mask=qm, c_mask=cm, backend=backend)
                for a, b in zip(got, refd):
                    np.testing.assert_allclose(a.numpy(), b, atol=tol, rtol=0)
                vals, ids = ops.pecm_topk(q, cc, w, k, q_mask=qm, c_mask=cm, backend=backend)
                np.testing.assert_allclose(vals.numpy(), -np.sort(-refd[2], axis=1)[:, :k], atol=tol, rtol=0)
                np.testing.assert_allclose(np.take_along_axis(refd[2], ids.numpy(), 1), vals.numpy(), atol=tol)
                vals, ids = ops.pecm_rerank(q, cc, cand, w, 5, q_mask=qm, c_mask=cm, backend=backend)
                rv, _ = reference.rerank(refd[2], cand.numpy(), 5)
                np.testing.assert_allclose(vals.numpy(), rv, atol=tol, rtol=0)
                assert set(ids.flatten().tolist()) <= set(cand.flatten().tolist())
                np.testing.assert_allclose(np.take_along_axis(refd[2], ids.numpy(), 1), vals.numpy(), atol=tol)
        print("ops ok")
        """
        % str(built.venv.resolve()),
        what="the ops in the wheel venv",
    ).stdout
    assert "ops ok" in out


def test_demo_quick_runs_from_the_wheel(built):
    out = built.cwd / "demo"
    r = _run([built.pecm, "demo", "--quick", "--out", out, "--no-progress"], built.cwd, built.env, 1200, "pecm demo")
    data = next(line for line in r.stdout.splitlines() if line.startswith("data: "))[len("data: ") :].split(":")[0]
    assert os.path.realpath(data).startswith(str(built.venv.resolve()) + os.sep), f"demo data {data}: not the wheel's"
    for row in ("sim only", "R = sim*C", "chance"):
        assert row in r.stdout, f"no {row!r} row in the evaluation table:\n{r.stdout[-3000:]}"
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["results"]) == {"sim", "score", "conf"}
    assert (out / "checkpoint" / "checkpoint.json").is_file() and (out / "index" / "images" / "manifest.json").is_file()


def test_bench_index_runs_from_the_wheel(built):
    res_path = built.work / "bench" / "index.json"
    cmd = [built.pecm, "bench", "index", "--n", "2000", "--queries", "4", "--reps", "1", "--no-progress"]
    _run([*cmd, "--out", res_path], built.cwd, built.env, 600, "pecm bench index")
    res = json.loads(res_path.read_text())
    assert res["benchmark"] == "pecm.bench.index_bench" and res["add"]["n"] == 2000
    assert res["search"]["exhaustive_B1"]["warm_s"] > 0 and "two_stage_recall_at_k_vs_exhaustive" in res["search"]
    assert res["git_commit"] == "unknown"  # an installed package is no git checkout
    assert not (built.cwd / "bench").exists()  # the default index folder under the cwd is removed again
