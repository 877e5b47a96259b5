"""How transfers to the drive are paced and timed: a token-bucket rate limiter (the
``max_write_bandwidth`` / ``max_read_bandwidth`` caps) and a busy clock (the wall time during
which at least one transfer of a kind was in flight, from which bandwidth is measured).

Threads: both are called from the I/O threads; each guards its state with its own lock and
never sleeps while holding it.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, List, Optional


class BusyClock:
    """Wall time during which at least one transfer of a kind was in flight.

    Summing per-transfer durations would count parallel transfers twice and understate the
    bandwidth; this counts the union of the intervals.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inflight = 0
        self._since = 0.0
        self._recorded_until = 0.0

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

    def record(self, start: float, end: float) -> float:
        """A transfer that ran from ``start`` to ``end`` (``time.perf_counter`` seconds, timed
        by the native engine itself); returns the busy seconds it adds. Such transfers are
        recorded in about the order they ran: the part before the end of the last one
        recorded is not counted again."""
        with self._lock:
            begin = max(start, self._recorded_until)
            self._recorded_until = max(self._recorded_until, end)
            return max(0.0, end - begin)


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
