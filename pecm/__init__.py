"""pecm: prototype-enhanced confidence modeling (PECM) for cross-modal medical image-report retrieval.

Fused scoring ops (`pecm.ops`) with torch, C++ and Triton backends, an on-disk archive index,
the PECM model, losses, training, metrics and a CLI. See README.md and DESIGN.md.

``import pecm`` is light (no torch): ``pecm.ops`` and the names re-exported from it (`pecm_scores`,
`pecm_topk`, `pecm_rerank`, `available_backends`) are imported on first use (PEP 562), so ``pecm --help``
and the command line's argument errors do not pay for importing torch.
"""

from ._version import __version__  # noqa: F401  (the number lives in pecm/_version.py)

_FROM_OPS = ("available_backends", "pecm_rerank", "pecm_scores", "pecm_topk")
__all__ = ["__version__", "ops", *_FROM_OPS]


def __getattr__(name: str):
    if name == "ops" or name in _FROM_OPS:
        import importlib

        ops = importlib.import_module(".ops", __name__)  # also binds pecm.ops
        return ops if name == "ops" else getattr(ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
