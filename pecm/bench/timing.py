"""Timing primitives and the environment record (device, CPU, versions, git commit, load)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A git checkout of pecm (editable install or PYTHONPATH) has ROOT/.git; an installed package does not, and
# `git rev-parse` there would report whatever repository happens to enclose site-packages.
IN_GIT_CHECKOUT = os.path.exists(os.path.join(ROOT, ".git"))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def summarize(samples_s: List[float]) -> Dict[str, float]:
    """Median and inter-quartile range (seconds) of a list of timings."""
    a = np.asarray(samples_s, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median_s": float(med), "iqr_s": float(q3 - q1), "min_s": float(a.min())}


def time_fn(
    fn: Callable[[], object],
    device: str = "cpu",
    warmup: int = 1,
    repeats: int = 5,
    budget_s: Optional[float] = None,
    min_repeats: int = 3,
) -> Dict[str, object]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` timed calls.

    CPU: ``time.perf_counter`` around each call. CUDA: one pair of CUDA events per call (after a
    synchronize), which is what ``triton.testing.do_bench`` does minus its cache flush.
    ``budget_s``: when the last warm-up call shows that ``repeats`` calls would take longer than this,
    time only ``max(min_repeats, budget_s / t_warmup)`` calls (never more than ``repeats``).
    """
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    t_warm = None
    for _ in range(max(0, warmup)):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        t_warm = time.perf_counter() - t0
    _sync(device)
    if budget_s is not None and t_warm and repeats * t_warm > budget_s:
        repeats = min(repeats, max(min_repeats, int(budget_s / t_warm)))
    samples = []
    if device.startswith("cuda"):
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    out = summarize(samples)
    out["samples_s"] = [float(s) for s in samples]
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    """HEAD of the pecm checkout (+dirty), or "unknown" (an installed package, or no git)."""
    if not IN_GIT_CHECKOUT:
        return "unknown"
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return r.stdout.strip() + ("+dirty" if dirty else "") if r.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
        return str(getattr(m, "__version__", "unknown"))
    except Exception:  # not installed / broken install: record it, never fail the run
        return "not installed"


def cpu_simd() -> Dict[str, object]:
    """The CPU's vector extensions that matter here and the SIMD path `pecm._C` uses."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    try:
        from .. import _C

        level = _C.simd_level()
    except Exception as e:  # not built / stale: recorded, never fatal
        level = f"unavailable ({type(e).__name__})"
    wanted = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16"}
    return {"cpp_simd": level, "cpu_flags": sorted(flags & wanted)}


def environment(device: str) -> Dict[str, object]:
    """What a reader needs to judge a number: hardware, software versions, commit, load."""
    dev_name = cpu_model()
    if device.startswith("cuda") and torch.cuda.is_available():
        dev_name = torch.cuda.get_device_name(torch.device(device))
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = -1.0
    return {
        "device": device,
        "device_name": dev_name,
        "cpu_model": cpu_model(),
        **cpu_simd(),
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("torch", "triton", "numpy", "pecm", "faiss")},
        "git_commit": git_commit(),
        "loadavg_1min_start": float(load1),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
