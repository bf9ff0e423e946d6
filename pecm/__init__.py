"""pecm: prototype-enhanced confidence modeling (PECM) for cross-modal medical image-report retrieval.

Fused scoring ops (`pecm.ops`) with torch, C++ and Triton backends, an on-disk archive index,
the PECM model, losses, training, metrics and a CLI. See README.md and DESIGN.md.
"""

__version__ = "0.1.0"

from . import ops  # noqa: E402,F401
from .ops import available_backends, pecm_rerank, pecm_scores, pecm_topk  # noqa: E402,F401
