"""The one operand contract of the scoring ops (DESIGN §2a): `Queries`, `Candidates`, `By`.

Math (DESIGN §1): per query b and candidate n, with K prototypes of dimension D, weights w >= 0,
masks mq, mc and ẑ = z / ||z|| (a zero vector stays zero; see `unit` for the numerics),

    qw[b]   = w_k mq_k q̂_k (flattened [K*D]),   qden[b] = w_k mq_k,   qp[b] = unit Eq. 4 pooled query
    num     = Σ_k qw[b]_k · ĉ_k mc_k,            den = Σ_k qden[b]_k mc_k
    sim     = qp[b] · ĉp[n],   conf = num / den (0 if den = 0),   score = sim · conf

`Queries` holds (qw, qden, qp): the query side, with w and the query mask folded in.
`Candidates` holds the candidate side as stored: prototypes [N, K, D] in their storage dtype, the
bool mask, the pooled vectors and the weights. A *prepared* `Candidates` (`prepare_candidates`, or an
index chunk) has unit prototypes with masked-out prototypes exactly zero and unit pooled vectors
(``normalized`` and ``pooled_normalized`` both True). The ops also wrap a user's raw ``c`` in a
`Candidates` view without copying it (``normalized=False``, pooled vectors possibly absent): the
fused kernels then normalise each prototype and, when there are no pooled vectors, pool Eq. 4 on the
fly in the same read of ``c``. Nothing downstream (backends, kernels, the C++ bindings) validates
these types again: construction is the one validation (shapes, dtypes, devices, and the weights'
values when not under torch.compile).

`By` is the one encoding of the ranked quantity ("score" | "sim" | "conf"), shared with the C++
extension (`pecm._C.By` has the same values) and the Triton kernels (constexpr ``BY``).
"""

from __future__ import annotations

import dataclasses
import enum
import numbers
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = 1e-12  # kept for compatibility only: nothing clamps norms to it any more (see `unit`)
# Sums of squares inside [NORM_LO, NORM_HI] take the plain path (x / sqrt(sum x^2) in the accumulation
# dtype); anything else (zero, tiny, huge, overflowed, NaN) is recomputed with a power-of-two pre-scale.
# The same thresholds are used by the C++ kernels (csrc/kernel_impl.h) and the Triton kernels.
NORM_LO = 2.0**-100
NORM_HI = 2.0**100
PREP_CHUNK = 16384  # candidate rows normalised at a time by prepare_candidates (no-grad path)

__all__ = ["By", "Queries", "Candidates", "EPS", "as_tensor", "check_float", "check_finite", "normalize_block", "unit"]


class By(enum.IntEnum):
    """The ranked quantity of `pecm_topk` / `pecm_rerank` (values shared with `pecm._C.By`)."""

    SCORE = 0
    SIM = 1
    CONF = 2

    @classmethod
    def parse(cls, by: Union[str, "By"]) -> "By":
        if isinstance(by, By):
            return by
        if isinstance(by, str) and by.upper() in cls.__members__:
            return cls[by.upper()]
        raise ValueError(f"by: expected one of {BY_CHOICES}, got {by!r}")

    @property
    def label(self) -> str:
        return self.name.lower()


