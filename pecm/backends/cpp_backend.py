"""Backend "cpp": the compiled CPU extension `pecm._C` (pybind11, OpenMP, run-time SIMD dispatch).

The canonical operands of `pecm.backends.base` are handed to C++ as zero-copy numpy views of the
contiguous CPU tensors (bfloat16/float16 as their 16-bit patterns plus a dtype flag); results come
back as numpy arrays wrapped zero-copy into torch tensors. Not differentiable: `pecm.ops` refuses
it when gradients are required. See docs/cpp.md.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from .base import Tensor

try:
    from .. import _C
except ImportError as e:  # the registry reports "cpp" as unavailable with this message
    raise ImportError(
        "pecm._C (the C++ CPU backend) is not built; build it with `pip install -e .` "
        f"or `python setup.py build_ext --inplace` from the repository root ({e})"
    ) from e

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _np(t: Optional[Tensor], storage: torch.dtype) -> Optional[np.ndarray]:
    """Zero-copy numpy view of a contiguous CPU tensor in the storage dtype (16-bit types as int16 bits).

    Already-canonical operands (the usual case) take no torch op but the view: per-call overhead
    matters for small calls such as one re-rank query.
    """
    if t is None:
        return None
    if t.requires_grad:
        t = t.detach()
    if t.dtype != storage:
        t = t.to(storage)
    if not t.is_contiguous():
        t = t.contiguous()
    if storage in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).numpy()
    return t.numpy()


def _q(t: Tensor) -> np.ndarray:
    return _np(t, torch.float32)


class CppBackend:
    name = "cpp"
    differentiable = False

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return torch.device(device).type == "cpu" and dtype in _DTYPES

    def _args(self, qw, qden, qp, c, cm, cp):
        if c.dtype not in _DTYPES:
            raise TypeError(f"c: dtype {c.dtype} is not supported by backend 'cpp'; expected float32/float16/bfloat16")
        st = c.dtype
        return (_q(qw), _q(qden), _q(qp), _np(c, st), _np(cm, st), _np(cp, st), _DTYPES[st])

    def prepare_query(self, q, w, q_mask, q_pooled, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
        """(qw, qden, qp) of `pecm.ops.prepare_query` in one C++ call (float32; no gradients).

        A one-query call otherwise spends ~0.15 ms in a dozen small torch ops (measured on the
        2-core CI CPU), ~10% of a 1000-candidate re-rank.
        """
        st = q.dtype if q.dtype in _DTYPES else torch.float32
        qm = None if q_mask is None else _np(q_mask, torch.bool)
        qp = None if q_pooled is None else _q(q_pooled)
        qw, qden, qpool = _C.prepare_query(_np(q, st), _DTYPES[st], _q(w), qm, qp, float(eps))
        return torch.from_numpy(qw), torch.from_numpy(qden), torch.from_numpy(qpool)

    def scores(self, qw, qden, qp, c, cm, cp) -> Tuple[Tensor, Tensor, Tensor]:
        sim, conf, score = _C.scores(*self._args(qw, qden, qp, c, cm, cp))
        return torch.from_numpy(sim), torch.from_numpy(conf), torch.from_numpy(score)

    def topk(self, qw, qden, qp, c, cm, cp, k, by, chunk_size) -> Tuple[Tensor, Tensor]:
        # chunk_size is a hint only: the kernel blocks candidates to fit the caches itself.
        vals, ids = _C.topk(*self._args(qw, qden, qp, c, cm, cp), int(k), by)
        return torch.from_numpy(vals), torch.from_numpy(ids)

    def rerank(self, qw, qden, qp, c, cm, cp, cand, k, by) -> Tuple[Tensor, Tensor]:
        cand_np = _np(cand, torch.int64)
        vals, ids = _C.rerank(*self._args(qw, qden, qp, c, cm, cp), cand_np, int(k), by)
        return torch.from_numpy(vals), torch.from_numpy(ids)


def simd_level() -> str:
    """The SIMD path `pecm._C` uses: 'scalar', 'avx2' or 'avx512'."""
    return _C.simd_level()


def set_simd(level: str) -> None:
    """Force a SIMD path ('scalar' | 'avx2' | 'avx512'; must be supported by this CPU)."""
    _C.set_simd(level)
