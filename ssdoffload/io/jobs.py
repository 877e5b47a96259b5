"""The I/O threads' job queue and its one future type, safe against Ctrl-C.

Why not ``concurrent.futures``: its ``Future`` guards its state with a ``threading.Condition``
that the compute thread takes in Python code (``done()``, ``cancel()``, ``result()``,
``add_done_callback``). A KeyboardInterrupt landing between the lock's acquisition and the
``with`` block's cleanup leaves the lock held for good; the I/O thread that later finishes
that future blocks on it forever, and the process cannot exit (seen in CI with real SIGINTs).

The rules here, so that no interrupt of the compute thread can stop an I/O thread:

* An I/O thread never waits on a lock the compute thread may hold. The compute thread only
  ever takes ``_claim`` without blocking (and never gives it back), and waits on
  ``_finished``, which the I/O thread releases once and never takes again.
* Every future is finished by an I/O thread, cancelled ones included (when the queue reaches
  them), so each wait ends. ``_done`` is set before ``_finished`` is released: a waiter that
  was interrupted while holding ``_finished`` leaves nothing to block on.
* Callbacks are popped from a list (atomic under the GIL), so each runs once: on the I/O
  thread that finished the future, or on the thread adding it once the future is done.

The same type also stands for a request of the native engine that no thread of ours runs
(``IOFuture.of_request``: the C++ workers do the I/O, submitted straight from the compute
thread). Its ``fn`` is then the completion (``finish(request)``: checks, state changes), run
once by whoever first sees the request finished — a waiter (``result``, ``exception``) or a
poll (``complete_if_done``) — under the same ``_claim`` rule; a Ctrl-C that lands after
that thread claimed it and before it finished leaves the claim held by that thread, which then
finishes it at its next look instead of waiting for itself (``_resume``: a training loop hung
for ever at the next step after 1 interrupt in ~15 runs of 20 under a CPU hog). Such a future cannot be
cancelled (the request is queued in C++ already); ``done()`` completes it when the request has
finished, so *done* always means completed.
"""
from __future__ import annotations

import _thread
import logging
import queue
import threading
from concurrent.futures import CancelledError
from typing import Any, Callable, List, Optional

from .. import chaos
from .threads import is_thread_start_failure, resource_limit_error

log = logging.getLogger("ssdoffload")

__all__ = ["CancelledError", "IOFuture", "JobPool"]


#: ``IOFuture._result`` before the job gave one (a job may return None).
_NO_OUTCOME = object()


