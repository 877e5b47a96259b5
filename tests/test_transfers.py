"""``Transfers`` on its own: entries moved through their states by real writes and reads to
real spill files (the native engine) and the host-RAM place, built the way ``Offloader``
builds them — no autograd, no hooks.

Host tensors go to the native engine straight from the compute thread (``Place.direct``); the
I/O-thread path (CUDA tensors, bandwidth caps, host RAM) is tested here with host tensors by
building the drive place with ``direct_requests=False``. To make "the write has not started
yet" certain rather than likely, that path's one write thread is first given a job that waits
on an event the test sets.
"""
from __future__ import annotations

import threading

import pytest
import torch

from ssdoffload.cache import Entry, OffloadCache, State
from ssdoffload.host_ram import HostTier
from ssdoffload.io import make_engine
from ssdoffload.places import DrivePlace, HostRamPlace
from ssdoffload.stats import StatsCollector
from ssdoffload.store import SpillStore
from ssdoffload.transfers import Transfers, wait_for
from ssdoffload.views import StorageToken, ViewSpec, storage_key, version_witness

from helpers import offload_config


class Parts:
    """Engine, store, places, cache and transfers, as the Offloader wires them."""

    def __init__(self, path: str, host_bytes: int = 0, direct: bool = False) -> None:
        config = offload_config(path, io_threads=2)  # one write thread, one read thread
        self.stats = StatsCollector()
        self.engine = make_engine(config)
        store = SpillStore(config.resolved_paths(), config.initial_file_bytes)
        self.drive = DrivePlace(store, config.resolved_paths(), config.initial_file_bytes, self.engine,
                                self.stats, verify=True, write_cap=None, read_cap=None, direct_requests=direct)
        self.tier = HostTier(host_bytes, self.stats) if host_bytes else None
        self.ram = HostRamPlace(self.tier, self.engine, self.stats, overflow=self.drive) if host_bytes else None
        self.cache = OffloadCache(self.stats)
        self.transfers = Transfers(self.cache, self.stats)

    def entry(self, tensor: torch.Tensor) -> Entry:
        storage = tensor.untyped_storage()
        e = Entry(scope="mb", group=1, layer=0, nbytes=storage.nbytes(), device=tensor.device,
                  label=ViewSpec.of(tensor).describe(), storage=storage, token=StorageToken(tensor),
                  witness=version_witness(tensor))
        self.cache.add(storage_key(tensor), e)
        return e

    def hold_writes(self) -> threading.Event:
        """Occupy the write thread until the returned event is set."""
        go = threading.Event()
        self.engine.submit_write(go.wait)
        return go

    def step(self, key: str) -> int:
        return getattr(self.stats.snapshot("step"), key)

    def close(self) -> None:
        self.engine.close()
        self.drive.discard()


@pytest.fixture
def parts(tmp_path):
    p = Parts(str(tmp_path / "spill"))
    yield p
    p.close()


@pytest.fixture
def direct(tmp_path):
    p = Parts(str(tmp_path / "spill"), direct=True)
    yield p
    p.close()


@pytest.mark.parametrize("path", ["io threads", "direct"])
def test_round_trip_through_every_state(tmp_path, path):
    parts = Parts(str(tmp_path / "spill"), direct=path == "direct")
    try:
        _round_trip(parts)
    finally:
        parts.close()


