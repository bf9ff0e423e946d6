"""Merge several ``results.json`` files into one Markdown report (table + plots)."""

from __future__ import annotations

import json
import os
from typing import List

from .plots import all_plots
from .runner import format_table
from .schema import validate


def load(path: str) -> dict:
    """A results.json (or a directory holding one), validated against the schema."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"DIR: no results.json at {path}")
    with open(path) as f:
        res = json.load(f)
    errs = validate(res)
    if errs:
        raise ValueError(f"DIR: {path} does not match the results schema: {'; '.join(errs[:3])}")
    return res


def make_report(paths: List[str], out_dir: str) -> str:
    """Write ``report.md`` and the plots into ``out_dir``; returns the Markdown text."""
    if not paths:
        raise ValueError("DIR: expected at least one results directory or results.json")
    results = [load(p) for p in paths]
    os.makedirs(out_dir, exist_ok=True)
    pngs = all_plots(results, out_dir)
    parts = ["# PECM op benchmark report", ""]
    for p, res in zip(paths, results):
        env = res["environment"]
        parts += [
            f"## {res['op']} on {env['device_name']} ({env['device']})",
            "",
            f"source `{p}`, {env['time_utc']}, versions {env['versions']}",
            "",
            format_table(res),
            "",
        ]
    parts += ["## Plots", ""] + [f"![{os.path.basename(x)}]({os.path.basename(x)})" for x in pngs]
    text = "\n".join(parts) + "\n"
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    return text
