"""Turn measured steps into the report's figures: per-strategy summaries, ratios to ``keep``,
the loss check, the bandwidth-bound optimum and the targets.

The bandwidth-bound optimum: a drive that writes ``Bw`` and reads ``Br`` bytes per second can
take at most ``Bw x T_forward`` bytes while forward runs (the writes must be done by the end of
forward, when keeping everything peaks) and give back at most ``Br x T_backward`` while backward
runs. So the most activation memory offloading can free is

    optimum = min(offloadable bytes, Bw x T_forward, Br x T_backward)

with ``T_forward`` and ``T_backward`` measured on ``keep``. It is an upper bound: the
activations of the last layers are produced at the very end of forward and cannot all be
written before backward needs them.
"""
from __future__ import annotations

import statistics
from typing import Dict, List, Optional, Sequence

from .steps import MemoryPass, StepRecord

STEP_TIME_LIMIT_CPU = 1.15
STEP_TIME_LIMIT_GPU = 1.05


def spread(values: Sequence[float]) -> dict:
    """Median, quartiles, extremes and all values."""
    vals = sorted(values)
    if not vals:
        return {"median": None, "values": []}
    q = statistics.quantiles(vals, n=4, method="inclusive") if len(vals) > 1 else [vals[0]] * 3
    return {"median": statistics.median(vals), "mean": statistics.fmean(vals), "min": vals[0],
            "max": vals[-1], "q1": q[0], "q3": q[2], "iqr": q[2] - q[0], "values": list(values)}