def _round_trip(parts):
    t = torch.randn(256, 64)
    expected = t.clone()
    e = parts.entry(t)
    assert parts.step("resident_bytes") == e.nbytes
    handle = parts.transfers.new_handle(e, t)
    parts.transfers.start_write(e, parts.drive)
    assert e.place is parts.drive and e.state in (State.WRITING, State.ON_DISK)
    wait_for(e.write_future)
    assert e.state is State.ON_DISK and e.storage is None
    assert parts.step("resident_bytes") == 0 and parts.step("bytes_written") == e.nbytes
    del t
    storage = parts.transfers.materialize(e)  # not prefetched: read on demand
    assert e.state is State.LOADED and parts.step("bytes_read") == e.nbytes
    # Read straight into a page-aligned buffer (O_DIRECT, no bounce), exactly the entry's size.
    assert storage.data_ptr() % 4096 == 0 and storage.nbytes() == e.nbytes
    assert torch.equal(torch.empty(0).set_(storage, 0, expected.shape, expected.stride()), expected)
    assert parts.drive.store.used > 0
    del handle, storage
    assert parts.cache.releases.drain() == 1
    assert e.state is State.FREED and parts.step("resident_bytes") == 0
    assert parts.drive.store.used == 0  # the extent went back


def test_a_prefetch_during_the_write_keeps_the_memory(parts):
    t = torch.randn(128, 128)
    e = parts.entry(t)
    go = parts.hold_writes()
    parts.transfers.start_write(e, parts.drive)
    assert e.state is State.WRITING
    assert parts.transfers.start_load(e, prefetch=True) is False  # nothing to read yet
    assert e.wanted
    go.set()
    wait_for(e.write_future)
    assert e.state is State.LOADED and e.storage is t.untyped_storage()  # never dropped
    assert parts.step("bytes_read") == 0 and parts.step("resident_bytes") == e.nbytes


def test_an_entry_freed_before_its_write_starts_is_not_written(parts):
    t = torch.randn(64, 64)
    e = parts.entry(t)
    handle = parts.transfers.new_handle(e, t)
    go = parts.hold_writes()
    parts.transfers.start_write(e, parts.drive)
    del handle
    parts.cache.releases.drain()
    assert e.state is State.FREED
    go.set()
    wait_for(e.write_future)
    assert parts.step("bytes_written") == 0 and parts.step("writes_skipped") == 1
    assert parts.drive.store.used == 0 and e.extent is None


def test_a_read_buffer_counts_until_its_read_ends_even_when_the_entry_is_freed(parts):
    """Backward dropped an entry whose read-back is still queued: the entry is gone, but the
    reload buffer (tensor bytes and its alignment page) lives until the read job ends, and
    counts as resident until then (on d069554 it was uncounted: a measured budget overrun)."""
    from ssdoffload.reload_buffers import PAGE

    t = torch.randn(256, 64)
    e = parts.entry(t)
    handle = parts.transfers.new_handle(e, t)
    parts.transfers.start_write(e, parts.drive)
    wait_for(e.write_future)
    parts.transfers.poll()
    del t
    assert e.state is State.ON_DISK and parts.step("resident_bytes") == 0
    stop_reads = threading.Event()
    parts.engine.submit_read(stop_reads.wait)  # the one read thread: busy until set
    try:
        assert parts.transfers.start_load(e, prefetch=True)
        assert parts.step("resident_bytes") == e.nbytes + PAGE  # the buffer and its page
        del handle
        parts.cache.releases.drain()
        assert e.state is State.FREED and not e.read_future.done()
        assert parts.step("resident_bytes") == e.nbytes + PAGE  # still alive, still counted
    finally:
        stop_reads.set()
    wait_for(e.read_future)
    assert parts.step("resident_bytes") == 0 and parts.drive.store.used == 0


def test_a_place_that_cannot_take_it_leaves_the_tensor_in_memory(parts):
    parts.drive.discard()  # the spill files are gone (as after an aborted step)
    t = torch.randn(64, 64)
    e = parts.entry(t)
    with pytest.warns(RuntimeWarning, match="keeping it in memory"):
        parts.transfers.start_write(e, parts.drive)
    assert e.state is State.RESIDENT and e.storage is t.untyped_storage() and e.place is None
    assert parts.step("write_failures") == 1 and parts.step("resident_bytes") == e.nbytes
    assert parts.transfers.materialize(e) is t.untyped_storage()


