"""The extent allocator and the cache state machine, as pure bookkeeping."""
import random

import pytest
import torch

from ssdoffload.allocator import ALIGNMENT, ExtentAllocator
from ssdoffload.cache import Entry, OffloadCache, State
from ssdoffload.stats import StatsCollector
from ssdoffload.errors import StateError
from ssdoffload.views import storage_key


def test_aligned_extents_and_reuse():
    a = ExtentAllocator(16 * ALIGNMENT)
    x = a.allocate(1)
    y = a.allocate(ALIGNMENT + 1)
    assert x == (0, ALIGNMENT) and y == (ALIGNMENT, 2 * ALIGNMENT)
    a.free(*x)
    assert a.allocate(100) == (0, ALIGNMENT)  # first fit reuses the hole


def test_coalescing_returns_to_one_range_and_same_offsets_next_step():
    a = ExtentAllocator(64 * ALIGNMENT)
    rng = random.Random(0)
    sizes = [rng.randint(1, 5 * ALIGNMENT) for _ in range(12)]
    first = [a.allocate(s) for s in sizes]
    order = list(first)
    rng.shuffle(order)
    for ext in order:
        a.free(*ext)
    assert a.free_ranges() == [(0, 64 * ALIGNMENT)] and a.used == 0
    assert [a.allocate(s) for s in sizes] == first


def test_full_then_grow():
    a = ExtentAllocator(2 * ALIGNMENT)
    assert a.allocate(2 * ALIGNMENT) == (0, 2 * ALIGNMENT)
    assert a.allocate(1) is None
    a.grow(4 * ALIGNMENT)
    assert a.allocate(2 * ALIGNMENT) == (2 * ALIGNMENT, 2 * ALIGNMENT)


def test_double_free_is_refused():
    a = ExtentAllocator(4 * ALIGNMENT)
    x = a.allocate(ALIGNMENT)
    a.free(*x)
    with pytest.raises(ValueError, match="double free"):
        a.free(*x)


def _entry():
    return Entry(scope="s", group=0, layer=0, nbytes=10, device=torch.device("cpu"), label="(10,) float32")


def _cache():
    return OffloadCache(StatsCollector())


def test_state_machine_allows_the_documented_path_only():
    cache = _cache()
    e = _entry()
    for s in (State.WRITING, State.ON_DISK, State.LOADING, State.LOADED, State.FREED):
        cache.transition(e, s)
    e = _entry()
    with pytest.raises(StateError, match="illegal transition resident -> loaded"):
        cache.transition(e, State.LOADED)
    cache.transition(e, State.FREED)
    with pytest.raises(StateError):
        cache.transition(e, State.WRITING)
    e = _entry()
    for s in (State.WRITING, State.ON_DISK, State.FAILED, State.FREED):  # discarded unread (abort)
        cache.transition(e, s)


def test_resident_bytes_follow_the_states():
    """The cache's transitions are the only place resident bytes change: an entry counts while
    its state holds memory, whatever path it takes."""
    cache = _cache()
    resident = lambda: cache.stats.snapshot("step").resident_bytes  # noqa: E731
    a, b = _entry(), _entry()
    b.nbytes = 100
    cache.add(("k", 1), a)
    cache.add(("k", 2), b)
    assert resident() == 110
    path_a = [(State.WRITING, 110), (State.ON_DISK, 100), (State.LOADING, 110), (State.LOADED, 110)]
    for state, expected in path_a:
        cache.transition(a, state)
        assert resident() == expected, state
    for state, expected in [(State.WRITING, 110), (State.ON_DISK, 10), (State.FAILED, 10), (State.FREED, 10)]:
        cache.transition(b, state)
        assert resident() == expected, state
    cache.transition(a, State.FREED)
    assert resident() == 0
    assert cache.stats.snapshot("step").peak_resident_bytes == 110


def test_dedup_index_never_matches_a_dead_storage():
    """The allocator may hand a dead tensor's address to a new one: the token must tell."""
    cache = _cache()
    t = torch.randn(1024)
    key = storage_key(t)
    from ssdoffload.views import StorageToken
    e = _entry()
    e.token = StorageToken(t)
    cache.add(key, e)
    assert cache.lookup(key, t[5:], "s") is e
    assert cache.lookup(key, t, "other scope") is None
    t.add_(1)  # a new version is different data
    assert cache.lookup(key, t, "s") is None
    del t
    u = torch.randn(1024)  # may or may not reuse the address; either way no false match
    assert cache.lookup(storage_key(u), u, "s") is None
