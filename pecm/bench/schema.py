"""The documented layout of ``results.json`` and a small validator (jsonschema is not a dependency).

The schema is a JSON-Schema subset (``type``, ``required``, ``properties``, ``items``, ``enum``,
``additionalProperties``) and `validate` implements exactly that subset.
"""

from __future__ import annotations

from typing import Any, List

_NUM = {"type": "number"}
_STR = {"type": "string"}

MEASUREMENT_SCHEMA = {
    "type": "object",
    "required": ["op", "impl", "kind", "shape", "dtype", "status", "pairs", "bytes", "flops"],
    "properties": {
        "op": {"type": "string", "enum": ["topk", "rerank", "scores"]},
        "impl": _STR,
        "kind": {"type": "string", "enum": ["backend", "peer"]},
        "shape": {"type": "object", "required": ["N", "B", "K", "D"], "additionalProperties": {"type": "integer"}},
        "dtype": _STR,
        "by": {"type": "string", "enum": ["score", "sim", "conf"]},
        "status": {"type": "string", "enum": ["ok", "failed", "skipped"]},
        "reason": _STR,
        "pairs": _NUM,
        "bytes": _NUM,
        "flops": _NUM,
        "median_s": _NUM,
        "iqr_s": _NUM,
        "min_s": _NUM,
        "samples_s": {"type": "array", "items": _NUM},
        "pairs_per_s": _NUM,
        "GBps": _NUM,
        "GFLOPs": _NUM,
        "frac_bw": _NUM,
        "frac_flops": _NUM,
        "speedup_vs": {"type": "object", "additionalProperties": _NUM},
        "fastest_peer": {"type": ["string", "null"]},
        "ratio_vs_fastest_peer": {"type": ["number", "null"]},
    },
}

# fields that must be present when status == "ok"
OK_FIELDS = ("median_s", "iqr_s", "samples_s", "pairs_per_s", "GBps", "GFLOPs", "frac_bw", "frac_flops")

RESULTS_SCHEMA = {
    "type": "object",
    "required": ["schema_version", "op", "environment", "ceilings", "checks", "settings", "measurements"],
    "properties": {
        "schema_version": {"type": "integer", "enum": [1]},
        "op": {"type": "string", "enum": ["topk", "rerank", "scores"]},
        "environment": {
            "type": "object",
            "required": [
                "device",
                "device_name",
                "cpu_model",
                "cpu_count",
                "versions",
                "git_commit",
                "loadavg_1min_start",
                "time_utc",
            ],
            "properties": {
                "device": _STR,
                "device_name": _STR,
                "cpu_model": _STR,
                "cpu_count": {"type": "integer"},
                "versions": {
                    "type": "object",
                    "required": ["torch", "triton", "numpy", "pecm"],
                    "additionalProperties": _STR,
                },
                "git_commit": _STR,
                "loadavg_1min_start": _NUM,
                "time_utc": _STR,
            },
        },
        "ceilings": {
            "type": "object",
            "required": ["copy_GBps", "matmul_GFLOPs"],
            "properties": {"copy_GBps": _NUM, "matmul_GFLOPs": _NUM},
        },
        "checks": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["kind", "ok", "detail"],
                "properties": {"ok": {"type": "boolean"}, "detail": _STR},
            },
        },
        "settings": {"type": "object", "required": ["repeats", "warmup", "topk", "dtype"]},
        "measurements": {"type": "array", "items": MEASUREMENT_SCHEMA},
    },
}

_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _is(v: Any, t: str) -> bool:
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, _TYPES[t])


def _walk(v: Any, s: dict, path: str, errors: List[str]) -> None:
    types = s.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is(v, t) for t in types):
            errors.append(f"{path}: expected {'/'.join(types)}, got {type(v).__name__}")
            return
    if "enum" in s and v not in s["enum"]:
        errors.append(f"{path}: {v!r} not in {s['enum']}")
    if isinstance(v, dict):
        for k in s.get("required", ()):
            if k not in v:
                errors.append(f"{path}: missing required key {k!r}")
        props = s.get("properties", {})
        extra = s.get("additionalProperties")
        for k, sub in v.items():
            if k in props:
                _walk(sub, props[k], f"{path}.{k}", errors)
            elif isinstance(extra, dict):
                _walk(sub, extra, f"{path}.{k}", errors)
    if isinstance(v, list) and "items" in s:
        for i, item in enumerate(v):
            _walk(item, s["items"], f"{path}[{i}]", errors)


def validate(results: Any, schema: dict = RESULTS_SCHEMA) -> List[str]:
    """List of problems (empty = valid), including the status-dependent rule: an "ok" measurement
    carries its timings and derived rates, a failed/skipped one carries a reason."""
    errors: List[str] = []
    _walk(results, schema, "$", errors)
    if schema is RESULTS_SCHEMA and isinstance(results, dict):
        for i, m in enumerate(results.get("measurements") or []):
            if not isinstance(m, dict):
                continue
            if m.get("status") == "ok":
                errors += [f"$.measurements[{i}]: status ok but no {f!r}" for f in OK_FIELDS if f not in m]
            elif "reason" not in m:
                errors.append(f"$.measurements[{i}]: status {m.get('status')!r} without a reason")
    return errors
