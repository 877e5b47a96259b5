"""Reading activations back ahead of backward.

``backward_reached(scope, group)`` is the one path for the event "backward of micro-batch
``scope`` reached ``group``", whoever saw it (a layer's gradient hook, the unpack of a saved
tensor): it tells the profiler, then starts loading the groups the read-ahead rule
(``readahead.groups_to_load``) names for that point, highest first. A pipeline schedule that
knows which micro-batch's backward comes next calls ``prefetch_scope`` so the first groups of
that backward are already in flight when it starts.

How far ahead is the plan's to say: ``placement.readahead()`` (the configured count, or the
adaptive plan's window) is asked at every event, so a re-plan takes effect at once.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, Optional

from .cache import OffloadCache, State
from .profiling import StepProfiler
from .readahead import Readahead, groups_to_load
from .reload_buffers import reload_overhead
from .transfers import Transfers


class Prefetcher:
    def __init__(self, cache: OffloadCache, transfers: Transfers, placement: Any,
                 profiler: Optional[StepProfiler] = None) -> None:
        self.cache = cache
        self.transfers = transfers
        self.placement = placement  # anything with .readahead() -> Readahead (placement.Placement)
        self.profiler = profiler
        self._lowest_started: Dict[Any, int] = {}  # scope -> lowest group already requested
        self._lock = threading.Lock()

    def backward_reached(self, scope: Any, group: int) -> int:
        """Backward of ``scope`` is at ``group``: load what the read-ahead asks for.

        Returns the number of loads started.
        """
        if self.profiler is not None:
            self.profiler.backward(scope)
        return self._read_ahead(scope, group)

    def prefetch_scope(self, scope: Any) -> int:
        """``scope``'s backward comes next: load what reaching its top group will."""
        groups = self.cache.groups_of(scope)
        if not groups:
            return 0
        return self._read_ahead(scope, groups[-1])

    def wants_trigger(self, scope: Any) -> bool:
        """Whether a layer of ``scope`` that just finished its forward needs a backward
        trigger: to time backward (the profiler), or because the scope has offloaded tensors
        at or below it to read ahead (a later layer's are read by later triggers)."""
        return self.profiler is not None or self.cache.has_entries(scope)

    def _read_ahead(self, scope: Any, group: int) -> int:
        if self.transfers.closed or not self.cache.has_entries(scope):
            return 0
        readahead: Readahead = self.placement.readahead()
        if not readahead.enabled:
            return 0
        wanted = groups_to_load(self.cache.groups_of(scope), group, readahead)
        if not wanted:
            return 0
        with self._lock:
            lowest = self._lowest_started.get(scope)
            if lowest is not None and wanted[0] >= lowest:
                return 0
            self._lowest_started[scope] = wanted[0]
        started, deferred = self._load(scope, wanted if lowest is None else [g for g in wanted if g < lowest])
        if deferred is not None:
            with self._lock:  # not all of it was requested: the next event tries again from there
                if self._lowest_started.get(scope) == wanted[0]:
                    self._lowest_started[scope] = deferred + 1
        return started

    def forward_resumed(self, scope: Any) -> None:
        """A forward saves tensors in ``scope`` again after a backward in it (gradient
        accumulation inside one step): forget how far that backward got."""
        if scope in self._lowest_started:  # the common case (no backward yet) takes no lock
            self.forget(scope)

    def forget(self, scope: Any) -> None:
        with self._lock:
            self._lowest_started.pop(scope, None)

    def _load(self, scope: Any, groups) -> "tuple[int, Optional[int]]":
        """Start the loads, highest group first; returns (loads started, the group where the
        budget stopped them, or None)."""
        started = 0
        budget = self.placement.memory_budget
        if budget is not None:  # leave room for the recomputations still to come
            budget -= self.placement.recompute_reserve()
        # Highest group first: backward needs it first.
        for g in sorted(groups, reverse=True):
            for entry in self.cache.entries(scope, g):
                if budget is not None and entry.state is State.ON_DISK and \
                        self.transfers.stats.resident_now() + entry.nbytes + \
                        reload_overhead(entry.nbytes, entry.device) > budget:
                    # Reading ahead would run over the budget: the rest is read when needed.
                    self.transfers.stats.add(prefetches_deferred=1)
                    return started, g
                started += self.transfers.start_load(entry, prefetch=True)
        return started, None
