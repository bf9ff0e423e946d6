"""`pecm eval --checkpoint CKPT --data DIR [--by score|sim|conf|score_pos] [--json]`: retrieval metrics of a
checkpoint. ``score_pos`` (R⁺ = sim · max(C, 0), `pecm.metrics.score_pos`) is an evaluation-only ranking: it is
computed, and gets a table row, only when asked for."""

from __future__ import annotations

import json
import logging

from ._common import add_progress_flags, show_progress


def eval_summary(res: dict, by: str, n: int) -> dict:
    """The `--json` object for ranking key ``by`` (percent)."""
    r = res[by]
    out = {
        "image_to_report": r["image_to_report"],
        "report_to_image": r["report_to_image"],
        "cui": r.get("cui"),
        "cbir_cui": dict(r.get("cbir_cui") or {}),
        "n_pairs": n,
        "by": by,
    }
    if "baseline" in res:
        out["cbir_cui"]["baseline@10"] = res["baseline"]["cbir_cui"]["@10"]
    return out


def format_table(res: dict, n: int) -> str:
    """One table: rows = ranking key (sim-only, conf, R = sim*C), columns = metrics (percent)."""
    from ..metrics import chance_levels

    cols = [
        ("i2r R@1", "image_to_report", "R@1"),
        ("i2r R@5", "image_to_report", "R@5"),
        ("i2r R@10", "image_to_report", "R@10"),
        ("r2i R@1", "report_to_image", "R@1"),
        ("r2i R@5", "report_to_image", "R@5"),
        ("r2i R@10", "report_to_image", "R@10"),
        ("CUI@1", "cui", "@1"),
        ("CUI@10", "cui", "@10"),
        ("CBIR P@10", "cbir_cui", "@10"),
    ]
    names = {"sim": "sim only", "conf": "conf only", "score": "R = sim*C", "score_pos": "R+ = sim*max(C,0)"}
    lines = [f"{'ranking (n=' + str(n) + ')':<18}" + "".join(f"{c[0]:>10}" for c in cols)]
    for by in ("sim", "conf", "score", "score_pos"):
        if by not in res:
            continue
        r = res[by]
        cells = []
        for _, a, b in cols:
            v = (r.get(a) or {}).get(b)
            cells.append(f"{v:>10.1f}" if v is not None else f"{'-':>10}")
        lines.append(f"{names[by]:<18}" + "".join(cells))
    ch = chance_levels(n)
    cc = res.get("chance", {})
    tail = "".join(f"{cc[key]:>10.1f}" if key in cc else f"{'-':>10}" for key in ("cui", "cui", "cbir_cui"))
    lines.append(f"{'chance':<18}" + "".join(f"{ch[k]:>10.1f}" for k in (1, 5, 10)) * 2 + tail)
    base = res.get("baseline", {}).get("cbir_cui", {}).get("@10")
    if base is not None:
        lines.append(f"{'raw backbone':<18}" + f"{'-':>10}" * 8 + f"{base:>10.1f}")
    return "\n".join(lines)


def _run(a) -> int:
    import torch

    from ..data import load_dataset, split_pairs
    from ..metrics import RANKING_KEYS
    from ..model import PECM
    from ..train import evaluate_features, extract_features

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("gensim").setLevel(logging.WARNING)
    if a.by not in RANKING_KEYS:
        raise ValueError(f"--by: expected one of {', '.join(RANKING_KEYS)}, got {a.by!r}")
    model = PECM.load(a.checkpoint, map_location=a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pairs = load_dataset(a.data, layout=a.layout, limit=a.limit)
    if a.test_split is not None:  # the held-out split of `pecm demo` / a seeded split of DIR
        _, pairs = split_pairs(pairs, a.test_split, a.seed)
    progress = show_progress(a, quiet=a.json)
    feats = extract_features(model, pairs, a.batch_size, progress=progress)
    cuis = pairs.cuis if any(pairs.cuis) else None
    by_list = ("sim", "score", "conf") + (("score_pos",) if a.by == "score_pos" else ())
    res = evaluate_features(model, feats, cuis, by_list=by_list)
    if a.json:
        print(json.dumps(eval_summary(res, a.by, len(pairs)), default=float))
    else:
        print(format_table(res, len(pairs)))
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: Recall@K both ways, CUI@K, CBIR, sim-only vs R")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--layout", default="auto", choices=("auto", "pairs", "roco", "mimic"))
    p.add_argument(
        "--by",
        default="score",
        help="ranking key for --json: score (R), sim, conf, or score_pos (R+ = sim*max(C,0), also a table row)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int)
    p.add_argument(
        "--test-split",
        type=float,
        metavar="FRACTION",
        help="evaluate only the seeded held-out split of DIR (pecm demo: --test-split 0.2 --seed 0)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --test-split")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device")
    add_progress_flags(p)
    p.set_defaults(func=_run)
