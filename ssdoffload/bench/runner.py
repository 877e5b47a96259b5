"""``run_bench``: the comparison behind ``python -m ssdoffload bench``.

All strategies run in one process, interleaved step by step (the order rotates every step),
so machine noise hits them alike. Every strategy starts from the same initial weights, sees the
same batches and draws the same dropout masks (the RNG is seeded per step), so their losses
must be bit-identical; the report says so, or warns.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from ..config import OffloadConfig
from . import analysis, probe
from .environment import environment
from .memory import PeakRSS
from ..models.gpt import GPT, synthetic_batch
from .presets import Preset, default_preset_name, get_preset, parameter_count
from .steps import MemoryPass, StepRecord, memory_pass, run_step, timeline_step
from .strategies import ADAPTIVE_STRATEGIES, STRATEGIES, build_strategies, strategy_offload_config

log = logging.getLogger("ssdoffload")

SCHEMA = "ssdoffload-bench/1"


@dataclass
class BenchOptions:
    """Everything ``bench`` can be told. ``None`` fields come from the preset."""

    preset: Optional[str] = None
    overrides: Dict[str, object] = field(default_factory=dict)  # GPTConfig / Preset fields
    device: str = "auto"
    strategies: Sequence[str] = STRATEGIES
    spill_paths: Sequence[str] = ()
    output: str = "ssdoffload-bench"
    seed: int = 0
    probe_bytes: int = 256 << 20
    offload_options: Dict[str, object] = field(default_factory=dict)  # extra OffloadConfig fields
    progress: bool = True
    plots: bool = True
    timeline: bool = True
    trace: bool = False  # also write a torch.profiler Chrome trace of the timeline step
    deterministic: bool = False
    sweep: bool = False
    memory_budget: Optional[int] = None
    sweep_max_micro_batch: Optional[int] = None
    threads: Optional[int] = None  # torch intra-op threads; default on a CPU: cores - 1
    # A throttled drive: cap reads and writes of every ssd strategy at this many bytes/s, or at
    # this fraction of the write bandwidth full offload needs (measured with keep first).
    throttle_bandwidth: Optional[float] = None
    throttle_fraction: Optional[float] = None
    host_cache_bytes: Optional[int] = None  # ram+ssd's tier (default: half the offloadable bytes)


def default_threads(device: torch.device) -> int:
    """On a CPU host, leave one core to the I/O threads (a GPU host leaves them its CPU)."""
    if device.type != "cpu":
        return torch.get_num_threads()
    return max(1, (os.cpu_count() or 2) - 1)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(name: str) -> torch.device:
    """The device to run on, with an explicit index for CUDA (some torch.cuda calls need one)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_preset(options: BenchOptions, device: torch.device) -> Preset:
    preset = get_preset(options.preset or default_preset_name(device.type))
    return preset.replace(**options.overrides)