def _median(values: Sequence[float]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize_strategy(name: str, records: List[StepRecord], warmup: int, tokens_per_step: int,
                       memory: Optional[MemoryPass], keep_memory: Optional[MemoryPass],
                       cuda: bool) -> dict:
    """Figures of one strategy over its steps after warm-up."""
    measured = [r for r in records if r.step >= warmup] or records
    step = spread([r.seconds for r in measured])
    out: dict = {
        "step_seconds": step,
        "forward_seconds": _median([r.forward_seconds for r in measured]),
        "backward_seconds": _median([r.backward_seconds for r in measured]),
        "tokens_per_second": tokens_per_step / step["median"] if step["median"] else None,
        "peak_rss_bytes": max(r.peak_rss_bytes for r in measured),
        "thread_cpu_seconds": _median([r.thread_cpu_seconds for r in measured]),
        "process_cpu_seconds": _median([r.process_cpu_seconds for r in measured]),
        "losses": [r.loss for r in records],
        "final_loss": records[-1].loss if records else None,
    }
    if cuda:
        out["cuda_peak_bytes"] = max(r.cuda_peak_bytes or 0 for r in measured)
    off = [r.offload for r in measured if r.offload is not None]
    resident_peak = None
    if off:
        hits = sum(o["prefetch_hits"] for o in off)
        misses = sum(o["prefetch_misses"] for o in off)
        resident_peak = int(_median([o["peak_resident_bytes"] for o in off]))
        out["offload"] = {
            "bytes_written_per_step": _median([o["bytes_written"] for o in off]),
            "bytes_read_per_step": _median([o["bytes_read"] for o in off]),
            "offloadable_bytes_per_step": _median([o["offloadable_bytes"] for o in off]),
            "write_bandwidth": _median([o["write_bandwidth"] for o in off]),
            "read_bandwidth": _median([o["read_bandwidth"] for o in off]),
            "stall_seconds_per_step": _median([o["stall_seconds"] for o in off]),
            "prefetch_hit_rate": hits / (hits + misses) if hits + misses else None,
            "peak_resident_bytes": resident_peak,
            "tensors_offloaded_per_step": _median([o["tensors_offloaded"] for o in off]),
            "dedup_hits_per_step": _median([o["dedup_hits"] for o in off]),
            "write_failures": sum(o["write_failures"] for o in off),
        }
    if memory is not None:
        act, method = activation_bytes(name, memory, keep_memory, resident_peak)
        out["peak_activation_bytes"] = act
        out["peak_activation_method"] = method
    return out


def activation_bytes(name: str, mem: MemoryPass, keep: Optional[MemoryPass],
                      resident_peak: Optional[int]) -> tuple:
    """Peak saved-activation bytes on the compute device, and how it was obtained."""
    block = keep.max_layer_bytes if keep is not None else mem.max_layer_bytes
    if name in ("keep", "cpu"):
        return mem.peak_bytes, "measured: live saved storages (untimed pass)"
    if name == "recompute":
        return mem.peak_bytes + block, ("measured checkpoint inputs + one block's activations "
                                        "(recomputed in backward; measured without recompute)")
    kept = mem.peak_bytes
    plus_block = block if name == "ssd+recompute" else 0
    return (kept + (resident_peak or 0) + plus_block,
            "tensors ssdoffload kept (untimed pass) + its peak resident offloadable bytes in the "
            "timed steps" + (" + one recomputed block" if plus_block else "") + " (an upper bound)")


def memory_figure(summary: dict, cuda: bool) -> Optional[float]:
    """The memory figure strategies are compared on: CUDA peak, or peak activation bytes."""
    return summary.get("cuda_peak_bytes") if cuda else summary.get("peak_activation_bytes")


def add_ratios(summaries: Dict[str, dict], cuda: bool) -> None:
    keep = summaries.get("keep")
    if keep is None:
        return
    base = {
        "step_time": keep["step_seconds"]["median"],
        "tokens_per_second": keep["tokens_per_second"],
        "memory": memory_figure(keep, cuda),
        "peak_activation_bytes": keep.get("peak_activation_bytes"),
        "peak_rss_bytes": keep["peak_rss_bytes"],
    }
    for s in summaries.values():
        mine = {"step_time": s["step_seconds"]["median"], "tokens_per_second": s["tokens_per_second"],
                "memory": memory_figure(s, cuda), "peak_activation_bytes": s.get("peak_activation_bytes"),
                "peak_rss_bytes": s["peak_rss_bytes"]}
        s["ratio_to_keep"] = {k: (mine[k] / base[k] if mine[k] is not None and base[k] else None)
                              for k in base}


def loss_check(summaries: Dict[str, dict]) -> dict:
    """Whether every strategy's loss was bit-identical to keep's at every step."""
    keep = summaries.get("keep")
    mismatches = []
    if keep is not None:
        for name, s in summaries.items():
            for step, (a, b) in enumerate(zip(s["losses"], keep["losses"])):
                if a != b:
                    mismatches.append({"strategy": name, "step": step, "loss": a, "keep_loss": b,
                                       "difference": a - b})
                    break
    finals = {name: s["final_loss"] for name, s in summaries.items()}
    return {"identical": not mismatches, "final_losses": finals, "mismatches": mismatches}


def bandwidth_bound(summaries: Dict[str, dict], keep_memory: Optional[MemoryPass],
                    write_bps: float, read_bps: float, cuda: bool) -> Optional[dict]:
    """The bandwidth-bound optimum and how much of it the ssd strategy achieved."""
    keep = summaries.get("keep")
    if keep is None:
        return None
    ssd = summaries.get("ssd")
    t_f, t_b = keep["forward_seconds"], keep["backward_seconds"]
    if ssd is not None and "offload" in ssd:
        offloadable = ssd["offload"]["offloadable_bytes_per_step"]
        source = "ssd strategy: bytes it offloaded per step"
    elif keep_memory is not None:
        offloadable = keep_memory.offloadable_bytes
        source = "keep memory pass: storages >= min_offload_bytes"
    else:
        return None
    write_window, read_window = write_bps * t_f, read_bps * t_b
    optimum = min(offloadable, write_window, read_window)
    limited_by = ("activations (the drive can hide full offload)" if optimum == offloadable
                  else "write bandwidth during forward" if optimum == write_window
                  else "read bandwidth during backward")
    out = {
        "write_bytes_per_s": write_bps, "read_bytes_per_s": read_bps,
        "forward_seconds": t_f, "backward_seconds": t_b,
        "offloadable_bytes": offloadable, "offloadable_source": source,
        "write_window_bytes": write_window, "read_window_bytes": read_window,
        "optimum_bytes": optimum, "limited_by": limited_by,
        "required_write_bytes_per_s": offloadable / t_f if t_f else None,
        "required_read_bytes_per_s": offloadable / t_b if t_b else None,
    }
    if ssd is not None:
        reduction = (memory_figure(keep, cuda) or 0) - (memory_figure(ssd, cuda) or 0)
        out["achieved_reduction_bytes"] = reduction
        out["fraction_of_optimum"] = reduction / optimum if optimum else None
    return out


def targets(summaries: Dict[str, dict], losses: dict, bound: Optional[dict], cuda: bool,
            probe_write_bps: float, preset: str) -> List[dict]:
    """The issue's targets for this device, each with its measured value and, if missed, why."""
    out: List[dict] = [{"name": "final losses identical across strategies", "met": losses["identical"],
                        "value": None, "limit": None,
                        "note": "" if losses["identical"] else _loss_note(losses, cuda)}]
    keep, ssd = summaries.get("keep"), summaries.get("ssd")
    if keep is None or ssd is None:
        return out
    limit = STEP_TIME_LIMIT_GPU if cuda else STEP_TIME_LIMIT_CPU
    ratio = ssd["ratio_to_keep"]["step_time"]
    out.append({"name": f"ssd step time <= {limit} x keep", "value": ratio, "limit": limit,
                "met": ratio is not None and ratio <= limit,
                "note": "" if ratio is not None and ratio <= limit else _time_note(keep, ssd, bound)})
    if bound is not None and "achieved_reduction_bytes" in bound:
        keep_mem = memory_figure(keep, cuda) or 0
        achieved = bound["achieved_reduction_bytes"]
        if cuda:
            need = 0.9 * bound["optimum_bytes"]
            name = "ssd memory reduction >= 90% of the bandwidth-bound optimum"
        else:
            need = min(0.5 * keep_mem, 0.9 * bound["optimum_bytes"])
            name = ("ssd peak activation bytes <= 0.5 x keep or reduced by >= 90% of the "
                    "bandwidth-bound optimum, whichever is less")
        met = achieved >= need
        out.append({"name": name, "value": achieved, "limit": need, "met": met,
                    "note": "" if met else _memory_note(ssd, bound)})
    if cuda:
        if preset == "gpu-wide":
            r = ssd["ratio_to_keep"]["memory"]
            out.append({"name": "gpu-wide: ssd peak memory <= 0.6 x keep", "value": r, "limit": 0.6,
                        "met": r is not None and r <= 0.6,
                        "note": "" if r is not None and r <= 0.6 else _memory_note(ssd, bound)})
        for other, op in (("recompute", "<"), ("cpu", "<=")):
            if other in summaries:
                a, b = ssd["step_seconds"]["median"], summaries[other]["step_seconds"]["median"]
                met = a < b if op == "<" else a <= b
                out.append({"name": f"ssd step time {op} {other}", "value": a / b, "limit": 1.0, "met": met,
                            "note": "" if met else _time_note(keep, ssd, bound)})
        wb = ssd.get("offload", {}).get("write_bandwidth") or 0.0
        met = probe_write_bps > 0 and wb >= 0.9 * probe_write_bps
        out.append({"name": "achieved write bandwidth >= 90% of probe", "value": wb,
                    "limit": 0.9 * probe_write_bps, "met": met,
                    "note": "" if met else ("the writes were not the bottleneck: the offloader was "
                                            "waiting for tensors, not for the drive" if
                                            (ssd.get("offload", {}).get("stall_seconds_per_step") or 0) == 0
                                            else "per-tensor writes through the pinned staging pool "
                                            "are smaller than the probe's 64 MiB blocks")})
    return out


def _loss_note(losses: dict, cuda: bool) -> str:
    first = losses["mismatches"][0]
    note = (f"{first['strategy']} differs from keep at step {first['step']} by "
            f"{first['difference']:.3g}")
    if cuda:
        note += ("; on CUDA some backward kernels (attention, index_add) are not deterministic, "
                 "which alone makes repeated keep runs differ; rerun with --deterministic to tell")
    return note


def _time_note(keep: dict, ssd: dict, bound: Optional[dict]) -> str:
    off = ssd.get("offload", {})
    extra = ssd["step_seconds"]["median"] - keep["step_seconds"]["median"]
    stall = off.get("stall_seconds_per_step") or 0.0
    parts = [f"ssd is {extra:.3f} s per step slower than keep"]
    if stall > 0.3 * max(extra, 1e-9):
        parts.append(f"{stall:.3f} s of it is backward waiting on reads (I/O-bound)")
        if bound:
            parts.append(f"hiding all I/O needs {bound['required_write_bytes_per_s'] / 1e9:.2f} GB/s write and "
                         f"{bound['required_read_bytes_per_s'] / 1e9:.2f} GB/s read; the drive gives "
                         f"{bound['write_bytes_per_s'] / 1e9:.2f} / {bound['read_bytes_per_s'] / 1e9:.2f} GB/s: "
                         "offload less (keep the last layers) or add drives")
    else:
        parts.append(f"backward stalled only {stall:.3f} s, so the cost is host work: hook calls per "
                     "saved tensor and the I/O threads' copies competing with compute for the CPU cores")
        if keep.get("thread_cpu_seconds") is not None and ssd.get("thread_cpu_seconds") is not None:
            parts.append(f"the step's own thread used {ssd['thread_cpu_seconds']:.3f} s of CPU "
                         f"(keep {keep['thread_cpu_seconds']:.3f} s) and the whole process "
                         f"{ssd['process_cpu_seconds']:.3f} s (keep {keep['process_cpu_seconds']:.3f} s)")
        fw = ssd.get("forward_seconds", 0) - keep.get("forward_seconds", 0)
        parts.append(f"forward +{fw:.3f} s, backward "
                     f"+{ssd.get('backward_seconds', 0) - keep.get('backward_seconds', 0):.3f} s")
    return "; ".join(parts)


def _memory_note(ssd: dict, bound: Optional[dict]) -> str:
    off = ssd.get("offload", {})
    parts = []
    if bound is not None:
        parts.append(f"optimum {bound['optimum_bytes'] / 2**20:.0f} MiB limited by {bound['limited_by']}")
    parts.append(f"ssd kept up to {off.get('peak_resident_bytes', 0) / 2**20:.0f} MiB of offloadable "
                 "activations resident (writes not yet finished at the end of forward, and the layers "
                 "read ahead during backward: prefetch_depth)")
    wb = off.get("write_bandwidth")
    if wb and bound and bound.get("required_write_bytes_per_s"):
        parts.append(f"writes ran at {wb / 1e9:.2f} GB/s against {bound['required_write_bytes_per_s'] / 1e9:.2f} "
                     "GB/s needed to keep up with forward")
    return "; ".join(parts)