BY_CHOICES = tuple(b.label for b in By)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------------
# argument helpers (the public edge)
# ----------------------------------------------------------------------------------------------
def as_tensor(x: Any, name: str, device: Optional[torch.device] = None) -> Tensor:
    """A torch tensor from a tensor / numpy array / list; numpy arrays are zero-copy CPU tensors."""
    if isinstance(x, Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        if x.dtype in (np.float16, np.float32, np.float64) or x.dtype.kind in "biu":
            t = torch.from_numpy(x if x.flags.writeable else np.ascontiguousarray(x))
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


def check_float(t: Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES and t.dtype != torch.float64:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported; expected float32, float16 or bfloat16")


def check_finite(t: Optional[Tensor], name: str) -> None:
    if t is not None and t.numel() and not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"{name}: contains NaN or inf values (check=True)")


def _mask(m, name: str, rows: int, k: int, rows_name: str, device) -> Optional[Tensor]:
    if m is None:
        return None
    t = as_tensor(m, name, device)
    if t.dtype.is_floating_point or t.is_complex():
        raise TypeError(f"{name}: expected a bool mask, got dtype {t.dtype}")
    if tuple(t.shape) != (rows, k):
        raise ValueError(f"{name}: expected shape [{rows_name}={rows}, K={k}], got {list(t.shape)}")
    return t if t.dtype == torch.bool and t.is_contiguous() else (t != 0).contiguous()


def _pooled(p, name: str, rows: int, d: int, rows_name: str, device, dtype=None) -> Optional[Tensor]:
    if p is None:
        return None
    t = as_tensor(p, name, device)
    check_float(t, name)
    if tuple(t.shape) != (rows, d):
        raise ValueError(f"{name}: expected shape [{rows_name}={rows}, D={d}], got {list(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous()


def on_device(t: Tensor) -> bool:
    """True when reading a value of ``t`` on the host would wait for a device (any non-CPU tensor).

    The op path never does that unless asked to (``check=True``): data-dependent checks of device tensors
    (w >= 0 and finite, candidate ids in [-1, N), equal weights) are queued as `assert_async` instead, so
    a bad value fails the stream (a device-side assert at the next synchronisation) rather than
    stalling every call on a host sync. CPU tensors are checked exactly (a ValueError), as before.
    """
    return t.device.type != "cpu"


def assert_async(cond: Tensor, msg: str) -> None:
    """Queue a check of the bool tensor ``cond`` (all true) without a host sync (`torch._assert_async`)."""
    torch._assert_async(cond.all(), msg)


_W_MSG = "w: weights must be finite and non-negative"


def check_weights(t: Tensor) -> None:
    """Exact check of the weights (a host sync for device tensors): finite and non-negative."""
    v = t.detach()
    if v.device.type == "cpu":  # K values: numpy is cheaper than two torch ops per call
        a = v.numpy()
        finite, nonneg = bool(np.isfinite(a).all()), bool((a >= 0).all())
    else:
        finite, nonneg = bool(torch.isfinite(v).all()), bool((v >= 0).all())
    if not finite:
        raise ValueError("w: contains NaN or inf values")
    if not nonneg:
        raise ValueError("w: weights must be non-negative")


def _weights(w, k: int, device, acc: torch.dtype, exact: bool = False) -> Tensor:
    """Validated weights [K] in `acc` on `device`: host data (and ``exact=True``) checked exactly, device
    tensors by a queued `assert_async` (no host sync)."""
    # numpy arrays / lists are validated on the host before they move to the device
    t = as_tensor(w, "w", device if isinstance(w, Tensor) else None)
    if tuple(t.shape) != (k,):
        raise ValueError(f"w: expected shape [K={k}], got {list(t.shape)}")
    if t.dtype != acc:
        t = t.to(acc)
    if not _compiling() and t.numel():
        if on_device(t) and not exact:
            v = t.detach()
            assert_async(torch.isfinite(v) & (v >= 0), _W_MSG)
        else:
            check_weights(t)
    if device is not None and t.device != device:
        t = t.to(device)
    return t


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for a storage dtype: float64 stays float64 (torch backend), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _trusted(cls, **fields):
    obj = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(obj, name, value)
    if "_cache" not in fields:
        object.__setattr__(obj, "_cache", {})
    return obj


# ----------------------------------------------------------------------------------------------
# the two operand types
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Candidates:
    """Candidate items as the kernels read them; build with `pecm.ops.prepare_candidates`.

    Fields: ``prototypes`` [N, K, D] (float32 / float16 / bfloat16; float64 for the torch backend
    only), ``weights`` [K] (float32, float64 with float64 prototypes), ``mask`` bool [N, K] or None
    (all valid), ``pooled`` [N, D] in the storage dtype or None, and two promises:
    ``normalized`` (prototypes are unit length and masked-out prototypes are exactly zero) and
    ``pooled_normalized`` (pooled vectors are unit length). Without the promises the kernels
    normalise on the fly; without pooled vectors they pool Eq. 4 on the fly.

    Constructing one validates shapes, dtypes and devices (and w >= 0 outside torch.compile);
    nothing validates it again. Frozen: the tensors are shared, not copied, so do not modify them
    in place afterwards. ``_cache`` lets a backend keep a converted view (e.g. the C++ handle).
    """

    prototypes: Tensor
    weights: Tensor
    mask: Optional[Tensor] = None
    pooled: Optional[Tensor] = None
    normalized: bool = False
    pooled_normalized: bool = False
    _cache: Dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        c = as_tensor(self.prototypes, "c")
        check_float(c, "c")
        if c.ndim != 3:
            raise ValueError(f"c: expected shape [N, K, D], got {list(c.shape)}")
        n, k, d = c.shape
        if k < 1 or d < 1:
            raise ValueError(f"c: K and D must be >= 1, got K={k}, D={d}")
        dev = c.device
        if not c.is_contiguous():
            c = c.contiguous()
        set_ = lambda name, v: object.__setattr__(self, name, v)
        set_("prototypes", c)
        set_("weights", _weights(self.weights, k, dev, acc_dtype(c.dtype)))
        set_("mask", _mask(self.mask, "c_mask", n, k, "N", dev))
        set_("pooled", _pooled(self.pooled, "c_pooled", n, d, "N", dev, c.dtype))
        if self.pooled is None and self.pooled_normalized:
            raise ValueError("pooled_normalized: True needs pooled vectors (c_pooled)")
        set_("normalized", bool(self.normalized))
        set_("pooled_normalized", bool(self.pooled_normalized))

    def __getstate__(self):  # the backends' cached views (e.g. a pybind11 handle) are not pickled
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}

    def __setstate__(self, state):
        for k, v in state.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "_cache", {})

    # shape / placement
    @property
    def n(self) -> int:
        return self.prototypes.shape[0]

    @property
    def k(self) -> int:
        return self.prototypes.shape[1]

    @property
    def d(self) -> int:
        return self.prototypes.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.prototypes.dtype

    @property
    def device(self) -> torch.device:
        return self.prototypes.device

    @property
    def prepared(self) -> bool:
        """Unit prototypes and unit pooled vectors: the kernels use them as they are."""
        return self.normalized and self.pooled is not None and self.pooled_normalized

    @property
    def requires_grad(self) -> bool:
        return any(t is not None and t.requires_grad for t in (self.prototypes, self.weights, self.pooled))

    @property
    def flags(self) -> int:
        """`normalized` | `pooled_normalized` << 1: the int the custom ops carry them in."""
        return int(self.normalized) | (int(self.pooled_normalized) << 1)

    def __len__(self) -> int:
        return self.n

    def rows(self, idx: Tensor) -> "Candidates":
        """The candidates at row indices ``idx`` (a gathered copy; same promises and weights)."""
        return _trusted(
            Candidates,
            prototypes=self.prototypes[idx],
            weights=self.weights,
            mask=None if self.mask is None else self.mask[idx],
            pooled=None if self.pooled is None else self.pooled[idx],
            normalized=self.normalized,
            pooled_normalized=self.pooled_normalized,
        )

    def slice(self, start: int, end: int) -> "Candidates":
        """Rows [start, end) as views (no copy)."""
        return _trusted(
            Candidates,
            prototypes=self.prototypes[start:end],
            weights=self.weights,
            mask=None if self.mask is None else self.mask[start:end],
            pooled=None if self.pooled is None else self.pooled[start:end],
            normalized=self.normalized,
            pooled_normalized=self.pooled_normalized,
        )

    def to(self, device) -> "Candidates":
        """The same candidates on ``device`` (a copy unless already there)."""
        if torch.device(device) == self.device:
            return self
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Candidates.trusted(mv(self.prototypes), mv(self.weights), mv(self.mask), mv(self.pooled), self.flags)

    @staticmethod
    def trusted(prototypes, weights, mask, pooled, flags: int) -> "Candidates":
        """Rebuild from already-validated tensors (what the custom ops receive); no checks."""
        return _trusted(
            Candidates,
            prototypes=prototypes,
            weights=weights,
            mask=mask,
            pooled=pooled,
            normalized=bool(flags & 1),
            pooled_normalized=bool(flags & 2),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Queries:
    """Prepared queries; build with `pecm.ops.prepare_queries`.

    ``qw`` [B, K*D] (w_k mq_k q̂_k), ``qden`` [B, K] (w_k mq_k), ``qp`` [B, D] (unit pooled
    query), all float32 (float64 for float64 inputs on the torch backend); ``weights`` [K] are the
    weights folded in; ``single`` records a 2-D ``[K, D]`` query (the ops then drop the batch
    dimension of their results).
    """

    qw: Tensor
    qden: Tensor
    qp: Tensor
    weights: Tensor
    single: bool = False
    _cache: Dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        qden, qp, qw = self.qden, self.qp, self.qw
        for t, name in ((qw, "qw"), (qden, "qden"), (qp, "qp")):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.ndim != 2:
                raise ValueError(f"{name}: expected a 2-D tensor, got {list(t.shape)}")
        b, k = qden.shape
        d = qp.shape[1]
        if qp.shape[0] != b or tuple(qw.shape) != (b, k * d):
            raise ValueError(f"qw: expected [B={b}, K*D={k * d}], got {list(qw.shape)}")
        if len({qw.device, qden.device, qp.device}) != 1:
            raise ValueError("qw, qden, qp: must share one device")

    __getstate__ = Candidates.__getstate__
    __setstate__ = Candidates.__setstate__

    @property
    def b(self) -> int:
        return self.qden.shape[0]

    @property
    def k(self) -> int:
        return self.qden.shape[1]

    @property
    def d(self) -> int:
        return self.qp.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qw.device

    @property
    def dtype(self) -> torch.dtype:
        return self.qw.dtype

    @property
    def requires_grad(self) -> bool:
        return any(t.requires_grad for t in (self.qw, self.qden, self.qp))

    def __len__(self) -> int:
        return self.b

    def slice(self, start: int, end: int) -> "Queries":
        """Queries [start, end) as views."""
        return Queries.trusted(self.qw[start:end], self.qden[start:end], self.qp[start:end], self.weights, False)

    def to(self, device) -> "Queries":
        """The same queries on ``device`` (a copy unless already there)."""
        if torch.device(device) == self.device:
            return self
        w = None if self.weights is None else self.weights.to(device)
        return Queries.trusted(self.qw.to(device), self.qden.to(device), self.qp.to(device), w, self.single)

    @staticmethod
    def trusted(qw, qden, qp, weights=None, single: bool = False) -> "Queries":
        return _trusted(Queries, qw=qw, qden=qden, qp=qp, weights=weights, single=single)


# ----------------------------------------------------------------------------------------------
# the math of preparation (differentiable torch; the fused kernels do the same on the fly)
# ----------------------------------------------------------------------------------------------
def _unit_scaled(x: Tensor, dim: int) -> Tensor:
    """x / ||x|| with x first scaled by a power of two that brings max|x| into [0.5, 1) (exact), so the
    sum of squares neither overflows nor underflows for any finite x. Branch-free (torch.compile,
    CUDA) and differentiable (the scale is a constant)."""
    a = x.detach().abs().amax(dim, keepdim=True)
    _, e = torch.frexp(a)  # a = m * 2**e, m in [0.5, 1); e = 0 for a = 0, inf, NaN
    e = e.to(x.dtype)
    h = torch.floor(e * 0.5)  # 2**-e in two halves: 2**149 (float32 subnormals) is not representable
    xs = x * torch.exp2(-h) * torch.exp2(h - e)
    n = torch.linalg.vector_norm(xs, dim=dim, keepdim=True)
    return xs / torch.where(n == 0, torch.ones_like(n), n)  # zero stays zero; NaN/inf give NaN


def unit(x: Tensor, dim: int = -1) -> Tensor:
    """x / ||x|| along ``dim``, correct for every finite magnitude (float32: 1e-45 ... 3.4e38).

    A vector is zero only when it is exactly zero (it stays zero); there is no eps clamp. Vectors with
    NaN or inf come out NaN (they are not validated here: ``check=True`` rejects them up front). The
    common case costs one norm and one division (F.normalize's work); only when some sum of squares
    lies outside [NORM_LO, NORM_HI] (zero, below ~1e-30, above ~1e30, inf, NaN) is the block recomputed
    with an exact power-of-two pre-scale (`_unit_scaled`). Under torch.compile and on CUDA the
    pre-scaled form is always used (no data-dependent branch, no device sync).
    """
    if _compiling() or on_device(x):
        return _unit_scaled(x, dim)
    n = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    ok = (n >= _N_LO) & (n <= _N_HI)
    if bool(ok.all()):
        return x / n
    zero = n == 0  # exactly zero rows (masked-out prototypes) keep the plain path; underflowed ones do not
    if bool((ok | zero).all()) and not bool(x.detach().abs().amax(dim, keepdim=True)[zero].any()):
        return x / torch.where(zero, torch.ones_like(n), n)
    return _unit_scaled(x, dim)


_N_LO, _N_HI = NORM_LO**0.5, NORM_HI**0.5


def fold_queries(q: Tensor, w: Tensor, q_mask: Optional[Tensor], q_pooled: Optional[Tensor], acc=torch.float32):
    """(qw [B, K*D], qden [B, K], qp [B, D]) from q [B, K, D] (differentiable torch ops)."""
    b, k, d = q.shape
    wq = w.to(acc).expand(b, k)
    if q_mask is not None:
        wq = wq * q_mask.to(acc)
    qhat = unit(q.to(acc))
    # masked-out prototypes contribute nothing, whatever they hold (where, not a product: NaN * 0 = NaN)
    qw3 = qhat * wq.unsqueeze(-1) if q_mask is None else torch.where(q_mask.unsqueeze(-1), qhat * wq.unsqueeze(-1), 0.0)
    if q_pooled is None:
        qp = unit(qw3.sum(1))
    else:
        qp = unit(q_pooled.to(acc))
    return qw3.reshape(b, k * d), wq, qp


def normalize_block(
    c: Tensor,
    w: Tensor,
    mask: Optional[Tensor],
    pooled: Optional[Tensor],
    normalized: bool,
    pooled_normalized: bool,
    acc: torch.dtype,
) -> Tuple[Tensor, Tensor]:
    """(unit prototypes [n, K, D], unit pooled [n, D]) in ``acc`` for one block of candidate rows.

    Unit prototypes have masked-out prototypes exactly zero; pooled is Eq. 4 (with w and the mask)
    unless given. Differentiable torch code: the torch backend and `prepare_candidates` use it.
    """
    k = c.shape[1]
    if normalized:
        chat = c.to(acc)
    else:
        chat = unit(c.to(acc))
        if mask is not None:  # where, not a product: a masked-out prototype's NaN/inf must not leak
            chat = torch.where(mask.unsqueeze(-1), chat, 0.0)
    if pooled is None:
        cp = unit((chat * w.to(acc).view(1, k, 1)).sum(1))
    elif pooled_normalized:
        cp = pooled.to(acc)
    else:
        cp = unit(pooled.to(acc))
    return chat, cp
