"""Validation of `pecm serve` request bodies: every problem is an `APIError` naming the field.

`parse_search` turns a ``POST /search`` body into a `Query` (the prototypes not yet encoded); `parse_items`
a ``POST /items`` body into a list of `Item`. Images are decoded here once (format, size, pixels), so a bad
one is refused before it can fail a whole micro-batch.
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import json
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from ..index import filters
from ..index.search import MODES
from ..query import check_finite
from .errors import APIError, bad

QUERY_KINDS = ("text", "image", "prototypes", "id")
SEARCH_FIELDS = frozenset(QUERY_KINDS + ("mask", "k", "index", "mode", "by", "where"))
ITEM_FIELDS = frozenset(("text", "image", "prototypes", "mask", "metadata"))
BYS = ("score", "sim", "conf")
IMAGE_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png"}
MAX_PIXELS = 40_000_000  # decoded image size limit (width * height) of queries and ingested images
MAX_TEXT = 100_000  # characters of a report


@dataclass
class Query:
    """One search request: ``kind`` and its ``payload`` (text str, image bytes, prototypes float32 [K, D] or
    item id int), ``mask`` (bool [K] or None), and the search options."""

    kind: str
    payload: object
    mask: Optional[np.ndarray]
    k: int
    index: str
    mode: str
    by: str
    where: Optional[dict]
    where_key: str = field(default="")

    def group(self) -> tuple:
        """Queries with the same group key share one index search call (`pecm.serve.batcher`); ``masked``
        is part of it because an all-true mask and no mask differ in float rounding (Σw vs K)."""
        masked = self.kind != "prototypes" or self.mask is not None  # encoded / stored queries carry a mask
        return (self.index, self.mode, self.by, self.k, self.where_key, masked)


@dataclass
class Item:
    """One item of ``POST /items``: ``kind`` "text" / "image" / "prototypes", its payload and metadata."""

    kind: str
    payload: object
    mask: Optional[np.ndarray]
    metadata: dict


def check_fields(body: dict, allowed: frozenset, where: str) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise bad(f"{where}{extra[0]}", f"unknown field (expected some of {sorted(allowed)})")


def _int(v, name: str, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"expected an int, got {json.dumps(v)[:40]}")
    if v < lo or (hi is not None and v > hi):
        raise bad(name, f"expected an int in [{lo}, {hi}], got {v}" if hi is not None else f"expected >= {lo}")
    return v


def _choice(v, name: str, choices) -> str:
    if v not in choices:
        raise bad(name, f"expected one of {list(choices)}, got {json.dumps(v)[:40]}")
    return v


def parse_text(v, name: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise bad(name, "expected a non-empty string")
    if len(v) > MAX_TEXT:
        raise bad(name, f"{len(v)} characters exceeds the limit of {MAX_TEXT}")
    return v


def parse_image(v, name: str) -> bytes:
    """base64 JPEG or PNG -> its bytes, after decoding it fully once (size limit ``MAX_PIXELS``)."""
    if not isinstance(v, str) or not v:
        raise bad(name, "expected a base64 string of a JPEG or PNG file")
    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise bad(name, "not valid base64") from None
    image_format(raw, name)
    return raw


def image_format(raw: bytes, name: str) -> str:
    """The MIME type of a JPEG / PNG in ``raw``, decoding every pixel; `APIError` naming ``name`` otherwise."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.format not in IMAGE_FORMATS:
                raise bad(name, f"expected a JPEG or PNG image, got {im.format}")
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise bad(name, f"{w}x{h} pixels exceeds the limit of {MAX_PIXELS}", 413)
            im.load()
            return IMAGE_FORMATS[im.format]
    except APIError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise bad(name, f"cannot decode the image ({type(e).__name__}: {e})") from None


