"""The contract every scoring backend implements: it consumes `Queries` and `Candidates`.

`pecm.ops` validates the user's inputs once, folds the query side into a `pecm.operands.Queries`
(qw [B, K*D] = w_k mq_k q̂_k, qden [B, K] = w_k mq_k, qp [B, D] unit pooled query, float32) and
wraps the candidate side as a `pecm.operands.Candidates` (prototypes [N, K, D] in the storage dtype,
bool mask or None, pooled vectors or None, weights, and the promises ``normalized`` /
``pooled_normalized``). Backends never validate again.

Per pair (b, n), accumulated in float32, with ĉ the unit candidate prototypes (masked-out ones
zero) and ĉp the unit pooled candidate vector (Eq. 4 with the weights and mask when absent)::

    sim   = qp[b] · ĉp[n]                                     (Eq. 3)
    num   = qw[b] · ĉ[n]            = Σ_k w_k mq_k mc_k s_k    (Eq. 1 folded)
    den   = qden[b] · mc[n]         = Σ_k w_k mq_k mc_k        (= Σ_k qden[b, k] without a mask)
    conf  = num / den  if den > 0 else 0                       (Eq. 6; fully masked pair -> 0)
    score = sim * conf                                         (Eq. 7)

A prepared `Candidates` (``.prepared``) holds ĉ and ĉp already. Otherwise a backend computes them
on the fly, block by block, in the same read of the rows it scores: no pass over all N rows first.

Methods (``by`` is a `pecm.operands.By`):

- ``scores(qs, cs) -> (sim, conf, score)``: float32 [B, N] each. A backend with
  ``differentiable = True`` also provides ``scores_backward`` (see `pecm.library`), called only
  with prepared candidates.
- ``topk(qs, cs, k, by, chunk_size) -> (values f32 [B, k], ids int64 [B, k])``: sorted descending;
  when k > N the tail is (-inf, -1). ``chunk_size`` is a hint (candidates per block) or ``None``.
- ``rerank(qs, cs, cand, k, by) -> (values, ids)``: ``cand`` int64 [B, M] rows of ``cs``
  (-1 = padding, never returned); ids already checked (-1 <= id < N); duplicates are scored once
  per occurrence.
- optional ``prepare_queries(q, w, q_mask, q_pooled, eps) -> (qw, qden, qp)``: the float32 query
  operands from raw q [B, K, D] in one call (same math as `pecm.operands.fold_queries`).

The ops layer guarantees B >= 1, N >= 1, k >= 1 (k may exceed N or M).
"""

from __future__ import annotations

from typing import Optional, Protocol, Tuple

import torch

from ..operands import BY_CHOICES, By, Candidates, Queries  # noqa: F401

Tensor = torch.Tensor


class Backend(Protocol):
    name: str
    differentiable: bool

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool: ...

    def scores(self, qs: Queries, cs: Candidates) -> Tuple[Tensor, Tensor, Tensor]: ...

    def topk(self, qs: Queries, cs: Candidates, k: int, by: By, chunk_size: Optional[int]) -> Tuple[Tensor, Tensor]: ...

    def rerank(self, qs: Queries, cs: Candidates, cand: Tensor, k: int, by: By) -> Tuple[Tensor, Tensor]: ...


def combine(sim: Tensor, num: Tensor, den: Tensor, by: Optional[By] = None):
    """Shared epilogue: conf = num/den (0 where den <= 0), score = sim*conf.

    Returns (sim, conf, score) when ``by`` is None, else only the ranked quantity.
    """
    safe = torch.where(den > 0, den, torch.ones_like(den))
    conf = torch.where(den > 0, num / safe, torch.zeros_like(num))
    if by == By.SIM:
        return sim
    if by == By.CONF:
        return conf
    score = sim * conf
    if by == By.SCORE:
        return score
    return sim, conf, score
