"""Backend "triton": fused Triton kernels (`pecm.kernels`) on the canonical operands of `base.py`.

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

from .base import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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

    def scores(self, qw, qden, qp, c, cm, cp) -> Tuple[Tensor, Tensor, Tensor]:
        return kernels.pecm_scores(qw, qden, qp, c, cm, cp)

    def topk(self, qw, qden, qp, c, cm, cp, k: int, by: str, chunk_size: Optional[int]) -> Tuple[Tensor, Tensor]:
        return kernels.pecm_topk(qw, qden, qp, c, cm, cp, k, by, chunk_size)

    def rerank(self, qw, qden, qp, c, cm, cp, cand, k: int, by: str) -> Tuple[Tensor, Tensor]:
        return kernels.pecm_rerank(qw, qden, qp, c, cm, cp, cand, k, by)
