"""The read-ahead rule: which offloaded groups backward requests when it reaches a group.

One rule, two users: ``prefetch.Prefetcher`` applies it at run time, ``adaptive.simulate``
predicts with it (``request_point``); ``tests/test_prefetch.py`` checks that both pick the
same groups.

Groups are numbered in forward order (``forward_position``); backward reaches them from the
top down. ``present`` is the sorted list of groups that hold offloaded tensors. The read-ahead
(``Readahead``) has two forms:

* a **count** (``depth``, no ``window``): reaching group ``g`` requests the ``depth + 1``
  highest present groups at or below ``g`` — the configured ``prefetch_depth``;
* a **window** (``window``): reaching ``g`` requests every present group in
  ``[g - window, g]`` — what the adaptive plan sets, so that the kept top layers do not pull
  offloaded groups back long before they are needed.

``depth == 0`` turns read-ahead off: a group is read when one of its tensors is unpacked.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import List, Optional, Sequence


@dataclass(frozen=True)
class Readahead:
    """How far ahead of backward to read (see the module docstring)."""

    depth: int
    window: Optional[int] = None

    @property
    def enabled(self) -> bool:
        return self.depth > 0


def groups_to_load(present: Sequence[int], reached: int, readahead: Readahead) -> List[int]:
    """The present groups that backward reaching ``reached`` requests, lowest first."""
    if not readahead.enabled:
        return []
    below = list(present[:bisect.bisect_right(present, reached)])
    if readahead.window is None:
        return below[-(readahead.depth + 1):]
    return [g for g in below if g >= reached - readahead.window]


def request_point(i: int, present: Sequence[int], fires: Sequence[bool], readahead: Readahead) -> int:
    """The group whose being reached first requests present group ``i``.

    ``fires[g]`` says whether reaching group ``g`` is an event the prefetcher sees (a layer's
    gradient hook, the unpack of one of its tensors); the top group always fires (backward
    starts there, ``Offloader.prefetch``), and so does ``i`` itself (its own unpack). The answer
    is the highest firing ``g >= i`` with ``i in groups_to_load(present, g, readahead)``.
    """
    n = len(fires)
    if not readahead.enabled:
        return i
    if readahead.window is None:
        k = bisect.bisect_left(present, i)
        above = k + readahead.depth + 1
        limit = present[above] - 1 if above < len(present) else n - 1
    else:
        limit = min(i + readahead.window, n - 1)
    g = limit
    while g > i and g != n - 1 and not fires[g]:
        g -= 1
    return g
