"""How an Offloader's threads, spill files and memory end, without a finaliser that can block.

An Offloader ends in one of three ways, and all three go through its ``Teardown`` — the parts
that must be ended (engine, transfers, entries, spill files, host tier), which holds no
reference to the ``Offloader`` itself:

1. ``close(timeout)``: entries nobody has started to read fail at once (a backward after
   ``close()`` raises instead of waiting on the drive); a finisher thread waits for the writes
   in flight, stops the engine and removes the files; the caller waits at most ``timeout``.
   A drive that does not answer cannot hold the caller: the finisher completes later.
2. **Dropped without** ``close()``: the ``Offloader`` has no ``__del__``. A weak reference to
   it, whose callback is ``deque.append`` (``releases.ReleaseQueue``: a C function — no Python
   frame, no lock, no thread, no I/O inside the garbage collector), queues its teardown; the
   queue is drained at the library's safe points (building an Offloader, every live
   offloader's safe points, ``close_dropped()``) and at exit, where the teardown starts as with
   ``close(timeout=0)``. A ``__del__`` that started the close itself hung processes: run from the
   collector inside ``threading``'s own lock, or during interpreter shutdown, where a new
   thread never starts and ``Thread.start`` waits for ever.
3. **Exit**: an ``atexit`` hook starts the teardown of every live and every dropped offloader,
   then waits for all of them under one deadline (``EXIT_TIMEOUT``), naming what is left.

A half-built Offloader (its ``__init__`` raised) is never queued: ``__init__`` ends what it
made before it raises (``Teardown.finish`` on the calling thread: nothing is in flight yet).
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from typing import Any, List, Optional

from .cache import State
from .errors import OffloadError
from .releases import ReleaseQueue
from .transfers import wait_for

log = logging.getLogger("ssdoffload")

#: How long the exit hook waits, in all, for the offloaders still open at exit.
EXIT_TIMEOUT = 60.0


class Teardown:
    """Ends one Offloader's parts; each may be ``None`` (a disabled or half-built one)."""

    def __init__(self, engine: Any = None, cache: Any = None, transfers: Any = None,
                 places: Any = None, tier: Any = None) -> None:
        self.engine, self.cache, self.transfers, self.places, self.tier = engine, cache, transfers, places, tier
        self.doing = "not started"  # what the finisher is doing (named when it takes too long)
        self.owner_pid = os.getpid()  # a forked child leaves its parent's threads and files alone
        self._started = False
        self._finisher: Optional[threading.Thread] = None

    # -- the steps ------------------------------------------------------------------------
    def release_dead(self) -> None:
        """Release the entries of handles autograd dropped since the last drain."""
        if self.cache is not None:
            self.cache.releases.drain()
            self.transfers.poll()

    def discard_unread(self, why: str, wait: bool = True) -> None:
        """Entries whose data lives only in the spill files (or is being read) become FAILED:
        a later unpack raises ``OffloadError`` saying ``why`` instead of reading a file that
        is about to go away. ``wait``: let reads in flight finish first (a loaded entry is
        then kept); without it only entries no read has started on are discarded."""
        if self.cache is None:
            return
        discard = (State.ON_DISK, State.LOADING) if wait else (State.ON_DISK,)
        for entry in self.cache.all_entries():
            if wait and entry.read_future is not None:
                wait_for(entry.read_future)
            with self.cache.lock:
                if entry.state in discard:
                    entry.error = OffloadError(f"ssdoffload: {entry.describe()} cannot be used: {why}")
                    self.cache.transition(entry, State.FAILED)

    def in_flight(self) -> list:
        """The futures of every write and read the engine has not finished."""
        if self.cache is None:
            return []
        reads = [e.read_future for e in self.cache.all_entries() if e.read_future is not None]
        return [f for f in self.transfers.writes_in_flight() + reads if not f.done()]

    def finish(self, failed: bool = False) -> None:
        """The part that may wait on the drive (``doing`` says where it is). ``failed``: the
        Offloader's construction failed (the directories it made go too)."""
        try:
            if self.transfers is not None:
                self.doing = "waiting for the writes in flight"
                self.transfers.wait_writes()
                self.discard_unread("the Offloader was closed before backward used it")
            if self.engine is not None:
                self.doing = "stopping the I/O threads"
                self.engine.close()
        finally:
            self.doing = "removing the spill files"
            if self.places is not None:
                self.places.drive.discard(failed=failed)
            if self.tier is not None:
                self.tier.close()
            self.doing = "done"

    # -- bounded close ---------------------------------------------------------------------
    def start(self) -> None:
        """Fail the unread entries, then run ``finish`` on a finisher thread (or here, if the
        process has no thread to spare). Idempotent."""
        if self._started:
            return
        self._started = True
        if os.getpid() != self.owner_pid:
            self.doing = "done"  # not ours to end: the parent's threads and spill files
            return
        if self.transfers is not None:
            self.transfers.closed = True  # a forward still running keeps what it saves from now
            self.release_dead()
            self.discard_unread("the Offloader was closed before backward used it", wait=False)
        try:
            self._finisher = threading.Thread(target=self.finish, name="ssdoffload-close", daemon=True)
            self._finisher.start()
        except RuntimeError:  # no thread to spare (a process limit): finish here, unbounded
            self._finisher = None
            self.finish()

    def join(self, timeout: Optional[float]) -> bool:
        """Wait at most ``timeout`` seconds (``None``: for ever) for the finisher; True when
        everything ended."""
        if self._finisher is not None:
            self._finisher.join(timeout)
            return not self._finisher.is_alive()
        return self.doing == "done"

    def spill_files(self) -> List[str]:
        return self.places.drive.paths() if self.places is not None else []

    def warn_unfinished(self, waited: float) -> None:
        pending = self.transfers.pending_writes() if self.transfers is not None else 0
        log.warning(
            "ssdoffload: close() gave up waiting after %.0f s while %s (%d write(s) still in "
            "flight; spill files %s). Is the drive frozen or hung? This is finished in the "
            "background when the drive answers; a file left after exit is reclaimed by the next "
            "start in its directory", waited, self.doing, pending, ", ".join(self.spill_files()) or "(none)")


