"""Where an offloaded activation can live: one class per place, one small interface for all.

The plan (``adaptive.Plan``, ``Offloader.set_plan``) names places with the words below; the
runtime looks the word up in ``Places`` and from then on talks to the object only. A place:

* ``reserve(nbytes)`` a location for the bytes (``None``: full, try ``overflow``; ``OSError``:
  it cannot take anything now, the tensor stays in memory) and ``free(location)`` it;
* ``write`` / ``read`` the bytes of one storage (blocking, on the I/O thread ``submit_*`` ran
  them on), pacing them with its rate limiter, timing them with its busy clock and counting them
  in its own ``OffloadStats`` fields: nothing outside the place branches on which place it is;
* ``moves(device)``: whether storing a tensor of that device here moves the bytes at all (host
  RAM holding a CPU tensor keeps it in place and only accounts for its budget);
* ``direct(device)``: whether the place takes requests straight from the compute thread
  (``direct_write`` / ``direct_read`` return the native engine's requests; ``direct_done``
  counts one when it completed) — one queue, the engine's, with no thread of ours in between.
  The drive does for host tensors without bandwidth caps; everything else runs ``write`` /
  ``read`` on an I/O thread.

Adding a place is one class here plus its cost in the planner (``adaptive.simulate``).

Threads: ``reserve`` runs on the compute thread, ``write``/``read`` on I/O threads, ``free`` on
whichever thread finishes last with the location; each place guards its own state.
"""
from __future__ import annotations

import errno
import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .host_ram import HostSlot, HostTier, HostTierBackend
from .io import IOEngine
from .io.native import NativeHostBackend
from .io.jobs import CancelledError, IOFuture
from .pacing import BusyClock, RateLimiter
from .stats import StatsCollector
from .store import DEAD_DRIVE_ERRNOS, Extent, SpillStore

log = logging.getLogger("ssdoffload")

#: The plan's words for the places (``Plan.placement`` holds one per forward group).
DEVICE = "device"
RAM = "ram"
SSD = "ssd"
PLACES = (DEVICE, RAM, SSD)


