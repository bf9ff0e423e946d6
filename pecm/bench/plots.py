"""Plots (matplotlib, Agg backend, PNG): throughput vs N / B / M per implementation, and a roofline."""

from __future__ import annotations

import os
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _ok(results: List[dict]):
    for res in results:
        for r in res["measurements"]:
            if r["status"] == "ok":
                yield res, r


def throughput_plots(results: List[dict], out_dir: str) -> List[str]:
    """One PNG per (op, swept variable) with more than one value: pairs/s vs that variable, a line
    per (implementation, device), the other variables fixed at their most common value."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    ops = sorted({r["op"] for _, r in _ok(results)})
    for op in ops:
        rows = [(res, r) for res, r in _ok(results) if r["op"] == op]
        for var in ("N", "B", "M"):
            vals = sorted({r["shape"].get(var) for _, r in rows if var in r["shape"]})
            if len(vals) < 2:
                continue
            others = [k for k in ("N", "B", "M", "K", "D") if k != var]
            fixed = {}
            for k in others:
                seen = [r["shape"][k] for _, r in rows if k in r["shape"]]
                if seen:
                    fixed[k] = max(sorted(set(seen)), key=seen.count)  # ties: the smallest
            lines: Dict[str, list] = {}
            for res, r in rows:
                if all(r["shape"].get(k) == v for k, v in fixed.items()):
                    label = f"{r['impl']} ({res['environment']['device']})"
                    lines.setdefault(label, []).append((r["shape"][var], r["pairs_per_s"]))
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for label, pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(var)
            ax.set_ylabel("pairs / s")
            ax.set_title(f"{op}: throughput vs {var} ({', '.join(f'{k}={v}' for k, v in fixed.items())})", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
            path = os.path.join(out_dir, f"{op}_throughput_vs_{var}.png")
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def roofline_plot(results: List[dict], out_dir: str) -> str:
    """Attained GFLOP/s vs arithmetic intensity (FLOPs / byte of the op's work model), with the
    measured copy-bandwidth slope and matmul ceiling of each run."""
    os.makedirs(out_dir, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 5))
    xs_grid = [10 ** (i / 20) for i in range(-40, 81)]  # 0.01 .. 1e4 FLOP/byte
    seen = set()
    devices = {res["environment"]["device_name"] for res in results}
    styles = ["k-", "k--", "k:", "k-."]
    for res in results:
        ce, env = res["ceilings"], res["environment"]
        if env["device_name"] in seen:  # several ops measured on one machine: one roof (the first run's)
            continue
        seen.add(env["device_name"])
        roof = [min(ce["matmul_GFLOPs"], x * ce["copy_GBps"]) for x in xs_grid]
        ax.plot(
            xs_grid,
            roof,
            styles[(len(seen) - 1) % len(styles)],
            lw=1,
            alpha=0.7,
            label=f"roof {env['device_name'][:30]}: {ce['copy_GBps']:.0f} GB/s, {ce['matmul_GFLOPs']:.0f} GFLOP/s",
        )
    impls = sorted({r["impl"] for _, r in _ok(results)})
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(impls)}
    op_marker = {"topk": "o", "rerank": "s", "scores": "^"}
    marks: Dict[tuple, tuple] = {}
    for res, r in _ok(results):
        key = (r["impl"], r["op"], res["environment"]["device"] if len(devices) > 1 else "")
        marks.setdefault(key, ([], []))
        marks[key][0].append(r["flops"] / max(r["bytes"], 1.0))
        marks[key][1].append(r["GFLOPs"])
    for (impl, op, dev), (x, y) in sorted(marks.items()):
        label = f"{impl} ({op}{', ' + dev if dev else ''})"
        face = "none" if dev.startswith("cuda") else colors[impl]  # hollow marks: GPU runs
        ax.scatter(x, y, label=label, s=22, edgecolors=colors[impl], facecolors=face, marker=op_marker.get(op, "x"))
    ais = [a for x, _ in marks.values() for a in x]
    if ais:
        ax.set_xlim(min(ais) / 10, max(ais) * 10)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title("roofline (measured ceilings)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    path = os.path.join(out_dir, "roofline.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def all_plots(results: List[dict], out_dir: str) -> List[str]:
    return throughput_plots(results, out_dir) + [roofline_plot(results, out_dir)]
