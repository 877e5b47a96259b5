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

Then the whole step (``measure_step_overhead``): the preset's GPT with plain PyTorch against an
offloader whose plan keeps everything, interleaved — what "nothing offloaded" costs.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from typing import TYPE_CHECKING, Callable, Dict

import torch

from ..config import OffloadConfig
from ..offloader import Offloader

if TYPE_CHECKING:
    from .presets import Preset


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


# -- the whole step, nothing offloaded -------------------------------------------------------
def measure_step_overhead(preset: "Preset", device: torch.device, steps: int = 10, warmup: int = 3,
                          spill_path: str = "") -> dict:
    """What a user pays when the plan keeps everything: the built-in GPT of ``preset`` trained
    with plain PyTorch and with an ``Offloader`` in budget mode under a budget that never
    binds (after its first, measured step the plan keeps every layer: the policy, the profiler's
    timing, the layer hooks, the kept tensors' bookkeeping — all of it, no I/O). The two run
    interleaved, one step each in turn, from the same weights and batches; the figure is the
    median step time of each and their ratio."""
    from ..models.gpt import GPT, synthetic_batch

    torch.manual_seed(0)
    with torch.device(device):
        state = GPT(preset.model).state_dict()
    cfg = preset.model
    cuda = device.type == "cuda"

    def build() -> tuple:
        with torch.device(device):
            model = GPT(cfg)
        model.load_state_dict(state)
        model.train()
        return model, torch.optim.SGD(model.parameters(), lr=1e-3)

    def run_step(model, opt, off, i: int) -> float:
        tokens, targets = synthetic_batch(cfg, preset.micro_batch, device, seed=i)
        torch.manual_seed(i)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with (off.step() if off is not None else contextlib.nullcontext()):
            loss = model(tokens, targets)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times: Dict[str, list] = {"plain": [], "nothing offloaded": []}
    with tempfile.TemporaryDirectory(prefix="ssdoffload-overhead-") as tmp:
        plain = build()
        kept = build()
        config = OffloadConfig(path=f"{spill_path or tmp}/spill", policy="budget", memory_budget=1 << 50)
        with Offloader(kept[0], config) as off:
            for i in range(warmup + steps):
                order = [("plain", plain, None), ("nothing offloaded", kept, off)]
                for name, (model, opt), o in (order if i % 2 else order[::-1]):
                    seconds = run_step(model, opt, o, i)
                    if i >= warmup:
                        times[name].append(seconds)
            last = off.last_step_stats()
            plan = off.plan()
    med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    return {"preset": preset.name, "device": str(device), "steps": steps, "warmup": warmup,
            "step_seconds": med, "step_seconds_all": times,
            "overhead": med["nothing offloaded"] / med["plain"] - 1,
            "offloaded_in_last_step": last.tensors_offloaded,
            "plan": list(plan.placement) if plan is not None else None,
            "target": 0.01 if cuda else 0.03}


def format_step_overhead(result: dict) -> str:
    med = result["step_seconds"]
    spread = {n: max(t) - min(t) for n, t in result["step_seconds_all"].items()}
    ok = result["overhead"] <= result["target"]
    return (f"{result['preset']} on {result['device']}, median of {result['steps']} interleaved steps: plain "
            f"{med['plain']:.3f} s (spread {spread['plain'] * 1e3:.0f} ms), nothing offloaded "
            f"{med['nothing offloaded']:.3f} s (spread {spread['nothing offloaded'] * 1e3:.0f} ms): "
            f"{result['overhead']:+.1%} (target <= {result['target']:.0%}: {'met' if ok else 'MISSED'}; "
            f"{result['offloaded_in_last_step']} tensors offloaded in the last step)")
