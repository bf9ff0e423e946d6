"""The GPU-session tooling, rehearsed on the CPU: bench/gpu_correctness.py under the Triton interpreter (it
agrees on toy sizes and catches planted kernel bugs) and kernels/aot_check.py's JIT specialisation (pointers
and ints divisible by 16 get tt.divisibility = 16, ints equal to 1 become constexprs; no compile)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")


def _load_correctness():
    spec = importlib.util.spec_from_file_location("gpu_correctness", ROOT / "bench" / "gpu_correctness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TOY = dict(device="cpu", dtypes=("fp32", "fp16"), bs=(1, 3), n=24, k=3, d=16, m=8, big=False, raw_b=3)


@pytest.fixture(scope="module")
def corr():
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without CUDA)")
    from pecm.backends import triton_backend

    return _load_correctness(), triton_backend


@pytest.mark.interpret
def test_correctness_module_agrees_at_toy_size(corr):
    mod, _ = corr
    rep = mod.run(**TOY, seed=123, log=lambda *a: None)
    assert rep["ok"], [c for c in rep["cases"] if not c["ok"]]
    ops = {c["op"] for c in rep["cases"]}
    assert {"scores.sim", "scores.conf", "scores.score", "topk", "rerank", "big"} <= ops
    assert {c["form"] for c in rep["cases"] if "form" in c} == {"prep", "raw"}
    assert all(c["nan"] == 0 for c in rep["cases"] if "nan" in c)


@pytest.mark.interpret
def test_correctness_module_catches_an_unwritten_element_and_wrong_ids(corr, monkeypatch):
    mod, tb = corr
    fwd, topk = tb.kernels.pecm_scores_fwd, tb.kernels.pecm_topk

    def unwritten(qs, cs):  # the last column of score is left as the allocator gave it (poisoned: NaN)
        sim, conf, score = fwd(qs, cs)
        return sim, conf, torch.cat([score[:, :-1], torch.empty_like(score[:, -1:])], 1)

    def wrong_ids(qs, cs, k, by, chunk):  # a plausible-looking bug: ids off by one
        v, i = topk(qs, cs, k, by, chunk)
        return v, (i + 1) % cs.prototypes.shape[0]

    monkeypatch.setattr(tb.kernels, "pecm_scores_fwd", unwritten)
    monkeypatch.setattr(tb.kernels, "pecm_topk", wrong_ids)
    toy = {**TOY, "dtypes": ("fp32",), "bs": (3,)}
    rep = mod.run(**toy, seed=7, log=lambda *a: None)
    assert not rep["ok"]
    failed = {c["op"] for c in rep["cases"] if not c["ok"]}
    assert "scores.score" in failed and "topk" in failed
    assert "scores.sim" not in failed and "rerank" not in failed
    assert all(c["nan"] > 0 for c in rep["cases"] if c["op"] == "scores.score")


def test_poisoned_outputs_fill_and_restore():
    mod = _load_correctness()
    orig = torch.empty
    with mod.poisoned_outputs():
        assert torch.isnan(torch.empty(4)).all()
        assert (torch.empty(3, dtype=torch.int64) == mod.POISON_INT).all()
        assert torch.isnan(torch.zeros(2).new_empty(2)).all()
    assert torch.empty is orig


def test_aot_check_specialisation_marks_pointers_and_ints_divisible_by_16(tmp_path):
    """The JIT's view of a B = 1 top-k launch (N = 1,000,000, K = 26, D = 256): every tensor pointer is
    16-byte aligned -> tt.divisibility = 16, as are N, D and the split length; K = 26 is not; B = 1 is a
    constexpr; the None pointers are constexpr None. Spec only: nothing is compiled (~5 s)."""
    out = tmp_path / "spec.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(ROOT / "kernels" / "aot_check.py"), "--spec-only", "--quick", "--kernels", "topk",
           "--dtypes", "fp16", "--variants", "prep", "--b", "1", "--json", str(out)]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    (row,) = json.loads(out.read_text())["rows"]
    spec = row["specialisation"]
    pointers = {"qw_ptr", "qden_ptr", "qp_ptr", "c_ptr", "cm_ptr", "cp_ptr", "part_ptr"}
    assert pointers <= set(spec["divisible_by_16"])
    assert {"N", "D", "per_prog", "B_BUCKET"} <= set(spec["divisible_by_16"])
    assert "K" not in spec["divisible_by_16"]
    assert spec["specialised_constants"]["B"] == 1
    assert spec["specialised_constants"]["qsum_ptr"] is None  # a candidate mask is given: no per-query sum
    assert row["KT"] == 64 and row["config_source"].startswith("first after pruning")
