"""Backend "cpp": the compiled CPU extension `pecm._C` (pybind11, OpenMP, run-time SIMD dispatch).

`Queries` and `Candidates` are handed to C++ as `_C.Queries` / `_C.Candidates`, built from zero-copy
numpy views of the contiguous CPU tensors (bfloat16/float16 as their 16-bit patterns plus a dtype
flag, the mask as bytes); results come back as numpy arrays wrapped zero-copy into torch tensors.
A `Candidates` keeps its `_C.Candidates` in its ``_cache``, so prepared candidates reused across
calls are converted once. Raw candidates are normalised (and pooled) on the fly by the tile
kernels. Not differentiable: `pecm.ops` never picks it when gradients are required. See docs/cpp.md.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from ..operands import EPS, By, Candidates, Queries
from .base import Tensor

try:
    from .. import _C
except ImportError as e:  # the registry reports "cpp" as unavailable with this message
    raise ImportError(
        "pecm._C (the C++ CPU backend) is not built; build it with `pip install -e .` "
        f"or `python setup.py build_ext --inplace` from the repository root ({e})"
    ) from e


def _check_version() -> None:
    from .. import __version__

    built = getattr(_C, "__version__", None)
    if built != __version__:
        raise ImportError(
            f"pecm._C was built for pecm {built!r} but the package is {__version__!r} (a stale extension): "
            "rebuild it with `make build` or `pip install -e .`"
        )


_check_version()

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_BY = {b: _C.By(int(b)) for b in By}


def _np(t: Optional[Tensor]) -> Optional[np.ndarray]:
    """Zero-copy numpy view of a contiguous CPU tensor (16-bit float types as int16 bits)."""
    if t is None:
        return None
    if t.requires_grad:
        t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).numpy()
    return t.numpy()


def _queries(qs: Queries):
    h = qs._cache.get("cpp")
    if h is None:
        h = _C.Queries(_np(qs.qw.float()), _np(qs.qden.float()), _np(qs.qp.float()))
        qs._cache["cpp"] = h
    return h


def _candidates(cs: Candidates):
    h = cs._cache.get("cpp")
    if h is None:
        if cs.dtype not in _DTYPES:
            raise TypeError(f"c: dtype {cs.dtype} is not supported by backend 'cpp'; expected float32/float16/bfloat16")
        h = _C.Candidates(
            _np(cs.prototypes),
            _DTYPES[cs.dtype],
            _np(cs.weights.float()),
            _np(cs.mask),
            _np(cs.pooled),
            cs.normalized,
            cs.pooled_normalized,
            EPS,
        )
        cs._cache["cpp"] = h
    return h


class CppBackend:
    name = "cpp"
    differentiable = False

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return torch.device(device).type == "cpu" and dtype in _DTYPES

    def prepare_queries(self, q, w, q_mask, q_pooled, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
        """(qw, qden, qp) of `pecm.operands.fold_queries` in one C++ call (float32; no gradients).

        A one-query call otherwise spends ~0.15 ms in a dozen small torch ops (measured on the
        2-core CI CPU), ~10% of a 1000-candidate re-rank.
        """
        st = q.dtype if q.dtype in _DTYPES else torch.float32
        if q.dtype != st:
            q = q.to(st)
        qm = None if q_mask is None else _np(q_mask)
        qp = None if q_pooled is None else _np(q_pooled.float())
        qw, qden, qpool = _C.prepare_query(_np(q), _DTYPES[st], _np(w.float()), qm, qp, float(eps))
        return torch.from_numpy(qw), torch.from_numpy(qden), torch.from_numpy(qpool)

    def prepare_candidates(self, cs: Candidates) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
        """(unit prototypes, unit pooled float32 or None) of raw float16 candidates in one C++ pass
        (`_C.encode_items`, the index's item encoder; no gradients), or None for other inputs.

        The pooled vectors are computed only when cs has none (given ones are left to the caller).
        """
        if cs.dtype != torch.float16 or cs.normalized or cs.prototypes.device.type != "cpu":
            return None
        x = cs.prototypes.detach().contiguous()
        n, _, d = x.shape
        unit = torch.empty_like(x)  # torch's allocator: large buffers fault in faster than numpy's
        pooled = torch.empty((n, d), dtype=torch.float32) if cs.pooled is None else None
        mask = None if cs.mask is None else _np(cs.mask)
        ok = _C.encode_items(x.numpy(), _np(cs.weights.float()), mask, unit.numpy(), _np(pooled), EPS)
        if not ok:
            raise ValueError("c: a prototype's norm is not finite (it holds NaN or inf values)")
        return unit, pooled

    def scores(self, qs: Queries, cs: Candidates) -> Tuple[Tensor, Tensor, Tensor]:
        sim, conf, score = _C.scores(_queries(qs), _candidates(cs))
        return torch.from_numpy(sim), torch.from_numpy(conf), torch.from_numpy(score)

    def topk(self, qs: Queries, cs: Candidates, k: int, by: By, chunk_size: Optional[int]) -> Tuple[Tensor, Tensor]:
        # chunk_size is a hint only: the kernel blocks candidates to fit the caches itself.
        vals, ids = _C.topk(_queries(qs), _candidates(cs), int(k), _BY[by])
        return torch.from_numpy(vals), torch.from_numpy(ids)

    def rerank(self, qs: Queries, cs: Candidates, cand: Tensor, k: int, by: By) -> Tuple[Tensor, Tensor]:
        vals, ids = _C.rerank(_queries(qs), _candidates(cs), _np(cand), int(k), _BY[by])
        return torch.from_numpy(vals), torch.from_numpy(ids)


def simd_level() -> str:
    """The SIMD path `pecm._C` uses: 'scalar', 'avx2' or 'avx512'."""
    return _C.simd_level()


def set_simd(level: str) -> None:
    """Force a SIMD path ('scalar' | 'avx2' | 'avx512'; must be supported by this CPU)."""
    _C.set_simd(level)
