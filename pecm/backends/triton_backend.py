"""Backend "triton": fused Triton kernels (`pecm.kernels`) on `Queries` / `Candidates`.

Runs CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` (the Triton interpreter; slow, for
tests). Storage dtypes float32, float16, bfloat16; accumulation float32. ``scores`` is
differentiable w.r.t. qw, qden, qp, c and cp (Triton backward kernels, see
``kernels/pecm_scores_bwd.py``). Design notes: docs/triton.md.

The kernels live in the repository's top-level ``kernels/`` directory, which ``setup.py`` installs as
the subpackage ``pecm.kernels``. In a source checkout (not installed) this module loads that
directory under the same name ``pecm.kernels``, so both layouts behave identically.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..operands import By, Candidates, Queries, normalize_block
from ..topk import RunningTopK, empty_topk, pad_topk
from .base import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHUNK = 16384  # candidate rows per block when the rows must be normalised first (or k > MAX_KT)


def _load_kernels():
    try:
        return importlib.import_module("pecm.kernels")
    except ModuleNotFoundError as e:
        if e.name not in ("pecm.kernels",):
            raise
    src = Path(__file__).resolve().parents[2] / "kernels" / "__init__.py"
    if not src.is_file():
        raise ImportError("pecm.kernels is not installed and no kernels/ source directory was found")
    spec = importlib.util.spec_from_file_location("pecm.kernels", src, submodule_search_locations=[str(src.parent)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["pecm.kernels"] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop("pecm.kernels", None)
        raise
    return mod


kernels = _load_kernels()
if not kernels.HAS_TRITON:
    raise ImportError(f"triton is not importable ({kernels.IMPORT_ERROR})")


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pad(vals: Tensor, ids: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    return pad_topk(vals, ids, k)


def _mask_store(cs: Candidates, mask: Optional[Tensor]) -> Optional[Tensor]:
    """The kernels read the mask as 0/1 values in the storage dtype (a [n, K] conversion)."""
    return None if mask is None else mask.to(cs.dtype)


def _canon(cs: Candidates, s: int = 0, e: Optional[int] = None):
    """(c [n, K*D], cm [n, K] or None, cp [n, D]) of rows [s, e) as unit operands in the storage dtype.

    Prepared candidates are views; others are normalised (and pooled) here for those rows only.
    """
    e = cs.n if e is None else e
    part = cs if (s, e) == (0, cs.n) else cs.slice(s, e)
    n = e - s
    if part.prepared:
        c, cp = part.prototypes, part.pooled
    else:
        chat, cp = normalize_block(
            part.prototypes, cs.weights, part.mask, part.pooled, cs.normalized, cs.pooled_normalized, torch.float32
        )
        c, cp = chat.to(cs.dtype), cp.to(cs.dtype)
    return c.reshape(n, -1), _mask_store(cs, part.mask), cp


_PICK = {By.SIM: 0, By.CONF: 1, By.SCORE: 2}  # position of the ranked quantity in (sim, conf, score)


class TritonBackend:
    name = "triton"
    differentiable = True

    def __init__(self) -> None:
        if not torch.cuda.is_available() and not _interpret():
            raise RuntimeError("no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU)")

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        if dtype not in SUPPORTED_DTYPES:
            return False
        if device.type == "cuda":
            return True
        return device.type == "cpu" and _interpret()

    def scores(self, qs: Queries, cs: Candidates) -> Tuple[Tensor, Tensor, Tensor]:
        if cs.prepared or cs.n <= CHUNK:
            return kernels.pecm_scores_fwd(qs.qw, qs.qden, qs.qp, *_canon(cs))
        out = [torch.empty((qs.b, cs.n), dtype=torch.float32, device=qs.device) for _ in range(3)]
        for s in range(0, cs.n, CHUNK):
            e = min(cs.n, s + CHUNK)
            for o, t in zip(out, kernels.pecm_scores_fwd(qs.qw, qs.qden, qs.qp, *_canon(cs, s, e))):
                o[:, s:e] = t
        return tuple(out)

    def scores_backward(self, qs: Queries, cs: Candidates, sim, conf, g_sim, g_conf, g_score):
        c, cm, cp = _canon(cs)
        g_qw, g_qden, g_qp, g_c, g_cp = kernels.pecm_scores_backward(
            qs.qw, qs.qden, qs.qp, c, cm, cp, sim, conf, g_sim, g_conf, g_score
        )
        return g_qw, g_qden, g_qp, g_c.view(cs.prototypes.shape), g_cp

    def topk(self, qs: Queries, cs: Candidates, k: int, by: By, chunk_size: Optional[int]) -> Tuple[Tensor, Tensor]:
        if cs.prepared and k <= kernels.MAX_KT:
            return _pad(*kernels.pecm_topk(qs.qw, qs.qden, qs.qp, *_canon(cs), k, int(by), chunk_size), k)
        step = int(chunk_size or CHUNK)
        best = RunningTopK(qs.b, k, qs.device)
        for s in range(0, cs.n, step):
            e = min(cs.n, s + step)
            ops_in = (qs.qw, qs.qden, qs.qp, *_canon(cs, s, e))
            if k <= kernels.MAX_KT:
                vals, ids = kernels.pecm_topk(*ops_in, k, int(by), None)
                best.add(vals, torch.where(ids >= 0, ids + s, ids))
            else:
                best.add(kernels.pecm_scores_fwd(*ops_in)[_PICK[by]], offset=s)
        return best.result()

    def rerank(self, qs: Queries, cs: Candidates, cand: Tensor, k: int, by: By) -> Tuple[Tensor, Tensor]:
        rows = None
        if not cs.prepared:  # normalise the distinct candidate rows only (sorted: row order kept)
            valid = cand >= 0
            rows = torch.unique(cand[valid])
            local = torch.searchsorted(rows, cand.clamp_min(0))
            cand = torch.where(valid, local, torch.full_like(local, -1)).contiguous()
            if rows.numel() == 0:
                return _pad(*empty_topk(qs.b, 0, qs.device), k)
            cs = cs.rows(rows)
        vals, ids = kernels.pecm_rerank(qs.qw, qs.qden, qs.qp, *_canon(cs), cand, k, int(by))
        if rows is not None:
            ids = torch.where(ids >= 0, rows[ids.clamp_min(0)], ids)
        return _pad(vals, ids, k)
