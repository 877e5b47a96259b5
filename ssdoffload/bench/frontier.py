"""``bench --budgets``: peak memory against step time for every way of handling activations,
and budget mode at a sweep of budgets — the frontier a user picks a point on.

Every point runs the same code path (an ``Offloader`` in budget mode) so that memory is counted
the same way for all of them:

* fixed plans, pinned with ``Offloader.set_plan``: ``keep`` (every group on the device),
  ``recompute`` (every layer recomputed, its input kept), ``ckpt-input-ssd`` (every layer
  recomputed, its input on the SSD: checkpoint-input offload), ``ssd`` (everything offloaded),
  and on a GPU with a host tier ``ckpt-input-ram`` (the DeepSpeed / transformers pattern);
* ``budget`` at each budget: the plan budget mode chooses from its own measurements;
* for reference, plain PyTorch without hooks: ``plain keep`` and ``plain recompute`` (step time
  only: the hooks' own cost is the difference).

``model="hf-llama"`` (``--model hf-llama``, ``bench_models``): a tiny random Hugging Face Llama that
checkpoints its own layers; its fixed plans are keep and ssd, its plain points are the model
without and with that checkpointing.

Memory figure: on a GPU ``torch.cuda.max_memory_allocated`` above the parameters, gradients and
optimizer state; on a CPU the offloader's peak resident offloadable bytes (which include a
recomputed layer's activations while its recomputation runs, at their measured size). Budgets are fractions of ``keep``'s figure, down to the smallest the
solver finds feasible.
"""
from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

from ..budget import RECOMPUTE, RECOMPUTE_RAM, RECOMPUTE_SSD
from ..config import OffloadConfig
from ..models.gpt import synthetic_batch
from ..offloader import Offloader
from ..places import DEVICE, SSD
from .bench_models import BenchModel, bench_model
from .presets import Preset

log = logging.getLogger("ssdoffload")

DEFAULT_FRACTIONS = (1.0, 0.7, 0.5, 0.35, 0.25, 0.15, 0.1)
#: Budget mode re-plans from measurements: these steps are not timed.
_WARMUP = 3


def _fixed_plans(layers: int, host_tier: bool) -> Dict[str, List[str]]:
    n = 2 * layers + 1
    layer = [g % 2 == 1 for g in range(n)]
    plans = {
        "keep": [DEVICE] * n,
        "recompute": [RECOMPUTE if is_layer else DEVICE for is_layer in layer],
        "ckpt-input-ssd": [RECOMPUTE_SSD if is_layer else DEVICE for is_layer in layer],
        "ssd": [SSD] * n,
    }
    if host_tier:
        plans["ckpt-input-ram"] = [RECOMPUTE_RAM if is_layer else DEVICE for is_layer in layer]
    return plans


class _Point:
    """One point of the frontier: a model, its optimizer and (but for plain PyTorch) an
    ``Offloader``, stepped one step at a time so that every point's timed steps interleave
    (machine drift then hits them alike). On a GPU a point's model waits on the host between
    its steps (``park``), so that a dozen copies of a large model need not fit at once."""

    def __init__(self, preset: Preset, state: dict, device: torch.device, config: Optional[OffloadConfig],
                 plan: Optional[List[str]], seed: int, recompute: bool = False, model: str = "gpt") -> None:
        self.preset, self.device, self.plan, self.seed = preset, device, plan, seed
        self.cuda = device.type == "cuda"
        self.kind: BenchModel = bench_model(model, plain=config is None)
        with torch.device(device):
            self.model = self.kind.build(preset, recompute)
        self.model.load_state_dict(state)
        self.model.to(device).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.off = Offloader(self.model, config) if config is not None else None
        self.steps_run = 0
        self.times: List[float] = []
        self.peaks: List[int] = []
        self.overruns, self.backpressure = 0, 0.0
        self._park()

    def _park(self) -> None:
        if self.cuda:
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def step(self, timed: bool) -> None:
        """One training step; ``timed``: record its time and memory."""
        off, cfg, device = self.off, self.preset.model, self.device
        if self.cuda:
            self.model.to(device)
        if off is not None and self.plan is not None and self.steps_run == 1:
            # Pinned after one measured step: the plan then knows each layer's activation
            # size, which its recomputation holds (and the memory figure counts).
            off.set_plan(self.plan)
        step = self.steps_run
        tokens, targets = synthetic_batch(cfg, self.preset.micro_batch, device, seed=self.seed + step)
        torch.manual_seed(self.seed + step)
        amp = torch.bfloat16 if self.preset.dtype == "bfloat16" else None
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        with (off.step() if off is not None else _null()):
            with (torch.autocast(device.type, dtype=amp) if amp else _null()):
                loss = self.kind.loss(self.model, tokens, targets)
            loss.backward()
        if off is not None:
            off.wait()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        self.steps_run += 1
        if timed:
            self.times.append(seconds)
            if self.cuda:
                self.peaks.append(torch.cuda.max_memory_allocated(device) - base)
            elif off is not None:
                self.peaks.append(off.last_step_stats().peak_resident_bytes)
            if off is not None:
                st = off.last_step_stats()
                self.overruns += st.budget_overruns
                self.backpressure += st.backpressure_seconds
        self._park()

    def memory_now(self) -> Optional[int]:
        """The last step's memory figure (a point's size is known after its warm-up)."""
        if self.off is None:
            return None
        return self.off.last_step_stats().peak_resident_bytes if not self.cuda else None

    def result(self) -> dict:
        current = self.off.plan() if self.off is not None else None
        return {"step_seconds": statistics.median(self.times), "step_seconds_all": list(self.times),
                "memory_bytes": max(self.peaks) if self.peaks else None, "budget_overruns": self.overruns,
                "backpressure_seconds": self.backpressure,
                "plan": list(current.placement) if current is not None else None,
                "plan_text": current.describe() if current is not None else None}

    def close(self) -> None:
        if self.off is not None:
            self.off.close()
            self.off = None


