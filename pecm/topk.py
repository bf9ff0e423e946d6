"""The one streamed "score a block -> top-k -> exact merge" helper, and the FAISS result sentinels.

Every caller that scores candidates block by block uses `RunningTopK`: the torch backend (exhaustive
top-k and re-rank), the Triton backend's k > 1024 path, and the archive index (exhaustive chunks and
the pooled first stage). A block is reduced to its best ``k`` first (``torch.topk``), then merged
with the running best ``k`` (another ``torch.topk`` over at most ``2k`` columns), so memory is one
block plus ``O(B k)`` and the result is exact: every candidate outside the final top-k is beaten by
k others. Ties may come in any order (DESIGN §2). Entries with value -inf are padding: their ids come
back as -1, and results shorter than k are padded with (-inf, -1).

NaN values (non-finite inputs scored with ``check=False``) are never selected: ``add`` turns them into
-inf, so they rank below every real value and come back, if at all, as padding (-inf, -1). The C++
and Triton top-k do the same (docs/cpp.md, "Numerics").
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

Tensor = torch.Tensor

__all__ = ["RunningTopK", "empty_topk", "pad_topk"]


def empty_topk(b: int, k: int, device=None) -> Tuple[Tensor, Tensor]:
    """(-inf float32 [B, k], -1 int64 [B, k])."""
    return (
        torch.full((b, k), float("-inf"), dtype=torch.float32, device=device),
        torch.full((b, k), -1, dtype=torch.int64, device=device),
    )


def pad_topk(values: Tensor, ids: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """[B, k'] results to exactly [B, k]: cut, or pad with (-inf, -1); ids of -inf values become -1."""
    b, kk = values.shape
    if kk >= k:
        values, ids = values[:, :k], ids[:, :k]
    else:
        pv, pi = empty_topk(b, k - kk, values.device)
        values, ids = torch.cat([values, pv.to(values.dtype)], 1), torch.cat([ids, pi.to(ids.device)], 1)
    return values, torch.where(values == float("-inf"), torch.full_like(ids, -1), ids)


class RunningTopK:
    """Exact running top-k of a stream of [B, n] value blocks (descending).

    ``add(values, ids=None, offset=0)``: ``ids`` [B, n] (or [n], shared by all rows) names the
    columns; without it column j is candidate ``offset + j``. Padding columns carry -inf.
    ``result()`` -> (values [B, k], ids int64 [B, k]) with the (-inf, -1) tail.
    """

    def __init__(self, b: int, k: int, device=None, dtype: torch.dtype = torch.float32):
        if k < 1:
            raise ValueError(f"k: expected an int >= 1, got {k}")
        self.b, self.k = int(b), int(k)
        self.values = torch.empty((self.b, 0), dtype=dtype, device=device)
        self.ids = torch.empty((self.b, 0), dtype=torch.int64, device=device)

    def add(self, values: Tensor, ids: Optional[Tensor] = None, offset: Union[int, Tensor] = 0) -> None:
        n = values.shape[1]
        if n == 0:
            return
        values = torch.where(torch.isnan(values), float("-inf"), values)  # NaN ranks below everything
        if n > self.k:
            values, pos = torch.topk(values, self.k, dim=1, largest=True, sorted=False)
            if ids is None:
                ids = pos + offset
            else:
                ids = torch.gather(ids.expand(self.b, n) if ids.ndim == 1 else ids, 1, pos)
        elif ids is None:
            ids = torch.arange(n, device=values.device).expand(self.b, n) + offset
        elif ids.ndim == 1:
            ids = ids.expand(self.b, n)
        v = torch.cat([self.values, values.to(self.values.dtype)], 1)
        i = torch.cat([self.ids, ids.to(torch.int64)], 1)
        kk = min(self.k, v.shape[1])
        top, pos = torch.topk(v, kk, dim=1, largest=True, sorted=True)
        self.values, self.ids = top, torch.gather(i, 1, pos)

    def result(self) -> Tuple[Tensor, Tensor]:
        return pad_topk(self.values, self.ids, self.k)