# -- offloaders dropped without close(), and exit -------------------------------------------
_dropped = ReleaseQueue()
_live: "weakref.WeakSet[Any]" = weakref.WeakSet()  # open Offloaders (closed at exit)
_started: List[Teardown] = []  # teardowns begun for dropped offloaders (waited for at exit)


def watch(offloader: Any, teardown: Teardown) -> None:
    """``offloader`` is built: end ``teardown`` if it is dropped unclosed, and at exit."""
    _live.add(offloader)
    _dropped.watch(offloader, _start_dropped, teardown)


def forget(offloader: Any) -> None:
    """``offloader`` was closed: the exit hook need not close it."""
    _live.discard(offloader)


def _start_dropped(teardown: Teardown) -> None:
    if not teardown._started:
        log.info("ssdoffload: an Offloader was dropped without close(); closing it now")
        teardown.start()
        _started.append(teardown)
    _started[:] = [t for t in _started if t.doing != "done"]


def close_dropped() -> int:
    """Start ending the offloaders dropped without ``close()`` since the last call (the library
    calls this at its safe points); returns how many were found. Never waits on the drive."""
    return _dropped.drain()


def has_dropped() -> bool:
    return _dropped.pending()


@atexit.register
def _close_at_exit() -> None:
    deadline = time.monotonic() + EXIT_TIMEOUT
    close_dropped()
    live = list(_live)
    for off in live:
        try:
            off.close(timeout=0)
        except Exception as exc:  # keep closing the others
            log.warning("ssdoffload: closing an offloader at exit failed: %s", exc)
    for teardown in [off._teardown for off in live] + _started:
        if teardown.owner_pid != os.getpid():
            continue  # a forked child: the parent's offloaders are the parent's to end
        left = max(0.0, deadline - time.monotonic())
        if not teardown.join(left):
            teardown.warn_unfinished(EXIT_TIMEOUT)
