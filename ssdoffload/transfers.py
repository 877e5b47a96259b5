"""Scheduling of the writes and reads of entries: the only code that moves entries between
states because of I/O.

Threads: ``start_write`` and ``start_load`` run on the thread autograd calls hooks on (the
compute side); the ``_write_job`` / ``_read_job`` bodies run on the I/O engine's threads.

CUDA lifetime rules:

* A tensor is saved → an event is recorded on the current (compute) stream; the backend waits
  on it before reading the memory. The entry keeps the storage until the backend returned, then
  drops it: the memory goes back to the caching allocator on its own stream, whose earlier
  kernels are ordered before any reuse, and no other stream touches it any more. No
  ``record_stream``.
* A reload buffer is allocated on the compute stream (we are on it when a hook runs), an event
  recorded right after the allocation lets the backend wait for earlier kernels that may still
  use that memory, and the compute stream waits on the backend's ready event before using it.
  A reloaded buffer dropped before anybody used it first makes its stream wait on that event,
  so the allocator never hands out memory a copy is still writing.

Tiers: ``start_write(entry, place)`` sends an entry to the spill files (``"ssd"``) or tries the
host-RAM tier first (``"ram"``, see ``tiers.py``): a slot within the budget, else the SSD
(overflow). A tier entry goes through the same states (``ON_DISK`` then means "stored off the
device"); its copies run on the engine's host thread and its slot is returned by ``on_free``
like an extent. On a CPU host a tier entry stays ``RESIDENT`` in place (no copy, no I/O).

Caps: with ``max_write_bandwidth`` / ``max_read_bandwidth`` each spill-file transfer first takes
its bytes from a token bucket (``tiers.RateLimiter``) on the I/O thread; a write whose entry was
freed while it waited is skipped. The busy clocks start after the wait, so the measured
bandwidth is the drive's own.
"""
from __future__ import annotations

import logging
import threading
import time
import warnings
from typing import Callable, Optional

import torch
from torch.autograd.profiler import record_function

from .cache import HOLDS_MEMORY, Entry, OffloadCache, State
from .errors import OffloadError, SpillReadError, WriteAbandoned
from .io import IOEngine, byte_view
from .io.jobs import CancelledError, IOFuture
from .stats import StatsCollector, Timeline
from .store import DEAD_DRIVE_ERRNOS, Extent, SpillStore
from .tiers import HostSlot, HostTier, HostTierBackend, RateLimiter

log = logging.getLogger("ssdoffload")


def wait_for(fut: IOFuture) -> None:
    """Block until ``fut`` is done (whatever its outcome)."""
    try:
        fut.exception()
    except CancelledError:
        pass


def _without_tracebacks(exc: BaseException) -> BaseException:
    """``exc`` and the exceptions chained to it, with their tracebacks (and frames) dropped."""
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    return exc


