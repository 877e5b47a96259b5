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
from ..models.gpt import GPT, synthetic_batch
from ..offloader import Offloader
from ..places import DEVICE, SSD
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


def _run(preset: Preset, state: dict, device: torch.device, config: Optional[OffloadConfig],
         plan: Optional[List[str]], steps: int, seed: int, recompute: bool = False) -> dict:
    """Train ``_WARMUP + steps`` steps; time the last ``steps``."""
    cfg = preset.model
    with torch.device(device):
        model = GPT(cfg, recompute=recompute)
    model.load_state_dict(state)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    off = Offloader(model, config) if config is not None else None
    amp = torch.bfloat16 if preset.dtype == "bfloat16" else None
    times, peaks, overruns, backpressure = [], [], 0, 0.0
    cuda = device.type == "cuda"
    try:
        for step in range(_WARMUP + steps):
            if off is not None and plan is not None and step == 1:
                # Pinned after one measured step: the plan then knows each layer's activation
                # size, which its recomputation holds (and the memory figure counts).
                off.set_plan(plan)
            tokens, targets = synthetic_batch(cfg, preset.micro_batch, device, seed=seed + step)
            torch.manual_seed(seed + step)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            with (off.step() if off is not None else _null()):
                with (torch.autocast(device.type, dtype=amp) if amp else _null()):
                    loss = model(tokens, targets)
                loss.backward()
            if off is not None:
                off.wait()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            if step < _WARMUP:
                continue
            times.append(seconds)
            if cuda:
                peaks.append(torch.cuda.max_memory_allocated(device) - base)
            elif off is not None:
                st = off.last_step_stats()
                peaks.append(st.peak_resident_bytes)
            if off is not None:
                st = off.last_step_stats()
                overruns += st.budget_overruns
                backpressure += st.backpressure_seconds
        current = off.plan() if off is not None else None
        return {"step_seconds": statistics.median(times), "step_seconds_all": times,
                "memory_bytes": max(peaks) if peaks else None, "budget_overruns": overruns,
                "backpressure_seconds": backpressure,
                "plan": list(current.placement) if current is not None else None,
                "plan_text": current.describe() if current is not None else None}
    finally:
        if off is not None:
            off.close()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def budget_frontier(preset: Preset, device: torch.device, config: OffloadConfig, seed: int = 0,
                    fractions: Sequence[float] = DEFAULT_FRACTIONS, steps: Optional[int] = None,
                    progress: bool = True) -> dict:
    """Measure the fixed plans, then budget mode at ``fractions`` of keep's memory figure."""
    steps = steps or max(3, preset.steps // 2)
    torch.manual_seed(seed)
    with torch.device(device):
        state = GPT(preset.model).state_dict()
    big = 1 << 50  # pinned plans: a budget that never binds
    host = config.host_cache_bytes > 0 and device.type == "cuda"
    points: Dict[str, dict] = {}
    for name, plan in _fixed_plans(preset.model.layers, host).items():
        points[name] = _run(preset, state, device, dataclasses.replace(config, memory_budget=big, policy="budget"),
                            plan, steps, seed)
        if progress:
            log.info("frontier: %s %.3f s, %s bytes", name, points[name]["step_seconds"], points[name]["memory_bytes"])
    plain = {"plain keep": _run(preset, state, device, None, None, steps, seed),
             "plain recompute": _run(preset, state, device, None, None, steps, seed, recompute=True)}
    keep_memory = points["keep"]["memory_bytes"] or 1
    budgets: List[dict] = []
    for f in fractions:
        budget = int(keep_memory * f)
        row = _run(preset, state, device, dataclasses.replace(config, memory_budget=budget, policy="budget"),
                   None, steps, seed)
        row.update(fraction=f, budget_bytes=budget)
        row["feasible"] = bool(row["plan_text"]) and "no plan meets the budget" not in row["plan_text"]
        row["within_budget"] = row["memory_bytes"] is not None and row["memory_bytes"] <= budget
        budgets.append(row)
        if progress:
            log.info("frontier: budget %.2f x keep (%d bytes): %.3f s, %s bytes", f, budget, row["step_seconds"],
                     row["memory_bytes"])
        if not row["feasible"]:
            break  # the smallest budget tried: below it nothing fits either
    return {"memory_kind": "cuda max_memory_allocated above the model" if device.type == "cuda"
            else "peak resident offloadable bytes (recomputations included)",
            "fixed": points, "plain": plain, "budgets": budgets, "checks": _checks(points, budgets)}


def _checks(points: Dict[str, dict], budgets: List[dict]) -> List[dict]:
    """The issue's targets, evaluated on this run: within budget; on or below the envelope of
    the fixed plans that fit (with the run's noise: the spread of the timed steps); faster
    than full recomputation at its own memory."""
    out = []
    for row in budgets:
        fits = [p for p in points.values() if p["memory_bytes"] is not None and p["memory_bytes"] <= row["budget_bytes"]]
        envelope = min((p["step_seconds"] for p in fits), default=None)
        noise = max(row["step_seconds_all"]) - min(row["step_seconds_all"])
        out.append({"budget_bytes": row["budget_bytes"], "fraction": row["fraction"],
                    "feasible": row["feasible"], "within_budget": row["within_budget"], "overruns": row["budget_overruns"],
                    "step_seconds": row["step_seconds"], "best_fixed_that_fits": envelope,
                    "noise_seconds": noise,
                    "on_or_below_envelope": envelope is None or row["step_seconds"] <= envelope + noise})
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
        env = check["best_fixed_that_fits"]
        if not row["feasible"]:
            lines.append(f"{label:<28}{row['step_seconds']:>9.3f}{(row['memory_bytes'] or 0) * mib:>12.1f}"
                         "  no plan fits this budget (the largest group alone is bigger): lowest-peak plan")
            continue
        over = f" ({row['budget_overruns']} overruns)" if row["budget_overruns"] else ""
        best = "-" if env is None else f"{env:.3f} s"
        lines.append(f"{label:<28}{row['step_seconds']:>9.3f}{(row['memory_bytes'] or 0) * mib:>12.1f}"
                     f"  {'within' if row['within_budget'] else 'OVER'} budget{over}; best fixed plan that "
                     f"fits: {best}{'' if check['on_or_below_envelope'] else '  (ABOVE it)'}")
    return "\n".join(lines)
