"""Public scoring ops: `pecm_scores`, `pecm_topk`, `pecm_rerank`, `prepare_candidates`, `prepare_queries`.

Math (DESIGN §1; `pecm.reference` is the float64 ground truth): for query q and candidate c,
each K prototypes of dimension D, weights w >= 0 and masks mq, mc,

    s_k = cos(q_k, c_k),   C = Σ w_k mq_k mc_k s_k / Σ w_k mq_k mc_k  (0 if the sum is 0),
    h = Σ w_k m_k ẑ_k,     sim = cos(h_q, h_c),                        R = sim · C.

Operands (DESIGN §2a): every op validates its arguments once into a `Queries` and a `Candidates`
(`pecm.operands`) and calls one backend through a torch custom op (`pecm.library`), so
``torch.compile(fullgraph=True)`` of code that calls these ops has no graph break. ``c`` may be a
raw tensor / array or a `Candidates` from `prepare_candidates` (then ``w`` may be ``None``; a
different ``w`` is an error); ``q`` may be raw or a `Queries` from `prepare_queries`.

Cost of a raw ``c``: none up front. The fused kernels (cpp, triton) normalise each prototype on the
fly in the read of ``c`` they score, and pool Eq. 4 there too when ``c_pooled`` is absent; the torch
backend normalises block by block. Preparing once (`prepare_candidates`) pays one pass over ``c``
and makes every later call read unit prototypes and unit pooled vectors as they are.

Gradients: `pecm_scores` is differentiable w.r.t. q, c, w, q_pooled and c_pooled. When gradients
are needed, ``backend="auto"`` picks a differentiable backend (triton for CUDA, else torch), the
operands are normalised with differentiable torch code, and the custom op's closed-form backward
does the rest (compiled or not). `pecm_topk` / `pecm_rerank` never carry gradients.

Decisions the contract left open (documented here and in the README):

- A 2-D query ``[K, D]`` is one query: results drop the batch dimension (``[N]`` / ``[k]``).
- Inputs are float32, float16 or bfloat16 (float32 accumulation). float64 is accepted by the
  ``"torch"`` backend only (accumulating in float64; used for gradcheck) and ``"auto"`` picks it.
- ``normalized=True`` promises that ``c`` already holds unit prototypes **with masked-out
  prototypes set to zero** (what `pecm.index.ArchiveIndex` stores); ``c_pooled`` is then also
  trusted to be unit length.
- numpy inputs are CPU tensors (zero-copy). Small arguments (w, masks, pooled vectors, candidate
  ids) given as numpy/lists are moved to the device of c; torch tensors on different devices raise.
- ``pecm_topk`` and ``pecm_rerank`` also take ``q_pooled``; ``pecm_rerank`` also takes ``by``.
- Duplicate candidate ids in ``pecm_rerank`` are scored once per occurrence.
- Under torch.compile the data-dependent argument checks (w >= 0, ``check=True``) run only when the
  operands are built outside the compiled region (e.g. `prepare_candidates`); candidate ids are
  checked inside the op, compiled or not.
- No host sync in the op path for device (CUDA) tensors: w >= 0 / finite, candidate ids in [-1, N)
  and "same weights" are queued as device-side asserts (`torch._assert_async`: a bad value fails the
  CUDA stream at the next synchronisation, it is never silently used; the kernels never read an
  out-of-range row). ``check=True`` checks them exactly on the host (a ValueError, one sync). CPU
  tensors are always checked exactly.
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import numpy as np
import torch

from . import library
from .backends import available_backends, get_backend, resolve_backend  # noqa: F401
from .operands import (
    BY_CHOICES,  # noqa: F401
    EPS,
    PREP_CHUNK,
    By,
    Candidates,
    Queries,
    _mask,
    _pooled,
    _weights,
    acc_dtype,
    as_tensor,
    assert_async,
    check_finite,
    check_float,
    check_weights,
    fold_queries,
    normalize_block,
    on_device,
)
from .operands import (
    unit as unit_vectors,
)
from .topk import empty_topk

Tensor = torch.Tensor
ArrayLike = Union[Tensor, np.ndarray]

__all__ = [
    "pecm_scores",
    "pecm_topk",
    "pecm_rerank",
    "prepare_candidates",
    "prepare_queries",
    "available_backends",
    "Candidates",
    "Queries",
    "By",
]


MAX_K = 2**31 - 1  # largest k of pecm_topk / pecm_rerank (ids and per-call counts stay in int32 range)
MAX_PAD_BYTES = 2**31  # a [B, k] result that is mostly (-inf, -1) padding may not exceed this (12 B per entry)


def _check_int(v, name: str, minimum: int = 1, maximum: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (numbers.Integral, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if int(v) < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {int(v)}")
    if maximum is not None and int(v) > maximum:
        raise ValueError(f"{name}: expected an int <= {maximum}, got {int(v)}")
    return int(v)


def _check_k(k) -> int:
    """k: an int in [1, MAX_K] (bool rejected); checked before anything is allocated."""
    return _check_int(k, "k", 1, MAX_K)


def _check_padding(k: int, b: int, avail: int, what: str) -> None:
    """Refuse a [B, k] result that would be mostly padding and larger than MAX_PAD_BYTES.

    When k <= ``avail`` (N candidates, or M shortlisted ids) the result is all real entries and is
    allocated as asked. Beyond that only the first ``avail`` columns can hold candidates, so a request
    such as k = 10**9 for a 1000-item search is a ValueError naming k instead of a multi-GB allocation.
    """
    if k > avail and b * k * 12 > MAX_PAD_BYTES:
        raise ValueError(
            f"k: {k} exceeds the {avail} {what} and the padded [B={b}, k] result would take "
            f"{b * k * 12 / 2**30:.1f} GiB (limit {MAX_PAD_BYTES / 2**30:.0f} GiB of (-inf, -1) padding); "
            f"ask for k <= {avail}"
        )


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _grad_enabled_for(*ts) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in ts)


# ----------------------------------------------------------------------------------------------
# preparation
# ----------------------------------------------------------------------------------------------
def prepare_queries(
    q: ArrayLike,
    w: ArrayLike,
    *,
    q_mask: Optional[ArrayLike] = None,
    q_pooled: Optional[ArrayLike] = None,
    check: bool = False,
    _w_checked: bool = False,
) -> Queries:
    """Validated queries with the weights and the query mask folded in (`pecm.operands.Queries`).

    q: [B, K, D] or [K, D] (one query), float32 / float16 / bfloat16 (float64 for the torch
    backend); w: [K] non-negative; q_mask: bool [B, K]; q_pooled: [B, D] (replaces Eq. 4).
    Differentiable when q, w or q_pooled require gradients.
    """
    q_t = as_tensor(q, "q")
    check_float(q_t, "q")
    device = q_t.device
    single = q_t.ndim == 2
    if single:
        q_t = q_t.unsqueeze(0)
        q_mask = None if q_mask is None else as_tensor(q_mask, "q_mask", device).unsqueeze(0)
        q_pooled = None if q_pooled is None else as_tensor(q_pooled, "q_pooled", device).unsqueeze(0)
    if q_t.ndim != 3:
        raise ValueError(f"q: expected shape [B, K, D] or [K, D], got {list(q_t.shape)}")
    b, k, d = q_t.shape
    if k < 1 or d < 1:
        raise ValueError(f"q: K and D must be >= 1, got K={k}, D={d}")
    acc = acc_dtype(q_t.dtype)
    w_t = w if _w_checked else _weights(w, k, device, acc, exact=check)  # _w_checked: the ops validated them
    qm = _mask(q_mask, "q_mask", b, k, "B", device)
    qp = _pooled(q_pooled, "q_pooled", b, d, "B", device)
    if check:
        for t, nm in ((q_t, "q"), (w_t, "w"), (qp, "q_pooled")):
            check_finite(t, nm)
    return _fold(q_t.contiguous(), w_t, qm, qp, acc, single)


def _fold(q: Tensor, w: Tensor, qm, qp, acc, single: bool) -> Queries:
    fast = None
    if acc == torch.float32 and q.device.type == "cpu" and not _compiling() and not _grad_enabled_for(q, w, qp):
        be = get_backend("auto", q.device, torch.float32)
        fast = getattr(be, "prepare_queries", None)
    if fast is not None:
        qw, qden, qpool = fast(q, w, qm, qp, EPS)
    else:
        qw, qden, qpool = fold_queries(q, w, qm, qp, acc)
    return Queries.trusted(qw.contiguous(), qden.contiguous(), qpool.contiguous(), w, single)


def prepare_candidates(
    c: ArrayLike,
    w: ArrayLike,
    *,
    c_mask: Optional[ArrayLike] = None,
    c_pooled: Optional[ArrayLike] = None,
    normalized: bool = False,
    check: bool = False,
) -> Candidates:
    """Validated candidates with unit prototypes (masked ones zero) and unit pooled vectors.

    One pass over ``c`` (float16 on the CPU: the index's one-pass C++ item encoder; otherwise torch in
    blocks of rows, bounded temporaries), skipped when ``normalized=True`` and ``c_pooled`` is given
    (then ``c`` is only wrapped, not copied). Differentiable when c, w or c_pooled require gradients.
    The result is what an archive index stores: pass it as ``c`` to every op (``w=None``).
    """
    if check:
        _check_weights_first(c, w)
    cs = Candidates(c, w, c_mask, c_pooled, normalized, normalized and c_pooled is not None)
    if check:
        _check_candidates_finite(cs)
    return _prepared(cs, refuse_nonfinite=True)


def _check_weights_first(c, w) -> None:
    """check=True: the exact weights check (ValueError) before `Candidates` would queue its device assert."""
    c_t = as_tensor(c, "c")
    if c_t.ndim == 3 and w is not None:
        _weights(w, c_t.shape[1], None if not isinstance(w, Tensor) else w.device, acc_dtype(c_t.dtype), exact=True)


def _check_candidates_finite(cs: Candidates) -> None:
    for t, nm in ((cs.prototypes, "c"), (cs.weights, "w"), (cs.pooled, "c_pooled")):
        check_finite(t, nm)
    if cs.weights is not None and cs.weights.numel():
        check_weights(cs.weights)  # exact (device tensors were only checked asynchronously)


_NOT_FINITE = "c: a prototype's norm is not finite (it holds NaN or inf values)"


def _prepared(cs: Candidates, refuse_nonfinite: bool = False) -> Candidates:
    """cs with unit prototypes and unit pooled vectors (cs itself when it already has them).

    ``refuse_nonfinite``: raise when a unit prototype comes out NaN/inf (`prepare_candidates`; the
    C++ encoder always refuses them).
    """
    if cs.prepared:
        return cs
    n, k, d = cs.prototypes.shape
    store, acc = cs.dtype, acc_dtype(cs.dtype)
    grad = cs.requires_grad and torch.is_grad_enabled()
    if not grad and not _compiling() and cs.device.type == "cpu":
        fast = getattr(get_backend("auto", cs.device, torch.float32), "prepare_candidates", None)
        got = None if fast is None else fast(cs)  # one C++ pass for float16 (the index's item encoder)
        if got is not None:
            unit, pooled = got
            if pooled is None:  # given pooled vectors: unit already, or normalised here ([N, D], small)
                given = cs.pooled
                unit_given = cs.pooled_normalized
                pooled = given if unit_given else unit_vectors(given.to(acc))
            return Candidates.trusted(unit.view(n, k, d), cs.weights, cs.mask, pooled.to(store), 3)
    args = (cs.weights, cs.mask, cs.pooled, cs.normalized, cs.pooled_normalized, acc)
    check = refuse_nonfinite and not grad and not _compiling()
    if grad or n <= PREP_CHUNK:
        chat, cp = normalize_block(cs.prototypes, *args)
        if check and not bool(torch.isfinite(chat).all()):
            raise ValueError(_NOT_FINITE)
        return Candidates.trusted(chat.to(store), cs.weights, cs.mask, cp.to(store), 3)
    out_c = cs.prototypes if cs.normalized else torch.empty_like(cs.prototypes)
    out_p = torch.empty((n, d), dtype=store, device=cs.device)
    with torch.no_grad():
        for s in range(0, n, PREP_CHUNK):
            e = min(n, s + PREP_CHUNK)
            part = cs.slice(s, e)
            chat, cp = normalize_block(
                part.prototypes, cs.weights, part.mask, part.pooled, cs.normalized, cs.pooled_normalized, acc
            )
            if check and not bool(torch.isfinite(chat).all()):
                raise ValueError(_NOT_FINITE)
            if not cs.normalized:
                out_c[s:e] = chat
            out_p[s:e] = cp
    return Candidates.trusted(out_c, cs.weights, cs.mask, out_p, 3)


# ----------------------------------------------------------------------------------------------
# argument handling shared by the three ops
# ----------------------------------------------------------------------------------------------
def _same_weights(a: Tensor, b: Tensor, exact: bool = False) -> bool:
    if a is b:
        return True
    if _compiling():
        return True  # identity could not be shown while tracing; values are compared eagerly only
    if a.shape != b.shape:
        return False
    a, b = a.detach().to(b.dtype), b.detach()
    if (on_device(a) or on_device(b)) and not exact:  # no host sync in the op path: a queued check (operands.on_device)
        assert_async(a == b.to(a.device), "w: differs from the weights the operands were prepared with")
        return True
    return bool(torch.equal(a, b))


def _operands(q, c, w, q_mask, c_mask, q_pooled, c_pooled, normalized: bool, check: bool):
    if isinstance(c, Candidates):
        for v, nm in ((c_mask, "c_mask"), (c_pooled, "c_pooled")):
            if v is not None:
                raise ValueError(f"{nm}: must be None when c is a Candidates (it already holds its {nm[2:]})")
        if normalized:
            raise ValueError("normalized: must be False when c is a Candidates (it records its own promises)")
        cs = c
        if w is not None and not _same_weights(as_tensor(w, "w", cs.device), cs.weights, check):
            raise ValueError("w: differs from the weights c was prepared with (pass w=None to use them)")
        if check:
            _check_candidates_finite(cs)
    else:
        if w is None:
            raise TypeError("w: expected the weights [K] (None is allowed only when c is a Candidates)")
        c_t = as_tensor(c, "c")
        q_dev = q.device if isinstance(q, (Tensor, Queries)) else None
        if q_dev is not None and q_dev != c_t.device:
            raise ValueError(f"q: on device {q_dev} but c is on {c_t.device} (all tensors must share a device)")
        if check:
            _check_weights_first(c_t, w)
        cs = Candidates(c_t, w, c_mask, c_pooled, normalized, normalized and c_pooled is not None)
        if check:
            _check_candidates_finite(cs)
    if isinstance(q, Queries):
        for v, nm in ((q_mask, "q_mask"), (q_pooled, "q_pooled")):
            if v is not None:
                raise ValueError(f"{nm}: must be None when q is a Queries (it is folded in)")
        if q.device != cs.device:
            raise ValueError(f"q: on device {q.device} but c is on {cs.device} (all tensors must share a device)")
        if (q.k, q.d) != (cs.k, cs.d):
            raise ValueError(f"q: expected K={cs.k}, D={cs.d} to match c, got K={q.k}, D={q.d}")
        if q.weights is not None and not _same_weights(q.weights, cs.weights, check):
            raise ValueError("q: was prepared with other weights than c")
        return q, cs
    q_t = as_tensor(q, "q", cs.device) if not isinstance(q, Tensor) else q
    if isinstance(q, Tensor) and q.device != cs.device:
        raise ValueError(f"q: on device {q.device} but c is on {cs.device} (all tensors must share a device)")
    check_float(q_t, "q")
    if q_t.ndim in (2, 3) and tuple(q_t.shape[-2:]) != (cs.k, cs.d):
        want = f"[B, K={cs.k}, D={cs.d}]"
        raise ValueError(f"q: expected {want} (or [K, D]) to match c, got {list(q_t.shape)}")
    if cs.dtype == torch.float64 and q_t.dtype != torch.float64:  # one float64 side: both accumulate in float64
        q_t = q_t.double()
    w_q = cs.weights.to(acc_dtype(q_t.dtype))
    qs = prepare_queries(q_t, w_q, q_mask=q_mask, q_pooled=q_pooled, check=check, _w_checked=True)
    return qs, cs


def _backend(backend: str, qs: Queries, cs: Candidates, grad: bool) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    wide = torch.float64 in (qs.dtype, cs.dtype)
    return resolve_backend(backend, cs.device.type, torch.float64 if wide else cs.dtype, grad)


def _squeeze(qs: Queries, *ts):
    return tuple(t[0] for t in ts) if qs.single else ts


# ----------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------
def pecm_scores(
    q: Union[ArrayLike, Queries],
    c: Union[ArrayLike, Candidates],
    w: Optional[ArrayLike] = None,
    *,
    q_mask: Optional[ArrayLike] = None,
    c_mask: Optional[ArrayLike] = None,
    q_pooled: Optional[ArrayLike] = None,
    c_pooled: Optional[ArrayLike] = None,
    backend: str = "auto",
    normalized: bool = False,
    check: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """All-pairs (sim, conf, score), float32 [B, N] each ([N] for a 2-D q).

    Differentiable w.r.t. q, c, w, q_pooled and c_pooled on the torch and triton backends.
    """
    qs, cs = _operands(q, c, w, q_mask, c_mask, q_pooled, c_pooled, normalized, check)
    grad = torch.is_grad_enabled() and (qs.requires_grad or cs.requires_grad)
    be = _backend(backend, qs, cs, grad)
    if qs.b == 0 or cs.n == 0:
        z = torch.zeros((qs.b, cs.n), dtype=qs.dtype, device=cs.device)
        return _squeeze(qs, z, z.clone(), z.clone())
    if grad:
        cs = _prepared(cs)  # differentiable torch normalisation; the op's backward needs unit operands
    sim, conf, score = library.scores(*library.operand_args(qs, cs), be)
    return _squeeze(qs, sim, conf, score)


def pecm_topk(
    q: Union[ArrayLike, Queries],
    c: Union[ArrayLike, Candidates],
    w: Optional[ArrayLike] = None,
    k: int = 10,
    *,
    q_mask: Optional[ArrayLike] = None,
    c_mask: Optional[ArrayLike] = None,
    q_pooled: Optional[ArrayLike] = None,
    c_pooled: Optional[ArrayLike] = None,
    by: Union[str, By] = "score",
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    normalized: bool = False,
    check: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Exhaustive fused top-k over all N candidates: (values float32 [B, k], ids int64 [B, k]).

    Sorted descending by ``by`` ("score" | "sim" | "conf"); when k > N the tail is (-inf, -1).
    """
    k = _check_k(k)
    by = By.parse(by)
    if chunk_size is not None:
        chunk_size = _check_int(chunk_size, "chunk_size")
    with torch.no_grad():
        qs, cs = _operands(q, c, w, q_mask, c_mask, q_pooled, c_pooled, normalized, check)
        _check_padding(k, qs.b, cs.n, "candidates (N)")
        be = _backend(backend, qs, cs, False)
        if qs.b == 0 or cs.n == 0:
            return _squeeze(qs, *empty_topk(qs.b, k, cs.device))
        if _compiling():
            vals, ids = library.topk(*library.operand_args(qs, cs), k, int(by), chunk_size or 0, be)
        else:
            vals, ids = library.topk_impl(qs, cs, k, by, chunk_size, be)
    return _squeeze(qs, vals, ids)