class BusyClock:
    """Wall time during which at least one transfer of a kind was in flight.

    Summing per-transfer durations would count parallel transfers twice and understate the
    bandwidth; this counts the union of the intervals.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inflight = 0
        self._since = 0.0

    def start(self) -> None:
        with self._lock:
            if self._inflight == 0:
                self._since = time.perf_counter()
            self._inflight += 1

    def stop(self) -> float:
        with self._lock:
            self._inflight -= 1
            if self._inflight == 0:
                return time.perf_counter() - self._since
            return 0.0


class Transfers:
    """Starts writes and loads of entries and waits for them."""

    def __init__(self, engine: IOEngine, store_getter: Callable[[], SpillStore], cache: OffloadCache,
                 stats: StatsCollector, verify: bool = False, tier: Optional[HostTier] = None,
                 max_write_bandwidth: Optional[float] = None,
                 max_read_bandwidth: Optional[float] = None) -> None:
        self.engine = engine
        self.tier = tier
        self._tier_backends: dict = {}
        self._tier_lock = threading.Lock()
        self.write_limiter = RateLimiter(max_write_bandwidth) if max_write_bandwidth else None
        self.read_limiter = RateLimiter(max_read_bandwidth) if max_read_bandwidth else None
        self.verify = verify
        self._store = store_getter
        self.cache = cache
        self.stats = stats
        self.timeline = Timeline()
        self._write_clock = BusyClock()
        self._read_clock = BusyClock()
        self._warned_write_failure = False
        self._pending_writes: "set" = set()
        self._pending_lock = threading.Lock()
        #: Set by ``Offloader.close()``: nothing new is written from then on.
        self.closed = False
        #: Asked when a write finishes: is backward already at this entry's group? Then the
        #: memory is kept (it would be read straight back) instead of dropped.
        self.wanted: Callable[[Entry], bool] = lambda entry: False

    # -- writes --------------------------------------------------------------------------
    def start_write(self, entry: Entry, place: str = "ssd") -> None:
        """Queue the write of a RESIDENT entry (compute thread). Never raises for I/O.

        ``place="ram"`` tries the host-RAM tier first and overflows to the spill files.
        """
        storage = entry.storage
        assert storage is not None
        if place == "ram" and self.tier is not None and self._to_tier(entry, storage):
            return
        ready = None
        if entry.device.type == "cuda":
            entry.compute_stream = torch.cuda.current_stream(entry.device)
            ready = torch.cuda.Event()
            ready.record(entry.compute_stream)
        try:
            entry.extent = self._store().allocate(entry.nbytes)
        except OSError as exc:
            self._write_failed(entry, exc, extent_allocated=False)
            return
        with self.cache.lock:
            self.cache.transition(entry, State.WRITING)
        self._submit_write(self.engine.submit_write, entry, storage, ready)

    def _to_tier(self, entry: Entry, storage: torch.UntypedStorage) -> bool:
        """Put ``entry`` in the host tier if it fits the budget; False: send it to the SSD."""
        assert self.tier is not None
        slot = self.tier.reserve(entry.nbytes)
        if slot is None:
            return False
        self.stats.host(slot.length)
        entry.extent = slot
        if entry.device.type != "cuda":
            # Host memory already: keep it in place (RESIDENT); the slot holds its budget.
            self.stats.add(host_bytes_written=entry.nbytes)
            return True
        entry.compute_stream = torch.cuda.current_stream(entry.device)
        ready = torch.cuda.Event()
        ready.record(entry.compute_stream)
        with self.cache.lock:
            self.cache.transition(entry, State.WRITING)
        self._submit_write(self.engine.submit_host, entry, storage, ready)
        return True

    def _submit_write(self, submit, entry: Entry, storage: torch.UntypedStorage, ready) -> None:
        # The job takes the storage from the entry when it starts, not as an argument: a queued
        # job must not keep device memory alive after backward freed the entry.
        fut = submit(self._write_job, entry, ready)
        entry.write_future = fut
        with self._pending_lock:
            self._pending_writes.add(fut)
        fut.add_done_callback(self._write_done)

    def _tier_backend(self, device: torch.device) -> HostTierBackend:
        assert self.tier is not None
        with self._tier_lock:
            backend = self._tier_backends.get(device)
            if backend is None:
                backend = self._tier_backends[device] = HostTierBackend(self.tier, device)
            return backend

    def _write_done(self, fut) -> None:
        with self._pending_lock:
            self._pending_writes.discard(fut)

    def _write_job(self, entry: Entry, ready) -> None:
        if entry.state is State.FREED:  # backward already used and dropped it: nothing to save
            self.stats.add(writes_skipped=1)
            return
        host = isinstance(entry.extent, HostSlot)
        if not host and self.write_limiter is not None:
            waited = self.write_limiter.take(entry.nbytes, lambda: entry.state is State.FREED)
            self.stats.add(write_throttle_seconds=waited)
        # Only now take the memory: waiting in the queue or for the cap must not keep it alive.
        with self.cache.lock:
            storage = entry.storage
        if entry.state is State.FREED or storage is None:
            self.stats.add(writes_skipped=1)
            return
        token = entry.token
        if token is not None and not token.unchanged(storage):
            self._storage_changed(entry)
            return
        src = byte_view(storage)
        del storage
        backend = self._tier_backend(entry.device) if host else self.engine.backend_for(entry.device)
        clock = None if host else self._write_clock
        if clock is not None:
            clock.start()
        t0 = time.perf_counter()
        try:
            with record_function("ssdoffload.write"):
                entry.checksums = backend.write(src, entry.extent, ready, self.verify and not host,
                                                stop=lambda: entry.state is State.FREED)
            self.timeline.add("host-write" if host else "write", t0, time.perf_counter(), entry.nbytes,
                              entry.layer, entry.scope)
        except WriteAbandoned:
            if clock is not None:
                self.stats.add(write_seconds=clock.stop())
            self.stats.add(writes_skipped=1)
            return
        except (OSError, RuntimeError) as exc:
            if clock is not None:
                self.stats.add(write_seconds=clock.stop())
            if token is not None and not token.unchanged(src.untyped_storage()):
                # Freed or moved under the copy (EFAULT from the engine): not a drive fault.
                self._storage_changed(entry)
                return
            if not isinstance(exc, OSError):
                exc = OSError(str(exc))
            self._write_failed(entry, exc, extent_allocated=True)
            return
        if clock is not None:
            self.stats.add(bytes_written=entry.nbytes, write_seconds=clock.stop())
        else:
            self.stats.add(host_bytes_written=entry.nbytes)
        if token is not None and not token.unchanged(src.untyped_storage()):
            # Resized or moved while we copied: what we wrote may be anything.
            self._storage_changed(entry)
            return
        del src
        with self.cache.lock:
            if entry.state is State.WRITING:
                if self.wanted(entry):
                    self.cache.transition(entry, State.LOADED)
                    entry.prefetched = True
                    return
                self.cache.transition(entry, State.ON_DISK)
                entry.storage = None  # the memory may now go back to its owner
                self.stats.resident(-entry.nbytes)

    def _storage_changed(self, entry: Entry) -> None:
        """The storage was resized or moved after it was saved (FSDP frees gathered weights
        with ``resize_(0)`` and refills them before backward): what the drive got cannot be
        trusted, so the extent is dropped and the entry keeps the storage, as autograd does
        without hooks — backward then reads whatever the owner put back."""
        with self.cache.lock:
            if entry.state is State.WRITING:
                self.cache.transition(entry, State.RESIDENT)
            extent, entry.extent = entry.extent, None
        if extent is not None:
            self._free_extent(extent)
        self.stats.add(writes_skipped=1, storages_changed=1)
        log.debug("ssdoffload: %s was resized or moved before its write; kept in memory", entry.describe())

    def _write_failed(self, entry: Entry, exc: OSError, extent_allocated: bool) -> None:
        """Keep the tensor in memory: a failed write must never cost a correct gradient."""
        with self.cache.lock:
            if entry.state is State.WRITING:
                self.cache.transition(entry, State.RESIDENT)
            extent, entry.extent = entry.extent, None
        if isinstance(extent, Extent) and exc.errno in DEAD_DRIVE_ERRNOS and extent.file.mark_failed(exc):
            # The drive, not this request, failed: nothing more goes to that file; the other
            # paths (or memory) carry on, and its data already written fails loudly on read.
            log.warning("ssdoffload: spill file %s failed (%s); no more writes go there", extent.file.path, exc)
        if extent is not None and extent_allocated:
            self._free_extent(extent)
        self.stats.add(write_failures=1)
        if not self._warned_write_failure:
            self._warned_write_failure = True
            warnings.warn(
                f"ssdoffload: writing {entry.describe()} failed ({exc}); keeping it in memory. "
                "Further write failures are counted in stats().write_failures.",
                RuntimeWarning, stacklevel=2)
        log.debug("ssdoffload: write of %s failed: %s", entry.describe(), exc)

    def pending_writes(self) -> int:
        """How many queued writes have not finished."""
        with self._pending_lock:
            return sum(1 for f in self._pending_writes if not f.done())

    def wait_writes(self) -> None:
        """Block until every queued write finished (successfully, failed or skipped)."""
        while True:
            with self._pending_lock:
                # Done futures leave here too, not only in their callback: an interrupt between
                # the submission and ``add_done_callback`` would otherwise leave one behind.
                self._pending_writes = {f for f in self._pending_writes if not f.done()}
                pending = list(self._pending_writes)
            if not pending:
                return
            for fut in pending:
                wait_for(fut)

    # -- reads ---------------------------------------------------------------------------
    def start_load(self, entry: Entry, prefetch: bool) -> bool:
        """Begin reading an ON_DISK entry back; returns False when there is nothing to do."""
        with self.cache.lock:
            if entry.state is not State.ON_DISK:
                return False
            self.cache.transition(entry, State.LOADING)
            entry.prefetched = prefetch
        try:
            dst = torch.empty(entry.nbytes, dtype=torch.uint8, device=entry.device)
            allocated = None
            if entry.device.type == "cuda":
                entry.compute_stream = torch.cuda.current_stream(entry.device)
                allocated = torch.cuda.Event()
                allocated.record(entry.compute_stream)
        except Exception as exc:  # out of memory while allocating the buffer
            self._read_failed(entry, exc)
            return True
        except BaseException:  # KeyboardInterrupt: the user's, not a read failure
            self._load_not_started(entry)
            raise
        submit = self.engine.submit_host if isinstance(entry.extent, HostSlot) else self.engine.submit_read
        try:
            fut = submit(self._read_job, entry, dst, allocated)
        except BaseException:
            self._load_not_started(entry)
            raise
        entry.read_future = fut
        self.stats.resident(entry.nbytes)
        return True

    def _load_not_started(self, entry: Entry) -> None:
        """An interrupt came between LOADING and the submission: back to ON_DISK, so the next
        unpack starts the load again instead of waiting for one that never began."""
        with self.cache.lock:
            if entry.state is State.LOADING and entry.read_future is None:
                self.cache.transition(entry, State.ON_DISK)

    def _read_job(self, entry: Entry, dst: torch.Tensor, allocated) -> None:
        host = isinstance(entry.extent, HostSlot)
        if not host and self.read_limiter is not None:
            self.stats.add(read_throttle_seconds=self.read_limiter.take(entry.nbytes))
        backend = self._tier_backend(entry.device) if host else self.engine.backend_for(entry.device)
        clock = None if host else self._read_clock
        if clock is not None:
            clock.start()
        t0 = time.perf_counter()
        try:
            with record_function("ssdoffload.read"):
                ready = backend.read(dst, entry.extent, allocated, None if host else entry.checksums)
            self.timeline.add("host-read" if host else "read", t0, time.perf_counter(), entry.nbytes,
                              entry.layer, entry.scope)
        except BaseException as exc:
            if clock is not None:
                self.stats.add(read_seconds=clock.stop())
            self._read_failed(entry, exc)
            return
        if clock is not None:
            self.stats.add(bytes_read=entry.nbytes, read_seconds=clock.stop())
        else:
            self.stats.add(host_bytes_read=entry.nbytes)
        with self.cache.lock:
            if entry.state is State.LOADING:
                self.cache.transition(entry, State.LOADED)
                entry.storage = dst.untyped_storage()
                entry.ready_event = ready
                return
        # Freed while loading: nobody will wait on the copy, so the stream must before reuse.
        if ready is not None and entry.compute_stream is not None:
            entry.compute_stream.wait_event(ready)

    def _read_failed(self, entry: Entry, exc: BaseException) -> None:
        where = entry.extent.describe() if entry.extent is not None else "no extent"
        error = SpillReadError(f"ssdoffload: reading {entry.describe()} back from {where} failed: {exc}")
        # The entry keeps the error until autograd drops it: without its traceback, whose
        # frames hold the reload buffer and the entry itself (a cycle only the collector frees).
        error.__cause__ = _without_tracebacks(exc)
        with self.cache.lock:
            entry.error = error
            if entry.state is State.LOADING:
                self.cache.transition(entry, State.FAILED)
                self.stats.resident(-entry.nbytes)

    def materialize(self, entry: Entry) -> torch.UntypedStorage:
        """The entry's storage in memory, loading or waiting as needed (compute thread)."""
        with self.cache.lock:
            state = entry.state
            first_use = not entry.served
            entry.served = True
            if state in (State.RESIDENT, State.WRITING):
                storage = entry.storage
                if first_use:
                    self.stats.add(forwarded=1)
                assert storage is not None
                return storage
        if state is State.ON_DISK:
            self.start_load(entry, prefetch=False)
            if first_use:
                self.stats.add(prefetch_misses=1)
        elif first_use and state in (State.LOADING, State.LOADED):
            self.stats.add(prefetch_hits=1 if entry.prefetched else 0,
                           prefetch_misses=0 if entry.prefetched else 1)
        fut = entry.read_future
        while fut is None and entry.state is State.LOADING:  # another thread is submitting it
            time.sleep(1e-4)
            fut = entry.read_future
        if fut is not None and not fut.done():
            t0 = time.perf_counter()
            with record_function("ssdoffload.stall"):
                fut.result()
            t1 = time.perf_counter()
            self.stats.add(stall_seconds=t1 - t0)
            self.timeline.add("stall", t0, t1, entry.nbytes, entry.layer, entry.scope)
        with self.cache.lock:
            if entry.state is State.FAILED or entry.error is not None:
                raise entry.error if entry.error is not None else OffloadError(f"{entry.describe()} failed")
        if entry.state is not State.LOADED:
            raise OffloadError(f"ssdoffload: {entry.describe()} is {entry.state.value}; it cannot be used "
                               "(was the offloader closed or the step aborted?)")
        if entry.ready_event is not None:
            torch.cuda.current_stream(entry.device).wait_event(entry.ready_event)
        assert entry.storage is not None
        return entry.storage

    # -- freeing -------------------------------------------------------------------------
    def on_free(self, entry: Entry) -> None:
        """The last handle is gone: return the memory and, once no I/O uses it, the extent."""
        with self.cache.lock:
            held = entry.state in HOLDS_MEMORY
            self.cache.transition(entry, State.FREED)
            storage, entry.storage = entry.storage, None
        if held:
            self.stats.resident(-entry.nbytes)
        if storage is not None and entry.ready_event is not None and entry.compute_stream is not None:
            entry.compute_stream.wait_event(entry.ready_event)
        del storage
        if entry.write_future is not None and entry.write_future.cancel():
            self.stats.add(writes_skipped=1)  # freed before its write started
        futures = [f for f in (entry.write_future, entry.read_future) if f is not None]
        extent = entry.extent
        if extent is None:
            return
        remaining = [len(futures)]
        lock = threading.Lock()

        def one_done(_fut=None) -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] <= 0
            if last:
                self._free_extent(extent)

        if not futures:
            self._free_extent(extent)
        for f in futures:
            f.add_done_callback(one_done)

    def _free_extent(self, extent) -> None:
        if isinstance(extent, HostSlot):
            extent.file.free(extent)
            self.stats.host(-extent.length)
            return
        try:
            extent.file.free(extent)
        except ValueError as exc:  # the store was closed and reopened: nothing to return
            log.debug("ssdoffload: extent not returned: %s", exc)

