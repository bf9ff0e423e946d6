"""PECM Triton kernels, installed as ``pecm.kernels`` (the source directory is ``kernels/``).

One op per module: `pecm_scores` (fused forward + autograd), `pecm_scores_bwd` (backward GEMMs),
`pecm_topk` (fused exhaustive top-k), `pecm_rerank` (gather + score + top-k), `pq_topk` (product-quantised
candidates scored from their codes + top-k; `pq_scores` unfused). See docs/triton.md.

Importing this package never fails: without Triton, ``HAS_TRITON`` is False and ``IMPORT_ERROR``
says why; the kernel modules are then not imported.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401

    HAS_TRITON = True
    IMPORT_ERROR = ""
except Exception as e:  # ImportError, or a broken install
    HAS_TRITON = False
    IMPORT_ERROR = f"{type(e).__name__}: {e}"

if HAS_TRITON:
    from .common import MAX_KT  # noqa: F401
    from .pecm_rerank import pecm_rerank  # noqa: F401
    from .pecm_scores import PecmScoresFn, pecm_scores, pecm_scores_fwd  # noqa: F401
    from .pecm_scores_bwd import pecm_scores_backward  # noqa: F401
    from .pecm_topk import pecm_topk  # noqa: F401
    from .pq_topk import pq_scores, pq_topk  # noqa: F401

__all__ = [
    "HAS_TRITON",
    "IMPORT_ERROR",
    "MAX_KT",
    "pecm_scores",
    "pecm_scores_fwd",
    "pecm_scores_backward",
    "PecmScoresFn",
    "pecm_topk",
    "pecm_rerank",
    "pq_topk",
    "pq_scores",
]
