"""Merge several ``results.json`` files (or throughput bundles) into one Markdown report (tables + plots)."""

from __future__ import annotations

import json
import os
from typing import List

from .plots import all_plots
from .runner import format_table
from .schema import validate


def load_bundle(path: str) -> dict:
    """``{"runs": [results, ...], ...}`` from a results.json (or a directory holding one), or from a
    bundle of several runs (as written by bench/throughput.py); every run validated against the schema."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"DIR: no results.json at {path}")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"DIR: {path} is not valid JSON: {e}") from None
    bundle = data if isinstance(data, dict) and isinstance(data.get("runs"), list) else {"runs": [data]}
    if not bundle["runs"]:
        raise ValueError(f"DIR: {path} holds no runs")
    for i, res in enumerate(bundle["runs"]):
        errs = validate(res)
        if errs:
            where = path if len(bundle["runs"]) == 1 else f"{path} (run {i})"
            raise ValueError(f"DIR: {where} does not match the results schema: {'; '.join(errs[:3])}")
    return bundle


def load(path: str) -> dict:
    """One validated results dict (the first run of a bundle)."""
    return load_bundle(path)["runs"][0]


def _shape_text(shape: dict, fixed: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items() if fixed.get(k) != v) or "-"


def headline(results: List[dict]) -> str:
    """The compact table quoted in READMEs: per op and grid point, every implementation's candidate
    pairs/s, GB/s and GFLOP/s with their fraction of the measured ceilings, and its speed relative to
    the fastest exact peer at that point (> 1 = faster than every peer). Parameters that are the same
    in every row of an op are given once in the heading."""
    parts = []
    for res in results:
        rows = res["measurements"]
        if not rows:
            continue
        env, ce = res["environment"], res["ceilings"]
        keys = list(rows[0]["shape"])
        fixed = {k: rows[0]["shape"][k] for k in keys if all(r["shape"].get(k) == rows[0]["shape"][k] for r in rows)}
        load = f"{env['loadavg_1min_start']:.2f}"
        if env.get("loadavg_1min_end") is not None:
            load += f" -> {env['loadavg_1min_end']:.2f}"
        parts += [
            f"**{res['op']}** ({', '.join(f'{k}={v}' for k, v in fixed.items())}, {res['settings']['dtype']}, "
            f"top-{res['settings']['topk']}) on {env['device_name']} ({env['device']}, {env['cpu_count']} cores), "
            f"{env['time_utc']}, load {load}, commit `{env['git_commit'][:12]}`; ceilings: copy "
            f"{ce['copy_GBps']:.1f} GB/s, fp32 matmul {ce['matmul_GFLOPs']:.0f} GFLOP/s",
            "",
            "| point | impl | ms (IQR) | Mpairs/s | GB/s | % bw | GFLOP/s | % flop | x fastest peer |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            pt = _shape_text(r["shape"], fixed)
            name = f"**{r['impl']}**" if r["kind"] == "backend" else r["impl"]
            if r["status"] != "ok":
                parts.append(f"| {pt} | {name} | {r['status']}: {r.get('reason', '')[:50]} | | | | | | |")
                continue
            f, fp = r.get("ratio_vs_fastest_peer"), r.get("fastest_peer")
            ratio = "-" if f is None else f"{f:.2f} ({fp})"
            parts.append(
                f"| {pt} | {name} | {r['median_s'] * 1e3:.1f} ({r['iqr_s'] * 1e3:.1f}) | {r['pairs_per_s'] / 1e6:.2f} "
                f"| {r['GBps']:.2f} | {100 * r['frac_bw']:.0f} | {r['GFLOPs']:.1f} | {100 * r['frac_flops']:.0f} "
                f"| {ratio} |"
            )
        parts.append("")
    return "\n".join(parts)


def make_report(paths: List[str], out_dir: str) -> str:
    """Write ``report.md`` and the plots into ``out_dir``; returns the Markdown text."""
    if not paths:
        raise ValueError("DIR: expected at least one results directory or results.json")
    sources = [(p, res) for p in paths for res in load_bundle(p)["runs"]]
    results = [res for _, res in sources]
    os.makedirs(out_dir, exist_ok=True)
    pngs = all_plots(results, out_dir)
    parts = ["# PECM op benchmark report", "", "## Headline", "", headline(results), "## Full tables", ""]
    for p, res in sources:
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


def replace_marked_block(path: str, begin: str, end: str, block: str, heading: str = "") -> None:
    """Replace the text between the markers ``begin`` ... ``end`` (included) of a Markdown file by
    ``block`` (which carries the markers), or append ``heading`` + ``block`` when they are absent."""
    import os
    import re

    text = open(path).read() if os.path.exists(path) else ""
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + (heading + "\n\n" if heading else "") + block + "\n"
    with open(path, "w") as f:
        f.write(text)
