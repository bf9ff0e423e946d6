"""Backend "torch": eager PyTorch on `Queries` / `Candidates` (reference-grade, any device).

Candidates that are not prepared are normalised (and pooled) block by block with
`pecm.operands.normalize_block` right before the block is scored, so no pass over all N rows
precedes the scoring and the temporaries stay bounded by one block: the float32 copy of the block
(chunk * (K*D + D) * 4 bytes) plus three [B, chunk] float32 tiles and the [B, k] running result.
With the default chunk of 8192 rows, K = 26, D = 256 that is ~ 227 MB + 3 * B * 32 KB.

``scores`` on prepared candidates is plain differentiable torch code; `pecm.library` registers its
closed-form backward (``scores_backward``) for the `pecm::scores` custom op.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..operands import By, Candidates, Queries, normalize_block
from ..topk import RunningTopK
from .base import Tensor, combine

DEFAULT_CHUNK = 8192


def _unit_rows(cs: Candidates, c: Tensor, mask: Optional[Tensor], pooled: Optional[Tensor], acc: torch.dtype):
    """(ĉ [n, K*D], ĉp [n, D]) in ``acc`` for candidate rows given as tensors of ``cs``'s layout."""
    n = c.shape[0]
    if cs.prepared:
        return c.reshape(n, -1).to(acc), pooled.to(acc)
    chat, cp = normalize_block(c, cs.weights, mask, pooled, cs.normalized, cs.pooled_normalized, acc)
    return chat.reshape(n, -1), cp


def _parts(qs: Queries, cs: Candidates, s: int, e: int):
    """sim, num, den float32 [B, e - s] for candidate rows [s, e)."""
    acc = qs.qw.dtype
    mask = None if cs.mask is None else cs.mask[s:e]
    chat, cp = _unit_rows(cs, cs.prototypes[s:e], mask, None if cs.pooled is None else cs.pooled[s:e], acc)
    sim = qs.qp @ cp.T
    num = qs.qw @ chat.T
    if mask is None:
        den = qs.qden.sum(1, keepdim=True).expand_as(num)
    else:
        den = qs.qden @ mask.to(acc).T
    return sim, num, den


class TorchBackend:
    name = "torch"
    differentiable = True

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return True

    def scores(self, qs: Queries, cs: Candidates) -> Tuple[Tensor, Tensor, Tensor]:
        n = cs.n
        grad = torch.is_grad_enabled() and (qs.requires_grad or cs.requires_grad)
        if grad or n <= DEFAULT_CHUNK:
            return combine(*_parts(qs, cs, 0, n))
        out = [torch.empty((qs.b, n), dtype=qs.qw.dtype, device=qs.device) for _ in range(3)]
        for s in range(0, n, DEFAULT_CHUNK):
            e = min(n, s + DEFAULT_CHUNK)
            for o, t in zip(out, combine(*_parts(qs, cs, s, e))):
                o[:, s:e] = t
        return tuple(out)

    def scores_backward(self, qs: Queries, cs: Candidates, sim, conf, g_sim, g_conf, g_score):
        """Closed-form gradients of (sim, conf, score) w.r.t. (qw, qden, qp, prototypes, pooled).

        d_sim = g_sim + g_score conf, d_conf = g_conf + g_score sim, d_num = d_conf / den,
        d_den = -d_conf conf / den (0 where den <= 0); then five GEMMs (see kernels/pecm_scores_bwd.py).
        """
        acc = qs.qw.dtype
        n, k, d = cs.prototypes.shape
        c = cs.prototypes.reshape(n, k * d).to(acc)
        cp = cs.pooled.to(acc)
        cm = None if cs.mask is None else cs.mask.to(acc)
        den = qs.qden.sum(1, keepdim=True).expand_as(sim) if cm is None else qs.qden @ cm.T
        d_sim = g_sim + g_score * conf
        d_conf = g_conf + g_score * sim
        pos = den > 0
        safe = torch.where(pos, den, torch.ones_like(den))
        d_num = torch.where(pos, d_conf / safe, torch.zeros_like(d_conf))
        d_den = torch.where(pos, -d_conf * conf / safe, torch.zeros_like(d_conf))
        g_qw = d_num @ c
        g_qp = d_sim @ cp
        g_qden = d_den.sum(1, keepdim=True).expand_as(qs.qden) if cm is None else d_den @ cm
        g_c = (d_num.T @ qs.qw).reshape(n, k, d).to(cs.prototypes.dtype)
        g_cp = (d_sim.T @ qs.qp).to(cs.pooled.dtype)
        return g_qw, g_qden.contiguous(), g_qp, g_c, g_cp

    def topk(self, qs: Queries, cs: Candidates, k: int, by: By, chunk_size: Optional[int]) -> Tuple[Tensor, Tensor]:
        step = int(chunk_size or DEFAULT_CHUNK)
        best = RunningTopK(qs.b, k, qs.device, qs.qw.dtype)
        with torch.no_grad():
            for s in range(0, cs.n, step):
                e = min(cs.n, s + step)
                best.add(combine(*_parts(qs, cs, s, e), by=by), offset=s)
        return best.result()

    def rerank(self, qs: Queries, cs: Candidates, cand: Tensor, k: int, by: By) -> Tuple[Tensor, Tensor]:
        b, m = cand.shape
        acc = qs.qw.dtype
        # Gather at most ~DEFAULT_CHUNK candidate rows at a time (bounded memory, like topk).
        step = max(1, DEFAULT_CHUNK // max(1, b))
        best = RunningTopK(b, k, qs.device, acc)
        with torch.no_grad():
            for s in range(0, m, step):
                blk = cand[:, s : s + step]
                mb = blk.shape[1]
                valid = blk >= 0
                safe = torch.where(valid, blk, torch.zeros_like(blk)).reshape(-1)
                mask = None if cs.mask is None else cs.mask[safe]
                pooled = None if cs.pooled is None else cs.pooled[safe]
                chat, cp = _unit_rows(cs, cs.prototypes[safe], mask, pooled, acc)
                sim = torch.einsum("bd,bmd->bm", qs.qp, cp.view(b, mb, -1))
                num = torch.einsum("bx,bmx->bm", qs.qw, chat.view(b, mb, -1))
                if mask is None:
                    den = qs.qden.sum(1, keepdim=True).expand_as(num)
                else:
                    den = torch.einsum("bk,bmk->bm", qs.qden, mask.view(b, mb, -1).to(acc))
                val = combine(sim, num, den, by=by)
                val = torch.where(valid, val, torch.full_like(val, float("-inf")))
                best.add(val, ids=torch.where(valid, blk, torch.full_like(blk, -1)))
        return best.result()
