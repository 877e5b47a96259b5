"""One measured training step, one untimed memory pass, and one timeline step of a strategy.

Timing: on CUDA the clock synchronizes before and after the step and splits forward from
backward with CUDA events (no synchronization inside the step); on the CPU it reads
``time.perf_counter``. A step is forward + backward + optimizer step + waiting for the
offloader's writes still in flight, so no strategy leaves work for the next one.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from .memory import PeakRSS, SavedBytesMeter
from .strategies import Strategy


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype in ("bfloat16", "bf16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if dtype in ("float16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


class StepClock:
    """Wall time of a step and of its forward and backward parts."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._t: List[float] = []
        self._events: List[torch.cuda.Event] = []

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self._events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            self._events[0].record()
        self._t = [time.perf_counter()]

    def forward_done(self) -> None:
        if self.cuda:
            self._events[1].record()
        self._t.append(time.perf_counter())

    def backward_done(self) -> None:
        if self.cuda:
            self._events[2].record()
        self._t.append(time.perf_counter())

    def stop(self) -> Tuple[float, float, float]:
        """(step, forward, backward) seconds."""
        if self.cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
        if self.cuda:
            fwd = self._events[0].elapsed_time(self._events[1]) / 1e3
            bwd = self._events[1].elapsed_time(self._events[2]) / 1e3
        else:
            fwd, bwd = self._t[1] - self._t[0], self._t[2] - self._t[1]
        return end - self._t[0], fwd, bwd


@dataclass
class StepRecord:
    """What one timed step of one strategy measured."""

    step: int
    seconds: float
    forward_seconds: float
    backward_seconds: float
    loss: float
    peak_rss_bytes: int
    cuda_peak_bytes: Optional[int] = None
    offload: Optional[dict] = None
    thread_cpu_seconds: float = 0.0  # CPU time of the thread that ran the step
    process_cpu_seconds: float = 0.0  # CPU time of the whole process (I/O threads included)


def run_step(strategy: Strategy, batch: Tuple[torch.Tensor, torch.Tensor], rng_seed: int,
             step: int, dtype: str, rss: PeakRSS) -> StepRecord:
    """One timed training step. The RNG is seeded with ``rng_seed`` first, so every strategy
    draws the same dropout masks."""
    device = strategy.device
    tokens, targets = batch
    clock = StepClock(device)
    base = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    torch.manual_seed(rng_seed)  # seeds the CUDA generators too
    rss.reset()
    clock.start()
    cpu0, thread0 = time.process_time(), time.thread_time()
    with strategy.context():
        with autocast(device, dtype):
            loss = strategy.model(tokens, targets)
        clock.forward_done()
        loss.backward()
        clock.backward_done()
    strategy.optimizer.step()
    strategy.optimizer.zero_grad(set_to_none=True)
    strategy.finish()
    seconds, fwd, bwd = clock.stop()
    thread_cpu, process_cpu = time.thread_time() - thread0, time.process_time() - cpu0
    cuda_peak = None
    if device.type == "cuda":
        # The step's own peak over what was allocated before it (other strategies' models),
        # plus this strategy's parameters: what a run of this strategy alone would show.
        cuda_peak = torch.cuda.max_memory_allocated(device) - base + strategy.parameter_bytes()
    stats = strategy.step_stats()
    return StepRecord(step=step, seconds=seconds, forward_seconds=fwd, backward_seconds=bwd,
                      loss=float(loss.detach().float().item()), peak_rss_bytes=rss.read(),
                      cuda_peak_bytes=cuda_peak, offload=stats.as_dict() if stats is not None else None,
                      thread_cpu_seconds=thread_cpu, process_cpu_seconds=process_cpu)


@dataclass
class MemoryPass:
    """Saved-activation bytes on the compute device, measured in an untimed pass."""

    peak_bytes: int  # live peak of the bytes the meter saw (ssd: only what it kept)
    total_bytes: int  # every saved activation storage once
    offloadable_bytes: int  # of those, the storages >= min_offload_bytes
    max_layer_bytes: int  # the largest one block saves (without recompute)


