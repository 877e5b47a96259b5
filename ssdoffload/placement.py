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
from .budget import SAVED_PLACE, recomputes
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
        self._readahead: Optional[tuple] = None  # (the plan it was made for, Readahead)

    def place_for(self, group: int) -> Place:
        """Where an offloadable tensor saved in forward group ``group`` goes (for a recomputed
        layer: where its input goes, the only tensor it saves)."""
        if self.adaptive is not None:
            word = self.adaptive.placement(group)
            return self.places[SAVED_PLACE.get(word, word)]
        return self._default

    def recompute_bytes(self, group: int) -> int:
        """For a group the plan recomputes: the activations its recomputation makes (measured
        when it was not recomputed), else 0."""
        plan = self.adaptive.plan if self.adaptive is not None else None
        if plan is None or not 0 <= group < len(plan.placement) or not recomputes(plan.placement[group]):
            return 0
        return plan.group_bytes[group] if group < len(plan.group_bytes) else 0

    def user_recompute_bytes(self, group: int) -> int:
        """For a layer the user's own checkpointing recomputes: what its recomputation was
        measured to save (0: none, or not measured yet)."""
        return self.adaptive.user_recompute_bytes(group) if self.adaptive is not None else 0

    def recompute_reserve(self) -> int:
        """Room read-ahead must leave free: the largest recomputation the plan will run."""
        plan = self.adaptive.plan if self.adaptive is not None else None
        if plan is None:
            return 0
        return max((max(self.recompute_bytes(g), self.user_recompute_bytes(g))
                    for g in range(len(plan.placement))), default=0)

    def readahead(self) -> Readahead:
        """The configured count, or the plan's window once there is a plan (asked at every
        unpack: made once per plan)."""
        plan = self.adaptive.plan if self.adaptive is not None else None
        cached = self._readahead
        if cached is not None and cached[0] is plan:
            return cached[1]
        if plan is not None and plan.prefetch_depth > 0:
            value = Readahead(self.prefetch_depth, window=plan.prefetch_depth)
        else:
            value = Readahead(self.prefetch_depth)
        self._readahead = (plan, value)
        return value