class IOFuture:
    """The outcome of one job on a ``JobPool`` (the subset of ``concurrent.futures.Future``
    the offloader uses: ``done``, ``cancel``, ``result``, ``exception``,
    ``add_done_callback``)."""

    __slots__ = ("_fn", "_args", "_claim", "_finished", "_done", "_cancelled", "_result",
                 "_exc", "_callbacks", "_request", "__weakref__")

    def __init__(self, fn: Callable[..., Any], args: tuple, request: Any = None) -> None:
        self._request = request  # a native engine request (``of_request``), or None: a pool job
        self._fn: Optional[Callable[..., Any]] = fn
        self._args: Optional[tuple] = args
        # Taken once: by cancel(), or by whoever runs the job. An RLock so that a thread can
        # ask whether it holds it (``_is_owned``): an interrupt can land between the claim and
        # the end of the run, and that thread must then finish the job, not wait for itself.
        self._claim = _thread.RLock()
        self._finished = _thread.allocate_lock()  # held until the job is finished
        self._finished.acquire()
        self._done = False
        self._cancelled = False
        self._result: Any = _NO_OUTCOME
        self._exc: Optional[BaseException] = None
        self._callbacks: List[Callable[["IOFuture"], None]] = []

    @classmethod
    def of_request(cls, request: Any, finish: Callable[[Any], Any]) -> "IOFuture":
        """The future of a native engine ``request``; ``finish(request)`` completes it (its
        return value is the result; what it raises, the exception)."""
        return cls(finish, (request,), request)

    # -- the I/O thread (a pool job) or the completing thread (a native request) -----------
    def _run(self) -> None:
        if chaos.ON: chaos.pause()  # SSDOFFLOAD_CHAOS: the job runs late
        if self._claim.acquire(False):
            self._execute()
        else:
            self._cancelled = True
            self._exc = CancelledError()
            self._finish()

    def _execute(self) -> None:
        """(Holding ``_claim``.) Run ``fn``, then finish."""
        fn, args = self._fn, self._args
        self._fn = None  # from here on ``fn`` counts as started (see ``_resume``)
        try:
            self._result = fn(*args)
        except BaseException as exc:  # handed to whoever asks for the result
            self._exc = exc
        self._finish()

    def _finish(self) -> None:
        self._fn = self._args = None  # the job's arguments (storages) are not kept alive
        self._request = None
        if not self._done:
            self._done = True
            self._finished.release()
        self._run_callbacks()

    def _resume(self) -> None:
        """(This thread holds ``_claim`` and the job is not done: an interrupt landed between
        its claim and its end.) Run ``fn`` if it never started; else finish, failed if ``fn``
        gave no outcome. Waiting instead would wait for ourselves, for ever."""
        if self._fn is not None:
            self._execute()
            return
        if self._exc is None and self._result is _NO_OUTCOME:
            self._exc = RuntimeError("ssdoffload: interrupted while completing this transfer")
        self._finish()

    # -- a native request ------------------------------------------------------------------
    def complete_if_done(self) -> bool:
        """Non-blocking: complete a native request that has finished; True when this future
        is done (completed) now. A pool job is done when its thread finished it."""
        if self._done:
            return True
        request = self._request
        if request is None:
            return False
        try:
            if not request.done():
                return False
        except RuntimeError:  # submitted by the parent of this forked process: never completes here
            return False
        self._complete()
        return self._done

    def _complete(self) -> None:
        """The request finished: run the completion once (another thread may be running it:
        then wait for that one). A KeyboardInterrupt that lands in the completion reaches the
        caller (this is the compute thread, not an I/O thread); the future still finishes,
        failed, so nothing waits for it forever."""
        if chaos.ON: chaos.pause()  # SSDOFFLOAD_CHAOS: late (before the claim: an interrupt here leaves it unclaimed)
        if self._done:
            return
        if self._claim._is_owned():  # ours already, not done: we were interrupted in it
            self._resume()
        elif self._claim.acquire(False):
            self._execute()
        elif not self._done:
            self._finished.acquire()
            self._finished.release()
            return
        exc = self._exc
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            self._exc = RuntimeError("ssdoffload: interrupted while completing this transfer")
            raise exc

    def _run_callbacks(self) -> None:
        while True:
            try:
                callback = self._callbacks.pop(0)
            except IndexError:
                return
            try:
                callback(self)
            except Exception:  # one callback's bug must not stop the others or the thread
                log.exception("ssdoffload: an I/O completion callback failed")

    # -- any thread ----------------------------------------------------------------------
    def done(self) -> bool:
        """Whether the future is done; a native request that finished is completed here
        first (so do not call this holding a lock its completion takes)."""
        return self._done or self.complete_if_done()

    def cancelled(self) -> bool:
        return self._done and self._cancelled

    def cancel(self) -> bool:
        """Stop the job if it has not started; True when it will not run. The future is
        finished (and its callbacks run) by the I/O thread when the queue reaches it. A native
        request is queued in the engine already: never cancelled."""
        if self._request is not None or self._claim._is_owned():  # (a second cancel: False)
            return False
        return self._claim.acquire(False)

    def _wait(self, timeout: Optional[float]) -> bool:
        if self._done:
            return True
        request = self._request
        if request is not None:
            # GIL released while waiting; KeyboardInterrupt comes through (checked every 100 ms).
            if request.wait(timeout):
                self._complete()
            return self._done
        if self._finished.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
            self._finished.release()
        return self._done

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """Wait for the job; its exception (None if it succeeded). Raises ``CancelledError``
        for a cancelled job and ``TimeoutError`` when ``timeout`` passes first."""
        if not self._wait(timeout):
            raise TimeoutError("the I/O job did not finish in time")
        if self._cancelled:
            raise CancelledError()
        return self._exc

    def result(self, timeout: Optional[float] = None) -> Any:
        exc = self.exception(timeout)
        if exc is not None:
            raise exc
        return self._result

    def add_done_callback(self, callback: Callable[["IOFuture"], None]) -> None:
        self._callbacks.append(callback)
        if self._done:
            self._run_callbacks()


_STOP = object()


class JobPool:
    """``workers`` threads, all started here, taking jobs from one FIFO queue.

    A thread the system refuses stops the ones already started and raises
    ``ResourceLimitError`` naming ``part``. ``shutdown`` runs what is queued, then stops.
    """

    def __init__(self, workers: int, name: str, part: str) -> None:
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()  # put() takes no Python lock
        self._threads: List[threading.Thread] = []
        try:
            for i in range(workers):
                t = threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
                t.start()
                self._threads.append(t)
        except BaseException as exc:
            self.shutdown()
            if is_thread_start_failure(exc):
                log.debug("ssdoffload: starting %s failed", part, exc_info=True)
                raise resource_limit_error(part, exc) from exc
            raise

    def submit(self, fn: Callable[..., Any], *args: Any) -> IOFuture:
        if chaos.ON: chaos.pause()  # SSDOFFLOAD_CHAOS: the submission comes late
        fut = IOFuture(fn, args)
        self._queue.put(fut)
        return fut

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            job._run()
            del job

    def shutdown(self) -> None:
        """Run every queued job, then stop the threads (waits for them)."""
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()
        self._threads = []
