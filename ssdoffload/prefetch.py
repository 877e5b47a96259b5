"""Reading activations back ahead of backward.

Backward visits a micro-batch's groups (layers) in reverse forward order. When it reaches
group ``g`` (a layer-output gradient hook fired, or a tensor of ``g`` was unpacked), the
prefetcher starts loading ``g`` and the ``depth`` non-empty groups below it. A pipeline
schedule that knows which micro-batch's backward comes next calls ``prefetch_scope`` so the
first groups of that backward are already in flight when it starts.

``depth == 0`` disables prefetching: every tensor is read when autograd asks for it.

``window`` (set by the adaptive plan) replaces the count by a distance: reaching group ``g``
loads the groups in ``[g - window, g]``. With the last layers kept on the device, a count would
pull the offloaded groups back as soon as backward starts, long before they are needed.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, Optional

from .cache import OffloadCache
from .transfers import Transfers


class Prefetcher:
    def __init__(self, cache: OffloadCache, transfers: Transfers, depth: int) -> None:
        self.cache = cache
        self.transfers = transfers
        self.depth = depth
        self.window: Optional[int] = None
        self._lowest_started: Dict[Any, int] = {}  # scope -> lowest group already requested
        self._lock = threading.Lock()

    def on_backward_reached(self, scope: Any, group: int) -> int:
        """Backward of ``scope`` is at ``group``: load it and ``depth`` groups below.

        Returns the number of loads started.
        """
        if self.depth <= 0:
            return 0
        groups = [g for g in self.cache.groups_of(scope) if g <= group]
        window = self.window
        wanted = groups[-(self.depth + 1):] if window is None else [g for g in groups if g >= group - window]
        if not wanted:
            return 0
        with self._lock:
            lowest = self._lowest_started.get(scope)
            if lowest is not None and wanted[0] >= lowest:
                return 0
            self._lowest_started[scope] = wanted[0]
        return self._load(scope, wanted if lowest is None else [g for g in wanted if g < lowest])

    def is_requested(self, entry) -> bool:
        """Whether backward already asked for ``entry``'s group (its write just finished)."""
        if self.depth <= 0:
            return False
        with self._lock:
            lowest = self._lowest_started.get(entry.scope)
        return lowest is not None and entry.group >= lowest

    def prefetch_scope(self, scope: Any) -> int:
        """``scope``'s backward comes next: load its last ``depth`` groups now."""
        if self.depth <= 0:
            return 0
        groups = self.cache.groups_of(scope)
        if not groups:
            return 0
        return self.on_backward_reached(scope, groups[-1])

    def forward_resumed(self, scope: Any) -> None:
        """A forward saves tensors in ``scope`` again after a backward in it (gradient
        accumulation inside one step): forget how far that backward got, or every new write
        would look requested and stay in memory."""
        if scope in self._lowest_started:  # the common case (no backward yet) takes no lock
            self.forget(scope)

    def forget(self, scope: Any) -> None:
        with self._lock:
            self._lowest_started.pop(scope, None)

    def _load(self, scope: Any, groups) -> int:
        started = 0
        # Highest group first: backward needs it first.
        for g in sorted(groups, reverse=True):
            for entry in self.cache.entries(scope, g):
                started += self.transfers.start_load(entry, prefetch=True)
        return started
