"""The adaptive offload plan: which forward groups (layers) go to the SSD, to the host-RAM tier,
or stay on the device, chosen from measured bytes, compute times and bandwidths.

Two layers:

* Pure functions over numbers (no torch, no I/O, no clock), so a plan is tested on synthetic
  timings: ``simulate`` predicts the stalls and the memory peak of a placement with a model of
  the engine (FIFO writes in forward order, cancelled when backward frees a tensor first;
  reads issued ``depth`` offloaded groups ahead in backward order; a tensor whose write has not
  finished when its read is requested stays in memory and needs no read); ``choose_plan``
  searches placements (an SSD prefix in forward order, then the RAM tier, then the device) for
  the lowest predicted peak whose predicted stall is within the tolerance.
  ``ssdtrain_prefix`` is SSDTrain's closed-form rule, kept for comparison and explanation.
* ``AdaptivePolicy``: the controller that owns the current plan. It smooths the measurements
  of each step (``StepObservation``) and re-plans with damping: it shrinks the plan at once
  when backward stalled or the current plan is predicted to stall under the new
  measurements, and grows it only after ``patience`` consecutive stall-free steps agree (and
  not during a cool-down after a stall), so the plan does not flap.

Threads: everything here runs on the thread that calls ``Offloader.end_step`` (the training
loop). ``AdaptivePolicy.placement`` is read by the pack hook on the compute thread; a plan is an
immutable object swapped in by one assignment, so a reader sees the old or the new plan whole.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from .places import DEVICE, PLACES, RAM, SSD  # the runtime's words for the places
from .readahead import Readahead, request_point

log = logging.getLogger("ssdoffload")



@dataclass(frozen=True)
class GroupTiming:
    """One forward group (a layer, or what runs before/between/after the layers).

    ``nbytes``: offloadable bytes it saves (storages at least ``min_offload_bytes``, each once);
    ``forward_seconds`` / ``backward_seconds``: its compute time without I/O waits;
    ``input_bytes``: for a layer, the bytes of its tensor inputs (what recomputing it keeps or
    offloads instead; 0 for the groups between layers, which cannot be recomputed);
    ``recompute_bytes``: for a layer the *user's* checkpointing recomputes (HF
    ``gradient_checkpointing_enable``, ``torch.utils.checkpoint``, DeepSpeed's or Megatron's),
    what its recomputation saves in backward, measured (``recompute_watch``); our hooks never
    see those tensors, yet backward holds them (0: not recomputed by the user);
    ``reload_overhead``: what reading its tensors back allocates beyond ``nbytes``
    (``reload_buffers``: a page per CPU tensor).
    """

    nbytes: int
    forward_seconds: float
    backward_seconds: float
    name: str = ""
    input_bytes: int = 0
    recompute_bytes: int = 0
    reload_overhead: int = 0


@dataclass(frozen=True)
class Prediction:
    """What ``simulate`` expects one step of a placement to cost and save."""

    stall_seconds: float
    compute_seconds: float
    peak_device_bytes: int
    ssd_bytes: int            # planned for the SSD
    ram_bytes: int            # planned for the RAM tier
    written_bytes: int        # SSD writes not cancelled
    read_bytes: int           # SSD reads (writes finished before their read was requested)
    group_stalls: Tuple[float, ...] = ()

    @property
    def stall_fraction(self) -> float:
        return self.stall_seconds / self.compute_seconds if self.compute_seconds > 0 else 0.0


def simulate(groups: Sequence[GroupTiming], placement: Sequence[str], write_bps: float,
             read_bps: float, depth: int, ram_bps: float = math.inf,
             window: Optional[int] = None) -> Prediction:
    """Predict one step of ``placement`` (one of ``PLACES`` per group, forward order).

    Time model: forward runs the groups in order, then backward runs them in reverse, each
    group taking its measured time plus any stall. A group's tensors are queued for writing
    when its forward ends (SSD and RAM have separate FIFO writers of ``write_bps`` and
    ``ram_bps``); a write not started when backward has finished with the group is cancelled.
    Reads of offloaded groups are requested where the prefetcher's rule
    (``readahead.request_point``) says — ``depth`` offloaded groups ahead, or within ``window``
    groups with the adaptive prefetcher; ``depth == 0``: when needed — and served in that
    order at ``read_bps`` (RAM: ``ram_bps``). A group whose
    write had not finished when its read was requested stays in memory (no read, no stall).
    Backward waits (stalls) when a read ends after backward reached the group.
    """
    n = len(groups)
    if len(placement) != n:
        raise ValueError(f"placement has {len(placement)} entries for {n} groups")
    f_end: List[float] = []
    t = 0.0
    for g in groups:
        t += max(g.forward_seconds, 0.0)
        f_end.append(t)
    t_fwd = t
    compute = t_fwd + sum(max(g.backward_seconds, 0.0) for g in groups)
    offloaded = [i for i in range(n) if placement[i] != DEVICE and groups[i].nbytes > 0]
    rank = {g: k for k, g in enumerate(offloaded)}
    # The prefetcher's own rule (readahead.py) says when each read is requested; backward is
    # seen reaching a group when it unpacks one of its tensors (or a layer hook fires there).
    fires = [g.nbytes > 0 for g in groups]
    readahead = Readahead(depth, window)

    # Pass 1 takes the backward times without stalls to decide which writes are cancelled;
    # pass 2 redoes everything with the backward times (stalls included) of pass 1.
    done = [0.0] * n     # backward finished group i (its tensors are freed)
    t = t_fwd
    for i in range(n - 1, -1, -1):
        t += max(groups[i].backward_seconds, 0.0)
        done[i] = t
    for _ in range(2):
        # Writes, FIFO per tier in forward order.
        w_start = [math.inf] * n
        w_end = [math.inf] * n
        free_at = {SSD: 0.0, RAM: 0.0}
        for i in offloaded:
            tier = placement[i]
            bps = write_bps if tier == SSD else ram_bps
            start = max(f_end[i], free_at[tier])
            if start >= done[i]:
                continue  # cancelled: backward was done with it before the write began
            w_start[i] = start
            w_end[i] = start + _seconds(groups[i].nbytes, bps)
            free_at[tier] = w_end[i]
        # Backward in reverse order; reads in the order they are requested.
        reach = [0.0] * n    # backward reaches group i
        new_done = [0.0] * n
        read_free = {SSD: 0.0, RAM: 0.0}
        r_start = [math.inf] * n
        stalls = [0.0] * n
        issue_at: List[float] = [0.0] * n
        t = t_fwd
        for i in range(n - 1, -1, -1):
            reach[i] = t
            if i in rank:
                issue = reach[request_point(i, offloaded, fires, readahead)]
                issue_at[i] = issue
                tier = placement[i]
                if not (w_end[i] == math.inf or w_end[i] > issue):  # else still in memory: no read
                    bps = read_bps if tier == SSD else ram_bps
                    start = max(issue, read_free[tier])
                    end = start + _seconds(groups[i].nbytes, bps)
                    read_free[tier] = end
                    r_start[i] = start
                    stalls[i] = max(0.0, end - reach[i])
            t = reach[i] + stalls[i] + max(groups[i].backward_seconds, 0.0)
            new_done[i] = t
        if new_done == done:
            break
        done = new_done
    stall = sum(stalls)

    # Device memory over time: a sweep over (time, +/- bytes).
    events: List[Tuple[float, int]] = []
    written = read = ssd_b = ram_b = 0
    for i, g in enumerate(groups):
        if g.nbytes <= 0:
            continue
        events.append((f_end[i], g.nbytes))
        if i not in rank:
            events.append((done[i], -g.nbytes))
            continue
        if placement[i] == SSD:
            ssd_b += g.nbytes
        else:
            ram_b += g.nbytes
        if w_end[i] == math.inf or w_end[i] > issue_at[i]:
            if placement[i] == SSD and w_start[i] != math.inf:
                written += g.nbytes
            events.append((done[i], -g.nbytes))
            continue
        if placement[i] == SSD:
            written += g.nbytes
            read += g.nbytes
        events.append((w_end[i], -g.nbytes))
        events.append((r_start[i], g.nbytes))
        events.append((done[i], -g.nbytes))
    events.sort(key=lambda e: (e[0], e[1]))  # frees before allocations at the same instant
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return Prediction(stall_seconds=stall, compute_seconds=compute, peak_device_bytes=peak,
                      ssd_bytes=ssd_b, ram_bytes=ram_b, written_bytes=written, read_bytes=read,
                      group_stalls=tuple(stalls))


def _bps(value: float) -> str:
    if value == math.inf:
        return "unlimited"
    if value != value:
        return "unmeasured"
    return f"{value / 1e6:.0f} MB/s" if value >= 10e6 else f"{value / 1e6:.2f} MB/s"


def _seconds(nbytes: int, bps: float) -> float:
    if nbytes <= 0:
        return 0.0
    if bps <= 0:
        return math.inf
    return nbytes / bps if bps != math.inf else 0.0


def ssdtrain_prefix(groups: Sequence[GroupTiming], bandwidth: float) -> int:
    """SSDTrain's rule: offload groups in forward order while
    ``(bytes before n + 2 * bytes(n)) / (3 * T_fwd - 2 * time before n)`` stays under the
    bandwidth; returns how many groups it offloads (a prefix)."""
    t_fwd = sum(g.forward_seconds for g in groups)
    before_b, before_t = 0, 0.0
    for n, g in enumerate(groups):
        window = 3 * t_fwd - 2 * before_t
        need = (before_b + 2 * g.nbytes) / window if window > 0 else math.inf
        if need > bandwidth:
            return n
        before_b += g.nbytes
        before_t += g.forward_seconds
    return len(groups)


@dataclass(frozen=True)
class Plan:
    """Where each forward group goes, the read-ahead, and why.

    ``placement[i]`` is ``"ssd"``, ``"ram"`` or ``"device"`` for group ``i``; groups beyond the
    plan (a forward with more groups than the profiled one) go to the SSD.
    ``prefetch_depth`` is the read-ahead window in groups (a layer is two groups: itself and
    what runs after it): group ``i`` is read when backward reaches group ``i + window``.
    """

    placement: Tuple[str, ...]
    prefetch_depth: int
    prediction: Prediction
    write_bps: float
    read_bps: float
    names: Tuple[str, ...] = ()
    group_bytes: Tuple[int, ...] = ()
    version: int = 0
    reason: str = ""
    ssdtrain_groups: Optional[int] = None
    #: Budget mode: per group with bytes, why it got its choice (what the others would cost).
    why: Tuple[str, ...] = ()

    def place(self, group: int) -> str:
        if 0 <= group < len(self.placement):
            return self.placement[group]
        return SSD

    def same_as(self, other: Optional["Plan"]) -> bool:
        return other is not None and self.placement == other.placement and \
            self.prefetch_depth == other.prefetch_depth

    @property
    def offloaded_bytes(self) -> int:
        return self.prediction.ssd_bytes + self.prediction.ram_bytes

    def groups_on(self, place: str) -> List[int]:
        return [i for i, p in enumerate(self.placement) if p == place and self._bytes(i) > 0]

    def _bytes(self, i: int) -> int:
        return self.group_bytes[i] if i < len(self.group_bytes) else 1

    def _names(self, idx: List[int]) -> str:
        if not idx:
            return "-"
        return ", ".join(self.names[i] if i < len(self.names) and self.names[i] else f"group {i}" for i in idx)

    def describe(self) -> str:
        """One line per tier: which groups go there; then the prediction and the reason."""
        p = self.prediction
        mib = 1 / (1 << 20)
        others = [w for w in dict.fromkeys(self.placement) if w not in PLACES]  # budget mode's choices
        recomputed = "".join(f" {w} [{self._names(self.groups_on(w))}]" for w in others)
        return (f"plan v{self.version}: ssd [{self._names(self.groups_on(SSD))}] "
                f"ram [{self._names(self.groups_on(RAM))}] device [{self._names(self.groups_on(DEVICE))}]"
                f"{recomputed}; "
                f"read-ahead {self.prefetch_depth} groups; planned with write {_bps(self.write_bps)}, "
                f"read {_bps(self.read_bps)}; predicts stall {p.stall_fraction:.1%} of "
                f"{p.compute_seconds:.3f} s, peak {p.peak_device_bytes * mib:.1f} MiB, "
                f"ssd {p.ssd_bytes * mib:.1f} MiB, ram {p.ram_bytes * mib:.1f} MiB"
                f"{f' (SSDTrain rule: {self.ssdtrain_groups} groups)' if self.ssdtrain_groups is not None else ''}"
                f" -- {self.reason}" + "".join(f"\n  {line}" for line in self.why))

    def as_dict(self) -> dict:
        p = self.prediction
        return {
            "version": self.version, "reason": self.reason, "prefetch_depth": self.prefetch_depth,
            "write_bytes_per_s": self.write_bps, "read_bytes_per_s": self.read_bps,
            "groups": [{"group": i, "name": self.names[i] if i < len(self.names) else f"group {i}",
                        "bytes": self.group_bytes[i] if i < len(self.group_bytes) else None,
                        "place": pl} for i, pl in enumerate(self.placement)],
            "ssd": self.groups_on(SSD), "ram": self.groups_on(RAM), "device": self.groups_on(DEVICE),
            "predicted_stall_seconds": p.stall_seconds, "predicted_compute_seconds": p.compute_seconds,
            "predicted_peak_device_bytes": p.peak_device_bytes, "ssd_bytes": p.ssd_bytes,
            "ram_bytes": p.ram_bytes, "ssdtrain_groups": self.ssdtrain_groups,
        }


def _ram_fill(groups: Sequence[GroupTiming], placement: List[str], start: int, budget: int) -> None:
    """Put the groups from ``start`` on (forward order) in RAM while they fit the budget."""
    left = budget
    for i in range(start, len(groups)):
        b = groups[i].nbytes
        if b <= 0:
            continue
        if b > left:
            break
        placement[i] = RAM
        left -= b


def choose_plan(groups: Sequence[GroupTiming], write_bps: float, read_bps: float, depth: int,
                max_depth: Optional[int] = None, host_cache_bytes: int = 0,
                ram_bps: float = math.inf, tolerance: float = 0.01) -> Plan:
    """The placement with the lowest predicted device peak among those predicted to stall at
    most ``tolerance`` of the step's compute time.

    Candidates: the first ``k`` groups (forward order) on the SSD for every ``k``, the next
    groups in the RAM tier while they fit ``host_cache_bytes``, the rest on the device; the
    read-ahead window (in groups: reads of group ``i`` start when backward reaches group
    ``i + window``) up to ``2 * max_depth``, the smallest that meets the tolerance: reading
    earlier than needed only raises the peak. Ties in peak (within 1% of the offloadable
    bytes) go to fewer SSD bytes (less wear, less I/O), then to the smaller window.
    ``depth == 0`` (prefetching off) stays 0.
    """
    n = len(groups)
    if depth <= 0:
        windows = [0]
    else:
        top = max(depth, max_depth or depth)
        windows = sorted({w for w in (1, 2, 3, 4, 6, 8, 12, 16) if w <= 2 * top} | {2 * top})
    total = sum(max(g.nbytes, 0) for g in groups) or 1
    bucket = max(total // 100, 1)
    best_key, best = None, None
    for k in range(n, -1, -1):
        placement = [SSD] * k + [DEVICE] * (n - k)
        if host_cache_bytes > 0:
            _ram_fill(groups, placement, k, host_cache_bytes)
        # The widest read-ahead is the most forgiving: if it stalls, so do the others.
        deepest = simulate(groups, placement, write_bps, read_bps, depth, ram_bps, window=windows[-1])
        if deepest.stall_seconds > tolerance * deepest.compute_seconds:
            continue
        chosen_w, chosen = windows[-1], deepest
        for w in windows[:-1]:
            pred = simulate(groups, placement, write_bps, read_bps, depth, ram_bps, window=w)
            if pred.stall_seconds <= tolerance * pred.compute_seconds:
                chosen_w, chosen = w, pred
                break
        key = (chosen.peak_device_bytes // bucket, chosen.ssd_bytes, chosen_w)
        if best_key is None or key < best_key:
            best_key, best = key, (tuple(placement), chosen_w, chosen)
    assert best is not None  # k = 0 without RAM never stalls
    placement, d, pred = best
    return Plan(placement=placement, prefetch_depth=d, prediction=pred, write_bps=write_bps,
                read_bps=read_bps, names=tuple(g.name for g in groups),
                group_bytes=tuple(g.nbytes for g in groups),
                ssdtrain_groups=ssdtrain_prefix(groups, min(write_bps, read_bps)))


@dataclass(frozen=True)
class StepObservation:
    """What one finished step measured (see ``profiling.StepProfiler``).

    Bandwidths are bytes per second while a transfer was in flight (``None``: nothing moved);
    ``stall_seconds`` is time backward waited on reads; ``compute_seconds`` forward+backward;
    ``in_flight``: the most micro-batches forwarded and not yet backwarded at once (a pipeline
    stage holds several: each holds what one plan saves).
    """

    groups: Tuple[GroupTiming, ...]
    write_bps: Optional[float]
    read_bps: Optional[float]
    stall_seconds: float
    compute_seconds: float
    in_flight: int = 1


@dataclass
class AdaptivePolicy:
    """Owns the current plan and re-plans from step observations, with damping.

    Args:
        depth: The configured read-ahead (the plan may read further ahead, up to
            ``max_depth``; 0 keeps prefetching off).
        host_cache_bytes: The RAM tier budget (0: no tier).
        write_cap / read_cap: ``max_write_bandwidth`` / ``max_read_bandwidth`` (None: none).
        tolerance: Predicted stall a plan may cost, as a fraction of compute time.
        ram_bps: Bandwidth of the RAM tier's copies (inf: in place, on a CPU host).
        patience: Stall-free steps that must agree before the plan grows.
        cooldown: Steps after a stall during which the plan does not grow (doubled after each
            further stall, up to 64).
        safety: Fraction of the measured bandwidth planned with (lowered after stalls,
            recovering toward ``safety`` over stall-free steps).
        smoothing: Weight of the newest measurement in the running averages.
    """

    depth: int
    host_cache_bytes: int = 0
    write_cap: Optional[float] = None
    read_cap: Optional[float] = None
    tolerance: float = 0.01
    ram_bps: float = math.inf
    max_depth: int = 4
    patience: int = 2
    cooldown: int = 3
    safety: float = 0.85
    min_safety: float = 0.3
    smoothing: float = 0.5
    plan: Optional[Plan] = None
    history: List[Plan] = field(default_factory=list)
    _groups: Optional[List[GroupTiming]] = None
    _write: Optional[float] = None
    _read: Optional[float] = None
    _margin: float = 0.0
    _grow_streak: int = 0
    _cool: int = 0
    _backoff: int = 0
    _version: int = 0
    pinned: bool = False

    def __post_init__(self) -> None:
        self._margin = self.safety
        self._backoff = self.cooldown
        if self.depth <= 0:
            self.max_depth = 0
        else:
            self.max_depth = max(self.max_depth, self.depth)

    # -- what the pack hook asks ---------------------------------------------------------
    def placement(self, group: int) -> str:
        """Where a tensor saved in forward group ``group`` goes (compute thread)."""
        plan = self.plan
        if plan is None:
            return RAM if self.host_cache_bytes > 0 else SSD
        return plan.place(group)

    @property
    def prefetch_depth(self) -> int:
        plan = self.plan
        return plan.prefetch_depth if plan is not None else self.depth

    # -- measurements -> plans -----------------------------------------------------------
    def bandwidths(self) -> Tuple[float, float]:
        """(write, read) bytes/s planned with: the smoothed measurement, under the caps, times
        the safety margin."""
        w = self._write if self._write is not None else math.inf
        r = self._read if self._read is not None else w
        if self.write_cap is not None:
            w = min(w, self.write_cap)
        if self.read_cap is not None:
            r = min(r, self.read_cap)
        return w * self._margin, r * self._margin

    def _absorb(self, obs: StepObservation) -> None:
        a = self.smoothing
        if self._groups is None or len(self._groups) != len(obs.groups):
            self._groups = list(obs.groups)
        else:
            self._groups = [GroupTiming(nbytes=self._saved_bytes(i, old, new),
                                        forward_seconds=a * new.forward_seconds + (1 - a) * old.forward_seconds,
                                        backward_seconds=a * new.backward_seconds + (1 - a) * old.backward_seconds,
                                        name=new.name, input_bytes=new.input_bytes or old.input_bytes,
                                        recompute_bytes=new.recompute_bytes or old.recompute_bytes,
                                        reload_overhead=max(new.reload_overhead, old.reload_overhead))
                            for i, (old, new) in enumerate(zip(self._groups, obs.groups))]
        self._write = self._blend(self._write, obs.write_bps)
        self._read = self._blend(self._read, obs.read_bps)

    def _saved_bytes(self, group: int, old: GroupTiming, new: GroupTiming) -> int:
        """The group's saved bytes as measured (a subclass keeps what a recomputed layer's
        forward cannot show)."""
        return new.nbytes

    def user_recompute_bytes(self, group: int) -> int:
        """What the user's checkpointing's recomputation of ``group`` saves (measured; 0: none)."""
        groups = self._groups
        return groups[group].recompute_bytes if groups is not None and 0 <= group < len(groups) else 0

    def _blend(self, old: Optional[float], new: Optional[float]) -> Optional[float]:
        """Running average that follows drops fast (a throttled drive stalls now) and rises
        slowly (one fast step should not grow the plan)."""
        if not new:
            return old
        if old is None:
            return new
        a = min(1.0, 1.5 * self.smoothing) if new < old else 0.6 * self.smoothing
        return a * new + (1 - a) * old

    def candidate(self) -> Plan:
        """The plan the current (smoothed) measurements call for."""
        assert self._groups is not None
        w, r = self.bandwidths()
        return choose_plan(self._groups, w, r, self.depth, self.max_depth, self.host_cache_bytes,
                           self.ram_bps, self.tolerance)

    def pin(self, placement: Sequence[str], prefetch_depth: int) -> Plan:
        """Adopt ``placement`` (one of ``PLACES`` per group) as the plan and stop re-planning
        until ``unpin``; measurements are still absorbed, so re-planning resumes from them."""
        placement = tuple(placement)
        bad = [p for p in placement if p not in PLACES]
        if bad:
            raise ValueError(f"plan placement {bad[0]!r} is not one of {', '.join(PLACES)}")
        if self._groups is not None and len(self._groups) == len(placement):
            w, r = self.bandwidths()
            prediction = simulate(self._groups, placement, w, r, self.depth, self.ram_bps,
                                  window=prefetch_depth)
            names = tuple(g.name for g in self._groups)
            group_bytes = tuple(g.nbytes for g in self._groups)
        else:  # nothing measured for these groups yet: no prediction to offer
            w = r = math.nan
            prediction = Prediction(stall_seconds=0.0, compute_seconds=0.0, peak_device_bytes=0,
                                    ssd_bytes=0, ram_bytes=0, written_bytes=0, read_bytes=0)
            names, group_bytes = (), ()
        self.pinned = True
        return self._adopt(Plan(placement=placement, prefetch_depth=prefetch_depth, prediction=prediction,
                                write_bps=w, read_bps=r, names=names, group_bytes=group_bytes),
                           "pinned by Offloader.set_plan")

    def unpin(self) -> None:
        """Let the measurements choose the plan again (from the end of the next step)."""
        self.pinned = False
        self._grow_streak = 0

    def observe(self, obs: StepObservation) -> Optional[Plan]:
        """Take one step's measurements; returns the new plan when it changed, else None."""
        if not obs.groups:
            return None
        if self.pinned:
            self._absorb(obs)
            return None
        stalled = obs.compute_seconds > 0 and \
            obs.stall_seconds > max(2 * self.tolerance, 0.005) * obs.compute_seconds
        profiling = self.plan is None
        if stalled and not profiling:
            # The model was too optimistic: plan with less of the measured bandwidth.
            self._margin = max(self.min_safety, self._margin * 0.75)
        elif not stalled:
            self._margin = min(self.safety, self._margin * 1.05)
        self._absorb(obs)
        cand = self.candidate()
        current = self.plan
        if current is None:
            return self._adopt(cand, "first plan, from the profiled full-offload step")
        if len(current.placement) != len(cand.placement):
            return self._adopt(cand, "the forward has a different number of groups")
        if cand.same_as(current):
            self._grow_streak = 0
            if self._cool:
                self._cool -= 1
            return None
        grows = cand.offloaded_bytes > current.offloaded_bytes or \
            (cand.offloaded_bytes == current.offloaded_bytes and cand.prefetch_depth < current.prefetch_depth)
        w, r = self.bandwidths()
        if stalled:
            # Back off: each stall doubles the wait before the plan may grow again (up to 64
            # steps), so a plan at the edge of what the drive hides settles instead of probing.
            self._grow_streak = 0
            self._cool = self._backoff
            self._backoff = min(64, max(1, 2 * self._backoff))
            if not grows:
                return self._adopt(cand, f"backward stalled {obs.stall_seconds / obs.compute_seconds:.1%} "
                                         f"of the step; planning with {self._margin:.0%} of the measured bandwidth")
            return None
        if not grows:
            now = simulate(self._groups, current.placement, w, r, self.depth, self.ram_bps,
                           window=current.prefetch_depth)
            self._grow_streak = 0
            if now.stall_seconds > self.tolerance * now.compute_seconds:
                self._cool = self.cooldown
                return self._adopt(cand, f"the current plan would now stall {now.stall_fraction:.1%} "
                                         f"(write {_bps(w)}, read {_bps(r)})")
            total = sum(g.nbytes for g in self._groups) or 1
            bucket = max(total // 100, 1)
            if now.peak_device_bytes // bucket >= cand.prediction.peak_device_bytes // bucket and \
                    now.ssd_bytes - cand.prediction.ssd_bytes > 0.1 * total:
                self._cool = self.cooldown
                return self._adopt(cand, f"the current plan writes {(now.ssd_bytes - cand.prediction.ssd_bytes) / 2**20:.1f} "
                                         f"MiB more for no lower peak (write {_bps(w)}, read {_bps(r)})")
            return None  # the current plan still hides its I/O at its peak: keep it (hysteresis)
        if self._cool:
            self._cool -= 1
            self._grow_streak = 0
            return None
        self._grow_streak += 1
        if self._grow_streak < self.patience:
            return None
        self._grow_streak = 0
        return self._adopt(cand, f"{self.patience} stall-free steps allow more "
                                 f"(write {_bps(w)}, read {_bps(r)})")

    def _adopt(self, plan: Plan, reason: str) -> Plan:
        self._version += 1
        plan = Plan(placement=plan.placement, prefetch_depth=plan.prefetch_depth, prediction=plan.prediction,
                    write_bps=plan.write_bps, read_bps=plan.read_bps, names=plan.names,
                    group_bytes=plan.group_bytes, version=self._version, reason=reason,
                    ssdtrain_groups=plan.ssdtrain_groups, why=plan.why)
        self.plan = plan
        self.history.append(plan)
        del self.history[:-32]
        log.info("ssdoffload: %s", plan.describe())
        return plan