class Place:
    """The interface (see the module docstring). ``DevicePlace`` is the place that offloads
    nothing: the hooks keep such tensors as autograd would."""

    name: str = "?"
    #: Whether tensors placed here leave the device (False: kept as they are).
    offloads: bool = True
    #: Where a tensor goes when ``reserve`` says this place is full.
    overflow: Optional["Place"] = None
    #: Prefix of the timeline events of this place's transfers ("" for the drive).
    timeline_prefix: str = ""
    #: A stage in front of ``overflow``: when full, its oldest entries move there.
    drains: bool = False

    def reserve(self, nbytes: int) -> Any:
        raise NotImplementedError

    def free(self, location: Any) -> None:
        raise NotImplementedError

    def moves(self, device: torch.device) -> bool:
        return True

    def submit_write(self, fn: Callable[..., Any], *args: Any) -> IOFuture:
        raise NotImplementedError

    def submit_read(self, fn: Callable[..., Any], *args: Any) -> IOFuture:
        raise NotImplementedError

    def pace_write(self, nbytes: int, cancelled: Callable[[], bool]) -> None:
        """Wait until ``nbytes`` may be written (bandwidth caps); no-op where there are none."""

    def pace_read(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may be read (bandwidth caps); no-op where there are none."""

    def write(self, src: torch.Tensor, location: Any, device: torch.device, ready: Any,
              stop: Callable[[], bool]) -> Optional[List[int]]:
        raise NotImplementedError

    def read(self, dst: torch.Tensor, location: Any, device: torch.device, allocated: Any,
             expected: Optional[List[int]]) -> Any:
        raise NotImplementedError

    def write_failed(self, location: Any, exc: OSError) -> None:
        """A write to ``location`` failed with ``exc`` (before ``free``)."""

    def kept_in_place(self, location: Any) -> None:
        """A tensor that ``moves`` nothing for stays where it is, holding ``location``."""

    def direct(self, device: torch.device) -> bool:
        """Whether tensors of ``device`` go to the engine straight from the compute thread."""
        return False

    def source(self, location: Any) -> torch.Tensor:
        """The bytes at ``location`` as a host tensor, for a stage that drains (``drains``)."""
        raise NotImplementedError(f"{type(self).__name__} does not drain")

    def describe(self, location: Any) -> str:
        return location.describe()


class DevicePlace(Place):
    """Kept on the device: nothing is written, nothing read."""

    name = DEVICE
    offloads = False


class DrivePlace(Place):
    """The spill files on the NVMe drives (``store.SpillStore``), written and read by the I/O
    engine's backends, paced by the bandwidth caps. Owns the store: ``discard()`` removes the
    files after a failed step and ``reopen()`` makes them again (on what still works)."""

    name = SSD

    def __init__(self, store: SpillStore, paths: Sequence[str], initial_file_bytes: int, engine: IOEngine,
                 stats: StatsCollector, verify: bool, write_cap: Optional[float],
                 read_cap: Optional[float], direct_requests: bool = True,
                 io_timeout: Optional[float] = None) -> None:
        self._store: Optional[SpillStore] = store
        self.io_timeout = io_timeout
        #: Host tensors' requests go to the engine straight from the compute thread (False: on
        #: the I/O threads, as CUDA tensors' always do; the tests of that path use it).
        self.direct_requests = direct_requests
        self._paths, self._initial_bytes = list(paths), initial_file_bytes
        self.engine = engine
        self.stats = stats
        self.verify = verify
        self.write_limiter: Optional[RateLimiter] = None
        self.read_limiter: Optional[RateLimiter] = None
        self.set_caps(write_cap, read_cap)
        self._write_clock = BusyClock()
        self._read_clock = BusyClock()

    # -- the store's lifetime --------------------------------------------------------------
    @property
    def store(self) -> Optional[SpillStore]:
        return self._store

    def reopen(self) -> None:
        """Make the spill files again after ``discard``: a path whose drive died is left out
        (with a warning) and, with none left, tensors stay in memory."""
        if self._store is None:
            self._store = SpillStore(self._paths, self._initial_bytes, require_all=False,
                                     grow_timeout=self.io_timeout)

    def discard(self, failed: bool = False) -> None:
        """Remove the spill files (their data is gone; extents still out are not returned)."""
        store, self._store = self._store, None
        if store is not None:
            store.close(failed=failed)

    def retire(self, in_flight: Sequence[Any]) -> None:
        """``discard`` once the requests ``in_flight`` on the files have ended (a thread
        waits for them: the drive does not answer now); the next ``reopen`` makes new files."""
        store, self._store = self._store, None
        if store is None:
            return

        def close_when_done() -> None:
            for fut in in_flight:
                try:
                    fut.exception()  # whatever its outcome
                except CancelledError:
                    pass
            store.close()

        try:
            threading.Thread(target=close_when_done, name="ssdoffload-retire", daemon=True).start()
        except RuntimeError:  # no thread to spare: wait here (the files must not close under I/O)
            close_when_done()

    def paths(self) -> List[str]:
        store = self._store
        return store.paths() if store is not None else []

    def set_caps(self, write: Optional[float], read: Optional[float]) -> None:
        self.write_limiter = RateLimiter(write) if write else None
        self.read_limiter = RateLimiter(read) if read else None
        # Caps are paced on the I/O threads: with one, host tensors take that path too.
        self._direct_host = self.direct_requests and not write and not read \
            and isinstance(self.engine.backends.get("cpu"), NativeHostBackend)

    # -- the interface ---------------------------------------------------------------------
    def reserve(self, nbytes: int) -> Extent:
        store = self._store
        if store is None:
            raise OSError(2, "spill store is closed")
        return store.allocate(nbytes)

    def free(self, location: Extent) -> None:
        try:
            location.file.free(location)
        except ValueError as exc:  # the store was closed and reopened: nothing to return
            log.debug("ssdoffload: extent not returned: %s", exc)

    def submit_write(self, fn: Callable[..., Any], *args: Any) -> IOFuture:
        return self.engine.submit_write(fn, *args)

    def submit_read(self, fn: Callable[..., Any], *args: Any) -> IOFuture:
        return self.engine.submit_read(fn, *args)

    def pace_write(self, nbytes: int, cancelled: Callable[[], bool]) -> None:
        limiter = self.write_limiter
        if limiter is not None:
            self.stats.add(write_throttle_seconds=limiter.take(nbytes, cancelled))

    def pace_read(self, nbytes: int) -> None:
        limiter = self.read_limiter
        if limiter is not None:
            self.stats.add(read_throttle_seconds=limiter.take(nbytes))

    def write(self, src: torch.Tensor, location: Extent, device: torch.device, ready: Any,
              stop: Callable[[], bool]) -> Optional[List[int]]:
        # The busy clock starts after the pacing wait: the bandwidth measured is the drive's.
        self._write_clock.start()
        nbytes = 0
        try:
            checksums = self.engine.backend_for(device).write(src, location, ready, self.verify, stop=stop)
            nbytes = src.numel()
            return checksums
        finally:
            self.stats.add(bytes_written=nbytes, write_seconds=self._write_clock.stop())

    def read(self, dst: torch.Tensor, location: Extent, device: torch.device, allocated: Any,
             expected: Optional[List[int]]) -> Any:
        self._read_clock.start()
        nbytes = 0
        try:
            ready = self.engine.backend_for(device).read(dst, location, allocated, expected)
            nbytes = dst.numel()
            return ready
        finally:
            self.stats.add(bytes_read=nbytes, read_seconds=self._read_clock.stop())

    # -- direct requests (host tensors, no caps): the engine's queue only -------------------
    def direct(self, device: torch.device) -> bool:
        return self._direct_host and device.type == "cpu"

    def direct_write(self, storage: torch.UntypedStorage, location: Extent) -> Any:
        """Queue the write of ``storage`` (host memory) at ``location``; the native request."""
        return self.engine.backends["cpu"].submit_write(storage.data_ptr(), storage.nbytes(), location,
                                                       self.verify)

    def direct_read(self, dst: torch.Tensor, location: Extent, expected: Optional[List[int]]) -> Any:
        """Queue the read of ``location`` into ``dst`` (host memory), checked against
        ``expected``; the native request."""
        return self.engine.backends["cpu"].submit_read(dst.data_ptr(), dst.numel(), location, expected)

    def direct_done(self, request: Any, write: bool, nbytes: int) -> Optional[tuple]:
        """A direct request completed (``nbytes`` moved: 0 when it failed): count it, its time
        as the engine measured it. Returns its (start, end), or None."""
        times = request.times()
        clock = self._write_clock if write else self._read_clock
        seconds = clock.record(*times) if times is not None else 0.0
        if write:
            self.stats.add(bytes_written=nbytes, write_seconds=seconds)
        else:
            self.stats.add(bytes_read=nbytes, read_seconds=seconds)
        return times

    def write_failed(self, location: Extent, exc: OSError) -> None:
        if exc.errno != errno.ETIMEDOUT:
            location.file.unname()  # while the filesystem still takes it (see SpillFile.unname)
        if exc.errno in DEAD_DRIVE_ERRNOS and location.file.mark_failed(exc):
            # The drive, not this request, failed: nothing more goes to that file; the other
            # paths (or memory) carry on, and its data already written fails loudly on read.
            log.warning("ssdoffload: spill file %s failed (%s); no more writes go there", location.file.path, exc)


class HostRamPlace(Place):
    """Pinned host RAM within ``host_cache_bytes`` (``host_ram.HostTier``), a write-back stage
    in front of the drive: a tensor that does not fit goes to ``overflow`` (the drive), and
    the oldest ones in RAM are drained there in the background (``Transfers._drain``), so RAM
    keeps the newest — those backward reads first. CUDA tensors are copied on the engine's
    host thread; CPU tensors stay where they are (``moves`` is False) and only take budget,
    trading RAM for disk I/O."""

    name = RAM
    timeline_prefix = "host-"
    drains = True

    def __init__(self, tier: HostTier, engine: IOEngine, stats: StatsCollector, overflow: Place) -> None:
        self.tier = tier
        self.engine = engine
        self.stats = stats
        self.overflow = overflow
        self._backends: Dict[torch.device, HostTierBackend] = {}
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> Optional[HostSlot]:
        return self.tier.reserve(nbytes)

    def free(self, location: HostSlot) -> None:
        self.tier.free(location)

    def moves(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def submit_write(self, fn: Callable[..., Any], *args: Any) -> IOFuture:
        return self.engine.submit_host(fn, *args)

    def submit_read(self, fn: Callable[..., Any], *args: Any) -> IOFuture:
        return self.engine.submit_host(fn, *args)

    def _backend(self, device: torch.device) -> HostTierBackend:
        with self._lock:
            backend = self._backends.get(device)
            if backend is None:
                backend = self._backends[device] = HostTierBackend(self.tier, device)
            return backend

    def write(self, src: torch.Tensor, location: HostSlot, device: torch.device, ready: Any,
              stop: Callable[[], bool]) -> None:
        self._backend(device).write(src, location, ready)
        self.stats.add(host_bytes_written=location.nbytes)
        return None

    def read(self, dst: torch.Tensor, location: HostSlot, device: torch.device, allocated: Any,
             expected: Optional[List[int]]) -> Any:
        ready = self._backend(device).read(dst, location, allocated)
        self.stats.add(host_bytes_read=location.nbytes)
        return ready

    def source(self, location: HostSlot) -> torch.Tensor:
        return self.tier.view(location)

    def kept_in_place(self, location: HostSlot) -> None:
        """A CPU tensor holds ``location``'s budget where it is (no copy)."""
        self.stats.add(host_bytes_written=location.nbytes)


class Places:
    """The places of one offloader, by the plan's words."""

    def __init__(self, drive: DrivePlace, ram: Optional[HostRamPlace]) -> None:
        self.device = DevicePlace()
        self.drive = drive
        self.ram = ram
        self._by_name: Dict[str, Place] = {DEVICE: self.device, SSD: drive}
        if ram is not None:
            self._by_name[RAM] = ram

    def __getitem__(self, name: str) -> Place:
        try:
            return self._by_name[name]
        except KeyError:
            raise ValueError(f"no place {name!r} here (places: {', '.join(sorted(self._by_name))}; "
                             "'ram' needs OffloadConfig.host_cache_bytes)") from None

    def names(self) -> Sequence[str]:
        return tuple(self._by_name)
