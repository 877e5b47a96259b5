"""Host RAM as a place for activations: a strict byte budget of host memory in front of the
spill files (``host_cache_bytes``), and the copies in and out of it. ``places.HostRamPlace``
puts it behind the interface every place has.

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
* A slot is returned (``HostTier.free``) once its entry was freed and no copy uses it any more.
  ``close()`` drops the pinned buffer.

Threads: ``reserve`` runs on the compute thread, ``free`` on whichever thread drops the last
handle or finishes the last transfer; one lock guards the allocator and the counters. The tier
is the one owner of its use: it reports every change to ``StatsCollector.host`` itself.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional

import torch

from .allocator import ALIGNMENT, ExtentAllocator, align_up
from .stats import StatsCollector


@dataclass(frozen=True)
class HostSlot:
    """A reservation in the host tier: ``length`` aligned bytes at ``offset`` of its budget."""

    offset: int
    length: int
    nbytes: int

    def describe(self) -> str:
        return f"the host-RAM tier at offset {self.offset}"


class HostTier:
    """A strict byte budget of host memory, optionally backed by one pinned buffer."""

    def __init__(self, budget: int, stats: Optional[StatsCollector] = None) -> None:
        self.budget = budget - budget % ALIGNMENT
        self._stats = stats
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
            if self._stats is not None:
                self._stats.host(length)
        return HostSlot(offset, length, nbytes)

    def free(self, slot: HostSlot) -> None:
        with self._lock:
            if self._closed:
                return
            self._alloc.free(slot.offset, slot.length)
            self.used -= slot.length
            if self._stats is not None:
                self._stats.host(-slot.length)

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
