"""The host-RAM tier: a strict byte budget of host memory in front of the spill files, and the
rate limiters (token buckets) that cap the bandwidth of the spill files.

Host tier (``host_cache_bytes``):

* ``HostTier.reserve(nbytes)`` hands out a ``HostSlot`` (4 KiB-aligned length) or ``None`` when
  the budget is full; the caller then sends the tensor to the SSD (overflow). The budget counts
  aligned lengths, so the memory in use is never above ``host_cache_bytes`` (``peak`` records
  the highest use, tests assert it).
* CUDA tensors: the slot is a range of one pinned host buffer of ``host_cache_bytes``, pinned on
  first use (``HostTierBackend``). Write: a side stream waits on the tensor's ``ready`` event
  (recorded on the compute stream when autograd saved it) and copies device-to-host; the I/O
  thread synchronizes that copy before returning, so the caller may drop the device tensor
  (no ``record_stream``). Read: a side stream waits on the ``allocated`` event of the
  destination (allocated on the compute stream) and copies host-to-device; the I/O thread
  synchronizes the copy before returning, so the slot can be reused as soon as the entry is
  freed, and returns the event the compute stream waits on.
* CPU tensors: the "device" is host memory already, so a copy would free nothing. The tier then
  keeps up to ``host_cache_bytes`` of activations in place (no copy, no I/O; the slot only
  accounts for the budget) and the overflow goes to the SSD: the tier trades RAM for disk I/O.
* A slot is returned by ``Transfers.on_free`` once no I/O uses it (``slot.file.free(slot)``,
  the same path as a spill-file extent). ``close()`` drops the pinned buffer.

Threads: ``reserve`` runs on the compute thread, ``free`` on whichever thread drops the last
handle or finishes the last transfer; one lock guards the allocator and the counters.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from .allocator import ALIGNMENT, ExtentAllocator, align_up


@dataclass(frozen=True)
class HostSlot:
    """A reservation in the host tier (``file`` is the tier, as for spill-file extents)."""

    file: "HostTier"
    offset: int
    length: int
    nbytes: int

    def describe(self) -> str:
        return f"the host-RAM tier at offset {self.offset}"


class HostTier:
    """A strict byte budget of host memory, optionally backed by one pinned buffer."""

    def __init__(self, budget: int) -> None:
        self.budget = budget - budget % ALIGNMENT
        self._lock = threading.Lock()
        self._alloc = ExtentAllocator(self.budget)
        self.used = 0
        self.peak = 0
        self._buffer: Optional[torch.Tensor] = None
        self._closed = False

    def reserve(self, nbytes: int) -> Optional[HostSlot]:
        """A slot for ``nbytes``, or ``None`` when it would exceed the budget."""
        if nbytes <= 0 or align_up(nbytes) > self.budget:
            return None
        with self._lock:
            if self._closed:
                return None
            got = self._alloc.allocate(nbytes)
            if got is None:
                return None
            offset, length = got
            self.used += length
            assert self.used <= self.budget
            self.peak = max(self.peak, self.used)
        return HostSlot(self, offset, length, nbytes)

    def free(self, slot: HostSlot) -> None:
        with self._lock:
            if self._closed:
                return
            self._alloc.free(slot.offset, slot.length)
            self.used -= slot.length

    def buffer(self) -> torch.Tensor:
        """The pinned buffer the CUDA slots live in (pinned on first use)."""
        with self._lock:
            if self._buffer is None:
                if self._closed:
                    raise OSError("the host-RAM tier is closed")
                self._buffer = torch.empty(self.budget, dtype=torch.uint8, pin_memory=True)
            return self._buffer

    def view(self, slot: HostSlot) -> torch.Tensor:
        return self.buffer()[slot.offset:slot.offset + slot.nbytes]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._buffer = None


class HostTierBackend:
    """Device-to-host and host-to-device copies of CUDA storages into tier slots, on side
    streams (see the module docstring for the event rules). Methods block; I/O threads call
    them."""

    name = "host-tier"

    def __init__(self, tier: HostTier, device: torch.device) -> None:
        self.tier = tier
        self._d2h = torch.cuda.Stream(device)
        self._h2d = torch.cuda.Stream(device)

    def write(self, src: torch.Tensor, slot: HostSlot, ready: Optional["torch.cuda.Event"],
              verify: bool = False, stop=None) -> None:
        dst = self.tier.view(slot)
        with torch.cuda.stream(self._d2h):
            if ready is not None:
                self._d2h.wait_event(ready)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._d2h)
        done.synchronize()  # the device memory may be dropped once we return
        return None

    def read(self, dst: torch.Tensor, slot: HostSlot, allocated: Optional["torch.cuda.Event"],
             expected=None) -> "torch.cuda.Event":
        src = self.tier.view(slot)
        with torch.cuda.stream(self._h2d):
            if allocated is not None:
                self._h2d.wait_event(allocated)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._h2d)
        done.synchronize()  # the slot may be reused as soon as the entry is freed
        return done


class RateLimiter:
    """A token bucket in virtual-clock form: a transfer of ``n`` bytes may start only
    ``n / rate`` seconds after the previous one started, and idle time earns no credit, so
    over any window the bytes started are at most ``rate`` x window + one transfer.

    Threads: ``take`` is called by I/O threads; the lock serialises reservations, the sleep is
    outside it. ``clock``/``sleep`` are injectable for tests of the schedule itself.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not rate > 0:
            raise ValueError(f"rate={rate!r} must be > 0 bytes per second")
        self.rate = float(rate)
        self._clock = clock
        self._sleep = sleep
        self._next = -float("inf")
        self._lock = threading.Lock()
        self.starts: List[float] = []  # the last start times granted (bounded), for inspection

    def reserve(self, nbytes: int) -> float:
        """Book ``nbytes``; returns the absolute time the transfer may start."""
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + nbytes / self.rate
            self.starts.append(start)
            del self.starts[:-256]
            return start

    def take(self, nbytes: int, cancelled: Optional[Callable[[], bool]] = None) -> float:
        """Block until ``nbytes`` may be moved; returns the seconds waited.

        ``cancelled`` is polled while waiting (every 10 ms at most): when it turns true the
        wait ends early (the booking stays, so the cap still holds for what follows).
        """
        start = self.reserve(nbytes)
        t0 = self._clock()
        while True:
            wait = start - self._clock()
            if wait <= 0 or (cancelled is not None and cancelled()):
                break
            self._sleep(min(wait, 0.01) if cancelled is not None else wait)
        return max(self._clock() - t0, 0.0)
