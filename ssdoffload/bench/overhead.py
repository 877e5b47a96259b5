"""``bench --overhead``: what the hooks cost the compute thread, per saved tensor.

A model of many tiny residual layers (the cost of the hooks, not of the kernels, dominates),
trained in one process under four set-ups, each for ``steps`` steps after a warm-up:

* ``plain``: autograd with no hooks;
* ``trivial hooks``: a ``saved_tensors_hooks`` pair that returns its argument (the floor any
  hook-based offloader pays);
* ``ssdoffload, all kept``: an ``Offloader`` whose ``min_offload_bytes`` is above every tensor
  (the policy, the version checks, the layer hooks, the profiler: everything but I/O);
* ``ssdoffload, all offloaded``: ``policy="all"``, ``min_offload_bytes=0`` (every tensor written
  and read back).

The figure is the compute thread's own CPU time (``time.thread_time()``) per step, minimum over
the steps, divided by the saved tensors per step, over the trivial pair: time the thread spends
blocked on a tiny tensor's I/O is the drive's latency, not the hooks' cost. Wall time is
reported too.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from typing import Callable, Dict

import torch

from ..config import OffloadConfig
from ..offloader import Offloader


class _Layer(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(x)).sigmoid()


class TinyResidual(torch.nn.Module):
    """``layers`` residual blocks of width ``width`` (each saves a few small tensors)."""

    def __init__(self, layers: int = 64, width: int = 32) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(_Layer(width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x.square().mean()


def _saved_per_step(model: torch.nn.Module, x: torch.Tensor) -> int:
    count = [0]

    def pack(t):
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).backward()
    model.zero_grad(set_to_none=True)
    return count[0]


def _time(step: Callable[[], None], steps: int, warmup: int) -> Dict[str, float]:
    for _ in range(warmup):
        step()
    cpu, wall = [], []
    for _ in range(steps):
        c0, w0 = time.thread_time(), time.perf_counter()
        step()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {"cpu_seconds": min(cpu), "wall_seconds": min(wall)}


def measure_overhead(layers: int = 64, width: int = 32, batch: int = 8, steps: int = 30, warmup: int = 5,
                     spill_path: str = "") -> dict:
    """The four set-ups' per-step compute-thread CPU and wall time, and the per-tensor cost."""
    torch.manual_seed(0)
    model = TinyResidual(layers, width)
    x = torch.randn(batch, width)
    saved = _saved_per_step(model, x)

    def train(context: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], None]:
        def step() -> None:
            with context():
                model(x).backward()
            model.zero_grad(set_to_none=True)
        return step

    results: Dict[str, Dict[str, float]] = {}
    results["plain"] = _time(train(contextlib.nullcontext), steps, warmup)
    results["trivial hooks"] = _time(
        train(lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)), steps, warmup)
    with tempfile.TemporaryDirectory(prefix="ssdoffload-overhead-") as tmp:
        path = spill_path or tmp
        for name, extra in (("ssdoffload, all kept", dict(min_offload_bytes=1 << 40, policy="all")),
                            ("ssdoffload, all offloaded", dict(min_offload_bytes=0, policy="all"))):
            with Offloader(model, OffloadConfig(path=f"{path}/spill", prefetch_depth=2, **extra)) as off:
                def context(off=off):
                    return off.step()
                results[name] = _time(train(context), steps, warmup)
                results[name]["tensors_offloaded_per_step"] = off.last_step_stats().tensors_offloaded
    floor = results["trivial hooks"]
    for r in results.values():
        r["cpu_us_per_tensor_over_trivial"] = (r["cpu_seconds"] - floor["cpu_seconds"]) / saved * 1e6
        r["wall_us_per_tensor_over_trivial"] = (r["wall_seconds"] - floor["wall_seconds"]) / saved * 1e6
    trivial = results["trivial hooks"]
    trivial["cpu_us_per_tensor_over_plain"] = (trivial["cpu_seconds"] - results["plain"]["cpu_seconds"]) / saved * 1e6
    return {"layers": layers, "width": width, "batch": batch, "saved_tensors_per_step": saved,
            "steps": steps, "warmup": warmup, "results": results,
            "targets": {"kept_us": 5.0, "offloaded_us": 20.0}}


def format_overhead(result: dict) -> str:
    lines = [f"{result['layers']} residual layers, {result['saved_tensors_per_step']} saved tensors per step; "
             f"minimum of {result['steps']} steps; compute-thread CPU time (wall in brackets)",
             f"{'set-up':<28}{'ms/step':>10}{'us/tensor over trivial':>26}"]
    for name, r in result["results"].items():
        extra = ""
        if name == "trivial hooks":
            extra = f"   ({r['cpu_us_per_tensor_over_plain']:.1f} us/tensor over plain)"
        lines.append(f"{name:<28}{r['cpu_seconds'] * 1e3:>10.2f}"
                     f"{r['cpu_us_per_tensor_over_trivial']:>14.1f} ({r['wall_us_per_tensor_over_trivial']:.1f} wall)"
                     f"{extra}")
    t = result["targets"]
    kept = result["results"]["ssdoffload, all kept"]["cpu_us_per_tensor_over_trivial"]
    off = result["results"]["ssdoffload, all offloaded"]["cpu_us_per_tensor_over_trivial"]
    lines.append(f"targets: kept <= {t['kept_us']:.0f} us ({'met' if kept <= t['kept_us'] else 'MISSED'}), "
                 f"offloaded <= {t['offloaded_us']:.0f} us ({'met' if off <= t['offloaded_us'] else 'MISSED'})")
    return "\n".join(lines)
