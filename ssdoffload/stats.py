"""Counters of what the offloader did: one ``OffloadStats`` per step and one cumulative.

All counters are updated under one lock by the hook thread and the I/O threads; ``snapshot``
returns a frozen copy so a reader never sees a half-updated record.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass, field

log = logging.getLogger("ssdoffload")


@dataclass
class OffloadStats:
    """What one step (or the whole run) moved and what it cost.

    Bytes are storage bytes (not rounded up to the 4 KiB extent size). ``stall_seconds`` is
    time backward waited on a read; ``peak_resident_bytes`` is the largest amount of
    offloadable activation memory held at once (not yet written, or read back).
    """

    steps: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    tensors_offloaded: int = 0
    tensors_kept: int = 0
    bytes_kept: int = 0
    dedup_hits: int = 0
    prefetch_hits: int = 0
    prefetch_misses: int = 0
    forwarded: int = 0
    write_failures: int = 0
    io_timeouts: int = 0           # waits on the drive given up after OffloadConfig.io_timeout
    writes_skipped: int = 0
    storages_changed: int = 0      # resized or moved after they were saved: kept, not written
    stall_seconds: float = 0.0
    write_seconds: float = 0.0
    read_seconds: float = 0.0
    offloadable_bytes: int = 0
    resident_bytes: int = 0
    peak_resident_bytes: int = 0
    #: Bytes the adaptive plan kept on the device (offloadable, but their layer is kept).
    plan_kept_bytes: int = 0
    #: Bytes copied into / back from the host-RAM tier (CUDA), or kept in place by it (CPU).
    host_bytes_written: int = 0
    host_bytes_read: int = 0
    #: Bytes the host-RAM tier moved on to the drive when it was full (write-back stage).
    host_bytes_drained: int = 0
    #: Host-RAM tier use now and its peak (aligned bytes; never above host_cache_bytes).
    host_tier_bytes: int = 0
    peak_host_tier_bytes: int = 0
    #: Seconds the writer / reader waited on max_write_bandwidth / max_read_bandwidth.
    write_throttle_seconds: float = 0.0
    read_throttle_seconds: float = 0.0
    #: Budget mode: seconds forward waited for writes to stay within memory_budget
    #: (back-pressure); tensors the plan kept that went to the SSD instead because the budget
    #: was full (diversions); *moments over the budget* (``budget_overruns``: a save, a read
    #: backward needed, or a recomputation, after which the offloadable bytes held exceeded the
    #: budget with nothing left to wait for or divert — each such moment counts once, the
    #: first of a run is logged with its figures); prefetches deferred by the budget.
    backpressure_seconds: float = 0.0
    budget_diversions: int = 0
    budget_overruns: int = 0
    prefetches_deferred: int = 0
    #: The adaptive plan in force at the end of the step (0: none yet) and plan changes.
    plan_version: int = 0
    replans: int = 0
    #: Why saved tensors were kept in memory: reason -> [tensors, bytes]. The reasons are
    #: ``policy.Decision`` values ("parameter", "below min_offload_bytes", "saved during
    #: backward", ...) and "plan keeps its layer on the device" — the answer to "why did my
    #: memory not go down?".
    kept_by_reason: dict = field(default_factory=dict)

    @property
    def write_bandwidth(self) -> float:
        """Bytes per second while a write was in flight (0 when nothing was written)."""
        return self.bytes_written / self.write_seconds if self.write_seconds > 0 else 0.0

    @property
    def read_bandwidth(self) -> float:
        """Bytes per second while a read was in flight (0 when nothing was read)."""
        return self.bytes_read / self.read_seconds if self.read_seconds > 0 else 0.0

    @property
    def prefetch_hit_rate(self) -> float:
        total = self.prefetch_hits + self.prefetch_misses
        return self.prefetch_hits / total if total else 0.0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(write_bandwidth=self.write_bandwidth, read_bandwidth=self.read_bandwidth,
                 prefetch_hit_rate=self.prefetch_hit_rate)
        return d

    def __str__(self) -> str:
        mib = 1 / (1 << 20)
        return (
            f"OffloadStats(steps={self.steps}, written={self.bytes_written * mib:.1f} MiB, "
            f"read={self.bytes_read * mib:.1f} MiB, offloaded={self.tensors_offloaded}, "
            f"kept={self.tensors_kept}, dedup_hits={self.dedup_hits}, "
            f"prefetch hit/miss={self.prefetch_hits}/{self.prefetch_misses}, "
            f"stall={self.stall_seconds:.4f}s, peak_resident={self.peak_resident_bytes * mib:.1f} MiB, "
            f"write={self.write_bandwidth / 1e9:.2f} GB/s, read={self.read_bandwidth / 1e9:.2f} GB/s"
            f"{f', write_failures={self.write_failures}' if self.write_failures else ''}"
            f"{f', io_timeouts={self.io_timeouts}' if self.io_timeouts else ''}"
            f"{f', moments over budget={self.budget_overruns}' if self.budget_overruns else ''}"
            f"{f', budget diversions={self.budget_diversions}' if self.budget_diversions else ''}"
            f"{f', back-pressure={self.backpressure_seconds:.4f}s' if self.backpressure_seconds else ''})"
        )


@dataclass
class StatsCollector:
    """Thread-safe accumulation into a per-step and a cumulative ``OffloadStats``."""

    step: OffloadStats = field(default_factory=OffloadStats)
    total: OffloadStats = field(default_factory=OffloadStats)
    last_step: OffloadStats = field(default_factory=OffloadStats)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _kept: dict = field(default_factory=dict, repr=False)  # (reason, plan) -> [tensors, bytes]
    _warned_over: bool = field(default=False, repr=False)

    def add(self, **deltas) -> None:
        with self._lock:
            # The records' own dicts: a few times cheaper than getattr/setattr (hot: several
            # calls per offloaded tensor).
            step, total = self.step.__dict__, self.total.__dict__
            for name, value in deltas.items():
                step[name] += value
                total[name] += value

    def kept(self, reason: str, nbytes: int, plan: bool = False) -> None:
        """A saved tensor of ``nbytes`` stayed in memory because of ``reason`` (the pack hook
        calls this for most tensors: it only counts here, folded into the records when they
        are read or the step ends)."""
        with self._lock:
            slot = self._kept.get((reason, plan))
            if slot is None:
                self._kept[(reason, plan)] = [1, nbytes]
            else:
                slot[0] += 1
                slot[1] += nbytes

    def _fold_kept(self) -> None:
        """(Under the lock.) Move the kept counts into the step and cumulative records."""
        for (reason, plan), (n, nbytes) in self._kept.items():
            for s in (self.step, self.total):
                s.tensors_kept += n
                s.bytes_kept += nbytes
                if plan:
                    s.plan_kept_bytes += nbytes
                slot = s.kept_by_reason.setdefault(reason, [0, 0])
                slot[0] += n
                slot[1] += nbytes
        self._kept.clear()

    def over_budget(self, where: str, now: int, budget: int, diverted: bool = False) -> None:
        """A moment over the budget (``where``: what was being held, in words): counted; the
        first of this offloader's run logged as a warning with the figures."""
        self.add(budget_overruns=1, budget_diversions=1 if diverted else 0)
        with self._lock:
            first, self._warned_over = not self._warned_over, True
        if first:
            mib = 1 / (1 << 20)
            log.warning("ssdoffload: over memory_budget=%.2f MiB by %.2f MiB (%.2f MiB held) at %s. "
                        "Counted in OffloadStats.budget_overruns (moments over the budget); only the "
                        "first is logged. The plan adapts if it can; otherwise raise the budget",
                        budget * mib, (now - budget) * mib, now * mib, where)

    def resident_now(self) -> int:
        """Offloadable activation bytes held in memory now (no lock: one int read)."""
        return self.step.resident_bytes

    def resident(self, delta: int) -> None:
        """Track offloadable bytes held in memory, and their peak."""
        with self._lock:
            step, total = self.step, self.total
            now = step.resident_bytes = step.resident_bytes + delta
            if now > step.peak_resident_bytes:
                step.peak_resident_bytes = now
            now = total.resident_bytes = total.resident_bytes + delta
            if now > total.peak_resident_bytes:
                total.peak_resident_bytes = now

    def host(self, delta: int) -> None:
        """Track the host-RAM tier's use, and its peak."""
        with self._lock:
            for s in (self.step, self.total):
                s.host_tier_bytes += delta
                s.peak_host_tier_bytes = max(s.peak_host_tier_bytes, s.host_tier_bytes)

    def set(self, **values) -> None:
        """Overwrite (not add) fields in the step and cumulative records."""
        with self._lock:
            for name, value in values.items():
                setattr(self.step, name, value)
                setattr(self.total, name, value)

    def end_step(self) -> OffloadStats:
        """Close the current step's record and start a new one."""
        with self._lock:
            self._fold_kept()
            self.step.steps = 1
            self.total.steps += 1
            done = self.step
            self.last_step = _copy(done)
            self.step = OffloadStats(resident_bytes=done.resident_bytes,
                                     peak_resident_bytes=done.resident_bytes,
                                     host_tier_bytes=done.host_tier_bytes,
                                     peak_host_tier_bytes=done.host_tier_bytes,
                                     plan_version=done.plan_version)
            return _copy(done)

    def snapshot(self, which: str = "total") -> OffloadStats:
        with self._lock:
            self._fold_kept()
            return _copy(getattr(self, which))


def _copy(stats: OffloadStats) -> OffloadStats:
    """A copy that shares nothing mutable with the live record."""
    return dataclasses.replace(stats, kept_by_reason={k: list(v) for k, v in stats.kept_by_reason.items()})


@dataclass(frozen=True)
class TimelineEvent:
    """One transfer or stall: ``kind`` is "write", "read" or "stall"; times are perf_counter."""

    kind: str
    start: float
    end: float
    nbytes: int
    layer: object
    scope: object


class Timeline:
    """An optional record of every transfer, for plots of the compute/I-O overlap.

    Off by default (it grows with every tensor); ``Offloader.timeline(True)`` turns it on.
    """

    def __init__(self) -> None:
        self.enabled = False
        self._events: list = []
        self._lock = threading.Lock()

    def add(self, kind: str, start: float, end: float, nbytes: int, layer: object, scope: object) -> None:
        if self.enabled:
            with self._lock:
                self._events.append(TimelineEvent(kind, start, end, nbytes, layer, scope))

    def drain(self) -> list:
        """The events recorded so far (and forget them)."""
        with self._lock:
            events, self._events = self._events, []
            return events

