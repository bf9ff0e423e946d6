"""The scoring ops as torch custom ops (`torch.library`): ``pecm::scores``, ``pecm::scores_backward``,
``pecm::topk``, ``pecm::rerank``.

Each op takes the flat tensors of a `Queries` (qw, qden, qp) and a `Candidates` (prototypes,
weights, mask, pooled, ``flags`` = normalized | pooled_normalized << 1) plus the backend's name, and
its implementation hands the rebuilt operand types to that backend: the pybind11 kernels (cpp), the
Triton kernels (triton) or eager torch. Fake implementations give torch.compile the output shapes, so
``torch.compile(fullgraph=True)`` of code that calls `pecm.ops` traces through them without a graph
break; ``pecm::scores`` has autograd (`register_autograd`): its backward is the ``pecm::scores_backward``
op, which the torch and triton backends implement in closed form (gradients w.r.t. qw, qden, qp,
the prototypes and the pooled vectors; the weights and mask reach them through the differentiable
torch preparation in `pecm.ops`, which therefore always hands this op prepared candidates when
gradients are needed).

The implementations also perform the one data-dependent check that must hold even under
torch.compile: candidate ids of ``pecm::rerank`` in [-1, N).

In eager mode `pecm.ops` calls the implementations of ``topk`` / ``rerank`` directly (``*_impl``):
they are the same functions, without the dispatcher's per-call overhead.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .backends import get_backend_by_name
from .operands import By, Candidates, Queries, assert_async, on_device

Tensor = torch.Tensor

__all__ = ["scores", "topk", "rerank", "topk_impl", "rerank_impl"]


def _qs(qw: Tensor, qden: Tensor, qp: Tensor, w: Optional[Tensor]) -> Queries:
    return Queries.trusted(qw, qden, qp, w)


def _cs(c: Tensor, w: Tensor, c_mask: Optional[Tensor], c_pooled: Optional[Tensor], c_flags: int) -> Candidates:
    return Candidates.trusted(c, w, c_mask, c_pooled, c_flags)


def check_candidate_ids(cand: Tensor, n: int, exact: bool = False) -> None:
    """Candidate ids must lie in [-1, N) (-1 = padding): a ValueError naming the first bad one.

    Device tensors (`operands.on_device`) are checked exactly only with ``exact=True`` (``check=True`` of
    the ops: one host sync); otherwise the check is queued on the device (`operands.assert_async`, no
    host sync) and the kernels never read an out-of-range row whatever the check does.
    """
    if not cand.numel():
        return
    if on_device(cand) and not exact:
        assert_async((cand >= -1) & (cand < n), f"candidates: ids must be in [-1, N={n}) (-1 = padding)")
        return
    lo, hi = (int(x) for x in torch.aminmax(cand))
    if lo < -1 or hi >= n:
        bad = lo if lo < -1 else hi
        raise ValueError(f"candidates: ids must be in [-1, N={n}) (-1 = padding), got {bad}")


# ----------------------------------------------------------------------------------------------
# pecm::scores (+ autograd) and pecm::scores_backward
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("pecm::scores", mutates_args=())
def scores(
    qw: Tensor,
    qden: Tensor,
    qp: Tensor,
    c: Tensor,
    w: Tensor,
    c_mask: Optional[Tensor],
    c_pooled: Optional[Tensor],
    c_flags: int,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(sim, conf, score) [B, N] of prepared queries against candidates (see `pecm.backends.base`)."""
    sim, conf, score = get_backend_by_name(backend).scores(_qs(qw, qden, qp, w), _cs(c, w, c_mask, c_pooled, c_flags))
    return sim.contiguous(), conf.contiguous(), score.contiguous()


@scores.register_fake
def _scores_fake(qw, qden, qp, c, w, c_mask, c_pooled, c_flags, backend):
    out = qw.new_empty((qw.shape[0], c.shape[0]))
    return out, torch.empty_like(out), torch.empty_like(out)


