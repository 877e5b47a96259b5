"""Chaos mode: random delays in the I/O path, to show that nothing correct depends on timing.

Set ``SSDOFFLOAD_CHAOS=<seed>`` (a non-negative integer; unset or empty: off) before the
process imports ssdoffload. It is read once, here (and once by the native engine when
``ssdoffload.io._native`` is imported), and then:

* every point that calls ``pause()`` sleeps a random 0-2 ms: the submission of a request
  (``JobPool.submit``, the native backend's ``submit_write`` / ``submit_read``), the harvest of
  completions (``Transfers.poll``; ``IOFuture._run`` and ``_complete``, which every I/O thread,
  wait and poll goes through, before the future is claimed: an interrupt there leaves it to the
  next waiter) and every change of an entry's state (``OffloadCache.transition``);
* the native engine sleeps at each submission, chunk start and request completion, and hands
  queued chunks to its workers in random order instead of FIFO, so requests finish out of order
  (``csrc/native_engine.cpp``);
* the cyclic garbage collector runs often (``gc.set_threshold(50, 5, 5)``), so finalisers and
  weakref callbacks fire at arbitrary points of the hooks, as they do in a big program.

Why: the rules in DESIGN.md say the same program gives the same gradients and the same budget
outcome on an idle machine, under load, and with random delays at every completion. A quiet
test run explores one interleaving; chaos mode makes each run explore others (reproducibly
as far as the OS's scheduling allows: the random numbers come from the seed and a per-thread
index, so a failing seed is worth reporting).

Cost when off: the call sites read ``if chaos.ON: chaos.pause()`` — one module attribute load
and a branch on a constant ``False`` per site; ``pause`` is never called.
"""
from __future__ import annotations

import gc
import itertools
import logging
import os
import random
import threading
import time
from typing import Optional

log = logging.getLogger("ssdoffload")

__all__ = ["ON", "SEED", "pause", "parse_seed"]

#: The longest random pause, in seconds.
MAX_PAUSE = 0.002


def parse_seed(value: Optional[str]) -> Optional[int]:
    """The seed that ``SSDOFFLOAD_CHAOS``'s ``value`` names; None for off (unset or empty)."""
    if value is None or value.strip() == "":
        return None
    text = value.strip()
    if not text.isdigit():
        raise ValueError(f"SSDOFFLOAD_CHAOS must be a non-negative integer seed (or unset/empty: off), got {value!r}")
    return int(text)


#: The seed of this process's chaos mode, or None when it is off.
SEED: Optional[int] = parse_seed(os.environ.get("SSDOFFLOAD_CHAOS"))
#: Whether chaos mode is on (constant for the life of the process).
ON: bool = SEED is not None

_local = threading.local()
_thread_index = itertools.count()  # next() is atomic under the GIL


def _rng() -> random.Random:
    rng = getattr(_local, "rng", None)
    if rng is None:
        # Seeded from the seed and this thread's index (the order threads first pause in).
        rng = _local.rng = random.Random((SEED or 0) * 1_000_003 + next(_thread_index))
    return rng


def pause() -> None:
    """Sleep a random 0-2 ms (call only when ``ON``: the call sites test it first)."""
    time.sleep(_rng().random() * MAX_PAUSE)


if ON:
    gc.set_threshold(50, 5, 5)
    log.warning("ssdoffload: chaos mode is on (SSDOFFLOAD_CHAOS=%d): random 0-2 ms delays in the I/O path, "
                "out-of-order completions in the native engine, garbage collection every 50 allocations",
                SEED)