def test_host_ram_keeps_cpu_tensors_in_place_and_drains_the_oldest_to_the_drive(tmp_path):
    """The RAM stage (64 KiB here) keeps CPU tensors in place; when a tensor does not fit, it
    goes to the drive and the oldest in RAM are drained there too, so the RAM holds the newest
    (what backward reads first) and room is made for the next ones."""
    parts = Parts(str(tmp_path / "spill"), host_bytes=64 << 10)
    try:
        tensors = [torch.randn(4096) for _ in range(3)] + [torch.randn(8192), torch.randn(4096)]
        copies = [t.clone() for t in tensors]
        entries = [parts.entry(t) for t in tensors]
        handles = [parts.transfers.new_handle(e, t) for e, t in zip(entries, tensors)]
        for e in entries[:4]:
            parts.transfers.start_write(e, parts.ram)
        # 3 x 16 KiB in RAM; the 32 KiB one did not fit: it and the two oldest go to the drive.
        assert [e.place for e in entries[:4]] == [parts.drive, parts.drive, parts.ram, parts.drive]
        assert entries[2].state is State.RESIDENT  # a CPU tensor: no copy
        parts.transfers.wait_writes()
        assert parts.tier.used == 16 << 10 and parts.step("host_tier_bytes") == 16 << 10
        assert parts.step("host_bytes_drained") == 32 << 10
        parts.transfers.start_write(entries[4], parts.ram)  # the drained room is free again
        assert entries[4].place is parts.ram and parts.tier.used == 32 << 10
        assert parts.tier.peak <= 64 << 10
        for e in (entries[0], entries[1], entries[3]):
            assert e.state is State.ON_DISK and e.storage is None
        del tensors
        for e, expected in zip(entries, copies):  # every one comes back right, wherever it is
            storage = parts.transfers.materialize(e)
            assert torch.equal(torch.empty(0).set_(storage, 0, expected.shape, (1,)), expected)
        del handles, storage
        parts.cache.releases.drain()
        assert parts.tier.used == 0 and parts.step("host_tier_bytes") == 0
        assert parts.drive.store.used == 0
    finally:
        parts.close()


# -- direct requests: the engine's queue, no thread of ours ------------------------------------
def test_direct_requests_do_not_wait_for_the_io_threads(direct):
    """With the I/O threads' write and read queues both occupied, a host tensor is still
    written and read back: its requests went to the engine from this thread, and complete on
    the thread that sees them done (here, the waits). The engine timed them itself."""
    t = torch.randn(512, 64)
    expected = t.clone()
    e = direct.entry(t)
    handle = direct.transfers.new_handle(e, t)
    go = direct.hold_writes()
    stop_reads = threading.Event()
    direct.engine.submit_read(stop_reads.wait)
    try:
        direct.transfers.start_write(e, direct.drive)
        wait_for(e.write_future)
        assert e.state is State.ON_DISK and e.storage is None and e.checksums  # verify: per chunk
        del t
        storage = direct.transfers.materialize(e)
        assert torch.equal(torch.empty(0).set_(storage, 0, expected.shape, expected.stride()), expected)
        assert direct.step("bytes_written") == direct.step("bytes_read") == e.nbytes
        assert direct.step("write_seconds") > 0 and direct.step("read_seconds") > 0
    finally:
        go.set()
        stop_reads.set()
    del handle, storage
    direct.cache.releases.drain()
    assert direct.drive.store.used == 0


def test_finished_direct_writes_complete_at_the_next_poll(direct):
    """Nobody waits on a write: the hooks' poll completes it (memory dropped, ON_DISK)."""
    t = torch.randn(256, 64)
    e = direct.entry(t)
    handle = direct.transfers.new_handle(e, t)
    direct.transfers.start_write(e, direct.drive)
    request = e.write_future._request
    assert request is not None
    assert request.wait(30)  # the engine finished it; nothing of ours ran yet
    assert e.state is State.WRITING and direct.step("resident_bytes") == e.nbytes
    direct.transfers.poll()
    assert e.state is State.ON_DISK and e.storage is None and direct.step("resident_bytes") == 0
    del handle


