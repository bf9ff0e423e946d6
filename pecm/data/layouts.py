"""Loaders for the ROCO and MIMIC-CXR folder layouts, and the default data folder.

ROCO (what ``../shared/data/roco`` and the shipped sample ``pecm/data/roco_sample`` hold)::

    DIR/pairs.jsonl          {"id","image":"images/<id>.jpg","caption","cuis":[...],"license","source"}
    DIR/images/<id>.jpg
    DIR/ATTRIBUTION.tsv      (id, licence, source; keep it when redistributing)

MIMIC-CXR (PhysioNet credentialed data; not shipped). Either a ``pairs.jsonl`` with ``"report"`` already
written, or the original layout, which `load_mimic` converts on the fly::

    DIR/files/p10/p10000032/s50414267/<dicom_id>.jpg     (MIMIC-CXR-JPG)
    DIR/files/p10/p10000032/s50414267.txt                (the free-text report of that study)

One pair per study (the first JPEG in sorted order); CUIs are empty unless a ``pairs.jsonl`` gives them.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from typing import Optional, Union

from .pairs import PAIRS_FILE, PairSet, load_pairs

PathLike = Union[str, "os.PathLike[str]"]

_HERE = os.path.dirname(os.path.abspath(__file__))
# The attributed 320-pair sample is package data (pecm/data/roco_sample/, in the wheel too): found next to this
# module, never through the source tree.
SAMPLE_ROCO = os.path.join(_HERE, "roco_sample")


def _source_tree_root() -> Optional[str]:
    """The repository root when pecm runs from its source tree (editable install, PYTHONPATH), else None."""
    root = os.path.dirname(os.path.dirname(_HERE))
    markers = ("setup.py", "CMakeLists.txt", os.path.join("csrc", "bindings.cpp"))
    return root if all(os.path.exists(os.path.join(root, m)) for m in markers) else None


REPO_ROOT = _source_tree_root()
# The full ROCO test-split subset, next to the source tree (``../shared/data/roco``); an installed package has
# no source tree, so there it is None and --data names any other folder.
SHARED_ROCO = os.path.join(REPO_ROOT, "..", "shared", "data", "roco") if REPO_ROOT else None


def default_data_dir() -> str:
    """``../shared/data/roco`` (beside the source tree) when present, else the shipped sample (package data)."""
    if SHARED_ROCO and os.path.isfile(os.path.join(SHARED_ROCO, PAIRS_FILE)):
        return os.path.normpath(SHARED_ROCO)
    if os.path.isfile(os.path.join(SAMPLE_ROCO, PAIRS_FILE)):
        return SAMPLE_ROCO
    if SHARED_ROCO:
        raise FileNotFoundError(f"data: neither {os.path.normpath(SHARED_ROCO)} nor {SAMPLE_ROCO} holds {PAIRS_FILE}")
    raise FileNotFoundError(f"data: the shipped sample {SAMPLE_ROCO} lacks {PAIRS_FILE} (incomplete install?)")


def load_roco(root: Optional[PathLike] = None, limit: Optional[int] = None, verify_images: bool = True) -> PairSet:
    return load_pairs(root or default_data_dir(), limit=limit, verify_images=verify_images)


def load_mimic(root: PathLike, limit: Optional[int] = None, verify_images: bool = True) -> PairSet:
    """MIMIC-CXR: ``pairs.jsonl`` if present, else the ``files/pXX/pNNN/sNNN`` layout (see module doc)."""
    root = os.path.abspath(os.fspath(root))
    if os.path.isfile(os.path.join(root, PAIRS_FILE)):
        return load_pairs(root, limit=limit, verify_images=verify_images)
    rows = []
    for study in sorted(glob.glob(os.path.join(root, "files", "p*", "p*", "s*"))):
        if not os.path.isdir(study):
            continue
        jpgs = sorted(glob.glob(os.path.join(study, "*.jpg")))
        txt = study + ".txt"
        report = open(txt, encoding="utf-8", errors="replace").read() if os.path.isfile(txt) else ""
        rows.append(
            {"id": os.path.basename(study), "image": jpgs[0] if jpgs else study + "/missing.jpg", "report": report}
        )
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise FileNotFoundError(f"data: {root} has neither {PAIRS_FILE} nor files/p*/p*/s* studies (MIMIC-CXR layout)")
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, PAIRS_FILE), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        ps = load_pairs(tmp, verify_images=verify_images)
    ps.root = root
    return ps


def load_dataset(
    root: Optional[PathLike] = None, layout: str = "auto", limit: Optional[int] = None, verify_images: bool = True
) -> PairSet:
    """``layout`` in {"auto", "pairs", "roco", "mimic"}; "auto" reads pairs.jsonl, else tries MIMIC-CXR."""
    if layout not in ("auto", "pairs", "roco", "mimic"):
        raise ValueError(f"layout: expected one of auto/pairs/roco/mimic, got {layout!r}")
    if layout == "mimic" or (layout == "auto" and root and not os.path.isfile(os.path.join(root, PAIRS_FILE))):
        return load_mimic(root, limit=limit, verify_images=verify_images)
    return load_roco(root, limit=limit, verify_images=verify_images)
