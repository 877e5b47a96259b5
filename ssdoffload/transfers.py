"""Scheduling of the writes and reads of entries: the only code that moves entries between
states because of I/O.

Threads: ``start_write`` and ``start_load`` run on the thread autograd calls hooks on (the
compute side). Two ways to the drive:

* **Direct** (host tensors to the spill files, no bandwidth cap: ``Place.direct``): the request
  goes from the compute thread straight into the native engine's queue — one queue, no thread
  of ours in between, no GIL handed back and forth per tensor. Its ``IOFuture`` completes
  (``_direct_write_done`` / ``_direct_read_done``: the checks and the state changes) on the
  thread that first sees it finished: ``poll()`` at every pack and unpack and step end, or a
  wait (``materialize``, ``wait_writes``, back-pressure). The completion holds the storage (or
  the reload buffer) until the engine is done with the memory. The engine checksums and checks
  the chunks itself (``verify``) and times each request.
* **I/O threads** (CUDA tensors, which need staging or kvikio; host RAM; capped bandwidth): the
  ``_write_job`` / ``_read_job`` bodies run on the engine's job pools.

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

Places: ``start_write(entry, place)`` reserves a location in a ``places.Place`` (the spill
files, host RAM, ...; a full place hands the entry to its ``overflow``), and from then on the
entry's ``place`` does the pacing, the copy, the timing and the counting; this module only moves
the entry through its states, the same for every place (``ON_DISK`` means "stored off the
device"). A place that does not move a tensor of its device (host RAM on a CPU host) leaves the
entry ``RESIDENT`` where it is, holding the location's budget. A write whose entry was freed
while it waited for the bandwidth cap is skipped.

Lifetime: ``new_handle`` watches each handle; when the last one died, ``release`` frees the
entry: its memory at once, its location once no transfer uses it any more.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import threading
import time
import warnings
from typing import Callable, Optional

import numpy
import torch
from torch.autograd.profiler import record_function

from . import chaos
from .cache import HOLDS_MEMORY, Entry, Handle, OffloadCache, State
from .errors import IntegrityError, OffloadError, SpillReadError, WriteAbandoned
from .io import byte_view
from .io.jobs import CancelledError, IOFuture
from .places import Place
from .reload_buffers import reload_buffer
from .stats import StatsCollector, Timeline
from .views import ViewSpec

log = logging.getLogger("ssdoffload")




def wait_for(fut: IOFuture, timeout: Optional[float] = None) -> bool:
    """Block until ``fut`` is done (whatever its outcome), at most ``timeout`` seconds
    (``None``: for ever); whether it is done."""
    try:
        fut.exception(timeout)
    except CancelledError:
        pass
    except TimeoutError:
        return False
    return True


def _wait_out(request) -> None:
    """An interrupt came between a direct request's submission and its future being kept:
    only that future would hold the memory (and the extent) the engine is using, so wait for
    the engine to be done with them before the interrupt goes on (further interrupts during
    this wait are not lost: the first one is re-raised by the caller)."""
    while True:
        try:
            request.wait()
            return
        except KeyboardInterrupt:
            continue


def _without_tracebacks(exc: BaseException) -> BaseException:
    """``exc`` and the exceptions chained to it, with their tracebacks (and frames) dropped."""
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    return exc



_NO_SPAN = contextlib.nullcontext()


def _span(name: str):
    """A ``torch.profiler`` span named ``name`` while a profiler records, else nothing (a
    ``record_function`` costs ~4.6 us even with no profiler: twice per offloaded tensor)."""
    return record_function(name) if torch._C._autograd._profiler_enabled() else _NO_SPAN


class Transfers:
    """Starts writes and loads of entries and waits for them."""

    def __init__(self, cache: OffloadCache, stats: StatsCollector, io_timeout: Optional[float] = None) -> None:
        self.cache = cache
        self.stats = stats
        #: The most the compute thread waits on one wait for the drive (``OffloadConfig``).
        self.io_timeout = io_timeout
        self._warned_timeout = False
        self.timeline = Timeline()
        self._warned_write_failure = False
        self._pending_writes: dict = {}  # IOFuture -> None, in submission order
        self._pending_lock = threading.Lock()
        #: Set by ``Offloader.close()``: nothing new is written from then on.
        self.closed = False
        #: Entries in a place that drains (host RAM), oldest first: drained first when it is full.
        self._staged: dict = {}
        self._stage_lock = threading.Lock()
        #: Direct requests (``Place.direct``) not yet completed, in submission order, writes and
        #: reads apart: ``poll`` completes the finished ones at the front.
        self._direct_writes: collections.deque = collections.deque()
        self._direct_reads: collections.deque = collections.deque()
        self._poll_lock = threading.Lock()

    # -- handles -------------------------------------------------------------------------
    def new_handle(self, entry: Entry, tensor: torch.Tensor, spec: Optional[ViewSpec] = None) -> Handle:
        """A handle to ``entry`` for ``tensor`` (whose ``ViewSpec`` the caller may have made
        already); the entry is freed after the last one died."""
        handle = self.cache.new_handle(entry, tensor, spec)
        self.cache.releases.watch(handle, self.release, entry)
        return handle

    def release(self, entry: Entry) -> None:
        """A handle of ``entry`` died (run at a drain of ``cache.releases``)."""
        if self.cache.unref(entry):
            self._free(entry)

    # -- writes --------------------------------------------------------------------------
    def start_write(self, entry: Entry, place: Place) -> None:
        """Queue the write of a RESIDENT entry to ``place`` (compute thread). Never raises for
        I/O: a place that cannot take it leaves the tensor in memory."""
        storage = entry.storage
        assert storage is not None
        try:
            location = place.reserve(entry.nbytes)
            while location is None and place.overflow is not None:  # full: the next place
                if place.drains:
                    self._drain(place, entry.nbytes)  # make room for the tensors that follow
                place = place.overflow
                location = place.reserve(entry.nbytes)
        except OSError as exc:
            self._write_failed(entry, exc)
            return
        if location is None:
            self._write_failed(entry, OSError(f"no room for {entry.nbytes} bytes in {place.name}"))
            return
        entry.place, entry.extent = place, location
        if place.drains:
            with self._stage_lock:
                self._staged[entry] = None
        if not place.moves(entry.device):
            place.kept_in_place(location)  # stays RESIDENT where it is; the location holds its budget
            return
        if place.direct(entry.device):
            self._submit_direct_write(entry, place)
            return
        ready = None
        if entry.device.type == "cuda":
            entry.compute_stream = torch.cuda.current_stream(entry.device)
            ready = torch.cuda.Event()
            ready.record(entry.compute_stream)
        with self.cache.lock:
            self.cache.transition(entry, State.WRITING)
        self._submit_write(entry, ready)

    def _submit_write(self, entry: Entry, ready) -> None:
        # The job takes the storage from the entry when it starts, not as an argument: a queued
        # job must not keep device memory alive after backward freed the entry.
        fut = entry.place.submit_write(self._write_job, entry, ready)
        entry.write_future = fut
        with self._pending_lock:
            self._pending_writes[fut] = None
        fut.add_done_callback(self._write_done)

    # -- direct requests: the engine's queue, completed on the thread that sees them done ------
    def _submit_direct_write(self, entry: Entry, place: Place) -> None:
        """Queue the write in the engine from here (compute thread): no thread of ours runs
        it. The completion holds the storage until the engine is done with the memory."""
        storage = entry.storage
        with self.cache.lock:
            self.cache.transition(entry, State.WRITING)
        try:
            request = place.direct_write(storage, entry.extent)
        except (OSError, RuntimeError) as exc:  # the engine refused it (closed, bad fd)
            self._write_failed(entry, exc if isinstance(exc, OSError) else OSError(str(exc)))
            return
        try:
            fut = IOFuture.of_request(request, functools.partial(self._direct_write_done, entry, storage))
            entry.write_future = fut
            with self._pending_lock:
                self._pending_writes[fut] = None
            fut.add_done_callback(self._write_done)
            self._direct_writes.append(fut)
        except BaseException:
            _wait_out(request)
            raise

    def _direct_write_done(self, entry: Entry, storage: torch.UntypedStorage, request) -> None:
        """A direct write finished (whoever saw it first runs this): as ``_write_job``'s end."""
        place = entry.place
        token = entry.token
        try:
            request.result()
        except OSError as exc:
            place.direct_done(request, True, 0)
            if token is not None and not token.unchanged(storage):
                self._storage_changed(entry)  # freed or moved under the write (EFAULT)
            else:
                self._write_failed(entry, exc)
            return
        self._count_direct(entry, request, "write")
        if token is not None and not token.unchanged(storage):
            self._storage_changed(entry)  # resized or moved while the engine read it
            return
        entry.checksums = request.checksums()
        self._written(entry)

    def _submit_direct_read(self, entry: Entry, dst: torch.Tensor) -> None:
        request = entry.place.direct_read(dst, entry.extent, entry.checksums)
        try:
            fut = IOFuture.of_request(request, functools.partial(self._direct_read_done, entry, dst))
            entry.read_future = fut
            self._direct_reads.append(fut)
        except BaseException:
            _wait_out(request)  # then start_load puts the entry back ON_DISK
            raise

    def _direct_read_done(self, entry: Entry, dst: torch.Tensor, request) -> None:
        place = entry.place
        try:
            request.result()
        except OSError as exc:
            place.direct_done(request, False, 0)
            mismatch = request.integrity()
            if mismatch is not None:
                offset, expected, got = mismatch
                exc = IntegrityError(entry.extent.file.path, offset, expected, got)
            self._read_failed(entry, exc)
            return
        self._count_direct(entry, request, "read")
        self._loaded(entry, dst, None)

    def _count_direct(self, entry: Entry, request, kind: str) -> None:
        """A direct request of ``entry`` succeeded: the place counts it; the timeline gets
        the span the engine measured."""
        place = entry.place
        times = place.direct_done(request, kind == "write", entry.nbytes)
        if times is not None:
            self.timeline.add(place.timeline_prefix + kind, times[0], times[1], entry.nbytes,
                              entry.layer, entry.scope)

    def poll(self) -> None:
        """Complete the direct requests that finished, oldest first (a safe point: the hooks,
        the end of a step, the waits). Non-blocking; another thread polling meanwhile: skip."""
        if not (self._direct_writes or self._direct_reads) or not self._poll_lock.acquire(False):
            return
        try:
            if chaos.ON: chaos.pause()  # SSDOFFLOAD_CHAOS: completions are harvested late
            for queue in (self._direct_writes, self._direct_reads):
                while queue and queue[0].complete_if_done():
                    queue.popleft()
        except RuntimeError:  # a forked child: the parent's requests cannot complete here
            pass
        finally:
            self._poll_lock.release()

    # -- the RAM stage draining to the drive ------------------------------------------------
    def _drain(self, stage: Place, nbytes: int) -> None:
        """``stage`` (host RAM) is full: move its oldest entries to ``stage.overflow`` (the
        drive) in the background until about ``nbytes`` will be free. Forward does not wait:
        the tensor that found it full goes to the drive itself; the ones after it find room.
        Backward needs the oldest entries last, so RAM keeps what it will read first."""
        started = 0
        while started < nbytes:
            with self._stage_lock:
                entry = next(iter(self._staged), None)
                if entry is None:
                    return
                del self._staged[entry]
            if self._drain_one(entry, stage):
                started += entry.nbytes

    def _drain_one(self, entry: Entry, stage: Place) -> bool:
        drive = stage.overflow
        assert drive is not None
        with self.cache.lock:
            state = entry.state
            if entry.place is not stage or state not in (State.RESIDENT, State.ON_DISK):
                return False  # being read back, used or freed: it stays where it is
        try:
            extent = drive.reserve(entry.nbytes)
        except OSError as exc:
            log.debug("ssdoffload: not draining %s: %s", entry.describe(), exc)
            return False
        slot = entry.extent
        self.stats.add(host_bytes_drained=entry.nbytes)
        if state is State.RESIDENT:
            # Kept in place (a CPU host): an ordinary write to the drive; the RAM budget it held
            # is returned when that write has finished, whatever its outcome.
            with self.cache.lock:
                if entry.state is not State.RESIDENT or entry.place is not stage:
                    drive.free(extent)
                    return False
                entry.place, entry.extent = drive, extent
                self.cache.transition(entry, State.WRITING)
            self._submit_write(entry, None)
            entry.write_future.add_done_callback(lambda _f: stage.free(slot))
            return True
        # Copied into a pinned slot (CUDA): the drive writes the slot; the entry moves to the
        # drive when that write is done, unless backward took it meanwhile.
        # Not the entry's write_future: freeing the entry cancels that one, and this job must
        # run to return the extent it holds.
        fut = drive.submit_write(self._drain_job, entry, stage, slot, drive, extent)
        entry.drain_future = fut
        with self._pending_lock:
            self._pending_writes[fut] = None
        fut.add_done_callback(self._write_done)
        return True

    def _drain_job(self, entry: Entry, stage: Place, slot, drive: Place, extent) -> None:
        moved = False
        try:
            if entry.state is State.ON_DISK:
                drive.pace_write(entry.nbytes, lambda: entry.state is State.FREED)
                src = stage.source(slot)
                t0 = time.perf_counter()
                checksums = drive.write(src, extent, src.device, None, stop=lambda: entry.state is State.FREED)
                self.timeline.add("drain", t0, time.perf_counter(), entry.nbytes, entry.layer, entry.scope)
                with self.cache.lock:
                    if entry.state is State.ON_DISK and entry.extent is slot:
                        entry.place, entry.extent, entry.checksums = drive, extent, checksums
                        moved = True
        except (OSError, RuntimeError, WriteAbandoned) as exc:  # it stays in RAM, as good as before
            log.debug("ssdoffload: draining %s failed: %s", entry.describe(), exc)
        finally:
            if moved:
                stage.free(slot)
            else:
                drive.free(extent)

    def _write_done(self, fut) -> None:
        with self._pending_lock:
            self._pending_writes.pop(fut, None)

    def _write_job(self, entry: Entry, ready) -> None:
        if entry.state is State.FREED:  # backward already used and dropped it: nothing to save
            self.stats.add(writes_skipped=1)
            return
        place = entry.place
        place.pace_write(entry.nbytes, lambda: entry.state is State.FREED)
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
        t0 = time.perf_counter()
        try:
            with _span("ssdoffload.write"):
                entry.checksums = place.write(src, entry.extent, entry.device, ready,
                                              stop=lambda: entry.state is State.FREED)
            self.timeline.add(place.timeline_prefix + "write", t0, time.perf_counter(), entry.nbytes,
                              entry.layer, entry.scope)
        except WriteAbandoned:
            self.stats.add(writes_skipped=1)
            return
        except (OSError, RuntimeError) as exc:
            if token is not None and not token.unchanged(src.untyped_storage()):
                # Freed or moved under the copy (EFAULT from the engine): not a drive fault.
                self._storage_changed(entry)
                return
            if not isinstance(exc, OSError):
                exc = OSError(str(exc))
            self._write_failed(entry, exc)
            return
        if token is not None and not token.unchanged(src.untyped_storage()):
            # Resized or moved while we copied: what we wrote may be anything.
            self._storage_changed(entry)
            return
        del src
        self._written(entry)

    def _written(self, entry: Entry) -> None:
        """The entry's bytes are on the drive: drop the memory (or keep it, when backward
        already asked for it)."""
        with self.cache.lock:
            if entry.state is State.WRITING:
                if entry.wanted:
                    # Backward already asked for it: keep the memory instead of reading it back.
                    self.cache.transition(entry, State.LOADED)
                    entry.prefetched = True
                    return
                self.cache.transition(entry, State.ON_DISK)
                entry.storage = None  # the memory may now go back to its owner

    def _take_location(self, entry: Entry) -> None:
        """Return the entry's location (it keeps its memory instead)."""
        with self.cache.lock:
            if entry.state is State.WRITING:
                self.cache.transition(entry, State.RESIDENT)
            place, extent = entry.place, entry.extent
            entry.place = entry.extent = None
        if extent is not None:
            place.free(extent)

    def _storage_changed(self, entry: Entry) -> None:
        """The storage was resized or moved after it was saved (FSDP frees gathered weights
        with ``resize_(0)`` and refills them before backward): what the drive got cannot be
        trusted, so the location is dropped and the entry keeps the storage, as autograd does
        without hooks — backward then reads whatever the owner put back."""
        self._take_location(entry)
        self.stats.add(writes_skipped=1, storages_changed=1)
        log.debug("ssdoffload: %s was resized or moved before its write; kept in memory", entry.describe())

    def _write_failed(self, entry: Entry, exc: OSError) -> None:
        """Keep the tensor in memory: a failed write must never cost a correct gradient."""
        # Its traceback holds the frames that saw it (the entry, the tensors): whatever keeps
        # the error (a failed file, a warning) must not keep them, collector or not.
        _without_tracebacks(exc)
        if exc.errno == errno.ETIMEDOUT:
            self.timed_out(f"writing {entry.describe()}")
        if entry.extent is not None:
            entry.place.write_failed(entry.extent, exc)
        self._take_location(entry)
        self.stats.add(write_failures=1)
        if not self._warned_write_failure:
            self._warned_write_failure = True
            warnings.warn(
                f"ssdoffload: writing {entry.describe()} failed ({exc}); keeping it in memory. "
                "Further write failures are counted in stats().write_failures.",
                RuntimeWarning, stacklevel=2)
        log.debug("ssdoffload: write of %s failed: %s", entry.describe(), exc)

    def timed_out(self, what: str) -> None:
        """The drive did not answer within ``io_timeout``: counted, and said once."""
        self.stats.add(io_timeouts=1)
        if not self._warned_timeout:
            self._warned_timeout = True
            log.warning("ssdoffload: the drive did not answer within io_timeout=%s s while %s; what "
                        "it holds stays in memory (is the drive frozen or hung?). Further timeouts "
                        "are counted in stats().io_timeouts", self.io_timeout, what)

    def writes_in_flight(self) -> list:
        """The queued writes, oldest first (copied under the lock: asking a direct write
        whether it is done may complete it, which takes the lock again)."""
        with self._pending_lock:
            return list(self._pending_writes)

    def pending_writes(self) -> int:
        """How many queued writes have not finished."""
        return sum(1 for f in self.writes_in_flight() if not f.done())

    def wait_writes(self, timeout: Optional[float] = None) -> bool:
        """Block until every queued write finished (successfully, failed or skipped), at most
        ``timeout`` seconds (``None``: for ever); whether they all did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.poll()
        while True:
            queued = self.writes_in_flight()
            pending = [f for f in queued if not f.done()]
            if len(pending) < len(queued):
                # Done futures leave here too, not only in their callback: an interrupt between
                # the submission and ``add_done_callback`` would otherwise leave one behind.
                finished = set(queued).difference(pending)
                with self._pending_lock:
                    for f in finished:
                        self._pending_writes.pop(f, None)
            if not pending:
                return True
            for fut in pending:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not wait_for(fut, left):
                    return False

    def make_room(self, nbytes: int, budget: int) -> bool:
        """Budget mode's back-pressure (compute thread): wait for writes in flight, oldest
        first, until ``nbytes`` more fit ``budget``; the wait counts as
        ``backpressure_seconds``. False when they still do not fit with no write left.

        The answer is what is resident after the last write was seen done, never a reading
        taken before: looking for the oldest write in flight completes the direct writes the
        engine finished meanwhile (``done()`` runs their completion, which frees their
        memory), and a pool write may finish between a check and that scan. How far the
        engine got while this thread was descheduled must not change the answer (a stale
        False diverted a kept tensor to the drive and counted a budget overrun that never
        happened, on a busy machine only)."""
        if self.stats.resident_now() + nbytes <= budget:
            return True
        self.poll()  # direct writes that finished free their memory once completed
        if self.stats.resident_now() + nbytes <= budget:
            return True
        t0 = time.perf_counter()
        deadline = None if self.io_timeout is None else time.monotonic() + self.io_timeout
        try:
            while self.stats.resident_now() + nbytes > budget:
                oldest = next((f for f in self.writes_in_flight() if not f.done()), None)
                if oldest is None:
                    # Every write is done and its memory returned (a write's completion frees
                    # it before the future is done): this reading is final.
                    return self.stats.resident_now() + nbytes <= budget
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                with _span("ssdoffload.backpressure"):
                    if not wait_for(oldest, left):
                        self.timed_out("back-pressure waited for a write")
                        return False
            return True
        finally:
            self.stats.add(backpressure_seconds=time.perf_counter() - t0)

    # -- reads ---------------------------------------------------------------------------
    def start_load(self, entry: Entry, prefetch: bool) -> bool:
        """Begin reading an ON_DISK entry back; returns False when there is nothing to do.

        A prefetch of an entry still being written marks it ``wanted``: when the write ends
        the memory is kept (it would be read straight back) instead of dropped."""
        with self.cache.lock:
            if entry.state is State.WRITING and prefetch:
                entry.wanted = True
                return False
            if entry.state is not State.ON_DISK:
                return False
            self.cache.transition(entry, State.LOADING)
            entry.prefetched = prefetch
        try:
            dst = reload_buffer(entry.nbytes, entry.device)
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
        try:
            if entry.place.direct(entry.device):
                self._submit_direct_read(entry, dst)
                return True
            fut = entry.place.submit_read(self._read_job, entry, dst, allocated)
        except (OSError, RuntimeError) as exc:  # the engine refused it (closed)
            if entry.read_future is None:
                self._read_failed(entry, exc)
            return True
        except BaseException:
            self._load_not_started(entry)
            raise
        entry.read_future = fut
        return True

    def _load_not_started(self, entry: Entry) -> None:
        """An interrupt came between LOADING and the submission: back to ON_DISK, so the next
        unpack starts the load again instead of waiting for one that never began."""
        with self.cache.lock:
            if entry.state is State.LOADING and entry.read_future is None:
                self.cache.transition(entry, State.ON_DISK)

    def _read_job(self, entry: Entry, dst: torch.Tensor, allocated) -> None:
        place = entry.place
        place.pace_read(entry.nbytes)
        t0 = time.perf_counter()
        try:
            with _span("ssdoffload.read"):
                ready = place.read(dst, entry.extent, entry.device, allocated, entry.checksums)
            self.timeline.add(place.timeline_prefix + "read", t0, time.perf_counter(), entry.nbytes,
                              entry.layer, entry.scope)
        except BaseException as exc:
            self._read_failed(entry, exc)
            return
        self._loaded(entry, dst, ready)

    def _loaded(self, entry: Entry, dst: torch.Tensor, ready) -> None:
        """``dst`` holds the entry's bytes (once ``ready``, on CUDA): it becomes the storage."""
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

    def materialize(self, entry: Entry) -> torch.UntypedStorage:
        """The entry's storage in memory, loading or waiting as needed (compute thread)."""
        fut = entry.write_future
        if fut is not None:
            fut.complete_if_done()  # a direct write that finished: ON_DISK (or LOADED) now
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
            with _span("ssdoffload.stall"):
                if not wait_for(fut, self.io_timeout):
                    self.stats.add(io_timeouts=1)
                    raise SpillReadError(
                        f"ssdoffload: reading {entry.describe()} back from "
                        f"{entry.place.describe(entry.extent) if entry.extent is not None else 'the drive'}"
                        f" got no answer in "
                        f"{time.perf_counter() - t0:.1f} s (OffloadConfig.io_timeout={self.io_timeout}); "
                        "is the drive frozen or hung? The step can be retried once the drive answers")
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
    def _free(self, entry: Entry) -> None:
        """The last handle is gone: return the memory now and, once no I/O uses it, the
        location (whichever of the entry's transfers finishes last returns it)."""
        if self._staged:
            with self._stage_lock:
                self._staged.pop(entry, None)
        with self.cache.lock:
            held = entry.nbytes + entry.overhead if entry.state in HOLDS_MEMORY else 0
            self.cache.transition(entry, State.FREED)
            storage, entry.storage = entry.storage, None
        if storage is not None and entry.ready_event is not None and entry.compute_stream is not None:
            entry.compute_stream.wait_event(entry.ready_event)
        del storage
        if entry.write_future is not None and entry.write_future.cancel():
            self.stats.add(writes_skipped=1)  # freed before its write started
        futures = [f for f in (entry.write_future, entry.read_future, entry.drain_future)
                   if f is not None and not f.done()]
        if not futures:  # the common case: every transfer of the entry has completed
            self._return_location(entry)
            return
        busy = [f for f in futures if f is not entry.drain_future]
        if held and busy:
            # A write still reading the tensor or a read still filling its buffer keeps that
            # memory alive after the entry is gone: it counts until the last of them ends.
            self.stats.resident(held)
            _AfterAll(busy, functools.partial(self.stats.resident, -held))
        _AfterAll(futures, functools.partial(self._return_location, entry))

    def _return_location(self, entry: Entry) -> None:
        # Taken under the lock: a failed write may have returned it already (_take_location).
        with self.cache.lock:
            place, extent = entry.place, entry.extent
            entry.place = entry.extent = None
        if extent is not None:
            place.free(extent)


class _AfterAll:
    """Runs ``action()`` once every future in ``futures`` is done (on the thread that finishes
    the last one; at once if all already are)."""

    def __init__(self, futures: list, action: Callable[[], None]) -> None:
        self._action = action
        self._left = len(futures)
        self._lock = threading.Lock()
        for f in futures:
            f.add_done_callback(self._one_done)

    def _one_done(self, _future=None) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._action()