@contextlib.contextmanager
def spill_directories(paths: Sequence[str]) -> Iterator[List[str]]:
    """The given spill directories, or a temporary one that is removed afterwards."""
    if paths:
        yield [os.path.abspath(os.path.expanduser(p)) for p in paths]
        return
    tmp = tempfile.mkdtemp(prefix="ssdoffload-bench-")
    try:
        yield [os.path.join(tmp, "spill")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def offload_config_for(preset: Preset, paths: Sequence[str], extra: Dict[str, object]) -> OffloadConfig:
    kwargs = dict(path=list(paths), min_offload_bytes=preset.min_offload_bytes,
                  prefetch_depth=preset.prefetch_depth, io_threads=preset.io_threads)
    kwargs.update(extra)
    return OffloadConfig(**kwargs)


def _throttle(options: BenchOptions, preset: Preset, device: torch.device, names: Sequence[str]) -> dict:
    """The throttled-drive cap (and ram+ssd's default tier size) for this run, with how it was
    derived. Measuring what full offload needs costs a few untimed keep steps."""
    out: Dict[str, object] = {}
    demand = None
    need_demand = options.throttle_fraction is not None or \
        ("ram+ssd" in names and options.host_cache_bytes is None)
    if need_demand:
        from .demand import measure_demand
        demand = measure_demand(preset, device, seed=options.seed)
        out["demand"] = demand.as_dict()
    if options.throttle_bandwidth is not None:
        out["bytes_per_s"] = float(options.throttle_bandwidth)
        out["source"] = "--throttle-bandwidth"
    elif options.throttle_fraction is not None:
        assert demand is not None
        out["bytes_per_s"] = options.throttle_fraction * demand.write_bytes_per_s
        out["fraction_of_full_offload_need"] = options.throttle_fraction
        out["source"] = (f"--throttle-fraction {options.throttle_fraction}: that fraction of the write bandwidth "
                         f"full offload needs (offloadable bytes / forward time with keep)")
    if "ram+ssd" in names:
        if options.host_cache_bytes is not None:
            out["host_cache_bytes"] = int(options.host_cache_bytes)
        else:
            assert demand is not None
            out["host_cache_bytes"] = max(4096, demand.offloadable_bytes // 2)
    if out.get("bytes_per_s"):
        log.info("ssdoffload bench: throttled drive, reads and writes capped at %.1f MB/s",
                 out["bytes_per_s"] / 1e6)
    return out


def adaptive_targets(summaries: Dict[str, dict], cuda: bool, throttle: dict) -> List[dict]:
    """Issue 7's targets: the adaptive strategies stall < 2% of the step time while cutting
    peak activation memory below keep's (and, for comparison, how much full offload stalls)."""
    out: List[dict] = []
    keep = summaries.get("keep")
    for name in ADAPTIVE_STRATEGIES:
        s = summaries.get(name)
        if s is None or keep is None:
            continue
        off = s.get("offload") or {}
        stall = (off.get("stall_seconds_per_step") or 0.0) / s["step_seconds"]["median"]
        out.append({"name": f"{name} stalls < 2% of step time", "value": stall, "limit": 0.02,
                    "met": stall < 0.02, "note": ""})
        mem = (s.get("ratio_to_keep") or {}).get("memory")
        out.append({"name": f"{name} peak activation memory < keep", "value": mem, "limit": 1.0,
                    "met": mem is not None and mem < 1.0, "note": ""})
    full = summaries.get("ssd")
    if full is not None and throttle.get("bytes_per_s"):
        off = full.get("offload") or {}
        stall = (off.get("stall_seconds_per_step") or 0.0) / full["step_seconds"]["median"]
        out.append({"name": "for comparison: ssd (fixed full offload) stall share on the throttled drive",
                    "value": stall, "limit": None, "met": True, "note": ""})
    return out


def _progress(total: int, enabled: bool, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # the 'bench' extra is not installed: run without a bar
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def close(self) -> None: ...


def run_bench(options: BenchOptions) -> dict:
    """Run the comparison; returns the report (``__main__`` writes it as JSON, with plots)."""
    device = resolve_device(options.device)
    with torch_threads(options.threads or default_threads(device)):
        return _run(options, device)


def _run(options: BenchOptions, device: torch.device) -> dict:
    started = time.perf_counter()
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    preset = resolve_preset(options, device)
    if options.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    names = [n for n in STRATEGIES if n in options.strategies]
    if "keep" not in names:
        names.insert(0, "keep")
    cuda = device.type == "cuda"
    cfg = preset.model
    tokens_per_step = preset.tokens_per_step()
    log.info("ssdoffload bench: preset %s on %s, strategies %s", preset.name, device, ", ".join(names))

    with spill_directories(options.spill_paths) as paths:
        probes = probe.measure_all(paths, options.probe_bytes, threads=preset.io_threads)
        write_bps, read_bps = probe.total_bandwidth(probes)
        torch.manual_seed(options.seed)
        with torch.device(device):
            initial = GPT(cfg).state_dict()
        throttle = _throttle(options, preset, device, names)
        extra = dict(options.offload_options)
        if throttle.get("bytes_per_s"):
            extra.update(max_write_bandwidth=throttle["bytes_per_s"], max_read_bandwidth=throttle["bytes_per_s"])
        if "ram+ssd" in names:
            extra["host_cache_bytes"] = throttle.pop("host_cache_bytes")
        throttle.pop("host_cache_bytes", None)
        config = offload_config_for(preset, paths, extra)
        strategies = build_strategies(names, cfg, initial, device,
                                      lambda name: strategy_offload_config(name, config))
        del initial
        records: Dict[str, List[StepRecord]] = {n: [] for n in names}
        memory: Dict[str, MemoryPass] = {}
        timeline = None
        plans: dict = {}
        plan_history: dict = {}
        rss = PeakRSS()
        total_steps = preset.warmup + preset.steps
        bar = _progress(total_steps * len(names) + len(names), options.progress, f"bench {preset.name}")
        try:
            batch0 = synthetic_batch(cfg, preset.micro_batch, device, seed=options.seed * 7919)
            for name in [n for n in names if n not in ADAPTIVE_STRATEGIES]:  # untimed memory passes
                bar.set_postfix_str(f"memory {name}")
                memory[name] = memory_pass(strategies[name], batch0, options.seed, preset.dtype,
                                           preset.min_offload_bytes)
                bar.update(1)
            for step in range(total_steps):
                batch = synthetic_batch(cfg, preset.micro_batch, device, seed=options.seed * 7919 + 1 + step)
                rng_seed = options.seed * 1_000_003 + step
                k = step % len(names)
                for name in names[k:] + names[:k]:
                    rec = run_step(strategies[name], batch, rng_seed, step, preset.dtype, rss)
                    records[name].append(rec)
                    bar.set_postfix_str(f"{name} {rec.seconds:.2f}s")
                    bar.update(1)
            for name in [n for n in names if n in ADAPTIVE_STRATEGIES]:
                # After the timed steps: the plan in force, not the profiling step's.
                bar.set_postfix_str(f"memory {name}")
                memory[name] = memory_pass(strategies[name], batch0, options.seed, preset.dtype,
                                           preset.min_offload_bytes)
                bar.update(1)
            plans = {n: strategies[n].plan() for n in names if n in ADAPTIVE_STRATEGIES}
            plan_history = {n: [p.as_dict() for p in strategies[n].offloader.plan_history()]
                            for n in names if n in ADAPTIVE_STRATEGIES}
            if options.timeline:
                ssd_name = "ssd" if "ssd" in strategies else "ssd+recompute" if "ssd+recompute" in strategies else None
                if ssd_name is not None:
                    trace_path = None
                    if options.trace:
                        os.makedirs(options.output, exist_ok=True)
                        trace_path = os.path.join(os.path.abspath(options.output), "trace_ssd_step.json")
                    timeline = timeline_step(strategies[ssd_name], batch0, options.seed, preset.dtype,
                                             trace_path)
        finally:
            bar.close()
            for s in strategies.values():
                s.close()
            strategies.clear()  # free the model copies (GPU memory) before the sweep
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        env = environment(device, list(paths))
        env["load_average_at_start"] = load_before
        temporary = not options.spill_paths
        sweep = None
        if options.sweep:
            from .sweep import sweep_micro_batch
            sweep = sweep_micro_batch(names, preset, device, paths, config, memory.get("keep"),
                                      options.memory_budget, options.sweep_max_micro_batch,
                                      options.seed, options.progress)

    summaries = {n: analysis.summarize_strategy(n, records[n], preset.warmup, tokens_per_step,
                                                memory.get(n), memory.get("keep"), cuda) for n in names}
    analysis.add_ratios(summaries, cuda)
    losses = analysis.loss_check(summaries)
    bound = analysis.bandwidth_bound(summaries, memory.get("keep"), write_bps, read_bps, cuda)
    report = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv[:] if sys.argv else [],
        "preset": preset.as_dict(),
        "parameters": parameter_count(cfg),
        "device": str(device),
        "memory_kind": "cuda max_memory_allocated" if cuda else "peak resident activation bytes",
        "tokens_per_step": tokens_per_step,
        "torch_threads": torch.get_num_threads(),
        "strategies": summaries,
        "loss_check": losses,
        "probe": [p.as_dict() for p in probes],
        "bandwidth_bound": bound,
        "targets": analysis.targets(summaries, losses, bound, cuda, write_bps, preset.name),
        "offload_config": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("layers", "paths")},
        "strategy_offload_configs": {n: {k: v for k, v in dataclasses.asdict(strategy_offload_config(n, config)).items()
                                         if k in ("policy", "host_cache_bytes", "max_write_bandwidth",
                                                  "max_read_bandwidth")}
                                     for n in names if n.startswith("ssd") or n == "ram+ssd"},
        "spill_paths": list(paths),
        "spill_paths_temporary": temporary,
        "environment": env,
        "timeline": timeline.as_dict() if timeline is not None else None,
        "throttle": throttle or None,
        "plans": plans,
        "plan_history": plan_history,
        "memory_passes": {n: dataclasses.asdict(m) for n, m in memory.items()},
    }
    report["targets"].extend(adaptive_targets(summaries, cuda, throttle))
    if sweep is not None:
        report["sweep"] = sweep
    report["wall_seconds"] = time.perf_counter() - started
    return report
