"""Product-quantised (PQ) candidates: PECM scores computed from 8-bit codes (asymmetric distances).

Math. A unit prototype ĉ_{n,k} (D floats) is split into M subvectors of DS = D / M dimensions; each is
replaced by the index of its nearest of 256 centroids ``cent[s, m]`` (s = 0 when one codebook is shared
by every slot k, s = k for per-slot codebooks). The *decoded* prototype is

    ĉ'_{n,k} = a_{n,k} · concat_m cent[s(k), m, code_{n,k,m}],   a_{n,k} = mc_{n,k} / ||concat_m cent[...]||

so it is unit length again (0 for a masked-out prototype). For a query, the lookup table

    lut[b, k, m, c] = w_k mq_{b,k} · <q̂_{b,k} restricted to subspace m, cent[s(k), m, c]>

gives the confidence numerator of DESIGN §1 exactly for the decoded prototypes:

    num = Σ_k a_{n,k} Σ_m lut[b, k, m, code_{n,k,m}],   den = Σ_k w_k mq_{b,k} mc_{n,k},   conf = num / den

(0 when den = 0).

Residual (coarse) stages. With ``coarse = R >= 1`` (IVFADC-style residual coding), every prototype first gets R
codes into per-slot codebooks of 256 *full-dimensional* centroids ``coarse[k, j]`` (stage j quantises the
residual left by stages < j), and the M PQ codes encode the residual left after them:

    ĉ'_{n,k} = a_{n,k} · (Σ_j coarse[k, j, code_{n,k,j}] + concat_m cent[s(k), m, code_{n,k,R+m}])

The lookup table gets R more "subspaces" (``lut[b, k, j, c] = w_k mq_k <q̂_k, coarse[k, j, c]>``), so the fused
kernels, which sum K·(R+M) table entries per candidate, are unchanged. The coarse stages take out what the
items of an archive share (a slot's common directions, cluster centres, repeated prototypes) and leave the
PQ codes a residual of smaller norm, which they quantise with a smaller error.

``sim`` uses the candidates' unit pooled vectors as float32 (dense; an index stores them as int8 rows r and
hands over r / ||r||, or as float16), ``score = sim·conf``. So every PQ score equals the float64 score of the
decoded prototypes (`decode`, ``a · (...)`` as they are) up to float32 rounding — tested — and the fused kernels
(cpp `pecm._C.pq_topk`, Triton `pecm.kernels.pq_topk`) never decompress a row: they gather K·(R+M) table
entries per candidate. With float32 scales the decoded prototypes are unit to float32 rounding, so this is also
the `pecm.reference` score; with float16 scales (an index's default) they are unit to 2^-11, as the prototypes
of a float16 index are.

Storage per item at K = 26, D = 256 (an index's default M = 64, R = 1, float16 scales, int8 pooled): 1,690 code
bytes + 52 scale bytes + 256 pooled bytes + 26 mask bytes + 8 id bytes = 2,032 bytes, against 13,858 bytes for
a float16 index.

Codebooks are trained with FAISS (`faiss.Kmeans` per slot and stage for the coarse stages, then
`faiss.ProductQuantizer`, k-means per subspace, on the residuals) on a sample of unit prototypes (the
optional ``faiss-cpu`` dependency, extra ``[ann]``); encoding uses the C++ extension (nearest centroid by
squared L2, ties to the smaller code; the coarse stages: torch, same rule) or a torch fallback.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np
import torch

from .operands import By, Queries

KSUB = 256  # centroids per subspace (8-bit codes)
TRAIN_SAMPLE = 65536  # prototypes sampled to train one codebook
MIN_TRAIN = KSUB  # k-means needs at least one training vector per centroid
TORCH_CHUNK = 2048  # candidate rows per step of the torch backend
MAX_COARSE = 4  # residual stages at most
DEFAULT_COARSE = 1  # residual stages of a new pq index (ArchiveIndex.create(pq_coarse=None))
COARSE_SAMPLE = 40 * KSUB  # prototypes per slot sampled to train one coarse stage


@dataclasses.dataclass(frozen=True, eq=False)
class Codebook:
    """``centroids`` float32 [S, M, 256, D/M]: S = 1 (shared by every slot) or K (one per slot);
    ``coarse`` float32 [K, R, 256, D] (R residual stages per slot) or None (R = 0)."""

    centroids: np.ndarray
    coarse: Optional[np.ndarray] = None

    def __post_init__(self):
        c = self.centroids
        if not isinstance(c, np.ndarray) or c.dtype != np.float32 or c.ndim != 4 or c.shape[2] != KSUB:
            raise ValueError(f"centroids: expected float32 [S, M, {KSUB}, D/M], got {getattr(c, 'shape', c)}")
        if not np.all(np.isfinite(c)):
            raise ValueError("centroids: contain NaN or inf values")
        g = self.coarse
        if g is not None:
            if not isinstance(g, np.ndarray) or g.dtype != np.float32 or g.ndim != 4 or g.shape[2:] != (KSUB, self.d):
                raise ValueError(f"coarse: expected float32 [K, R, {KSUB}, D={self.d}], got {getattr(g, 'shape', g)}")
            if c.shape[0] != 1 and c.shape[0] != g.shape[0]:
                raise ValueError(f"coarse: expected K={c.shape[0]} slots like the centroids, got {g.shape[0]}")
            if not np.all(np.isfinite(g)):
                raise ValueError("coarse: contains NaN or inf values")

    @property
    def r(self) -> int:
        """Residual (coarse) stages per prototype."""
        return 0 if self.coarse is None else self.coarse.shape[1]

    @property
    def codes(self) -> int:
        """Codes (bytes) per prototype: R coarse + M PQ."""
        return self.r + self.m

    @property
    def s(self) -> int:
        return self.centroids.shape[0]

    @property
    def m(self) -> int:
        return self.centroids.shape[1]

    @property
    def d(self) -> int:
        return self.centroids.shape[1] * self.centroids.shape[3]

    def slot_centroids(self, k: int) -> np.ndarray:
        """[K, M, 256, D/M]: the codebook of every slot (a broadcast view when shared)."""
        c = self.centroids
        return np.broadcast_to(c, (k, *c.shape[1:])) if c.shape[0] == 1 else c


@dataclasses.dataclass(frozen=True, eq=False)
class PQCandidates:
    """PQ-coded candidates (an index chunk): ``codes`` uint8 [N, K, M], ``scales`` float32 [N, K],
    ``pooled`` unit [N, D] float16/float32, ``mask`` bool [N, K] or None, ``weights`` float32 [K]."""

    codes: torch.Tensor
    scales: torch.Tensor
    pooled: torch.Tensor
    mask: Optional[torch.Tensor]
    weights: torch.Tensor

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    def to(self, device) -> "PQCandidates":
        if torch.device(device) == self.codes.device:
            return self
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PQCandidates(mv(self.codes), mv(self.scales), mv(self.pooled), mv(self.mask), mv(self.weights))


def check_m(m, d: int) -> int:
    """Subspaces per prototype: an int >= 1 dividing D."""
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 1 <= int(m) <= d or d % int(m):
        raise ValueError(f"pq_m: expected an int in [1, D={d}] that divides D, got {m!r}")
    return int(m)


def check_coarse(r) -> int:
    """Residual stages: an int in [0, MAX_COARSE]."""
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 0 <= int(r) <= MAX_COARSE:
        raise ValueError(f"pq_coarse: expected an int in [0, {MAX_COARSE}], got {r!r}")
    return int(r)


def default_m(d: int) -> int:
    """D / 4 subspaces (4-dimensional subvectors: 64 bytes per prototype at D = 256), or the largest
    divisor of D not above that."""
    m = max(1, d // 4)
    while d % m:
        m -= 1
    return m


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "dtype 'pq' trains its codebook with FAISS; install faiss-cpu (pip install 'pecm[ann]')"
        ) from None
    return faiss


def train(
    unit: np.ndarray,
    mask: Optional[np.ndarray],
    m: int,
    per_slot: bool,
    seed: int = 0,
    sample: int = TRAIN_SAMPLE,
    coarse: int = 0,
) -> Codebook:
    """A codebook trained on (a sample of) the valid unit prototypes ``unit`` [n, K, D]: ``coarse`` residual
    stages per slot first, then the PQ centroids on what they leave."""
    faiss = _faiss()
    n, k, d = unit.shape
    valid = np.ones((n, k), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    rng = np.random.default_rng(seed)
    stages = None
    if coarse:
        unit = np.array(unit, dtype=np.float32)  # becomes the residual after each stage
        stages = np.zeros((k, coarse, KSUB, d), dtype=np.float32)
        for t in range(k):
            rows = np.nonzero(valid[:, t])[0]
            for j in range(coarse):
                x = unit[rows, t]  # (a copy: the residual of slot t so far)
                fit = x if len(x) <= COARSE_SAMPLE else x[rng.choice(len(x), size=COARSE_SAMPLE, replace=False)]
                stages[t, j] = _kmeans(faiss, np.ascontiguousarray(fit), seed + 7919 * t + j)
                unit[rows, t] = x - stages[t, j][_nearest(x, stages[t, j]).numpy()]
    groups = [np.arange(k)] if not per_slot else [np.array([t]) for t in range(k)]
    out = []
    for g in groups:
        rows, slots = np.nonzero(valid[:, g])
        have = rows.size
        if have < MIN_TRAIN:
            what = "all slots" if not per_slot else f"slot {int(g[0])}"
            raise ValueError(
                f"prototypes: training a PQ codebook needs at least {MIN_TRAIN} valid prototypes for {what}, got "
                f"{have}; add more items in the first add (or call train_pq with a sample)"
            )
        pick = rng.choice(have, size=min(sample, have), replace=False) if have > sample else np.arange(have)
        x = np.ascontiguousarray(unit[rows[pick], g[slots[pick]]], dtype=np.float32)
        pq = faiss.ProductQuantizer(d, m, 8)
        pq.cp.seed = int(seed)
        pq.verbose = False
        pq.cp.min_points_per_centroid = 1  # (small first adds: no FAISS warning; MIN_TRAIN is checked above)
        pq.train(x)
        out.append(faiss.vector_to_array(pq.centroids).reshape(m, KSUB, d // m).astype(np.float32))
    return Codebook(np.ascontiguousarray(np.stack(out)), stages)


def _kmeans(faiss, x: np.ndarray, seed: int) -> np.ndarray:
    """256 centroids [256, D] of the rows of ``x`` (k-means); with fewer than 256 distinct rows, those rows
    themselves (exact codes for them), padded with zero centroids."""
    uniq = np.unique(x, axis=0)
    if len(uniq) <= KSUB:
        out = np.zeros((KSUB, x.shape[1]), dtype=np.float32)
        out[: len(uniq)] = uniq
        return out
    km = faiss.Kmeans(x.shape[1], KSUB, niter=20, seed=int(seed) % (2**31), verbose=False)
    km.cp.min_points_per_centroid = 1
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def _nearest(x, cent: np.ndarray, chunk: int = 65536) -> torch.Tensor:
    """Index (int64) of the nearest of the centroids ``cent`` [256, D] (squared L2) for each row of ``x``
    [n, D] (numpy or torch float32): argmax of <x, c> - ||c||^2 / 2, ties to the smaller index."""
    c = torch.from_numpy(np.ascontiguousarray(cent, dtype=np.float32))
    half = torch.from_numpy((np.square(cent, dtype=np.float64).sum(-1) / 2).astype(np.float32))
    x = torch.as_tensor(x)
    out = torch.empty(len(x), dtype=torch.int64)
    for s in range(0, len(x), chunk):
        out[s : s + chunk] = torch.addmm(half, x[s : s + chunk], c.T, beta=-1).argmax(-1)
    return out


def encode(
    unit: np.ndarray, mask: Optional[np.ndarray], cb: Codebook, scales: str = "float32"
) -> Tuple[np.ndarray, np.ndarray]:
    """(codes uint8 [n, K, R + M], scales [n, K]) of unit prototypes [n, K, D] (masked rows get codes 0 and
    scale 0). ``scales="float16"`` rounds the scales to float16 (the decoded prototypes are then unit up to
    that rounding, relative error <= 2^-11, as a float16 index's prototypes are; a scale above the float16
    range is clamped to its largest value)."""
    c, a = _encode32(unit, mask, cb)
    if scales == "float16":
        a = np.minimum(a, np.finfo(np.float16).max).astype(np.float16)
    elif scales != "float32":
        raise ValueError(f"scales: expected 'float16' or 'float32', got {scales!r}")
    return c, a


def _encode32(unit: np.ndarray, mask: Optional[np.ndarray], cb: Codebook) -> Tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(unit, dtype=np.float32)
    mk = None if mask is None else np.ascontiguousarray(mask, dtype=bool).view(np.uint8)
    if not cb.r:
        return _pq_encode(x, mk, cb)
    n, k, _ = x.shape
    r, m = cb.r, cb.m
    codes = np.zeros((n, k, r + m), dtype=np.uint8)
    scales = np.zeros((n, k), dtype=np.float32)
    xt = torch.from_numpy(x)
    for t in range(k):  # one slot at a time: its [n, D] rows stay in cache, no [n, K, D] temporaries
        resid = xt[:, t].contiguous()  # what the coarse stages leave; then the input of the PQ codes
        for j in range(r):
            c = _nearest(resid, cb.coarse[t, j])
            codes[:, t, j] = c.numpy()
            resid -= torch.from_numpy(cb.coarse[t, j])[c]
        one = Codebook(cb.centroids[t : t + 1] if cb.s > 1 else cb.centroids)  # slot t's PQ codebook
        mt = None if mk is None else np.ascontiguousarray(mk[:, t : t + 1])
        pc, _ = _pq_encode(resid.numpy()[:, None, :], mt, one)
        codes[:, t, r:] = pc[:, 0]
        dec = _decode_pq(torch.from_numpy(pc), one)[:, 0]  # the PQ part; + what the coarse stages took out:
        dec += xt[:, t]
        dec -= resid
        nrm = torch.linalg.vector_norm(dec, dim=-1)
        scales[:, t] = torch.where(nrm > 0, nrm.reciprocal(), torch.zeros_like(nrm)).numpy()
    if mk is not None:
        bad = mk == 0
        codes[bad] = 0
        scales[bad] = 0.0
    return codes, scales


def _pq_encode(x: np.ndarray, mk: Optional[np.ndarray], cb: Codebook) -> Tuple[np.ndarray, np.ndarray]:
    """The M PQ codes and 1/||decoded|| of the PQ part alone (the C++ encoder, else torch)."""
    try:
        from . import _C
    except ImportError:
        _C = None
    if _C is not None:
        return _C.pq_encode(x, mk, cb.centroids)
    return _encode_torch(x, mk, cb)


def _encode_torch(x: np.ndarray, mk: Optional[np.ndarray], cb: Codebook) -> Tuple[np.ndarray, np.ndarray]:
    n, k, d = x.shape
    m, ds = cb.m, d // cb.m
    cent = torch.from_numpy(np.ascontiguousarray(cb.slot_centroids(k)))  # [K, M, 256, DS]
    half = (cent * cent).sum(-1) / 2  # [K, M, 256]
    codes = np.empty((n, k, m), dtype=np.uint8)
    norm2 = torch.zeros((n, k), dtype=torch.float64)
    xt = torch.from_numpy(x).view(n, k, m, ds)
    for t in range(k):
        s = torch.einsum("nmj,mcj->nmc", xt[:, t], cent[t]) - half[t]  # argmax = nearest (ties: first)
        c = s.argmax(-1)
        codes[:, t] = c.numpy().astype(np.uint8)
        norm2[:, t] = (2 * half[t].double()).gather(1, c.T).T.sum(-1)
    scales = torch.where(norm2 > 0, norm2.rsqrt(), torch.zeros_like(norm2)).float().numpy()
    if mk is not None:
        bad = mk == 0
        codes[bad] = 0
        scales[bad] = 0.0
    return codes, scales


def _decode_pq(codes: torch.Tensor, cb: Codebook, dtype=torch.float32) -> torch.Tensor:
    """concat_m cent[s(k), m, code_m] [n, K, D] of PQ codes [n, K, M] (no coarse part, no scale)."""
    n, k, m = codes.shape
    cent = torch.from_numpy(cb.centroids).to(dtype)  # [S, M, 256, DS]
    flat = cent.reshape(-1, cent.shape[-1])  # row (s*M + m)*256 + c
    s_of_k = torch.zeros(k, dtype=torch.int64) if cb.s == 1 else torch.arange(k)
    base = ((s_of_k.view(k, 1) * m + torch.arange(m).view(1, m)) * KSUB).view(1, k, m)
    return torch.nn.functional.embedding(codes.long() + base, flat).reshape(n, k, -1)


def decode(codes: np.ndarray, scales: np.ndarray, cb: Codebook, dtype=np.float32) -> np.ndarray:
    """The decoded unit prototypes [n, K, D] (``a · (Σ_j coarse[code_j] + concat_m cent[code_{R+m}])``; 0 for
    masked ones)."""
    tdt = torch.float64 if np.dtype(dtype) == np.float64 else torch.float32
    c = torch.as_tensor(np.asarray(codes))
    k, r = c.shape[1], cb.r
    out = _decode_pq(c[:, :, r:], cb, tdt)
    for j in range(r):
        g = torch.from_numpy(cb.coarse[:, j]).to(tdt).reshape(-1, cb.d)  # row t*256 + c
        out += torch.nn.functional.embedding(c[:, :, j].long() + KSUB * torch.arange(k).view(1, k), g)
    out *= torch.as_tensor(np.asarray(scales)).to(tdt).unsqueeze(-1)
    return out.numpy().astype(dtype, copy=False)


def lut(qs: Queries, cb: Codebook) -> torch.Tensor:
    """Lookup tables float32 [B, K, R + M, 256]: w_k mq_k <q̂_k, coarse[k, j, c]> for the R coarse stages,
    then w_k mq_k <q̂_k|m, cent[s(k), m, c]> (see the module docstring)."""
    b, k, d = qs.b, qs.k, qs.d
    if cb.d != d:
        raise ValueError(f"codebook: built for D={cb.d}, the queries have D={d}")
    m = cb.m
    qf = qs.qw.detach().float()
    qw = qf.reshape(b, k, m, d // m)
    cent = torch.from_numpy(cb.centroids).to(qw.device)  # [S, M, 256, DS]
    if cb.s == 1:
        t = torch.einsum("bkmj,mcj->bkmc", qw, cent[0])
    else:
        t = torch.einsum("bkmj,kmcj->bkmc", qw, cent)
    if cb.r:
        g = torch.from_numpy(cb.coarse).to(qw.device)  # [K, R, 256, D]
        t = torch.cat([torch.einsum("bkd,kjcd->bkjc", qf.reshape(b, k, d), g), t], dim=2)
    return t.contiguous()


def _torch_values(qs: Queries, table: torch.Tensor, cs: PQCandidates, rows: torch.Tensor):
    """(sim, conf, score) [B, R] of candidate rows ``rows`` [R] by gathering ``table`` (no decoding)."""
    b, k = qs.b, qs.k
    m = cs.codes.shape[2]
    codes = cs.codes[rows].long()  # [R, K, M]
    flat = (torch.arange(k * m, device=codes.device).view(1, k, m) * KSUB + codes).view(1, -1)  # [1, R*K*M]
    g = table.reshape(b, -1).gather(1, flat.expand(b, -1)).view(b, rows.numel(), k, m).sum(-1)  # [B, R, K]
    num = (g * cs.scales[rows].float().unsqueeze(0)).sum(-1)
    if cs.mask is None:
        den = qs.qden.float().sum(-1, keepdim=True).expand(b, rows.numel())
    else:
        den = qs.qden.float() @ cs.mask[rows].float().T
    conf = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
    sim = qs.qp.float() @ cs.pooled[rows].float().T
    return sim, conf, sim * conf


def _pick(by: By, vals):
    return vals[{By.SCORE: 2, By.SIM: 0, By.CONF: 1}[by]]


def _backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "cpp", "torch", "triton"):
        raise ValueError(f"backend: expected 'auto', 'cpp', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "triton"
        try:
            from . import _C  # noqa: F401

            return "cpp"
        except ImportError:
            return "torch"
    return backend


def _cpp(qs: Queries, table: torch.Tensor, cs: PQCandidates):
    from . import _C
    from .backends.cpp_backend import _np, _queries

    h = cs.__dict__.get("_cpp")
    if h is None:
        dt = "float16" if cs.pooled.dtype == torch.float16 else "float32"
        h = _C.PQCandidates(
            cs.codes.numpy(), cs.scales.numpy(), _np(cs.pooled), dt, _np(cs.weights.float()), _np(cs.mask)
        )
        object.__setattr__(cs, "_cpp", h)
    return _C, _queries(qs), np.ascontiguousarray(table.reshape(qs.b, -1).numpy()), h


def pq_scores(qs: Queries, table: torch.Tensor, cs: PQCandidates, backend: str = "auto"):
    """(sim, conf, score) float32 [B, N] of PQ candidates (unfused; for tests and small problems)."""
    be = _backend(backend, cs.codes.device)
    if be == "cpp":
        C, q, t, h = _cpp(qs, table, cs)
        return tuple(torch.from_numpy(x) for x in C.pq_scores(q, t, h))
    if be == "triton":
        from .kernels import pq_scores as tri

        return tri(*_triton_args(qs, table, cs))
    return _torch_values(qs, table, cs, torch.arange(cs.n, device=cs.codes.device))


def _triton_args(qs: Queries, table: torch.Tensor, cs: PQCandidates):
    cm = None if cs.mask is None else cs.mask.view(torch.uint8)
    qden = qs.qden.float().contiguous()
    return (table, cs.codes, cs.scales, cm, qden, qden.sum(-1), qs.qp.float().contiguous(), cs.pooled)


def pq_topk(
    qs: Queries, table: torch.Tensor, cs: PQCandidates, k: int, by=By.SCORE, cand=None, backend: str = "auto"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` candidates per query by ``by`` (values float32 [B, k] descending, row ids int64 [B, k];
    (-inf, -1) padding), scored from the codes. ``cand`` int64 [B, Mc] (-1 = padding) restricts query b
    to those rows (the re-rank of a shortlist). Inputs are trusted (the index builds them)."""
    from .topk import RunningTopK

    by = By.parse(by)
    be = _backend(backend, cs.codes.device)
    if be == "cpp":
        C, q, t, h = _cpp(qs, table, cs)
        if cand is None:
            v, i = C.pq_topk(q, t, h, int(k), C.By(int(by)))
        else:
            v, i = C.pq_rerank(q, t, h, np.ascontiguousarray(cand, dtype=np.int64), int(k), C.By(int(by)))
        return torch.from_numpy(v), torch.from_numpy(i)
    if be == "triton":
        from .kernels import pq_topk as tri

        c = None if cand is None else torch.as_tensor(cand, device=cs.codes.device)
        return tri(*_triton_args(qs, table, cs), int(k), int(by), cand=c)
    best = RunningTopK(qs.b, k)
    if cand is None:
        for s in range(0, cs.n, TORCH_CHUNK):
            rows = torch.arange(s, min(cs.n, s + TORCH_CHUNK))
            v = _pick(by, _torch_values(qs, table, cs, rows))
            best.add(v.masked_fill(torch.isnan(v), float("-inf")), offset=s)
        return best.result()
    cand = torch.as_tensor(cand)
    outs = []
    for b in range(qs.b):  # the re-rank: each query's own rows
        rows = cand[b][cand[b] >= 0]
        one = RunningTopK(1, k)
        if rows.numel():
            v = _pick(by, _torch_values(qs.slice(b, b + 1), table[b : b + 1], cs, rows))
            one.add(v.masked_fill(torch.isnan(v), float("-inf")), rows.view(1, -1))
        outs.append(one.result())
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
