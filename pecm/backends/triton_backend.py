"""Backend "triton": fused Triton kernels (`pecm.kernels`) on `Queries` / `Candidates`.

Runs CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` (the Triton interpreter; slow, for
tests). Storage dtypes float32, float16, bfloat16; accumulation float32. ``scores`` is
differentiable w.r.t. qw, qden, qp, c and cp (Triton backward kernels, see
``kernels/pecm_scores_bwd.py``). The launchers take the `Queries` / `Candidates` as they are: raw
candidates (not prepared) are normalised, and pooled by Eq. 4 when they have no pooled vectors, on
the fly inside the fused kernels, so a one-shot call has no separate normalisation pass. Design
notes: docs/triton.md.

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

from ..operands import By, Candidates, Queries
from ..topk import RunningTopK, pad_topk
from .base import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHUNK = 16384  # candidate rows per fused-scores block of the k > MAX_KT top-k (one [B, CHUNK] f32 tile)


def _load_kernels():
    root = Path(__file__).resolve().parents[2]
    src = root / "kernels" / "__init__.py"
    # A source checkout (setup.py beside pecm/ and kernels/) uses its own kernels/, even when an editable
    # install elsewhere (e.g. another worktree of the repository) maps the name pecm.kernels to its copy.
    checkout = (root / "setup.py").is_file() and src.is_file() and "pecm.kernels" not in sys.modules
    if not checkout:
        try:
            return importlib.import_module("pecm.kernels")
        except ModuleNotFoundError as e:
            if e.name not in ("pecm.kernels",):
                raise
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

    # The kernels take `Queries` / `Candidates` as they are (duck-typed): raw candidates are normalised
    # and pooled on the fly inside the fused pass, so nothing is normalised here.
    def scores(self, qs: Queries, cs: Candidates) -> Tuple[Tensor, Tensor, Tensor]:
        return kernels.pecm_scores_fwd(qs, cs)

    def scores_backward(self, qs: Queries, cs: Candidates, sim, conf, g_sim, g_conf, g_score):
        # always prepared candidates (pecm.library); the backward GEMMs read the mask as 0/1 values
        c = cs.prototypes.reshape(cs.n, -1)
        cm = None if cs.mask is None else cs.mask.to(cs.dtype)
        g_qw, g_qden, g_qp, g_c, g_cp = kernels.pecm_scores_backward(
            qs.qw, qs.qden, qs.qp, c, cm, cs.pooled, sim, conf, g_sim, g_conf, g_score
        )
        return g_qw, g_qden, g_qp, g_c.view(cs.prototypes.shape), g_cp

    def topk(self, qs: Queries, cs: Candidates, k: int, by: By, chunk_size: Optional[int]) -> Tuple[Tensor, Tensor]:
        if k <= kernels.MAX_KT:
            return _pad(*kernels.pecm_topk(qs, cs, k, int(by), chunk_size), k)
        # k > MAX_KT: the fused list would not fit; stream fused-scores chunks (each normalised on the
        # fly by the kernel) through the exact running merge
        step = int(chunk_size or CHUNK)
        best = RunningTopK(qs.b, k, qs.device)
        for s in range(0, cs.n, step):
            e = min(cs.n, s + step)
            best.add(kernels.pecm_scores_fwd(qs, cs.slice(s, e))[_PICK[by]], offset=s)
        return best.result()

    def rerank(self, qs: Queries, cs: Candidates, cand: Tensor, k: int, by: By) -> Tuple[Tensor, Tensor]:
        return _pad(*kernels.pecm_rerank(qs, cs, cand, k, int(by)), k)
