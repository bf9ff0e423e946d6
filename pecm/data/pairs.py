"""Image–report pair datasets over a folder holding ``pairs.jsonl`` (DESIGN §5, §7).

Each line of ``pairs.jsonl`` is a JSON object::

    {"id": "...", "image": "images/x.jpg", "caption": "..." | "report": "...", "cuis": [...], ...}

``image`` is relative to the folder (absolute paths are used as is). The text is ``report`` when present,
else ``caption``. ``cuis`` (UMLS concept ids, optional) drive CUI@K and CBIR precision. Any other keys
(licence, source, ...) are kept in ``Pair.extra``.

Bad rows (invalid JSON, missing id/image/text, empty text, missing or unreadable image) are skipped;
the loader logs one warning with the count per reason and keeps the details in ``PairSet.skipped``.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

log = logging.getLogger("pecm.data")

PAIRS_FILE = "pairs.jsonl"


@dataclass
class Pair:
    id: str
    image: str  # absolute path
    text: str
    cuis: List[str] = field(default_factory=list)
    extra: Dict = field(default_factory=dict)


@dataclass
class PairSet:
    """A list of valid pairs plus the skipped rows ``(line number, reason)``."""

    root: str
    pairs: List[Pair]
    skipped: List[Tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]

    def subset(self, idx: Sequence[int]) -> "PairSet":
        return PairSet(self.root, [self.pairs[i] for i in idx], [])

    @property
    def texts(self) -> List[str]:
        return [p.text for p in self.pairs]

    @property
    def images(self) -> List[str]:
        return [p.image for p in self.pairs]

    @property
    def cuis(self) -> List[List[str]]:
        return [p.cuis for p in self.pairs]


def _image_ok(path: str, verify: bool) -> Optional[str]:
    if not os.path.isfile(path):
        return "missing image"
    if verify:
        try:
            from PIL import Image

            with Image.open(path) as im:
                im.verify()
        except Exception:  # any decoder error means unreadable
            return "unreadable image"
    elif os.path.getsize(path) == 0:
        return "unreadable image"
    return None


def load_pairs(root, limit: Optional[int] = None, verify_images: bool = True, pairs_file: str = PAIRS_FILE) -> PairSet:
    """Read ``root/pairs.jsonl``; returns a `PairSet` of the valid rows (bad rows skipped and counted)."""
    root = os.path.abspath(os.fspath(root))
    path = os.path.join(root, pairs_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data: {path} not found (expected a folder with {pairs_file})")
    pairs: List[Pair] = []
    skipped: List[Tuple[int, str]] = []
    seen = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(pairs) >= limit:
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped.append((lineno, "invalid JSON"))
                continue
            if not isinstance(row, dict) or not row.get("id") or not row.get("image"):
                skipped.append((lineno, "missing id or image"))
                continue
            text = row.get("report", row.get("caption"))
            if not isinstance(text, str) or not text.strip():
                skipped.append((lineno, "empty text"))
                continue
            if row["id"] in seen:
                skipped.append((lineno, "duplicate id"))
                continue
            img = row["image"] if os.path.isabs(row["image"]) else os.path.join(root, row["image"])
            bad = _image_ok(img, verify_images)
            if bad:
                skipped.append((lineno, bad))
                continue
            seen.add(row["id"])
            cuis = row.get("cuis") or []
            extra = {k: v for k, v in row.items() if k not in ("id", "image", "caption", "report", "cuis")}
            pairs.append(Pair(str(row["id"]), img, text.strip(), [str(c) for c in cuis], extra))
    if skipped:
        counts = Counter(r for _, r in skipped)
        log.warning(
            "data: skipped %d bad rows in %s (%s)",
            len(skipped),
            path,
            ", ".join(f"{k}: {v}" for k, v in counts.items()),
        )
    if not pairs:
        raise ValueError(f"data: no valid pairs in {path} ({len(skipped)} rows skipped)")
    return PairSet(root, pairs, skipped)


def split_pairs(ps: PairSet, test_fraction: float = 0.2, seed: int = 0) -> Tuple[PairSet, PairSet]:
    """Seeded random train/test split (by row)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a float in (0, 1), got {test_fraction}")
    idx = list(range(len(ps)))
    random.Random(seed).shuffle(idx)
    n_test = max(1, int(round(len(idx) * test_fraction)))
    if n_test >= len(idx):
        raise ValueError(f"test_fraction: leaves no training pairs out of {len(idx)}")
    return ps.subset(sorted(idx[n_test:])), ps.subset(sorted(idx[:n_test]))
