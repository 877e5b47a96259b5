"""Which place each forward group's offloadable tensors go to, and how far ahead backward
reads: the plan in force, asked by the hooks (``place_for``) and the prefetcher
(``readahead``).

With ``policy="adaptive"`` the plan is the ``AdaptivePolicy``'s (measured, or pinned by
``Offloader.set_plan``), which owns it; otherwise every group goes to host RAM when there is a
host tier (overflowing to the drive) and to the drive when not, read ahead by the configured
``prefetch_depth``.
"""
from __future__ import annotations

from typing import Optional

from .adaptive import AdaptivePolicy
from .budget import SAVED_PLACE
from .places import Place, Places
from .readahead import Readahead


class Placement:
    """``memory_budget`` (budget mode, else None): the bytes of offloadable activations a
    step may hold, which the hooks (back-pressure) and the prefetcher (read-ahead) honour."""

    def __init__(self, places: Places, adaptive: Optional[AdaptivePolicy], prefetch_depth: int,
                 memory_budget: Optional[int] = None) -> None:
        self.places = places
        self.adaptive = adaptive
        self.prefetch_depth = prefetch_depth
        self.memory_budget = memory_budget
        self._default = places.ram if places.ram is not None else places.drive

    def place_for(self, group: int) -> Place:
        """Where an offloadable tensor saved in forward group ``group`` goes (for a recomputed
        layer: where its input goes, the only tensor it saves)."""
        if self.adaptive is not None:
            word = self.adaptive.placement(group)
            return self.places[SAVED_PLACE.get(word, word)]
        return self._default

    def readahead(self) -> Readahead:
        """The configured count, or the plan's window once there is a plan."""
        plan = self.adaptive.plan if self.adaptive is not None else None
        if plan is not None and plan.prefetch_depth > 0:
            return Readahead(self.prefetch_depth, window=plan.prefetch_depth)
        return Readahead(self.prefetch_depth)
