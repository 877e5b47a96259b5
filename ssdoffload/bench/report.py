"""The terminal table and the JSON file of a benchmark report."""
from __future__ import annotations

import json
import math
import os
from typing import List, Optional


def _mib(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / 2**20:,.1f}"


def _gbs(x: Optional[float]) -> str:
    return "-" if not x else f"{x / 1e9:.2f}"


def _ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def format_table(report: dict) -> str:
    """A plain-text table, one row per strategy, plus the checks and targets below it."""
    cuda = report["device"].startswith("cuda")
    mem_label = "peak GPU MiB" if cuda else "peak act MiB"
    headers = ["strategy", "step s (med)", "spread", "tokens/s", mem_label, "x keep", "time x keep",
               "RSS MiB", "write MiB", "read MiB", "W GB/s", "R GB/s", "stall s", "hit rate", "final loss"]
    rows: List[List[str]] = []
    for name, s in report["strategies"].items():
        st = s["step_seconds"]
        off = s.get("offload") or {}
        mem = s.get("cuda_peak_bytes") if cuda else s.get("peak_activation_bytes")
        ratios = s.get("ratio_to_keep", {})
        rows.append([
            name, f"{st['median']:.3f}", f"{st['min']:.3f}-{st['max']:.3f}",
            f"{s['tokens_per_second']:,.0f}", _mib(mem), _ratio(ratios.get("memory")),
            _ratio(ratios.get("step_time")), _mib(s["peak_rss_bytes"]),
            _mib(off.get("bytes_written_per_step")) if off else "-",
            _mib(off.get("bytes_read_per_step")) if off else "-",
            _gbs(off.get("write_bandwidth")) if off else "-", _gbs(off.get("read_bandwidth")) if off else "-",
            f"{off['stall_seconds_per_step']:.3f}" if off else "-",
            f"{off['prefetch_hit_rate']:.0%}" if off and off.get("prefetch_hit_rate") is not None else "-",
            f"{s['final_loss']:.6f}",
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    p = report["preset"]
    m = p["model"]
    out = [f"ssdoffload bench: preset {p['name']} ({report['parameters'] / 1e6:.1f} M params, hidden {m['hidden']}, "
           f"{m['layers']} layers, seq {m['seq']}, micro-batch {p['micro_batch']}, {p['dtype']}) on {report['device']}; "
           f"{p['steps']} steps after {p['warmup']} warm-up, interleaved",
           line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    probes = report["probe"]
    out.append("")
    out.append("drive (probe, O_DIRECT): " + "; ".join(
        f"{pr['path']}: write {_gbs(pr['write_bytes_per_s'])} GB/s, read {_gbs(pr['read_bytes_per_s'])} GB/s"
        f"{'' if pr['direct'] else ' (no O_DIRECT on this filesystem)'}" for pr in probes))
    b = report.get("bandwidth_bound")
    if b:
        out.append(
            f"bandwidth-bound optimum: {_mib(b['optimum_bytes'])} MiB of {_mib(b['offloadable_bytes'])} MiB offloadable "
            f"(limited by {b['limited_by']}; forward {b['forward_seconds']:.3f} s, backward {b['backward_seconds']:.3f} s; "
            f"hiding all I/O needs {_gbs(b['required_write_bytes_per_s'])} GB/s write, "
            f"{_gbs(b['required_read_bytes_per_s'])} GB/s read)")
        if b.get("fraction_of_optimum") is not None:
            out.append(f"ssd memory reduction: {_mib(b['achieved_reduction_bytes'])} MiB = "
                       f"{b['fraction_of_optimum']:.0%} of the optimum")
    th = report.get("throttle") or {}
    if th.get("bytes_per_s"):
        out.append(f"throttled drive: reads and writes of the ssd strategies capped at "
                   f"{th['bytes_per_s'] / 1e6:.1f} MB/s ({th.get('source', '')})")
    for name, plan in (report.get("plans") or {}).items():
        if plan:
            names = {g["group"]: g["name"] for g in plan["groups"]}
            fmt = lambda idx: ", ".join(names[i] for i in idx) or "-"
            out.append(f"{name} plan v{plan['version']}: ssd [{fmt(plan['ssd'])}] ram [{fmt(plan['ram'])}] "
                       f"device [{fmt(plan['device'])}], read-ahead {plan['prefetch_depth']} groups -- {plan['reason']}")
    lc = report["loss_check"]
    if lc["identical"]:
        out.append("losses: bit-identical across strategies at every step")
    else:
        out.append("WARNING: losses differ across strategies: " + "; ".join(
            f"{m_['strategy']} at step {m_['step']}: {m_['loss']!r} vs keep {m_['keep_loss']!r}"
            for m_ in lc["mismatches"]))
    for t in report["targets"][1:]:
        val = t["value"]
        shown = "" if val is None else (f" ({val:.2f})" if isinstance(val, float) and abs(val) < 100 else f" ({_mib(val)} MiB)")
        out.append(f"target {'met' if t['met'] else 'MISSED'}: {t['name']}{shown}" + (f" -- {t['note']}" if t["note"] else ""))
    sweep = report.get("sweep")
    if sweep:
        out.append(f"micro-batch sweep (budget {_mib(sweep['budget_bytes'])} MiB of {sweep['memory_kind']}, "
                   f"{sweep['budget_source']}):")
        for name, best in sweep["best"].items():
            out.append(f"  {name:14s} " + ("does not fit at micro-batch 1" if best is None else
                                           f"micro-batch {best['micro_batch']:4d}  {best['tokens_per_second']:,.0f} tokens/s"))
    return "\n".join(out)


def _clean(obj):
    """JSON-safe: NaN/inf become null, tuples lists, unknown objects strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if obj is None or isinstance(obj, (int, str, bool)):
        return obj
    return str(obj)


def write_json(report: dict, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_clean(report), f, indent=1, sort_keys=False)
        f.write("\n")
    return path