def test_an_entry_freed_during_its_direct_write_returns_its_extent_when_it_completes(direct):
    """A direct write cannot be cancelled: the entry is freed at once (no longer resident),
    the memory is held for the engine and the extent goes back when the write completed."""
    t = torch.randn(256, 64)
    e = direct.entry(t)
    handle = direct.transfers.new_handle(e, t)
    direct.transfers.start_write(e, direct.drive)
    del handle, t
    direct.cache.releases.drain()
    assert e.state is State.FREED
    # The engine may still read the tensor: its bytes count until the write is seen done.
    assert direct.step("resident_bytes") in (0, e.nbytes)
    wait_for(e.write_future)
    assert e.extent is None and direct.drive.store.used == 0 and direct.step("resident_bytes") == 0


def test_a_corrupted_extent_fails_the_direct_read_with_an_integrity_error(direct):
    """The engine checks each chunk it reads against the CRC-32C it took when writing."""
    import os

    from ssdoffload.errors import IntegrityError, SpillReadError

    t = torch.randn(256, 64)
    e = direct.entry(t)
    handle = direct.transfers.new_handle(e, t)
    direct.transfers.start_write(e, direct.drive)
    wait_for(e.write_future)
    fd = os.open(e.extent.file.path, os.O_RDWR)
    try:
        os.pwrite(fd, b"\xff\x00\xff\x00", e.extent.offset + 100)
    finally:
        os.close(fd)
    del t
    with pytest.raises(SpillReadError) as info:
        direct.transfers.materialize(e)
    assert isinstance(info.value.__cause__, IntegrityError)
    assert info.value.__cause__.offset == e.extent.offset
    del handle


@pytest.mark.parametrize("kind", ["write", "read"])
def test_an_interrupt_before_a_direct_requests_future_exists_waits_for_the_engine(direct, monkeypatch, kind):
    """Between the engine taking a request and its future being kept, only the submitting
    frame holds the memory (a reload buffer, the tensor) and the extent the engine uses: a
    KeyboardInterrupt there must not let them go while the engine still works on them. The
    interrupt reaches the caller once the engine is done; the entry stays usable."""
    import ssdoffload.transfers as transfers_mod

    t = torch.randn(512, 256)
    expected = t.clone()
    e = direct.entry(t)
    handle = direct.transfers.new_handle(e, t)
    real = transfers_mod.IOFuture.of_request

    def interrupted(request, finish):
        raise KeyboardInterrupt

    if kind == "write":
        monkeypatch.setattr(transfers_mod.IOFuture, "of_request", staticmethod(interrupted))
        with pytest.raises(KeyboardInterrupt):
            direct.transfers.start_write(e, direct.drive)
        assert direct.engine.backends.native.engine.pending() == 0  # the engine was done first
        assert e.state is State.WRITING and e.write_future is None
        assert torch.equal(torch.empty(0).set_(direct.transfers.materialize(e), 0, expected.shape,
                                               expected.stride()), expected)
    else:
        direct.transfers.start_write(e, direct.drive)
        wait_for(e.write_future)
        del t
        monkeypatch.setattr(transfers_mod.IOFuture, "of_request", staticmethod(interrupted))
        with pytest.raises(KeyboardInterrupt):
            direct.transfers.start_load(e, prefetch=True)
        assert direct.engine.backends.native.engine.pending() == 0
        assert e.state is State.ON_DISK and e.read_future is None  # the next unpack loads it again
        monkeypatch.setattr(transfers_mod.IOFuture, "of_request", real)
        storage = direct.transfers.materialize(e)
        assert torch.equal(torch.empty(0).set_(storage, 0, expected.shape, expected.stride()), expected)
        del storage
    del handle