def parse_prototypes(v, mask, name: str, mask_name: str, K: int, D: int):
    """[K][D] numbers -> float32 [K, D] (finite) and an optional [K] bool mask."""
    if not isinstance(v, list) or len(v) != K or not all(isinstance(r, list) and len(r) == D for r in v):
        raise bad(name, f"expected a [K={K}][D={D}] list of numbers")
    # exact types, not isinstance: bool (an int subclass) is refused; json.loads makes no other subclasses. One
    # C-level pass over the K*D numbers (the per-number generator took ~0.7 ms of the event loop at K=26, D=256)
    if not set(map(type, itertools.chain.from_iterable(v))) <= {int, float}:
        raise bad(name, "expected numbers only")
    with np.errstate(over="ignore"):  # 1e39 overflows to inf: refused below
        q = np.asarray(v, dtype=np.float32)
    try:
        check_finite(q, name)
    except ValueError as e:
        raise APIError(422, name, str(e)) from None
    m = None
    if mask is not None:
        if not isinstance(mask, list) or len(mask) != K or not all(isinstance(x, bool) for x in mask):
            raise bad(mask_name, f"expected a list of K={K} booleans")
        m = np.asarray(mask, dtype=bool)
    return q, m


def parse_search(body: dict, state, max_k: int) -> Query:
    check_fields(body, SEARCH_FIELDS, "")
    given = [f for f in QUERY_KINDS if body.get(f) is not None]
    if len(given) != 1:
        what = "none" if not given else ", ".join(given)
        raise bad("query", f"expected exactly one of {list(QUERY_KINDS)}, got {what}")
    kind = given[0]
    served = state.index_for(body.get("index"))
    k = _int(body.get("k", 10), "k", 1, max_k)
    mode = _choice(body.get("mode", "exhaustive"), "mode", MODES + ("auto",))
    by = _choice(body.get("by", "score"), "by", BYS)
    where = body.get("where")
    if where is not None:
        if not isinstance(where, dict):
            raise bad("where", f"expected an object of metadata key -> value, got {type(where).__name__}")
        try:
            filters.check_where(where)
        except (TypeError, ValueError) as e:  # "where[...]: ..." / "where: ..."
            raise APIError(422, "where", str(e)) from None
    if body.get("mask") is not None and kind != "prototypes":
        raise bad("mask", "only with prototypes")
    mask = None
    if kind == "text":
        payload = parse_text(body["text"], "text")
    elif kind == "image":
        payload = parse_image(body["image"], "image")
    elif kind == "prototypes":
        payload, mask = parse_prototypes(body["prototypes"], body.get("mask"), "prototypes", "mask", served.K, served.D)
    else:
        payload = _int(body["id"], "id", 0)
    wk = json.dumps(where, sort_keys=True) if where else ""
    return Query(kind, payload, mask, k, served.name, mode, by, where, wk)


def parse_items(body: dict, K: int, D: int, max_items: int) -> List[Item]:
    check_fields(body, frozenset(("items", "index")), "")
    items = body.get("items")
    if not isinstance(items, list) or not items:
        raise bad("items", "expected a non-empty list of {text | image | prototypes, metadata} objects")
    if len(items) > max_items:
        raise bad("items", f"{len(items)} items exceeds the limit of {max_items} per request", 413)
    out = []
    for i, it in enumerate(items):
        p = f"items[{i}]"
        if not isinstance(it, dict):
            raise bad(p, "expected an object")
        check_fields(it, ITEM_FIELDS, f"{p}.")
        given = [f for f in ("text", "image", "prototypes") if it.get(f) is not None]
        if len(given) != 1:
            raise bad(p, f"expected exactly one of ['text', 'image', 'prototypes'], got {given or 'none'}")
        kind = given[0]
        meta = it.get("metadata") or {}
        if not isinstance(meta, dict):
            raise bad(f"{p}.metadata", "expected an object")
        if "id" in meta:
            raise bad(f"{p}.metadata.id", "ids are given by the index")
        for c in ("modality", "source", "text"):
            if c in meta and meta[c] is not None and not isinstance(meta[c], str):
                raise bad(f"{p}.metadata.{c}", "expected a string")
        if kind == "image" and "source" in meta:
            raise bad(f"{p}.metadata.source", "set by the server for an ingested image (the stored file)")
        if kind == "text" and "text" in meta:
            raise bad(f"{p}.metadata.text", "set by the server for an ingested report (the report text)")
        if it.get("mask") is not None and kind != "prototypes":
            raise bad(f"{p}.mask", "only with prototypes")
        mask = None
        if kind == "text":
            payload = parse_text(it["text"], f"{p}.text")
        elif kind == "image":
            payload = parse_image(it["image"], f"{p}.image")
        else:
            payload, mask = parse_prototypes(it["prototypes"], it.get("mask"), f"{p}.prototypes", f"{p}.mask", K, D)
        out.append(Item(kind, payload, mask, dict(meta)))
    return out
