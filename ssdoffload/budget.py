"""Budget mode: meet an activation-memory budget at the least predicted step time.

Each forward group gets one *choice* (the words are the plan's, next to ``places.PLACES``):

============== ===================================== ============================== ============
choice          held on the device through forward    moved (bytes, channel)         extra time
============== ===================================== ============================== ============
``device``      its saved bytes S                      —                              —
``ram``         —                                      S to host RAM                  —
``ssd``         —                                      S to the SSD                   —
``recompute``   its input I (checkpointed layer)       —                              recompute R
``recompute+ram`` —                                    I to host RAM                  R
``recompute+ssd`` —                                    I to the SSD                   R
============== ===================================== ============================== ============

Only layers can be recomputed (the offloader wraps them in non-reentrant checkpointing); the
groups between layers choose among the first three.

**Cost model** (``evaluate``; every figure is measured on this machine by the profiler):

* Memory. ``H`` is what the groups hold through forward. During backward of group ``i`` the
  groups below it still hold theirs and group ``i`` has its whole working set back (reloaded or
  recomputed: S, plus the input while a layer is recomputed). The peak is
  ``max(H_total, max_i(H_below_i + work_i))``. Writes that lag behind forward and reads ahead
  of backward do not appear: at run time the budget is enforced by back-pressure (forward
  waits for writes) and by a prefetcher that reads ahead only within the budget.
* Time. Compute (forward + backward) plus recomputation plus the I/O that compute cannot hide:
  per channel, ``max(0, bytes / write_bps - T_forward) + max(0, bytes / read_bps - T_backward)``.
  Host RAM holds at most ``host_bytes``.

**Solver** (``solve``): a dynamic programme over the groups in forward order whose states are
``(bytes held so far, SSD bytes, RAM bytes)`` with the least recompute time for each; a group
whose backward would exceed the budget above what is held below it is not added. It is exact
(``tests/test_budget.py`` checks it against every assignment of small instances) as long as
the work left stays small: more than ``max_states`` states after a group (after dropping
dominated ones) times the groups still to come above ``32 * max_states`` (a short model stays
exact however many states it has; 7 groups reach 6^6). Past that (long models: the states grow
with the square of the layers), ``_solve_on_grid`` takes over:
held bytes on a grid, rounded up (a plan found still meets the budget), the I/O priced into
the objective, one vectorised pass per price; the result says ``exact=False``.

**The policy** (``BudgetPolicy``) plans one micro-batch. Where several are in flight at once (a
pipeline stage forwards its warm-up micro-batches before their backwards; the profiler counts
the scopes forwarded and not yet backwarded), each holds what the plan saves, so the plan gets
``memory_budget / in_flight`` (and the host-RAM tier is shared the same way). The runtime
guarantee stays global: back-pressure compares every resident byte with the whole budget.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .adaptive import AdaptivePolicy, GroupTiming, Plan, Prediction, StepObservation
from .places import DEVICE, RAM, SSD

log = logging.getLogger("ssdoffload")

RECOMPUTE = "recompute"
RECOMPUTE_RAM = "recompute+ram"
RECOMPUTE_SSD = "recompute+ssd"
#: Every choice, in the order the solver tries them.
CHOICES = (DEVICE, SSD, RAM, RECOMPUTE, RECOMPUTE_SSD, RECOMPUTE_RAM)
#: Where the tensors our hooks see go for each choice (a recomputed layer's only saved tensor
#: is its input).
SAVED_PLACE = {DEVICE: DEVICE, RAM: RAM, SSD: SSD, RECOMPUTE: DEVICE, RECOMPUTE_RAM: RAM, RECOMPUTE_SSD: SSD}


def recomputes(choice: str) -> bool:
    return choice.startswith(RECOMPUTE)


@dataclass(frozen=True)
class BudgetGroup:
    """What the plan knows of one forward group.

    ``saved_bytes``: offloadable bytes it saves when not recomputed; ``input_bytes``: bytes of
    its input (what a recomputed layer keeps or offloads), 0 when it cannot be recomputed;
    ``recompute_seconds``: its forward again, in backward; ``user_recompute_bytes``: what
    the user's own checkpointing of this layer holds in its backward (recomputed activations
    our hooks never see: part of its working set whatever the choice); ``reload_overhead``:
    what reading its saved tensors back allocates beyond them (part of the working set of the
    choices that read them back).
    """

    saved_bytes: int
    forward_seconds: float
    backward_seconds: float
    input_bytes: int = 0
    recompute_seconds: float = 0.0
    recomputable: bool = False
    name: str = ""
    user_recompute_bytes: int = 0
    reload_overhead: int = 0


@dataclass(frozen=True)
class Machine:
    """The bandwidths (bytes/s) and host budget the plan is made for."""

    write_bps: float
    read_bps: float
    ram_bps: float = math.inf
    host_bytes: int = 0


@dataclass(frozen=True)
class Cost:
    seconds: float           # predicted step time
    peak_bytes: int          # predicted activation peak
    recompute_seconds: float
    stall_seconds: float
    ssd_bytes: int
    ram_bytes: int


@dataclass(frozen=True)
class BudgetPlan:
    choices: Tuple[str, ...]
    cost: Cost
    budget: int
    exact: bool
    feasible: bool


def allowed(group: BudgetGroup, machine: Machine) -> Tuple[str, ...]:
    out = [DEVICE, SSD]
    if machine.host_bytes > 0:
        out.append(RAM)
    if group.recomputable and group.input_bytes > 0:
        out += [RECOMPUTE, RECOMPUTE_SSD]
        if machine.host_bytes > 0:
            out.append(RECOMPUTE_RAM)
    return tuple(c for c in CHOICES if c in out)


def _effects(g: BudgetGroup, choice: str) -> Tuple[int, int, int, int, float]:
    """(held through forward, working set in its backward, SSD bytes, RAM bytes, extra seconds)."""
    s, i, u, o = g.saved_bytes, g.input_bytes, g.user_recompute_bytes, g.reload_overhead
    if choice == DEVICE:
        return s, s + u, 0, 0, 0.0
    if choice == SSD:
        return 0, s + u + o, s, 0, 0.0
    if choice == RAM:
        return 0, s + u + o, 0, s, 0.0
    r = g.recompute_seconds
    if choice == RECOMPUTE:
        return i, s + i, 0, 0, r
    if choice == RECOMPUTE_SSD:
        return 0, s + i, i, 0, r
    if choice == RECOMPUTE_RAM:
        return 0, s + i, 0, i, r
    raise ValueError(f"unknown choice {choice!r} (one of {', '.join(CHOICES)})")


def _stall(nbytes: int, write_bps: float, read_bps: float, t_fwd: float, t_bwd: float) -> float:
    if nbytes <= 0:
        return 0.0
    w = nbytes / write_bps if write_bps > 0 else math.inf
    r = nbytes / read_bps if read_bps > 0 else math.inf
    return max(0.0, w - t_fwd) + max(0.0, r - t_bwd)


def _times(groups: Sequence[BudgetGroup]) -> Tuple[float, float]:
    return (sum(max(g.forward_seconds, 0.0) for g in groups),
            sum(max(g.backward_seconds, 0.0) for g in groups))


def _finish(groups, machine, held, peak, ssd, ram, extra) -> Cost:
    t_fwd, t_bwd = _times(groups)
    stall = _stall(ssd, machine.write_bps, machine.read_bps, t_fwd, t_bwd) + \
        _stall(ram, machine.ram_bps, machine.ram_bps, t_fwd, t_bwd)
    return Cost(seconds=t_fwd + t_bwd + extra + stall, peak_bytes=max(held, peak), recompute_seconds=extra,
                stall_seconds=stall, ssd_bytes=ssd, ram_bytes=ram)


def _kept_input(g: BudgetGroup, choice: str) -> int:
    """Bytes a recomputed layer's input stays in memory from its backward to the end of
    backward (non-reentrant checkpointing holds the saved input in its frame until the graph
    is freed; offloaded inputs are read back for the recomputation and held the same way)."""
    return g.input_bytes if recomputes(choice) else 0


def evaluate(groups: Sequence[BudgetGroup], choices: Sequence[str], machine: Machine) -> Cost:
    """The model's step time and peak for ``choices`` (one per group, forward order).

    Peak: the most of (what the groups hold through forward) and, for each group's backward,
    what the groups below still hold + the group's working set + the inputs of the recomputed
    layers above it (held until backward ends)."""
    if len(choices) != len(groups):
        raise ValueError(f"{len(choices)} choices for {len(groups)} groups")
    held = ssd = ram = rk = 0
    extra = 0.0
    term = -1  # max over groups of (held below + work - recomputed inputs up to and with it)
    for g, c in zip(groups, choices):
        h, work, s, r, x = _effects(g, c)
        rk += _kept_input(g, c)
        term = max(term, held + work - rk)
        held += h
        ssd += s
        ram += r
        extra += x
    return _finish(groups, machine, held, term + rk if groups else 0, ssd, ram, extra)


def fits_host(cost: Cost, machine: Machine) -> bool:
    return cost.ram_bytes <= machine.host_bytes


def solve(groups: Sequence[BudgetGroup], budget: int, machine: Machine, max_states: int = 2048) -> BudgetPlan:
    """The choices with the least predicted time whose predicted peak is at most ``budget``
    and whose RAM use fits ``machine.host_bytes`` (see the module docstring). With no feasible
    plan, the one with the lowest peak (``feasible=False``)."""
    n = len(groups)
    # state: (held, SSD bytes, RAM bytes, recomputed inputs so far, max of the backward terms)
    # -> (least extra seconds, choices as a linked tuple). A group's backward needs what is held
    # below it, its working set, and the inputs of the recomputed layers above it (known only
    # at the end): so the state keeps "held below + work - recomputed inputs up to here" and
    # the final check adds all recomputed inputs (see ``evaluate``).
    Key = Tuple[int, int, int, int, int]
    states: Dict[Key, Tuple[float, Optional[tuple]]] = {(0, 0, 0, 0, -1): (0.0, None)}
    for index, g in enumerate(groups):
        options = [(c, _effects(g, c), _kept_input(g, c)) for c in allowed(g, machine)]
        nxt: Dict[Key, Tuple[float, Optional[tuple]]] = {}
        for (held, ssd, ram, rk, term), (extra, trail) in states.items():
            for c, (h, work, s, r, x), k in options:
                rk2 = rk + k
                term2 = max(term, held + work - rk2)
                if term2 + rk2 > budget or held + h > budget or ram + r > machine.host_bytes:
                    continue  # over already: every later group only adds
                key = (held + h, ssd + s, ram + r, rk2, term2)
                old = nxt.get(key)
                if old is None or extra + x < old[0]:
                    nxt[key] = (extra + x, (c, trail))
        if not nxt:
            return _lowest_peak(groups, budget, machine)
        if len(nxt) > max_states:
            # Dropping dominated states costs the square of their number: worth it only for
            # a modest overflow.
            if len(nxt) <= 2 * max_states:
                nxt = _pareto(nxt)
            # The work left is about states x groups left: a short model stays exact with many
            # states (7 groups reach 6^6); a long one hands over to the grid solver.
            remaining = n - index - 1
            if len(nxt) > max_states and len(nxt) * remaining > 32 * max_states:
                return _solve_on_grid(groups, budget, machine)
        states = nxt
    best = None
    for (held, ssd, ram, rk, term), (extra, trail) in states.items():
        cost = _finish(groups, machine, held, term + rk, ssd, ram, extra)
        if best is None or cost.seconds < best[0]:
            best = (cost.seconds, trail)
    assert best is not None
    choices = _tidy(groups, _unroll(best[1], n))
    cost = evaluate(groups, choices, machine)
    return BudgetPlan(choices=choices, cost=cost, budget=budget, exact=True, feasible=True)


def explain(groups: Sequence[BudgetGroup], choices: Sequence[str], machine: Machine, budget: int,
            limit: int = 64) -> Tuple[str, ...]:
    """One line per group that saves bytes: its choice, and what each other choice would do
    with the rest unchanged (over the budget, or how much slower). Empty past ``limit`` groups
    (quadratic)."""
    if len(groups) > limit:
        return ()
    base = evaluate(groups, choices, machine)
    mib = 1 / (1 << 20)
    lines = []
    for i, g in enumerate(groups):
        if g.saved_bytes <= 0:
            continue
        notes = []
        for alt in allowed(g, machine):
            if alt == choices[i]:
                continue
            trial = list(choices)
            trial[i] = alt
            cost = evaluate(groups, trial, machine)
            if cost.peak_bytes > budget:
                notes.append(f"{alt} would peak at {cost.peak_bytes * mib:.2f} MiB > {budget * mib:.2f}")
            elif cost.ram_bytes > machine.host_bytes:
                notes.append(f"{alt} would overfill host RAM")
            else:
                notes.append(f"{alt} {1e3 * (cost.seconds - base.seconds):+.1f} ms")
        lines.append(f"{g.name or f'group {i}'}: {choices[i]} ({'; '.join(notes)})")
    return tuple(lines)


def _tidy(groups: Sequence[BudgetGroup], choices: Tuple[str, ...]) -> Tuple[str, ...]:
    """Groups that save nothing cost the same anywhere: call them kept."""
    return tuple(DEVICE if g.saved_bytes <= 0 and not recomputes(c) else c for g, c in zip(groups, choices))


def _solve_on_grid(groups: Sequence[BudgetGroup], budget: int, machine: Machine,
                   cells: int = 4096) -> BudgetPlan:
    """Large instances: held bytes on a grid of ``budget / cells`` (each group's bytes rounded
    up, so a plan found meets the budget under the true sizes), and the I/O folded into the
    objective with prices: ``extra + price * SSD bytes + ram_price * RAM bytes``, one
    vectorised pass per price. The SSD prices sweep the slopes of the stall (0 while the drive
    hides it, then 1/write + 1/read per byte) and steps between; the RAM price is raised until
    host RAM fits. Every plan found is costed with ``evaluate`` and the fastest is returned."""
    import numpy as np

    q = budget / cells
    options = [allowed(g, machine) for g in groups]
    # The inputs of recomputed layers above a group are still held in its backward; the grid
    # does not know which will be recomputed, so it reserves room for all of them (a plan
    # found is then costed exactly by ``evaluate``).
    reserve = int(math.ceil(sum(g.input_bytes for g in groups if g.recomputable) / q))
    eff = [[_effects(g, c) for c in opts] for g, opts in zip(groups, options)]
    held_c = [[int(math.ceil(e[0] / q)) for e in row] for row in eff]
    work_c = [[int(math.ceil(e[1] / q)) for e in row] for row in eff]

    def run(price: float, ram_price: float) -> Optional[Tuple[str, ...]]:
        best = np.full(cells + 1, np.inf)
        best[0] = 0.0
        picks = []
        for k, row in enumerate(eff):
            new = np.full(cells + 1, np.inf)
            pick = np.full(cells + 1, -1, dtype=np.int8)
            for j, (h, work, s, r, x) in enumerate(row):
                hc, wc = held_c[k][j], work_c[k][j]
                top = min(cells - hc, cells - wc - reserve)  # highest source cell within budget
                if top < 0:
                    continue
                cand = best[:top + 1] + (x + price * s + ram_price * r)
                dst = new[hc:hc + top + 1]
                better = cand < dst
                dst[better] = cand[better]
                pick[hc:hc + top + 1][better] = j
            best = new
            picks.append(pick)
        if not np.isfinite(best).any():
            return None
        cell = int(np.argmin(best))
        out = []
        for k in range(len(eff) - 1, -1, -1):
            j = int(picks[k][cell])
            out.append(options[k][j])
            cell -= held_c[k][j]
        out.reverse()
        return tuple(out)

    w = 1.0 / machine.write_bps if machine.write_bps > 0 else 0.0
    r = 1.0 / machine.read_bps if machine.read_bps > 0 else 0.0
    steep = w + r if w + r > 0 else 1e-9
    prices = sorted({0.0, w, r, steep} | {steep * f for f in (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 1.5, 3.0)})
    ram_unit = (1.0 / machine.ram_bps if machine.ram_bps not in (0, math.inf) else 0.0) or steep * 1e-3
    found = None

    def consider(choices: Optional[Tuple[str, ...]]) -> Optional[bool]:
        """Cost ``choices``; keep them if fastest so far. None: no plan; else whether RAM fits."""
        nonlocal found
        if choices is None:
            return None
        cost = evaluate(groups, choices, machine)
        if not fits_host(cost, machine):
            return False
        if cost.peak_bytes <= budget and (found is None or cost.seconds < found[1].seconds):
            found = (choices, cost)
        return True

    for price in prices:
        if consider(run(price, 0.0)) is not False:
            continue
        # Host RAM overflows at no price: find a price at which it fits, then bisect down to
        # the smallest such price (the plan that uses the most RAM that fits).
        lo, hi = 0.0, ram_unit
        while consider(run(price, hi)) is False and hi < 1e3:
            lo, hi = hi, hi * 4
        for _ in range(16):
            mid = (lo + hi) / 2
            if consider(run(price, mid)) is False:
                lo = mid
            else:
                hi = mid
    if found is None:
        return _lowest_peak(groups, budget, machine)
    choices = _tidy(groups, found[0])
    return BudgetPlan(choices=choices, cost=evaluate(groups, choices, machine), budget=budget, exact=False,
                      feasible=True)


def _unroll(trail, n: int) -> Tuple[str, ...]:
    out: List[str] = []
    while trail is not None:
        c, trail = trail
        out.append(c)
    out.reverse()
    assert len(out) == n
    return tuple(out)


def _pareto(states):
    """Drop every state another one beats or equals on every byte count (held, SSD, RAM,
    recomputed inputs, backward term) and on extra time (exact: the cost and the budget check
    only grow with each)."""
    items = sorted(states.items(), key=lambda kv: (kv[1][0], kv[0]))
    kept: list = []
    for key, val in items:
        if not any(all(a <= b for a, b in zip(k, key)) for k, _ in kept):
            kept.append((key, val))
    return dict(kept)


def infeasible_reason(groups: Sequence[BudgetGroup], solved: BudgetPlan, budget: int) -> str:
    """Why no plan meets ``budget``, with the figures: the lowest peak the model knows and the
    group whose backward alone needs the most (the user's recomputation named when it is that)."""
    mib = 1 / (1 << 20)
    worst = max(range(len(groups)), key=lambda i: _effects(groups[i], solved.choices[i])[1], default=None)
    text = (f"no plan meets the budget (memory_budget={budget * mib:.2f} MiB): the lowest peak this model can be "
            f"planned to is {solved.cost.peak_bytes * mib:.2f} MiB")
    if worst is not None:
        g = groups[worst]
        need = _effects(g, solved.choices[worst])[1]
        text += f"; {g.name or f'group {worst}'}'s backward alone holds {need * mib:.2f} MiB"
        if g.user_recompute_bytes:
            text += (f", {g.user_recompute_bytes * mib:.2f} MiB of it recomputed by your own gradient "
                     "checkpointing")
    return text + ". Raise the budget above that; until then every moment over it is counted " \
                  "(OffloadStats.budget_overruns)"


def one_backward_reason(saved_bytes: int, budget: int) -> str:
    """Why no plan meets ``budget`` for a model compiled as one graph."""
    mib = 1 / (1 << 20)
    return (f"no plan meets the budget (memory_budget={budget * mib:.2f} MiB): the model is compiled as one "
            f"graph, whose backward is one autograd node that reads all {saved_bytes * mib:.2f} MiB it saved "
            "at once, so offloading cannot lower the peak below that. Compile each block instead "
            "(block.compile(), as torchtitan does) or raise the budget; until then every moment over "
            "it is counted (OffloadStats.budget_overruns)")


def _lowest_peak(groups: Sequence[BudgetGroup], budget: int, machine: Machine) -> BudgetPlan:
    """No plan meets the budget: the lowest-peak plan the model knows (everything offloaded to
    the SSD, layers recomputed with their inputs on the SSD where that holds less)."""
    choices = []
    for g in groups:
        opts = allowed(g, machine)
        best = min((c for c in opts if c in (SSD, RECOMPUTE_SSD)),
                   key=lambda c: (_effects(g, c)[1], _effects(g, c)[4]))
        choices.append(best)
    cost = evaluate(groups, choices, machine)
    return BudgetPlan(choices=tuple(choices), cost=cost, budget=budget, exact=True, feasible=False)


# -- the policy: measurements -> budget plans ------------------------------------------------
@dataclass
class BudgetPolicy(AdaptivePolicy):
    """``AdaptivePolicy`` with budget plans: the same measurements, pinning and history, but
    each candidate comes from ``solve`` under ``memory_budget``. Re-plans when the current
    plan is predicted to exceed the budget under new measurements, when backward stalled, or
    when a candidate is predicted at least ``gain`` faster. Long models (more groups than
    ``solve_every_groups``) are solved every ``solve_every`` steps only (a solve takes ~1 s
    at 128 layers)."""

    memory_budget: int = 0
    # A stall costs time, not memory, here: plan with no less than this share of the measured
    # bandwidth (the adaptive policy goes down to 0.3, and budget mode then recomputes what
    # the drive would have hidden).
    min_safety: float = 0.6
    headroom: float = 0.05
    gain: float = 0.03
    solve_every: int = 8
    solve_every_groups: int = 64
    _steps: int = 0
    #: No group's saved bytes changed between measured steps (fixed shapes): keeping
    #: everything may use the whole budget.
    _steady: bool = True
    #: Micro-batches in flight at once (measured: a pipeline stage's warm-up forwards); each
    #: holds what the plan saves, so each gets ``memory_budget / in_flight``.
    in_flight: int = 1
    #: The model runs as one compiled graph (``model.compile()``, ``torch.compile(model)``):
    #: its backward is one autograd node that reads every tensor it saved at once, so the
    #: peak is their sum whatever the placement (the offloader sets it when it sees that).
    one_backward: bool = False
    _warned_infeasible: bool = False

    @property
    def micro_batch_budget(self) -> int:
        """The budget one micro-batch's plan must meet."""
        return self.memory_budget // self.in_flight

    def placement(self, group: int) -> str:
        plan = self.plan
        if plan is None:
            # Nothing measured: the first step offloads everything to the SSD, which holds
            # the least (and is what the plan needs to see measured).
            return SSD
        return plan.place(group)

    def _saved_bytes(self, group: int, old: GroupTiming, new: GroupTiming) -> int:
        # A recomputed layer's forward saves only its input: keep its activations' size from
        # when it was not recomputed.
        plan = self.plan
        if plan is not None and group < len(plan.placement) and recomputes(plan.placement[group]):
            return old.nbytes
        if new.nbytes != old.nbytes:
            self._steady = False
        return new.nbytes

    def budget_groups(self) -> List[BudgetGroup]:
        assert self._groups is not None
        return [BudgetGroup(saved_bytes=g.nbytes, forward_seconds=g.forward_seconds,
                            backward_seconds=g.backward_seconds, input_bytes=g.input_bytes,
                            recompute_seconds=g.forward_seconds, name=g.name,
                            # A layer the user already checkpoints is not checkpointed again.
                            recomputable=g.input_bytes > 0 and not g.recompute_bytes,
                            user_recompute_bytes=g.recompute_bytes, reload_overhead=g.reload_overhead)
                for g in self._groups]

    def machine(self) -> Machine:
        w, r = self.bandwidths()
        # The host-RAM tier, like the device budget, is shared by the micro-batches in flight.
        return Machine(write_bps=w, read_bps=r, ram_bps=self.ram_bps,
                       host_bytes=self.host_cache_bytes // self.in_flight)

    def candidate(self) -> Plan:
        groups = self.budget_groups()
        machine = self.machine()
        keep = tuple(DEVICE for _ in groups)
        kept = evaluate(groups, keep, machine)
        budget = self.micro_batch_budget
        if self.one_backward:
            # Backward needs everything back at once: offloading moves where the tensors wait
            # through forward, never the peak. Keep (no I/O), and say whether that fits.
            solved = BudgetPlan(choices=keep, cost=kept, budget=budget, exact=True,
                                feasible=kept.peak_bytes <= budget)
            if not solved.feasible and not self._warned_infeasible:
                self._warned_infeasible = True
                log.warning("ssdoffload: %s", one_backward_reason(kept.peak_bytes, budget))
            return self._as_plan(groups, solved)
        if self._steady and kept.peak_bytes <= budget:
            # Keeping everything has no granularity gap (its peak is the sum of what was
            # measured) and no I/O to fall behind: with sizes that did not move between steps
            # it may use the whole budget (at a budget equal to keep's own peak, keep).
            return self._as_plan(groups, BudgetPlan(choices=keep, cost=kept, budget=budget,
                                                    exact=True, feasible=True))
        # Otherwise plan within (1 - headroom) of the budget: measured sizes may move from step
        # to step, and the runtime holds whole tensors where the model holds whole groups.
        solved = solve(groups, int(budget * (1 - self.headroom)), machine)
        if not solved.feasible:
            # Only the headroom is in the way: plan at the budget itself (back-pressure holds
            # the runtime to it) rather than give up on it.
            at_budget = solve(groups, budget, machine)
            if at_budget.feasible:
                solved = at_budget
        if not solved.feasible and not self._warned_infeasible:
            self._warned_infeasible = True
            log.warning("ssdoffload: %s", infeasible_reason(groups, solved, budget))
        return self._as_plan(groups, solved)

    def _as_plan(self, groups: Sequence[BudgetGroup], solved: BudgetPlan) -> Plan:
        c = solved.cost
        w, r = self.bandwidths()
        prediction = Prediction(stall_seconds=c.stall_seconds, compute_seconds=c.seconds - c.stall_seconds,
                                peak_device_bytes=c.peak_bytes, ssd_bytes=c.ssd_bytes, ram_bytes=c.ram_bytes,
                                written_bytes=c.ssd_bytes, read_bytes=c.ssd_bytes)
        if solved.feasible:
            note = ""
        elif self.one_backward:
            note = f" ({one_backward_reason(c.peak_bytes, self.micro_batch_budget)})"
        else:
            note = f" ({infeasible_reason(groups, solved, self.micro_batch_budget)})"
        if solved.feasible and solved.budget < self.micro_batch_budget:
            note += (f" (memory_budget {self.micro_batch_budget / 2**20:.2f} MiB; planned within "
                     f"{solved.budget / 2**20:.2f} MiB: {1 - solved.budget / self.micro_batch_budget:.0%} "
                     "headroom, as measured sizes move between steps and whole tensors fill it)")
        if self.in_flight > 1:
            note += (f" ({self.in_flight} micro-batches in flight: {self.micro_batch_budget / 2**20:.1f} MiB "
                     "of the budget each)")
        return Plan(placement=solved.choices, prefetch_depth=self.depth, prediction=prediction, write_bps=w,
                    read_bps=r, names=tuple(g.name for g in groups),
                    group_bytes=tuple(g.saved_bytes for g in groups), reason=note,
                    why=explain(groups, solved.choices, self.machine(), solved.budget))

    def predict(self, choices: Sequence[str]) -> Cost:
        return evaluate(self.budget_groups(), choices, self.machine())

    def pin(self, placement: Sequence[str], prefetch_depth: int) -> Plan:
        placement = tuple(placement)
        bad = [p for p in placement if p not in CHOICES]
        if bad:
            raise ValueError(f"plan placement {bad[0]!r} is not one of {', '.join(CHOICES)}")
        if self._groups is not None and len(self._groups) == len(placement):
            groups = self.budget_groups()
            cost = evaluate(groups, placement, self.machine())
            budget = self.micro_batch_budget
            plan = self._as_plan(groups, BudgetPlan(choices=placement, cost=cost, budget=budget,
                                                    exact=True, feasible=cost.peak_bytes <= budget))
        else:
            plan = Plan(placement=placement, prefetch_depth=prefetch_depth,
                        prediction=Prediction(0.0, 0.0, 0, 0, 0, 0, 0), write_bps=math.nan, read_bps=math.nan)
        plan = Plan(placement=plan.placement, prefetch_depth=prefetch_depth, prediction=plan.prediction,
                    write_bps=plan.write_bps, read_bps=plan.read_bps, names=plan.names, group_bytes=plan.group_bytes)
        self.pinned = True
        return self._adopt(plan, "pinned by Offloader.set_plan")

    def observe(self, obs: StepObservation) -> Optional[Plan]:
        if not obs.groups:
            return None
        self._steps += 1
        stalled = obs.compute_seconds > 0 and \
            obs.stall_seconds > max(2 * self.tolerance, 0.005) * obs.compute_seconds
        if stalled and self.plan is not None:
            self._margin = max(self.min_safety, self._margin * 0.75)
        elif not stalled:
            self._margin = min(self.safety, self._margin * 1.05)
        self._absorb(obs)
        grew = obs.in_flight > self.in_flight
        # More micro-batches in flight than planned for: re-plan now. Fewer (a step that
        # ended early): keep the smaller share, the schedule will fill up again.
        self.in_flight = max(self.in_flight, obs.in_flight)
        if self.pinned:
            return None
        current = self.plan
        long_model = len(obs.groups) > self.solve_every_groups
        if current is not None and long_model and not stalled and not grew and self._steps % self.solve_every:
            return None
        cand = self.candidate()
        if current is None:
            return self._adopt(cand, "first budget plan, from the profiled full-offload step" + cand.reason)
        if len(current.placement) != len(cand.placement):
            return self._adopt(cand, "the forward has a different number of groups" + cand.reason)
        if cand.placement == current.placement:
            return None
        now = self.predict(current.placement)
        if now.peak_bytes > self.micro_batch_budget:
            return self._adopt(cand, f"the current plan would now peak at {now.peak_bytes / 2**20:.1f} MiB, "
                                     f"over the budget of {self.micro_batch_budget / 2**20:.1f} MiB per "
                                     "micro-batch" + cand.reason)
        if stalled:
            return self._adopt(cand, f"backward stalled {obs.stall_seconds / obs.compute_seconds:.1%} of the "
                                     f"step; planning with {self._margin:.0%} of the measured bandwidth" + cand.reason)
        predicted = cand.prediction.compute_seconds + cand.prediction.stall_seconds
        if predicted < (1 - self.gain) * now.seconds:
            return self._adopt(cand, f"predicted {predicted:.3f} s a step instead of {now.seconds:.3f} s" + cand.reason)
        return None


def resolve_budget(budget: Union[int, float], device: "torch.device") -> int:
    """``OffloadConfig.memory_budget`` in bytes: an int is bytes; a float in (0, 1] is that
    fraction of ``device``'s memory (CUDA only: on a CPU host there is no device memory to
    take a fraction of)."""
    if isinstance(budget, int):
        return budget
    if device.type != "cuda":
        raise ValueError(f"OffloadConfig.memory_budget={budget!r} is a fraction of the GPU's memory, but the "
                         f"model is on {device}; give the budget in bytes (e.g. 2 << 30)")
    total = torch.cuda.get_device_properties(device).total_memory
    return int(total * budget)
