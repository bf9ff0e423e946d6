"""Retrieval metrics (DESIGN §5): Recall@K (both directions), CUI@K, CBIR Precision@K (micro/macro), mAP.

All functions take a score matrix ``scores`` [Nq, Nc] (numpy or torch; higher = better). Conventions:

- Cross-modal ground truth: query i's match is candidate i (paired test set).
- Ties: ranks are *pessimistic* — a candidate tied with the match counts as ranked above it — and
  top-K lists break ties by the lower candidate index (stable sort).
- Results are percentages (0–100).
- CUI@K: mean over queries with ≥ 1 CUI of the fraction of their top-K candidates that share at least one
  UMLS CUI with the query (precision-style; ``mode="hit"`` gives the fraction of queries with ≥ 1 such
  candidate in the top K instead).
- CBIR Precision@K (image → image, the query itself excluded): relevance = shares a CUI. *micro*: relevant
  retrieved / all retrieved over all queries; *macro*: the mean over CUI classes of the mean precision of
  the queries that carry that CUI.
- mAP: mean over queries of average precision over the full ranking for a boolean relevance matrix.
- Ranking keys of the evaluation (`RANKING_KEYS`; `pecm.train.evaluate_prototypes`, ``pecm eval --by``):
  ``"sim"``, ``"conf"``, ``"score"`` (R = sim · C, Eq. 7: what `pecm.ops` and the index rank by) and the
  evaluation-only ``"score_pos"`` = `score_pos` (R⁺ = sim · max(C, 0); docs/model.md, "Sign of R = sim · C").
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

RANKING_KEYS = ("sim", "conf", "score", "score_pos")


def score_pos(sim, conf):
    """R⁺ = sim · max(C, 0) (numpy or torch, elementwise): R = sim · C without its sign quirk. A pair with sim < 0
    and C < 0 has R > 0 and so ranks above every pair with sim ≈ 0 or C ≈ 0; R⁺ gives every pair with C ≤ 0 the
    score 0 and equals R wherever C ≥ 0. An evaluation-time ranking only: `pecm.ops` / the index rank by R."""
    try:
        import torch

        if isinstance(sim, torch.Tensor) or isinstance(conf, torch.Tensor):
            return torch.as_tensor(sim) * torch.as_tensor(conf).clamp_min(0.0)
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(sim) * np.maximum(np.asarray(conf), 0.0)


def _np(scores, name: str = "scores") -> np.ndarray:
    try:
        import torch

        if isinstance(scores, torch.Tensor):
            scores = scores.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(scores, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D matrix [Nq, Nc], got shape {list(a.shape)}")
    return a


def _ks(ks) -> List[int]:
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks: expected positive ints, got {ks}")
    return ks


def ranks_of_match(scores) -> np.ndarray:
    """0-based pessimistic rank of candidate i for query i (square matrix)."""
    s = _np(scores)
    if s.shape[0] != s.shape[1]:
        raise ValueError(f"scores: expected a square matrix for paired ground truth, got {list(s.shape)}")
    d = np.diag(s)[:, None]
    ge = (s >= d).sum(1) - 1  # everything at least as good, minus the match itself
    return ge.astype(np.int64)


def recall_at_k(scores, ks: Iterable[int] = (1, 5, 10)) -> Dict[int, float]:
    r = ranks_of_match(scores)
    return {k: 100.0 * float((r < k).mean()) for k in _ks(ks)}


def topk_ids(scores, k: int, exclude_self: bool = False) -> np.ndarray:
    s = _np(scores).copy()
    if exclude_self:
        n = min(s.shape)
        s[np.arange(n), np.arange(n)] = -np.inf
    k = min(int(k), s.shape[1] - (1 if exclude_self else 0))
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def relevance(q_cuis: Sequence[Sequence[str]], c_cuis: Sequence[Sequence[str]]) -> np.ndarray:
    """bool [Nq, Nc]: shares at least one CUI."""
    vocab = {c: i for i, c in enumerate(sorted({c for cs in list(q_cuis) + list(c_cuis) for c in cs}))}

    def mat(rows):
        m = np.zeros((len(rows), max(len(vocab), 1)), dtype=np.float32)
        for i, cs in enumerate(rows):
            for c in cs:
                m[i, vocab[c]] = 1.0
        return m

    return (mat(q_cuis) @ mat(c_cuis).T) > 0


def cui_at_k(scores, q_cuis, c_cuis, ks: Iterable[int] = (1, 5, 10), mode: str = "precision") -> Dict[int, float]:
    if mode not in ("precision", "hit"):
        raise ValueError(f"mode: expected 'precision' or 'hit', got {mode!r}")
    s = _np(scores)
    if len(q_cuis) != s.shape[0] or len(c_cuis) != s.shape[1]:
        raise ValueError(f"q_cuis/c_cuis: expected {s.shape[0]}/{s.shape[1]} rows, got {len(q_cuis)}/{len(c_cuis)}")
    rel = relevance(q_cuis, c_cuis)
    keep = np.array([len(c) > 0 for c in q_cuis])
    out = {}
    for k in _ks(ks):
        ids = topk_ids(s, k)
        hits = np.take_along_axis(rel, ids, 1)[keep]
        v = hits.mean(1) if mode == "precision" else hits.any(1)
        out[k] = 100.0 * float(v.mean()) if len(v) else float("nan")
    return out


def cbir_precision_at_k(scores, cuis, ks: Iterable[int] = (5, 10, 50)) -> Dict[str, Dict[int, float]]:
    """Image→image Precision@K (query excluded), micro and macro over CUI classes."""
    s = _np(scores)
    if s.shape[0] != s.shape[1] or len(cuis) != s.shape[0]:
        raise ValueError(
            f"scores/cuis: expected a square [N, N] matrix and N cui lists, got {list(s.shape)}/{len(cuis)}"
        )
    rel = relevance(cuis, cuis)
    keep = np.array([len(c) > 0 for c in cuis])
    micro, macro = {}, {}
    for k in _ks(ks):
        ids = topk_ids(s, k, exclude_self=True)
        prec = np.take_along_axis(rel, ids, 1).mean(1)
        micro[k] = 100.0 * float(prec[keep].mean()) if keep.any() else float("nan")
        per_class: Dict[str, List[float]] = {}
        for i, cs in enumerate(cuis):
            for c in set(cs):
                per_class.setdefault(c, []).append(prec[i])
        macro[k] = 100.0 * float(np.mean([np.mean(v) for v in per_class.values()])) if per_class else float("nan")
    return {"micro": micro, "macro": macro}


def mean_average_precision(scores, rel: Optional[np.ndarray] = None) -> float:
    """mAP (percent); ``rel`` bool [Nq, Nc], default the paired diagonal (then mAP = MRR)."""
    s = _np(scores)
    rel = np.eye(*s.shape, dtype=bool) if rel is None else np.asarray(rel, dtype=bool)
    if rel.shape != s.shape:
        raise ValueError(f"rel: expected shape {list(s.shape)}, got {list(rel.shape)}")
    order = np.argsort(-s, axis=1, kind="stable")
    r = np.take_along_axis(rel, order, 1)
    cum = np.cumsum(r, 1)
    prec = cum / np.arange(1, s.shape[1] + 1)
    n = r.sum(1)
    ap = np.where(n > 0, (prec * r).sum(1) / np.maximum(n, 1), np.nan)
    return 100.0 * float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def chance_levels(n: int, ks: Iterable[int] = (1, 5, 10)) -> Dict[int, float]:
    """Recall@K of a random ranking over n candidates."""
    return {k: 100.0 * min(k, n) / n for k in _ks(ks)}


def cui_chance(q_cuis, c_cuis=None) -> float:
    """CUI@K (precision) of a random ranking, the same for every K: the mean over queries with >= 1 CUI of the
    fraction of candidates sharing a CUI with the query. ``c_cuis=None``: image→image (CBIR) with the query
    itself excluded from its candidates."""
    cbir = c_cuis is None
    rel = relevance(q_cuis, q_cuis if cbir else c_cuis).astype(np.float64)
    keep = np.array([len(c) > 0 for c in q_cuis])
    if not keep.any():
        return float("nan")
    if cbir:
        if rel.shape[1] < 2:
            return float("nan")
        frac = (rel.sum(1) - 1.0) / (rel.shape[1] - 1)  # a query with CUIs is relevant to itself
    else:
        frac = rel.mean(1)
    return 100.0 * float(frac[keep].mean())


def retrieval_metrics(score_i2t, cuis: Optional[Sequence[Sequence[str]]] = None) -> dict:
    """Recall@1/5/10 both ways, mAP and (with CUIs) CUI@1/5/10 image→report for one image×report matrix."""
    s = _np(score_i2t)
    i2t, t2i = recall_at_k(s), recall_at_k(s.T)
    out = {
        "image_to_report": {f"R@{k}": v for k, v in i2t.items()},
        "report_to_image": {f"R@{k}": v for k, v in t2i.items()},
        "mAP": {"image_to_report": mean_average_precision(s), "report_to_image": mean_average_precision(s.T)},
    }
    if cuis is not None:
        out["cui"] = {f"@{k}": v for k, v in cui_at_k(s, cuis, cuis).items()}
    return out
