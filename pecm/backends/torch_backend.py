"""Backend "torch": eager PyTorch on the canonical operands (see `pecm.backends.base`).

Exhaustive top-k streams the candidates in chunks of ``chunk_size`` rows. Peak extra memory is
bounded by one chunk: the float32 upcast of the chunk (chunk * (K*D + D + K) * 4 bytes, only when
the storage dtype is not float32) plus three [B, chunk] float32 score tiles and the [B, k] running
result. With the default chunk of 8192 rows, K = 26, D = 256 that is ~ 227 MB + 3 * B * 32 KB.

`scores` is plain differentiable torch code: autograd flows to qw, qden, qp, c and cp, which
`pecm.ops` produced from q, c, w and the pooled vectors with differentiable torch ops.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .base import Tensor, combine, merge_topk, pad_topk

DEFAULT_CHUNK = 8192


def _parts(qw, qden, qp, c, cm, cp):
    """sim, num, den for every (b, n) of the given candidate block, float32 [B, n]."""
    c32, cp32 = c.to(qw.dtype), cp.to(qw.dtype)
    sim = qp @ cp32.T
    num = qw @ c32.T
    if cm is None:
        den = qden.sum(1, keepdim=True).expand_as(num)
    else:
        den = qden @ cm.to(qw.dtype).T
    return sim, num, den


class TorchBackend:
    name = "torch"
    differentiable = True

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return True

    def scores(self, qw, qden, qp, c, cm, cp) -> Tuple[Tensor, Tensor, Tensor]:
        return combine(*_parts(qw, qden, qp, c, cm, cp))

    def topk(self, qw, qden, qp, c, cm, cp, k, by, chunk_size) -> Tuple[Tensor, Tensor]:
        n = c.shape[0]
        b = qw.shape[0]
        step = int(chunk_size or DEFAULT_CHUNK)
        vals = torch.empty((b, 0), dtype=qw.dtype, device=qw.device)
        ids = torch.empty((b, 0), dtype=torch.int64, device=qw.device)
        with torch.no_grad():
            for s in range(0, n, step):
                e = min(n, s + step)
                tile = combine(*_parts(qw, qden, qp, c[s:e], None if cm is None else cm[s:e], cp[s:e]), by=by)
                kk = min(k, e - s)
                tv, ti = torch.topk(tile, kk, dim=1, largest=True, sorted=True)
                vals, ids = merge_topk(vals, ids, tv, ti + s, k)
        return pad_topk(vals, ids, k)

    def rerank(self, qw, qden, qp, c, cm, cp, cand, k, by) -> Tuple[Tensor, Tensor]:
        b, m = cand.shape
        # Gather at most ~DEFAULT_CHUNK candidate rows at a time (bounded memory, like topk).
        step = max(1, DEFAULT_CHUNK // max(1, b))
        vals = torch.empty((b, 0), dtype=qw.dtype, device=qw.device)
        ids = torch.empty((b, 0), dtype=torch.int64, device=qw.device)
        with torch.no_grad():
            for s in range(0, m, step):
                blk = cand[:, s : s + step]
                valid = blk >= 0
                safe = torch.where(valid, blk, torch.zeros_like(blk))
                sim = torch.einsum("bd,bmd->bm", qp, cp[safe].to(qw.dtype))
                num = torch.einsum("bx,bmx->bm", qw, c[safe].to(qw.dtype))
                if cm is None:
                    den = qden.sum(1, keepdim=True).expand_as(num)
                else:
                    den = torch.einsum("bk,bmk->bm", qden, cm[safe].to(qw.dtype))
                val = combine(sim, num, den, by=by)
                val = torch.where(valid, val, torch.full_like(val, float("-inf")))
                vals, ids = merge_topk(vals, ids, val, torch.where(valid, blk, torch.full_like(blk, -1)), k)
        return pad_topk(vals, ids, k)
