"""The read-ahead rule, the prefetcher that applies it and the simulator that predicts with it.

``Prefetcher`` (run time) and ``adaptive.simulate`` (planning) must agree on when each group
is requested, or the plan is made for a prefetcher that does not exist. Both use
``readahead.py``; these tests drive the real ``Prefetcher`` over a real cache and real
``Transfers`` (entries still being written: a request marks them ``wanted``, no I/O needed) and
compare what it requested, event by event, with ``request_point``.
"""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssdoffload.adaptive import DEVICE, SSD, GroupTiming, simulate
from ssdoffload.cache import Entry, OffloadCache, State
from ssdoffload.prefetch import Prefetcher
from ssdoffload.readahead import Readahead, groups_to_load, request_point
from ssdoffload.stats import StatsCollector
from ssdoffload.transfers import Transfers


class _Plan:
    """The part of ``placement.Placement`` the prefetcher asks: the read-ahead in force."""

    memory_budget = None

    def __init__(self, readahead: Readahead) -> None:
        self._readahead = readahead

    def readahead(self) -> Readahead:
        return self._readahead


def _writing_entries(cache: OffloadCache, scope, groups):
    entries = {}
    for g in groups:
        e = Entry(scope=scope, group=g, layer=None, nbytes=4096, device=torch.device("cpu"), label=f"g{g}")
        cache.add(("test", g), e)
        cache.transition(e, State.WRITING)
        entries[g] = e
    return entries


def _requested_at(present, fires, readahead):
    """Run backward from the top over the firing groups; the group at which each present
    group was first requested by the real Prefetcher."""
    stats = StatsCollector()
    cache = OffloadCache(stats)
    prefetcher = Prefetcher(cache, Transfers(cache, stats), _Plan(readahead))
    entries = _writing_entries(cache, "mb", present)
    n = len(fires)
    requested = {}
    for g in range(n - 1, -1, -1):
        if g == n - 1 or fires[g] or g in entries:
            prefetcher.backward_reached("mb", g)
        for i, e in entries.items():
            if e.wanted and i not in requested:
                requested[i] = g
        if g in entries:
            requested.setdefault(g, g)  # its own unpack reads it at the latest
    return requested


@st.composite
def _instances(draw):
    n = draw(st.integers(1, 24))
    present = sorted(draw(st.sets(st.integers(0, n - 1), max_size=n)))
    fires = [draw(st.booleans()) or g in present for g in range(n)]
    depth = draw(st.integers(0, 4))
    window = draw(st.one_of(st.none(), st.integers(0, 8)))
    return n, present, fires, Readahead(depth, window)


@settings(max_examples=300, deadline=None)
@given(_instances())
def test_prefetcher_requests_each_group_where_the_rule_says(case):
    n, present, fires, readahead = case
    got = _requested_at(present, fires, readahead)
    expected = {i: request_point(i, present, fires, readahead) for i in present}
    assert got == expected


def test_the_simulator_requests_reads_where_the_rule_says():
    """One offloaded group among kept ones, a read that takes 5 s, groups of 1 s: backward
    stalls by exactly 5 s minus the time between the read's request point and the group, so
    the stall shows where simulate requested the read."""
    n, i, nbytes = 12, 2, 5 << 20
    groups = [GroupTiming(nbytes=nbytes, forward_seconds=1.0, backward_seconds=1.0, name=str(g)) for g in range(n)]
    placement = [SSD if g == i else DEVICE for g in range(n)]
    fires = [True] * n
    for readahead in (Readahead(1), Readahead(1, window=0), Readahead(1, window=2), Readahead(1, window=4),
                      Readahead(1, window=7), Readahead(0)):
        point = request_point(i, [i], fires, readahead)
        pred = simulate(groups, placement, write_bps=1e15, read_bps=nbytes / 5.0, depth=readahead.depth,
                        window=readahead.window)
        assert abs(pred.stall_seconds - max(0.0, 5.0 - (point - i))) < 1e-9, (readahead, point)


def test_groups_to_load_by_count_and_by_window():
    present = [1, 3, 5, 7, 9]
    assert groups_to_load(present, 9, Readahead(1)) == [7, 9]
    assert groups_to_load(present, 8, Readahead(2)) == [3, 5, 7]
    assert groups_to_load(present, 8, Readahead(2, window=3)) == [5, 7]
    assert groups_to_load(present, 0, Readahead(2)) == []
    assert groups_to_load(present, 9, Readahead(0)) == []  # read-ahead off


def test_a_request_is_made_once_per_group():
    stats = StatsCollector()
    cache = OffloadCache(stats)
    loads = []

    class CountingTransfers(Transfers):
        def start_load(self, entry, prefetch):
            loads.append(entry.group)
            return super().start_load(entry, prefetch)

    prefetcher = Prefetcher(cache, CountingTransfers(cache, stats), _Plan(Readahead(2)))
    _writing_entries(cache, "mb", [0, 2, 4, 6])
    for g in (6, 6, 5, 4, 4, 3, 2, 1, 0):
        prefetcher.backward_reached("mb", g)
    assert sorted(loads) == [0, 2, 4, 6]
    prefetcher.forget("mb")  # a new forward in the scope: the next backward reads again
    prefetcher.backward_reached("mb", 6)
    assert sorted(loads) == [0, 2, 2, 4, 4, 6, 6]


def test_nothing_is_requested_once_closed():
    stats = StatsCollector()
    cache = OffloadCache(stats)
    transfers = Transfers(cache, stats)
    prefetcher = Prefetcher(cache, transfers, _Plan(Readahead(4)))
    entries = _writing_entries(cache, "mb", [0, 1])
    transfers.closed = True
    assert prefetcher.backward_reached("mb", 1) == 0
    assert not any(e.wanted for e in entries.values())
