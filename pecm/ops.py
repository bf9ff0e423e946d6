"""Public scoring ops: `pecm_scores`, `pecm_topk`, `pecm_rerank`, `available_backends`.

Math (DESIGN §1; `pecm.reference` is the float64 ground truth): for query q and candidate c,
each K prototypes of dimension D, weights w >= 0 and masks mq, mc,

    s_k = cos(q_k, c_k),   C = Σ w_k mq_k mc_k s_k / Σ w_k mq_k mc_k  (0 if the sum is 0),
    h = Σ w_k m_k ẑ_k,     sim = cos(h_q, h_c),                        R = sim · C.

Every op validates its arguments, folds w and the masks into canonical operands
(`pecm.backends.base`) with differentiable torch code, then calls one backend.

Decisions the contract left open (documented here and in the README):

- A 2-D query ``[K, D]`` is one query: results drop the batch dimension (``[N]`` / ``[k]``).
- Inputs are float32, float16 or bfloat16 (float32 accumulation). float64 is accepted by the
  ``"torch"`` backend only (accumulating in float64; used for gradcheck) and ``"auto"`` picks it.
- ``normalized=True`` promises that ``c`` already holds unit prototypes **with masked-out
  prototypes set to zero** (what `pecm.index.ArchiveIndex` stores); the ops then use ``c`` as is,
  without a normalised copy. ``c_pooled`` is then also trusted to be unit length.
- numpy inputs are CPU tensors (zero-copy). Small arguments (w, masks, pooled vectors, candidate
  ids) given as numpy/lists are moved to the device of q; torch tensors on different devices raise.
- ``pecm_topk`` and ``pecm_rerank`` also take ``q_pooled``; ``pecm_rerank`` also takes ``by``.
- Duplicate candidate ids in ``pecm_rerank`` are scored once per occurrence.
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .backends import BY_CHOICES, available_backends, get_backend  # noqa: F401

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = 1e-12
_PREP_CHUNK = 16384  # candidate rows normalised at a time (no-grad path)

__all__ = ["pecm_scores", "pecm_topk", "pecm_rerank", "available_backends", "prepare_query", "prepare_candidates"]


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------
def _as_tensor(x, name: str, device: Optional[torch.device] = None) -> Tensor:
    if isinstance(x, Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        if x.dtype == np.float16 or x.dtype == np.float32 or x.dtype == np.float64 or x.dtype.kind in "biu":
            t = torch.from_numpy(np.ascontiguousarray(x)) if not x.flags.writeable else torch.from_numpy(x)
        else:
            raise TypeError(f"{name}: unsupported numpy dtype {x.dtype}")
    elif isinstance(x, (list, tuple)) or isinstance(x, numbers.Number):
        t = torch.as_tensor(x)
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if device is not None and t.device != device:
        if isinstance(x, Tensor):
            raise ValueError(f"{name}: on device {t.device}, expected {device} (all tensors must share a device)")
        t = t.to(device)
    return t


def _check_float(t: Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES and t.dtype != torch.float64:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported; expected float32, float16 or bfloat16")


def _check_finite(t: Optional[Tensor], name: str) -> None:
    if t is not None and t.numel() and not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"{name}: contains NaN or inf values (check=True)")


def _check_int(v, name: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (numbers.Integral, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if int(v) < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {int(v)}")
    return int(v)


def _mask(m, name: str, rows: int, k: int, rows_name: str, device) -> Optional[Tensor]:
    if m is None:
        return None
    t = _as_tensor(m, name, device)
    if t.dtype.is_floating_point or t.is_complex():
        raise TypeError(f"{name}: expected a bool mask, got dtype {t.dtype}")
    if tuple(t.shape) != (rows, k):
        raise ValueError(f"{name}: expected shape [{rows_name}={rows}, K={k}], got {list(t.shape)}")
    return t != 0


def _pooled(p, name: str, rows: int, d: int, rows_name: str, device) -> Optional[Tensor]:
    if p is None:
        return None
    t = _as_tensor(p, name, device)
    _check_float(t, name)
    if tuple(t.shape) != (rows, d):
        raise ValueError(f"{name}: expected shape [{rows_name}={rows}, D={d}], got {list(t.shape)}")
    return t.contiguous()


class _Inputs:
    """Validated user inputs as tensors on one device (q always 3-D)."""

    def __init__(self, q, c, w, q_mask, c_mask, q_pooled, c_pooled, check: bool, backend: str):
        c_t = _as_tensor(c, "c")
        q_t = _as_tensor(q, "q")
        if q_t.device != c_t.device:
            raise ValueError(f"q: on device {q_t.device} but c is on {c_t.device} (all tensors must share a device)")
        device = c_t.device
        _check_float(q_t, "q")
        _check_float(c_t, "c")
        if c_t.ndim != 3:
            raise ValueError(f"c: expected shape [N, K, D], got {list(c_t.shape)}")
        self.single = q_t.ndim == 2
        if self.single:
            q_t = q_t.unsqueeze(0)
            q_mask = None if q_mask is None else _as_tensor(q_mask, "q_mask", device).unsqueeze(0)
            q_pooled = None if q_pooled is None else _as_tensor(q_pooled, "q_pooled", device).unsqueeze(0)
        if q_t.ndim != 3:
            raise ValueError(f"q: expected shape [B, K, D] or [K, D], got {list(q_t.shape)}")
        n, k, d = c_t.shape
        if tuple(q_t.shape[1:]) != (k, d):
            raise ValueError(f"q: expected [B, K={k}, D={d}] to match c, got {list(q_t.shape)}")
        if k < 1 or d < 1:
            raise ValueError(f"c: K and D must be >= 1, got K={k}, D={d}")
        w_t = _as_tensor(w, "w", device)
        if tuple(w_t.shape) != (k,):
            raise ValueError(f"w: expected shape [K={k}], got {list(w_t.shape)}")
        if not w_t.dtype.is_floating_point:
            w_t = w_t.float()
        if w_t.numel() and bool((w_t.detach() < 0).any()):
            raise ValueError("w: weights must be non-negative")
        b = q_t.shape[0]
        self.q_mask = _mask(q_mask, "q_mask", b, k, "B", device)
        self.c_mask = _mask(c_mask, "c_mask", n, k, "N", device)
        self.q_pooled = _pooled(q_pooled, "q_pooled", b, d, "B", device)
        self.c_pooled = _pooled(c_pooled, "c_pooled", n, d, "N", device)
        if check:
            for t, nm in ((q_t, "q"), (c_t, "c"), (w_t, "w"), (self.q_pooled, "q_pooled"), (self.c_pooled, "c_pooled")):
                _check_finite(t, nm)
        wide = torch.float64 in (q_t.dtype, c_t.dtype)
        self.acc = torch.float64 if wide else torch.float32
        self.q, self.c, self.w = q_t.contiguous(), c_t.contiguous(), w_t
        self.b, self.n, self.k, self.d = b, n, k, d
        self.device = device
        self.backend = get_backend("torch" if (wide and backend == "auto") else backend, device, c_t.dtype)
        if wide and self.backend.name != "torch":
            raise TypeError(f"c: float64 inputs are supported by backend='torch' only, not {self.backend.name!r}")

    def squeeze(self, *ts):
        return tuple(t[0] for t in ts) if self.single else ts


# ----------------------------------------------------------------------------------------------
# preparation: fold w and masks into the canonical operands (differentiable torch code)
# ----------------------------------------------------------------------------------------------
def prepare_query(q: Tensor, w: Tensor, q_mask: Optional[Tensor], q_pooled: Optional[Tensor], acc=torch.float32):
    """(qw [B, K*D], qden [B, K], qp [B, D]) from validated q [B, K, D]; see `pecm.backends.base`."""
    b, k, d = q.shape
    wq = w.to(acc).expand(b, k)
    if q_mask is not None:
        wq = wq * q_mask.to(acc)
    qhat = F.normalize(q.to(acc), dim=-1, eps=EPS)
    qw3 = qhat * wq.unsqueeze(-1)
    if q_pooled is None:
        qp = F.normalize(qw3.sum(1), dim=-1, eps=EPS)
    else:
        qp = F.normalize(q_pooled.to(acc), dim=-1, eps=EPS)
    return qw3.reshape(b, k * d), wq, qp


def _prep_c_block(c: Tensor, w: Tensor, c_mask, c_pooled, normalized: bool, acc):
    n, k, d = c.shape
    if normalized:
        chat = c
    else:
        chat = F.normalize(c.to(acc), dim=-1, eps=EPS)
        if c_mask is not None:
            chat = chat * c_mask.to(acc).unsqueeze(-1)
    if c_pooled is None:
        cp = F.normalize((chat.to(acc) * w.to(acc).view(1, k, 1)).sum(1), dim=-1, eps=EPS)
    elif normalized:
        cp = c_pooled
    else:
        cp = F.normalize(c_pooled.to(acc), dim=-1, eps=EPS)
    return chat, cp


def prepare_candidates(
    c: Tensor, w: Tensor, c_mask: Optional[Tensor], c_pooled: Optional[Tensor], normalized: bool = False, acc=None
):
    """(c [N, K*D] storage dtype, cm [N, K] or None, cp [N, D]) from validated c [N, K, D].

    Differentiable when gradients are enabled and any input requires them; otherwise the work is
    done in blocks of rows so the float32 temporaries stay bounded.
    """
    n, k, d = c.shape
    store = c.dtype
    acc = acc or (torch.float64 if store == torch.float64 else torch.float32)
    cm = None if c_mask is None else c_mask.to(store)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (c, w, c_pooled))
    if grad or n <= _PREP_CHUNK:
        chat, cp = _prep_c_block(c, w, c_mask, c_pooled, normalized, acc)
        return chat.to(store).reshape(n, k * d), cm, cp.to(store)
    if normalized and c_pooled is not None:
        return c.reshape(n, k * d), cm, c_pooled.to(store)
    out_c = c if normalized else torch.empty_like(c)
    out_p = torch.empty((n, d), dtype=store, device=c.device)
    with torch.no_grad():
        for s in range(0, n, _PREP_CHUNK):
            e = min(n, s + _PREP_CHUNK)
            chat, cp = _prep_c_block(
                c[s:e],
                w,
                None if c_mask is None else c_mask[s:e],
                None if c_pooled is None else c_pooled[s:e],
                normalized,
                acc,
            )
            if not normalized:
                out_c[s:e] = chat
            out_p[s:e] = cp
    return out_c.reshape(n, k * d), cm, out_p


def _prepare(inp: _Inputs, normalized: bool):
    fast = getattr(inp.backend, "prepare_query", None)  # a backend's own (non-differentiable) query prep
    if fast is not None and not inp.backend.differentiable and inp.acc == torch.float32:
        qw, qden, qp = fast(inp.q, inp.w, inp.q_mask, inp.q_pooled, EPS)
    else:
        qw, qden, qp = prepare_query(inp.q, inp.w, inp.q_mask, inp.q_pooled, inp.acc)
    c, cm, cp = prepare_candidates(inp.c, inp.w, inp.c_mask, inp.c_pooled, normalized, inp.acc)
    return qw, qden, qp, c, cm, cp


def _check_by(by) -> str:
    if by not in BY_CHOICES:
        raise ValueError(f"by: expected one of {BY_CHOICES}, got {by!r}")
    return by


def _empty_topk(b: int, k: int, device) -> Tuple[Tensor, Tensor]:
    return (
        torch.full((b, k), float("-inf"), dtype=torch.float32, device=device),
        torch.full((b, k), -1, dtype=torch.int64, device=device),
    )


# ----------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------
def pecm_scores(
    q,
    c,
    w,
    *,
    q_mask=None,
    c_mask=None,
    q_pooled=None,
    c_pooled=None,
    backend: str = "auto",
    normalized: bool = False,
    check: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """All-pairs (sim, conf, score), float32 [B, N] each ([N] for a 2-D q).

    Differentiable w.r.t. q, c, w, q_pooled and c_pooled on the torch and triton backends.
    """
    inp = _Inputs(q, c, w, q_mask, c_mask, q_pooled, c_pooled, check, backend)
    if inp.b == 0 or inp.n == 0:
        z = torch.zeros((inp.b, inp.n), dtype=torch.float32, device=inp.device)
        return inp.squeeze(z, z.clone(), z.clone())
    if (
        not inp.backend.differentiable
        and torch.is_grad_enabled()
        and any(isinstance(t, Tensor) and t.requires_grad for t in (inp.q, inp.c, inp.w, inp.q_pooled, inp.c_pooled))
    ):
        raise ValueError(f"backend: {inp.backend.name!r} is not differentiable; use backend='torch' or 'triton'")
    ops_in = _prepare(inp, normalized)
    sim, conf, score = inp.backend.scores(*ops_in)
    return inp.squeeze(sim, conf, score)


def pecm_topk(
    q,
    c,
    w,
    k: int,
    *,
    q_mask=None,
    c_mask=None,
    q_pooled=None,
    c_pooled=None,
    by: str = "score",
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    normalized: bool = False,
    check: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Exhaustive fused top-k over all N candidates: (values float32 [B, k], ids int64 [B, k]).

    Sorted descending by ``by`` ("score" | "sim" | "conf"); when k > N the tail is (-inf, -1).
    """
    k = _check_int(k, "k")
    by = _check_by(by)
    if chunk_size is not None:
        chunk_size = _check_int(chunk_size, "chunk_size")
    inp = _Inputs(q, c, w, q_mask, c_mask, q_pooled, c_pooled, check, backend)
    if inp.b == 0 or inp.n == 0:
        return inp.squeeze(*_empty_topk(inp.b, k, inp.device))
    with torch.no_grad():
        ops_in = _prepare(inp, normalized)
        vals, ids = inp.backend.topk(*ops_in, k, by, chunk_size)
    return inp.squeeze(vals, ids)


