"""Synthetic benchmark operands and the byte / FLOP model of each op (for the roofline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Workload:
    """User-level operands: unit prototypes (``normalized=True`` layout) and unit pooled vectors."""

    q: torch.Tensor  # [B, K, D] storage dtype
    c: torch.Tensor  # [N, K, D] storage dtype, unit rows
    cp: torch.Tensor  # [N, D] storage dtype, unit
    w: torch.Tensor  # [K] float32 >= 0
    cand: Optional[torch.Tensor]  # [B, M] int64 or None
    topk: int

    @property
    def shape(self) -> Dict[str, int]:
        n, k, d = self.c.shape
        out = {"B": self.q.shape[0], "N": n, "K": k, "D": d}
        if self.cand is not None:
            out["M"] = self.cand.shape[1]
        return out


def make_candidates(n: int, k: int, d: int, dtype="float16", device="cpu", seed: int = 0):
    """(c [N, K, D] unit prototypes, cp [N, D] unit pooled, w [K]) in the storage dtype."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    for name, v in (("N", n), ("K", k), ("D", d)):
        if v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v}")
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(k, generator=g) + 0.1
    c = torch.empty((n, k, d), dtype=dt, device=device)
    cp = torch.empty((n, d), dtype=dt, device=device)
    block = 8192
    for s in range(0, n, block):  # bounded float32 temporaries
        e = min(n, s + block)
        x = F.normalize(torch.randn((e - s, k, d), generator=g), dim=-1)
        c[s:e] = x.to(device=device, dtype=dt)
        cp[s:e] = F.normalize((x * w.view(1, k, 1)).sum(1), dim=-1).to(device=device, dtype=dt)
    return c, cp, w.to(device)


def make_workload(
    b: int,
    n: int,
    k: int,
    d: int,
    m: Optional[int] = None,
    dtype="float16",
    device="cpu",
    topk: int = 10,
    seed=0,
    candidates=None,
) -> Workload:
    """Queries are noisy copies of random candidates (so the top-k is not pure noise); ``candidates``
    reuses a (c, cp, w) triple from `make_candidates` across grid points."""
    if b < 1:
        raise ValueError(f"B: expected an int >= 1, got {b}")
    c, cp, w = candidates if candidates is not None else make_candidates(n, k, d, dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    src = torch.randint(0, n, (b,), generator=g)
    q = (c[src.to(c.device)].float() + 0.5 * torch.randn((b, k, d), generator=g).to(c.device)).to(c.dtype)
    cand = None
    if m is not None:
        if m < 1:
            raise ValueError(f"M: expected an int >= 1, got {m}")
        cand = torch.randint(0, n, (b, m), generator=g).to(c.device)
    return Workload(q=q, c=c, cp=cp, w=w, cand=cand, topk=topk)


def work_model(op: str, shape: Dict[str, int], itemsize: int) -> Dict[str, float]:
    """Bytes that must move from memory and FLOPs that must be done, per call.

    topk / scores: every candidate row (K*D prototype values + D pooled values) is read once;
    2*(K*D + D) FLOPs per pair. scores also writes three float32 [B, N] outputs. rerank: the
    gathered rows B*M*(K*D+D)*itemsize. ``pairs`` is the number of (query, candidate) pairs scored.
    """
    b, n, k, d = shape["B"], shape["N"], shape["K"], shape["D"]
    row = k * d + d
    if op == "rerank":
        m = shape["M"]
        pairs = b * m
        nbytes = b * m * row * itemsize
    else:
        pairs = b * n
        nbytes = n * row * itemsize
        if op == "scores":
            nbytes += 3 * b * n * 4
    return {"pairs": float(pairs), "bytes": float(nbytes), "flops": float(2 * pairs * row)}
