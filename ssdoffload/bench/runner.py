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
from .model import GPT, synthetic_batch
from .presets import Preset, default_preset_name, get_preset, parameter_count
from .steps import MemoryPass, StepRecord, memory_pass, run_step, timeline_step
from .strategies import STRATEGIES, build_strategies

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
        config = offload_config_for(preset, paths, options.offload_options)
        strategies = build_strategies(names, cfg, initial, device, lambda name: config)
        del initial
        records: Dict[str, List[StepRecord]] = {n: [] for n in names}
        memory: Dict[str, MemoryPass] = {}
        timeline = None
        rss = PeakRSS()
        total_steps = preset.warmup + preset.steps
        bar = _progress(total_steps * len(names) + len(names), options.progress, f"bench {preset.name}")
        try:
            batch0 = synthetic_batch(cfg, preset.micro_batch, device, seed=options.seed * 7919)
            for name in names:  # untimed memory passes
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
        "spill_paths": list(paths),
        "spill_paths_temporary": temporary,
        "environment": env,
        "timeline": timeline.as_dict() if timeline is not None else None,
        "memory_passes": {n: dataclasses.asdict(m) for n, m in memory.items()},
    }
    if sweep is not None:
        report["sweep"] = sweep
    report["wall_seconds"] = time.perf_counter() - started
    return report