def _interleaved(points: Sequence[_Point], steps: int, timed: bool) -> None:
    """``steps`` steps of every point, one step of each in turn; the order rotates every round."""
    for i in range(steps):
        k = i % len(points)
        for point in list(points[k:]) + list(points[:k]):
            point.step(timed)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def budget_frontier(preset: Preset, device: torch.device, config: OffloadConfig, seed: int = 0,
                    fractions: Sequence[float] = DEFAULT_FRACTIONS, steps: Optional[int] = None,
                    progress: bool = True, model: str = "gpt") -> dict:
    """Measure the fixed plans and budget mode at ``fractions`` of keep's memory figure (and at
    full recomputation's), every point's timed steps interleaved with every other's.

    1. The fixed plans and plain PyTorch warm up (interleaved); their memory figures, known
       then, set the budgets: fractions of keep's, and recomputation's own.
    2. Budget mode warms up at each budget (it re-plans from its measurements meanwhile).
    3. Every point runs ``steps`` timed steps, one step of each in turn."""
    steps = steps or max(3, preset.steps // 2)
    torch.manual_seed(seed)
    with torch.device(device):
        state = bench_model(model).build(preset, False).state_dict()
    big = 1 << 50  # pinned plans: a budget that never binds
    host = config.host_cache_bytes > 0 and device.type == "cuda"
    fixed: Dict[str, _Point] = {}
    budgets: List[dict] = []
    points: List[_Point] = []
    try:
        wanted = bench_model(model).fixed_plans
        for name, plan in _fixed_plans(preset.model.layers, host).items():
            if name in wanted:
                fixed[name] = _Point(preset, state, device,
                                     dataclasses.replace(config, memory_budget=big, policy="budget"), plan, seed,
                                     model=model)
        plain = {"plain keep": _Point(preset, state, device, None, None, seed, model=model),
                 "plain recompute": _Point(preset, state, device, None, None, seed, recompute=True, model=model)}
        points = [*fixed.values(), *plain.values()]
        _interleaved(points, _WARMUP, timed=False)
        # The memory figures: on a CPU the warm-up's last step; on a GPU one more step of each.
        sizes = {name: p.memory_now() for name, p in fixed.items()}
        if device.type == "cuda":
            for name in ("keep", "recompute"):
                fixed[name].step(timed=True)
                sizes[name] = fixed[name].peaks.pop()
                fixed[name].times.pop()
        keep_memory = sizes["keep"] or 1
        # The comparison point: budget mode at exactly full recomputation's memory.
        at_recompute = (sizes.get("recompute") or 0) / keep_memory
        sweep = sorted({*fractions, *([at_recompute] if 0 < at_recompute < 1 else [])}, reverse=True)
        rows: List[tuple] = []
        for f in sweep:
            budget = int(keep_memory * f)
            point = _Point(preset, state, device, dataclasses.replace(config, memory_budget=budget, policy="budget"),
                           None, seed, model=model)
            rows.append((f, budget, point))
            points.append(point)
            for _ in range(_WARMUP):
                point.step(timed=False)
            current = point.off.plan()
            if current is None or "no plan meets the budget" in current.describe():
                break  # the smallest budget tried: below it nothing fits either
        if progress:
            log.info("frontier: %d points warmed up; %d timed steps of each, interleaved", len(points), steps)
        _interleaved(points, steps, timed=True)
        results = {name: p.result() for name, p in fixed.items()}
        plain_results = {name: p.result() for name, p in plain.items()}
        for f, budget, point in rows:
            row = point.result()
            row.update(fraction=f, budget_bytes=budget, at_recompute_peak=f == at_recompute)
            row["feasible"] = bool(row["plan_text"]) and "no plan meets the budget" not in row["plan_text"]
            row["within_budget"] = row["memory_bytes"] is not None and row["memory_bytes"] <= budget
            budgets.append(row)
            if progress:
                log.info("frontier: budget %.2f x keep (%d bytes): %.3f s, %s bytes", f, budget,
                         row["step_seconds"], row["memory_bytes"])
    finally:
        for p in points:
            p.close()
    return {"model": model, "memory_kind": "cuda max_memory_allocated above the model" if device.type == "cuda"
            else "peak resident offloadable bytes (recomputations included)",
            "fixed": results, "plain": plain_results, "budgets": budgets, "checks": _checks(results, budgets)}


def _checks(points: Dict[str, dict], budgets: List[dict]) -> List[dict]:
    """The issue's targets, evaluated on this run: within budget; on or below the envelope of
    the fixed plans that fit (with the run's noise: the spread of the timed steps); faster
    than full recomputation at its own memory."""
    def spread(p: dict) -> float:
        return max(p["step_seconds_all"]) - min(p["step_seconds_all"])

    out = []
    for row in budgets:
        fits = {name: p for name, p in points.items()
                if p["memory_bytes"] is not None and p["memory_bytes"] <= row["budget_bytes"]}
        best = min(fits, key=lambda name: fits[name]["step_seconds"], default=None)
        envelope = fits[best]["step_seconds"] if best is not None else None
        # The noise of a comparison of two runs: the larger spread of their timed steps.
        noise = max(spread(row), spread(fits[best]) if best is not None else 0.0)
        # Budget mode may choose exactly a fixed plan: then the two are one plan timed twice.
        same = next((name for name, p in points.items() if p["plan"] is not None and p["plan"] == row["plan"]), None)
        recompute = points.get("recompute")
        out.append({"budget_bytes": row["budget_bytes"], "fraction": row["fraction"],
                    "feasible": row["feasible"], "within_budget": row["within_budget"], "overruns": row["budget_overruns"],
                    "step_seconds": row["step_seconds"], "best_fixed_that_fits": envelope, "best_fixed_name": best,
                    "noise_seconds": noise, "same_plan_as": same,
                    "on_or_below_envelope": envelope is None or row["step_seconds"] <= envelope + noise,
                    "vs_recompute": (row["step_seconds"] / recompute["step_seconds"] - 1
                                     if recompute and row.get("at_recompute_peak") else None)})
    return out


def format_frontier(result: dict) -> str:
    mib = 1 / (1 << 20)
    lines = [f"memory: {result['memory_kind']}", f"{'point':<28}{'step s':>9}{'memory MiB':>12}"]
    for name, p in result["fixed"].items():
        lines.append(f"{name:<28}{p['step_seconds']:>9.3f}{(p['memory_bytes'] or 0) * mib:>12.1f}")
    for name, p in result["plain"].items():
        lines.append(f"{name:<28}{p['step_seconds']:>9.3f}{'-':>12}")
    for row, check in zip(result["budgets"], result["checks"]):
        label = f"budget {row['fraction']:.2f}x ({row['budget_bytes'] * mib:.1f} MiB)"
        if row.get("at_recompute_peak"):
            label += " = recompute's"
        env = check["best_fixed_that_fits"]
        if not row["feasible"]:
            lines.append(f"{label:<28}{row['step_seconds']:>9.3f}{(row['memory_bytes'] or 0) * mib:>12.1f}"
                         "  no plan fits this budget (the largest group alone is bigger): lowest-peak plan")
            continue
        over = f" ({row['budget_overruns']} overruns)" if row["budget_overruns"] else ""
        best = "-" if env is None else f"{env:.3f} s"
        if env is not None:
            best += f" ({check['best_fixed_name']}, noise {check['noise_seconds'] * 1e3:.0f} ms)"
        notes = ""
        if not check["on_or_below_envelope"]:
            notes += "  ABOVE it"
        if check["same_plan_as"]:
            notes += f"  [the same plan as {check['same_plan_as']}]"
        if check["vs_recompute"] is not None:
            notes += f"  [{-check['vs_recompute']:.0%} faster than recompute at its memory]" \
                if check["vs_recompute"] < 0 else f"  [{check['vs_recompute']:.0%} SLOWER than recompute]"
        lines.append(f"{label:<28}{row['step_seconds']:>9.3f}{(row['memory_bytes'] or 0) * mib:>12.1f}"
                     f"  {'within' if row['within_budget'] else 'OVER'} budget{over}; best fixed plan that "
                     f"fits: {best}{notes}")
    return "\n".join(lines)