def pecm_rerank(
    q,
    c,
    candidates,
    w,
    k: int,
    *,
    q_mask=None,
    c_mask=None,
    q_pooled=None,
    c_pooled=None,
    by: str = "score",
    backend: str = "auto",
    normalized: bool = False,
    check: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Best k of each query's candidate rows of c (int64 [B, M], -1 = padding) by ``by``.

    Returns (values float32 [B, k], ids int64 [B, k]); ids are rows of c; (-inf, -1) fill the
    tail when a query has fewer than k valid candidates.
    """
    k = _check_int(k, "k")
    by = _check_by(by)
    inp = _Inputs(q, c, w, q_mask, c_mask, q_pooled, c_pooled, check, backend)
    cand = _as_tensor(candidates, "candidates", inp.device)
    if inp.single and cand.ndim == 1:
        cand = cand.unsqueeze(0)
    if cand.dtype.is_floating_point or cand.dtype == torch.bool or cand.is_complex():
        raise TypeError(f"candidates: expected an integer tensor (int64), got dtype {cand.dtype}")
    if cand.ndim != 2 or cand.shape[0] != inp.b:
        raise ValueError(f"candidates: expected shape [B={inp.b}, M], got {list(cand.shape)}")
    cand = cand.to(torch.int64).contiguous()
    if cand.numel():
        lo, hi = (int(x) for x in torch.aminmax(cand))
        if lo < -1 or hi >= inp.n:
            bad = lo if lo < -1 else hi
            raise ValueError(f"candidates: ids must be in [-1, N={inp.n}) (-1 = padding), got {bad}")
    if inp.b == 0 or inp.n == 0 or cand.shape[1] == 0:
        return inp.squeeze(*_empty_topk(inp.b, k, inp.device))
    with torch.no_grad():
        rows = None
        if not (normalized and inp.c_pooled is not None):
            # preparation (normalising rows, pooling) would touch all N rows: do it for the candidates only
            rows, cand = _restrict_to_candidates(inp, cand)
            if inp.n == 0:  # padding only
                return inp.squeeze(*_empty_topk(inp.b, k, inp.device))
        ops_in = _prepare(inp, normalized)
        vals, ids = inp.backend.rerank(*ops_in, cand, k, by)
        if rows is not None:
            ids = torch.where(ids >= 0, rows[ids.clamp_min(0)], ids)
    return inp.squeeze(vals, ids)


def _restrict_to_candidates(inp: _Inputs, cand: Tensor) -> Tuple[Tensor, Tensor]:
    """Replace inp's candidate rows by the distinct ids of ``cand`` (sorted, so the row order and hence
    tie order is kept); returns (rows, cand in local row numbers, -1 kept)."""
    valid = cand >= 0
    rows = torch.unique(cand[valid])  # sorted ascending
    local = torch.searchsorted(rows, cand.clamp_min(0))
    local = torch.where(valid, local, torch.full_like(local, -1))
    inp.c = inp.c[rows]
    inp.c_mask = None if inp.c_mask is None else inp.c_mask[rows]
    inp.c_pooled = None if inp.c_pooled is None else inp.c_pooled[rows]
    inp.n = int(rows.numel())
    return rows, local.contiguous()
