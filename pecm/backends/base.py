"""The contract every scoring backend implements.

`pecm.ops` validates and *prepares* the user's inputs, then hands every backend the same
canonical, already-folded operands. A backend therefore never normalises, never pools and never
looks at user masks in their raw form; it only computes three dot products per pair and an epilogue.

Canonical operands (all torch tensors on one device, contiguous):

=========  ==============  =========================================================================
name       shape / dtype   meaning
=========  ==============  =========================================================================
``qw``     [B, K*D] f32    ``w_k * mq_k * q̂_k`` flattened: weights and the query mask folded into the
                           unit query prototypes (q̂ = q / max(||q||, eps)).
``qden``   [B, K]   f32    ``w_k * mq_k``: the query side of the confidence denominator.
``qp``     [B, D]   f32    unit pooled query embedding (Eq. 4, or the user's ``q_pooled``).
``c``      [N, K*D] T      unit candidate prototypes, **masked-out prototypes are exactly zero**.
                           T is the storage dtype: float32, float16 or bfloat16.
``cm``     [N, K] T or     candidate mask as 0/1 values in dtype T, or ``None`` = all ones.
           None
``cp``     [N, D]   T      unit pooled candidate embedding (Eq. 4, or the user's ``c_pooled``).
=========  ==============  =========================================================================

Per pair (b, n), accumulated in float32::

    sim   = qp[b] · cp[n]                                   (Eq. 3)
    num   = qw[b] · c[n]            = Σ_k w_k mq_k mc_k s_k  (masked c rows are zero)
    den   = qden[b] · cm[n]         = Σ_k w_k mq_k mc_k      (= Σ_k qden[b, k] when cm is None)
    conf  = num / den  if den > 0 else 0                     (Eq. 6; fully masked pair -> 0)
    score = sim * conf                                       (Eq. 7)

Methods a backend provides (see `TorchBackend` for the reference implementation):

- ``scores(qw, qden, qp, c, cm, cp) -> (sim, conf, score)``: float32 [B, N] each. Backends with
  ``differentiable = True`` must support autograd w.r.t. qw, qden, qp, c and cp.
- ``topk(qw, qden, qp, c, cm, cp, k, by, chunk_size) -> (values f32 [B, k], ids int64 [B, k])``:
  values of the ``by`` quantity ("score" | "sim" | "conf"), sorted descending; when k > N the tail
  is (-inf, -1). ``chunk_size`` is a hint (candidates per block) that may be ``None``.
- ``rerank(qw, qden, qp, c, cm, cp, cand, k, by) -> (values, ids)``: ``cand`` int64 [B, M] indexes
  rows of ``c``; -1 is padding and never returned; ids are rows of ``c``. Ids are already validated
  (-1 <= id < N). Duplicated ids are scored (and may be returned) once per occurrence.

- optional ``prepare_query(q, w, q_mask, q_pooled, eps) -> (qw, qden, qp)``: float32 query operands
  straight from raw q [B, K, D] (same math as `pecm.ops.prepare_query`); `pecm.ops` uses it only for
  non-differentiable backends with float32 accumulation, to skip a dozen small torch ops per call.

``ops`` guarantees: B >= 1, N >= 1, 1 <= k (k may exceed N or M), ``by`` valid.
"""

from __future__ import annotations

from typing import Optional, Protocol, Tuple

import torch

Tensor = torch.Tensor
BY_CHOICES = ("score", "sim", "conf")


class Backend(Protocol):
    name: str
    differentiable: bool

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool: ...

    def scores(
        self, qw: Tensor, qden: Tensor, qp: Tensor, c: Tensor, cm: Optional[Tensor], cp: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor]: ...

    def topk(
        self,
        qw: Tensor,
        qden: Tensor,
        qp: Tensor,
        c: Tensor,
        cm: Optional[Tensor],
        cp: Tensor,
        k: int,
        by: str,
        chunk_size: Optional[int],
    ) -> Tuple[Tensor, Tensor]: ...

    def rerank(
        self,
        qw: Tensor,
        qden: Tensor,
        qp: Tensor,
        c: Tensor,
        cm: Optional[Tensor],
        cp: Tensor,
        cand: Tensor,
        k: int,
        by: str,
    ) -> Tuple[Tensor, Tensor]: ...


def combine(sim: Tensor, num: Tensor, den: Tensor, by: str = "all"):
    """Shared float32 epilogue: conf = num/den (0 where den <= 0), score = sim*conf.

    Returns (sim, conf, score) for by="all", else only the requested quantity.
    """
    safe = torch.where(den > 0, den, torch.ones_like(den))
    conf = torch.where(den > 0, num / safe, torch.zeros_like(num))
    if by == "sim":
        return sim
    if by == "conf":
        return conf
    score = sim * conf
    if by == "score":
        return score
    return sim, conf, score


def pad_topk(values: Tensor, ids: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Pad [B, k'] results (k' <= k) to [B, k] with the FAISS sentinels (-inf, -1)."""
    b, kk = values.shape
    if kk >= k:
        return values[:, :k], ids[:, :k]
    pv = torch.full((b, k - kk), float("-inf"), dtype=values.dtype, device=values.device)
    pi = torch.full((b, k - kk), -1, dtype=torch.int64, device=ids.device)
    return torch.cat([values, pv], 1), torch.cat([ids, pi], 1)


def merge_topk(values: Tensor, ids: Tensor, new_values: Tensor, new_ids: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Exact merge of two sorted-or-not [B, *] candidate lists into the best k (descending)."""
    v = torch.cat([values, new_values], 1)
    i = torch.cat([ids, new_ids], 1)
    kk = min(k, v.shape[1])
    top, pos = torch.topk(v, kk, dim=1, largest=True, sorted=True)
    return top, torch.gather(i, 1, pos)
