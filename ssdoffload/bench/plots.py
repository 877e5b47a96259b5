"""PNG plots of a benchmark report (matplotlib, headless)."""
from __future__ import annotations

import os
from typing import List

COLORS = {"keep": "#4c72b0", "recompute": "#dd8452", "cpu": "#55a868", "ssd": "#c44e52",
          "ssd+recompute": "#8172b3", "ssd-adaptive": "#937860", "ram+ssd": "#da8bc3"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def memory_vs_time(report: dict, path: str) -> str:
    """Each strategy at (median step time, peak memory), with the step-time range as a bar."""
    plt = _plt()
    cuda = report["device"].startswith("cuda")
    fig, ax = plt.subplots(figsize=(8.8, 4.5))
    for name, s in report["strategies"].items():
        mem = s.get("cuda_peak_bytes") if cuda else s.get("peak_activation_bytes")
        if mem is None:
            continue
        st = s["step_seconds"]
        x, y = st["median"], mem / 2**20
        # Named in the legend (outside the axes), not next to the points: close points made
        # their labels overlap.
        ax.errorbar([x], [y], xerr=[[x - st["min"]], [st["max"] - x]], fmt="o", ms=8, capsize=4,
                    color=COLORS.get(name), label=f"{name}: {st['median']:.3f} s, {y:.0f} MiB")
    b = report.get("bandwidth_bound")
    keep = report["strategies"].get("keep")
    if b and keep:
        keep_mem = (keep.get("cuda_peak_bytes") if cuda else keep.get("peak_activation_bytes")) or 0
        floor = optimum_memory_bytes(keep_mem, b, report["preset"].get("model", {}).get("layers"))
        ax.axhline(floor / 2**20, ls="--", color="grey", lw=1,
                   label=f"bandwidth-bound optimum: {floor / 2**20:.0f} MiB")
    ax.set_xlabel("step time, s (median; bar: min-max)")
    ax.set_ylabel("peak GPU memory, MiB" if cuda else "peak resident activation memory, MiB")
    ax.set_ylim(bottom=0)
    p = report["preset"]
    ax.set_title(f"{p['name']}: memory vs step time ({report['device']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def optimum_memory_bytes(keep_bytes: float, bound: dict, layers) -> float:
    """The lowest peak the drive's bandwidth allows: what is never offloadable (keep's peak
    less the offloadable bytes), plus what the bandwidth cannot hide, and never less than one
    layer's activations (backward of a layer needs them in memory; without a layer count, no
    such floor)."""
    offloadable = bound["offloadable_bytes"]
    never = max(0.0, keep_bytes - offloadable)
    unhidden = offloadable - bound["optimum_bytes"]
    one_layer = offloadable / layers if layers else 0.0
    return never + max(unhidden, one_layer)


def timeline(report: dict, path: str) -> str:
    """One ssd step: compute (forward per layer, backward), writes, reads and stalls."""
    plt = _plt()
    tl = report["timeline"]
    fig, ax = plt.subplots(figsize=(10, 4.0))
    lanes = {"compute": 3, "write": 2, "read": 1, "stall": 0}
    f0, f1 = tl["forward"]
    b0, b1 = tl["backward"]
    ax.broken_barh([(b0, b1 - b0)], (lanes["compute"] - 0.4, 0.8), color="#bbbbbb", label="backward")
    if tl["layers"]:
        for i, s, e in tl["layers"]:
            ax.broken_barh([(s, e - s)], (lanes["compute"] - 0.4, 0.8),
                           color="#4c72b0" if i % 2 == 0 else "#8fb0e0")
        ax.broken_barh([], (0, 0), color="#4c72b0", label="forward (layer by layer)")
    else:
        ax.broken_barh([(f0, f1 - f0)], (lanes["compute"] - 0.4, 0.8), color="#4c72b0", label="forward")
    colors = {"write": "#c44e52", "read": "#55a868", "stall": "#000000"}
    for kind in ("write", "read", "stall"):
        bars = [(t["start"], max(t["end"] - t["start"], 1e-5)) for t in tl["transfers"] if t["kind"] == kind]
        if bars:
            ax.broken_barh(bars, (lanes[kind] - 0.35, 0.7), color=colors[kind], alpha=0.55, label=kind)
    ax.set_yticks(list(lanes.values()))
    ax.set_yticklabels([f"{k}" for k in lanes])
    ax.axvline(f1, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("seconds from the start of the step")
    note = " (layers synchronized for the plot)" if tl.get("synchronized_layers") else ""
    ax.set_title(f"one {tl['strategy']} step: compute and I/O overlap{note}")
    # Below the axes: inside, it covered the backward bar.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=6, frameon=False)
    ax.set_xlim(0, max(b1, max((t["end"] for t in tl["transfers"]), default=b1)) * 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep(report: dict, path: str) -> str:
    """Throughput against micro-batch for each strategy, fitting sizes only."""
    plt = _plt()
    sw = report["sweep"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in sw["rows"].items():
        pts = [(r["micro_batch"], r["tokens_per_second"]) for r in rows if r.get("fits")]
        if pts:
            ax.plot(*zip(*pts), "o-", color=COLORS.get(name), label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-batch")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"largest micro-batch within {sw['budget_bytes'] / 2**30:.2f} GiB ({sw['memory_kind']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def frontier(result: dict, path: str) -> str:
    """Peak memory against step time: the fixed plans as points, budget mode as a curve, and
    each budget as a dotted vertical line."""
    plt = _plt()
    mib = 1 / (1 << 20)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    marks = {"keep": "o", "recompute": "s", "ckpt-input-ssd": "D", "ckpt-input-ram": "P", "ssd": "^"}
    for name, p in result["fixed"].items():
        if p["memory_bytes"] is not None:
            ax.plot(p["memory_bytes"] * mib, p["step_seconds"], marks.get(name, "o"), ms=8, label=name)
    rows = [r for r in result["budgets"] if r["feasible"] and r["memory_bytes"] is not None]
    if rows:
        ax.plot([r["memory_bytes"] * mib for r in rows], [r["step_seconds"] for r in rows], "k.-", lw=1.5,
                label="budget mode (measured peak)")
        for r in rows:
            ax.axvline(r["budget_bytes"] * mib, color="0.8", ls=":", lw=0.8, zorder=0)
    for name, p in result["plain"].items():
        ax.axhline(p["step_seconds"], ls="--", lw=0.8, color="0.5" if "keep" in name else "0.3")
        ax.annotate(name, (0, p["step_seconds"]), xycoords=("axes fraction", "data"), fontsize=7,
                    xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel(f"peak memory, MiB ({result['memory_kind']})")
    ax.set_ylabel("step time, s (median)")
    ax.set_xlim(left=0)
    times = [p["step_seconds"] for p in list(result["fixed"].values()) + list(result["plain"].values())] + \
        [r["step_seconds"] for r in rows]
    ax.set_ylim(bottom=0.8 * min(times), top=1.08 * max(times))
    model = result.get("model", "gpt")
    what = "" if model == "gpt" else ("\nHugging Face Llama with its own checkpointing (plain keep: without it; "
                                      "plain recompute: with it)" if model == "hf-llama" else f"\n{model}")
    ax.set_title(f"activation memory against step time (dotted: the budgets asked for){what}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(report: dict, folder: str) -> List[str]:
    """All plots that the report has data for; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = [memory_vs_time(report, os.path.join(folder, "memory_vs_step_time.png"))]
    if report.get("timeline"):
        paths.append(timeline(report, os.path.join(folder, "timeline_ssd_step.png")))
    if report.get("sweep"):
        paths.append(sweep(report, os.path.join(folder, "micro_batch_sweep.png")))
    return paths
