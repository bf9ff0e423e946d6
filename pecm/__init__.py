"""pecm: prototype-enhanced confidence modeling (PECM) for cross-modal medical image-report retrieval.

Fused scoring ops (`pecm.ops`) with torch, C++ and Triton backends, an on-disk archive index,
the PECM model, losses, training, metrics and a CLI. See README.md and DESIGN.md.
"""

from . import ops  # noqa: E402,F401
from ._version import __version__  # noqa: F401  (the number lives in pecm/_version.py)
from .ops import available_backends, pecm_rerank, pecm_scores, pecm_topk  # noqa: E402,F401
