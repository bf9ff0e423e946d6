"""Hardware ceilings measured in the same run: memory copy bandwidth and matmul peak (each the
fastest of its repeats: a ceiling is the best the machine did, not its median under contention).

CPU: a large torch (and numpy) copy, reported as read+write bytes per second (the max of the
two), a read-only sum for reference, and the float32 GEMM rate of ``torch.mm`` / NumPy (the max).
CUDA: device-to-device copy and fp16/bf16 matmul peak.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from .timing import time_fn

BEST = "min_s"  # a ceiling is the best the machine did: the fastest repeat, not the median


def memory_bandwidth(device: str = "cpu", mbytes: int = 512, repeats: int = 5) -> Dict[str, float]:
    n = (mbytes << 20) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=1, repeats=repeats)[BEST]
    out = {"copy_torch_GBps": 2 * src.numel() * 4 / t / 1e9}
    tr = time_fn(lambda: src.sum(), device, warmup=1, repeats=repeats)[BEST]
    out["read_sum_GBps"] = src.numel() * 4 / tr / 1e9
    if device == "cpu":
        a = np.ones(n, dtype=np.float32)
        b = np.empty_like(a)
        tn = time_fn(lambda: np.copyto(b, a), device, warmup=1, repeats=repeats)[BEST]
        out["copy_numpy_GBps"] = 2 * a.nbytes / tn / 1e9
    out["copy_GBps"] = max(v for k, v in out.items() if k.startswith("copy_"))
    return out


def matmul_peak(device: str = "cpu", size: int = 2048, repeats: int = 3) -> Dict[str, float]:
    """Best measured GEMM rate: float32 ``torch.mm`` and NumPy ``matmul`` (its own BLAS) on the CPU;
    fp32/fp16/bf16 ``torch.mm`` on CUDA. A BLAS rate, not the theoretical FMA peak: a hand-written
    kernel can exceed it where the BLAS is weak (e.g. MKL on AMD CPUs), so fractions above 100% occur."""
    out = {}
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.float16, torch.bfloat16]
    if device != "cpu":
        size = max(size, 8192)
    for dt in dtypes:
        a = torch.randn(size, size, device=device).to(dt)
        b = torch.randn(size, size, device=device).to(dt)
        t = time_fn(lambda a=a, b=b: torch.mm(a, b), device, warmup=1, repeats=repeats)[BEST]
        out[f"mm_{str(dt).replace('torch.', '')}_GFLOPs"] = 2 * size**3 / t / 1e9
    if device == "cpu":
        an = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
        bn = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
        t = time_fn(lambda: an @ bn, device, warmup=1, repeats=repeats)[BEST]
        out["matmul_numpy_float32_GFLOPs"] = 2 * size**3 / t / 1e9
    out["matmul_GFLOPs"] = max(out.values())
    return out


def measure(device: str = "cpu", quick: bool = False) -> Dict[str, float]:
    """All ceilings; ``quick`` uses small buffers (for tests, not for numbers anyone quotes)."""
    bw = memory_bandwidth(device, mbytes=32 if quick else 512, repeats=3 if quick else 5)
    mm = matmul_peak(device, size=256 if quick else 2048, repeats=2 if quick else 3)
    return {**bw, **mm, "quick": bool(quick)}