def pecm_rerank(
    q: Union[ArrayLike, Queries],
    c: Union[ArrayLike, Candidates],
    candidates: ArrayLike,
    w: Optional[ArrayLike] = None,
    k: int = 10,
    *,
    q_mask: Optional[ArrayLike] = None,
    c_mask: Optional[ArrayLike] = None,
    q_pooled: Optional[ArrayLike] = None,
    c_pooled: Optional[ArrayLike] = None,
    by: Union[str, By] = "score",
    backend: str = "auto",
    normalized: bool = False,
    check: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Best k of each query's candidate rows of c (int64 [B, M], -1 = padding) by ``by``.

    Returns (values float32 [B, k], ids int64 [B, k]); ids are rows of c; (-inf, -1) fill the
    tail when a query has fewer than k valid candidates.
    """
    k = _check_k(k)
    by = By.parse(by)
    with torch.no_grad():
        qs, cs = _operands(q, c, w, q_mask, c_mask, q_pooled, c_pooled, normalized, check)
        cand = as_tensor(candidates, "candidates", cs.device)
        if qs.single and cand.ndim == 1:
            cand = cand.unsqueeze(0)
        if cand.dtype.is_floating_point or cand.dtype == torch.bool or cand.is_complex():
            raise TypeError(f"candidates: expected an integer tensor (int64), got dtype {cand.dtype}")
        if cand.ndim != 2 or cand.shape[0] != qs.b:
            raise ValueError(f"candidates: expected shape [B={qs.b}, M], got {list(cand.shape)}")
        cand = cand.to(torch.int64).contiguous()
        _check_padding(k, qs.b, cand.shape[1], "candidate ids per query (M)")
        be = _backend(backend, qs, cs, False)
        if qs.b == 0 or cs.n == 0 or cand.shape[1] == 0:
            if cs.n == 0:
                library.check_candidate_ids(cand, 0, exact=check)
            return _squeeze(qs, *empty_topk(qs.b, k, cs.device))
        if _compiling():
            vals, ids = library.rerank(*library.operand_args(qs, cs), cand, k, int(by), be)
        else:
            vals, ids = library.rerank_impl(qs, cs, cand, k, by, be, check=check)
    return _squeeze(qs, vals, ids)