@torch.library.custom_op("pecm::scores_backward", mutates_args=())
def scores_backward(
    g_sim: Tensor,
    g_conf: Tensor,
    g_score: Tensor,
    qw: Tensor,
    qden: Tensor,
    qp: Tensor,
    c: Tensor,
    c_mask: Optional[Tensor],
    c_pooled: Tensor,
    sim: Tensor,
    conf: Tensor,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients w.r.t. (qw, qden, qp, c, c_pooled) of `scores` on prepared candidates."""
    be = get_backend_by_name(backend)
    qs = _qs(qw, qden, qp, None)
    cs = _cs(c, None, c_mask, c_pooled, 3)
    grads = be.scores_backward(qs, cs, sim, conf, g_sim, g_conf, g_score)
    return tuple(g.contiguous().clone() if _aliases(g, (qw, qden, qp, c, c_pooled)) else g.contiguous() for g in grads)


def _aliases(t: Tensor, others) -> bool:
    return any(o is not None and t.untyped_storage().data_ptr() == o.untyped_storage().data_ptr() for o in others)


@scores_backward.register_fake
def _scores_backward_fake(g_sim, g_conf, g_score, qw, qden, qp, c, c_mask, c_pooled, sim, conf, backend):
    return (
        torch.empty_like(qw),
        torch.empty_like(qden),
        torch.empty_like(qp),
        torch.empty_like(c),
        torch.empty_like(c_pooled),
    )


def _scores_setup(ctx, inputs, output) -> None:
    qw, qden, qp, c, w, c_mask, c_pooled, c_flags, backend = inputs
    sim, conf, _ = output
    ctx.save_for_backward(qw, qden, qp, c, c_mask, c_pooled, sim, conf)
    ctx.backend, ctx.flags = backend, c_flags


def _scores_grad(ctx, g_sim, g_conf, g_score):
    qw, qden, qp, c, c_mask, c_pooled, sim, conf = ctx.saved_tensors
    if ctx.flags != 3 or c_pooled is None:
        raise RuntimeError("pecm::scores: gradients need prepared candidates (pecm.ops prepares them; call it instead)")
    zeros = lambda g: torch.zeros_like(sim) if g is None else g  # noqa: E731
    g_qw, g_qden, g_qp, g_c, g_cp = scores_backward(
        zeros(g_sim), zeros(g_conf), zeros(g_score), qw, qden, qp, c, c_mask, c_pooled, sim, conf, ctx.backend
    )
    return g_qw, g_qden, g_qp, g_c, None, None, g_cp, None, None


scores.register_autograd(_scores_grad, setup_context=_scores_setup)


# ----------------------------------------------------------------------------------------------
# pecm::topk and pecm::rerank (no gradients)
# ----------------------------------------------------------------------------------------------
def topk_impl(qs: Queries, cs: Candidates, k: int, by: By, chunk_size: Optional[int], backend: str):
    vals, ids = get_backend_by_name(backend).topk(qs, cs, k, by, chunk_size)
    return vals.contiguous(), ids.contiguous()


def rerank_impl(qs: Queries, cs: Candidates, cand: Tensor, k: int, by: By, backend: str, check: bool = False):
    check_candidate_ids(cand, cs.n, exact=check)
    vals, ids = get_backend_by_name(backend).rerank(qs, cs, cand, k, by)
    return vals.contiguous(), ids.contiguous()


@torch.library.custom_op("pecm::topk", mutates_args=())
def topk(
    qw: Tensor,
    qden: Tensor,
    qp: Tensor,
    c: Tensor,
    w: Tensor,
    c_mask: Optional[Tensor],
    c_pooled: Optional[Tensor],
    c_flags: int,
    k: int,
    by: int,
    chunk_size: int,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """Exhaustive fused top-k (values float32 [B, k], ids int64 [B, k]); chunk_size 0 = the backend's."""
    qs, cs = _qs(qw, qden, qp, w), _cs(c, w, c_mask, c_pooled, c_flags)
    return topk_impl(qs, cs, k, By(by), chunk_size or None, backend)


@topk.register_fake
def _topk_fake(qw, qden, qp, c, w, c_mask, c_pooled, c_flags, k, by, chunk_size, backend):
    b = qw.shape[0]
    return qw.new_empty((b, k), dtype=torch.float32), qw.new_empty((b, k), dtype=torch.int64)


@torch.library.custom_op("pecm::rerank", mutates_args=())
def rerank(
    qw: Tensor,
    qden: Tensor,
    qp: Tensor,
    c: Tensor,
    w: Tensor,
    c_mask: Optional[Tensor],
    c_pooled: Optional[Tensor],
    c_flags: int,
    cand: Tensor,
    k: int,
    by: int,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """Best k of each query's candidate rows cand [B, M] (-1 = padding)."""
    qs, cs = _qs(qw, qden, qp, w), _cs(c, w, c_mask, c_pooled, c_flags)
    return rerank_impl(qs, cs, cand, k, By(by), backend)


@rerank.register_fake
def _rerank_fake(qw, qden, qp, c, w, c_mask, c_pooled, c_flags, cand, k, by, backend):
    b = qw.shape[0]
    return qw.new_empty((b, k), dtype=torch.float32), qw.new_empty((b, k), dtype=torch.int64)


def operand_args(qs: Queries, cs: Candidates) -> List:
    """The flat custom-op arguments of a (Queries, Candidates) pair, in schema order."""
    return [qs.qw, qs.qden, qs.qp, cs.prototypes, cs.weights, cs.mask, cs.pooled, cs.flags]