def memory_pass(strategy: Strategy, batch: Tuple[torch.Tensor, torch.Tensor], rng_seed: int,
                dtype: str, min_offload_bytes: int, recompute: Optional[bool] = None) -> MemoryPass:
    """Forward and backward under a ``SavedBytesMeter`` (no optimizer step, gradients dropped).

    ``recompute`` temporarily overrides the model's checkpointing (``False`` measures what one
    block saves when it is not recomputed).
    """
    model = strategy.model
    saved_recompute = model.recompute
    if recompute is not None:
        model.recompute = recompute
    device = strategy.device
    tokens, targets = batch
    torch.manual_seed(rng_seed)
    outer = strategy.context() if strategy.uses_ssd else contextlib.nullcontext()
    meter: Optional[SavedBytesMeter] = None
    try:
        with outer:
            meter = SavedBytesMeter([model], strategy.hook_pair(), layers=model.blocks, device=device,
                                    threshold=min_offload_bytes)
            with meter.hooks():
                with autocast(device, dtype):
                    loss = model(tokens, targets)
                loss.backward()
            del loss
        strategy.finish()
    finally:
        model.recompute = saved_recompute
        model.zero_grad(set_to_none=True)
        if meter is not None:
            meter.close()
    return MemoryPass(peak_bytes=meter.peak_bytes, total_bytes=meter.total_bytes,
                      offloadable_bytes=meter.threshold_bytes, max_layer_bytes=meter.max_layer_bytes())


@dataclass
class TimelineRecord:
    """One ssd step, times in seconds from its start: compute spans and transfers."""

    strategy: str
    forward: Tuple[float, float]
    backward: Tuple[float, float]
    layers: List[Tuple[int, float, float]] = field(default_factory=list)
    transfers: List[Tuple[str, float, float, int, object]] = field(default_factory=list)
    synchronized_layers: bool = False

    def as_dict(self) -> dict:
        return {"strategy": self.strategy, "forward": list(self.forward), "backward": list(self.backward),
                "layers": [list(x) for x in self.layers], "synchronized_layers": self.synchronized_layers,
                "transfers": [{"kind": k, "start": s, "end": e, "bytes": n, "layer": l if isinstance(l, (int, type(None))) else str(l)}
                              for k, s, e, n, l in self.transfers]}


def timeline_step(strategy: Strategy, batch: Tuple[torch.Tensor, torch.Tensor], rng_seed: int,
                  dtype: str, trace_path: Optional[str] = None) -> TimelineRecord:
    """An extra, untimed ssd step with the transfer timeline on and layer forward spans.

    With ``trace_path`` the step also runs under ``torch.profiler`` and its Chrome trace (open
    it in Perfetto) is written there: the ``ssdoffload.stall`` spans sit beside the model's ops.
    (The ``ssdoffload.write/read`` spans are recorded on the I/O threads, which torch.profiler's
    CPU collection does not follow in torch 2.13; the transfer timeline has them.)

    On CUDA the layer hooks synchronize so that the spans are real compute times; that adds
    small gaps, which is why this step is not one of the measured ones.
    """
    assert strategy.offloader is not None
    off = strategy.offloader
    device = strategy.device
    cuda = device.type == "cuda"

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    spans: List[Tuple[int, float, float]] = []
    open_at = {}
    handles = []
    for i, block in enumerate(strategy.model.blocks):
        def pre(module, args, i=i):
            if torch._C._current_graph_task_id() == -1:
                open_at[i] = now()

        def post(module, args, output, i=i):
            if torch._C._current_graph_task_id() == -1 and i in open_at:
                spans.append((i, open_at.pop(i), now()))
        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    off.timeline(True)
    off.timeline()  # drop anything recorded before
    tokens, targets = batch
    torch.manual_seed(rng_seed)
    profiler = contextlib.nullcontext()
    if trace_path is not None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities)
    try:
        with profiler as prof:
            t0 = now()
            with strategy.context():
                with autocast(device, dtype):
                    loss = strategy.model(tokens, targets)
                t1 = now()
                loss.backward()
                t2 = now()
            strategy.finish()
            events = off.timeline(False)
        if trace_path is not None:
            prof.export_chrome_trace(trace_path)
    finally:
        for h in handles:
            h.remove()
        strategy.model.zero_grad(set_to_none=True)
    return TimelineRecord(
        strategy=strategy.name, forward=(0.0, t1 - t0), backward=(t1 - t0, t2 - t0),
        layers=[(i, a - t0, b - t0) for i, a, b in spans],
        transfers=[(e.kind, e.start - t0, e.end - t0, e.nbytes, e.layer) for e in events],
        synchronized_layers=cuda)
