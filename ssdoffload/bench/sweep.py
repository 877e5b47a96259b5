"""``--sweep-micro-batch``: the largest micro-batch each strategy fits in a memory budget, and
its throughput there (the keep / recompute / offload curve of the SSDTrain paper).

Each strategy runs alone, with the micro-batch doubled from 1 until its memory figure exceeds
the budget (or ``max_micro_batch`` is reached): one untimed memory pass, one warm-up and two
timed steps per size. On a GPU the figure is ``torch.cuda.max_memory_allocated`` and the budget
defaults to the GPU's memory (an out-of-memory error means "does not fit"). On a CPU the figure
is the peak saved-activation bytes: host RAM is not what offloading is for, so the budget is in
activation bytes and defaults to 4x what ``keep`` needs at the preset's micro-batch.
"""
from __future__ import annotations

import logging
import statistics
from typing import Dict, List, Optional, Sequence

import torch

from ..config import OffloadConfig
from .analysis import activation_bytes
from .memory import PeakRSS
from ..models.gpt import GPT, synthetic_batch
from .presets import Preset
from .steps import MemoryPass, memory_pass, run_step
from .strategies import Strategy, strategy_offload_config, uses_offloader

log = logging.getLogger("ssdoffload")


def _measure(name: str, preset: Preset, mb: int, device: torch.device, config: OffloadConfig,
             state_dict: dict, seed: int) -> dict:
    cfg = preset.model
    strategy = Strategy(name, cfg, state_dict, device, strategy_offload_config(name, config) if uses_offloader(name) else None)
    try:
        batch = synthetic_batch(cfg, mb, device, seed=seed)
        rss = PeakRSS()
        mem = memory_pass(strategy, batch, seed, preset.dtype, preset.min_offload_bytes)
        keep_like = (memory_pass(strategy, batch, seed, preset.dtype, preset.min_offload_bytes, recompute=False)
                     if strategy.recompute else mem)
        recs = [run_step(strategy, batch, seed + i, i, preset.dtype, rss) for i in range(3)]
    finally:
        strategy.close()
    timed = recs[1:]
    median = statistics.median(r.seconds for r in timed)
    resident = None
    if timed[0].offload is not None:
        resident = int(statistics.median(r.offload["peak_resident_bytes"] for r in timed))
    activation, _ = activation_bytes(name, mem, keep_like, resident)
    cuda_peak = max(r.cuda_peak_bytes or 0 for r in timed) if device.type == "cuda" else None
    return {"micro_batch": mb, "step_seconds": median, "tokens_per_second": mb * cfg.seq / median,
            "peak_activation_bytes": activation, "cuda_peak_bytes": cuda_peak,
            "memory_bytes": cuda_peak if cuda_peak is not None else activation}


def sweep_micro_batch(names: Sequence[str], preset: Preset, device: torch.device, paths: Sequence[str],
                      config: OffloadConfig, keep_memory: Optional[MemoryPass], budget: Optional[int],
                      max_micro_batch: Optional[int], seed: int, progress: bool) -> dict:
    """Largest fitting micro-batch and its throughput for each strategy."""
    cuda = device.type == "cuda"
    if budget is None:
        if cuda:
            budget = torch.cuda.get_device_properties(device).total_memory
            budget_source = "GPU memory"
        else:
            base = keep_memory.peak_bytes if keep_memory is not None else 64 << 20
            budget = 4 * base
            budget_source = f"4 x keep's peak activation bytes at micro-batch {preset.micro_batch}"
    else:
        budget_source = "--memory-budget"
    if max_micro_batch is None:
        max_micro_batch = 64 if cuda else 8 * preset.micro_batch
    torch.manual_seed(seed)
    with torch.device(device):
        state = GPT(preset.model).state_dict()
    rows: Dict[str, List[dict]] = {}
    best: Dict[str, Optional[dict]] = {}
    for name in names:
        rows[name], best[name] = [], None
        mb = 1
        while mb <= max_micro_batch:
            try:
                row = _measure(name, preset, mb, device, config, state, seed)
            except torch.cuda.OutOfMemoryError:
                row = {"micro_batch": mb, "out_of_memory": True, "memory_bytes": None}
            if cuda:
                torch.cuda.empty_cache()
            row["fits"] = row.get("memory_bytes") is not None and row["memory_bytes"] <= budget
            rows[name].append(row)
            if progress:
                log.info("sweep %s mb=%d fits=%s", name, mb, row["fits"])
            if not row["fits"]:
                break
            best[name] = {"micro_batch": mb, "tokens_per_second": row["tokens_per_second"]}
            mb *= 2
    return {"budget_bytes": budget, "budget_source": budget_source,
            "memory_kind": "cuda max_memory_allocated" if cuda else "peak activation bytes",
            "max_micro_batch": max_micro_batch, "rows": rows, "best": best}
