"""Nothing of ours runs inside the garbage collector (``releases.py``).

A full disk left a reference cycle (exception → traceback → frames holding handles); the cyclic
garbage collector freed it while ``StatsCollector``'s non-reentrant lock was held on the same
thread, and ``Handle.__del__`` → ``OffloadCache.release`` → … → ``StatsCollector.resident``
took that lock again: the step hung forever. It was seen in a natural run (the RLIMIT_FSIZE
test under load). Here it is forced: a handle dies in a cycle that is collected while each of
our locks is held. Run in a child process: a hang must fail the test, not stop the run.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest
import torch

import ssdoffload

_COLLECT_UNDER_LOCK = r"""
import gc, sys, torch, ssdoffload

def offloader(**kw):
    return ssdoffload.Offloader(None, ssdoffload.OffloadConfig(
        path={path!r}, min_offload_bytes=0, policy="all", initial_file_bytes=1 << 20, **kw))

# On the drive, written (the release frees the extent), and in the host tier, which on a CPU
# host keeps the tensor in place (the release returns its memory: stats and tier locks).
disk, tier = offloader(), offloader(host_cache_bytes=64 << 20)
cases = [
    ("spill file", disk, disk._store.files[0]._lock),
    ("pending writes", disk, disk.transfers._pending_lock),
    ("prefetcher", disk, disk.prefetcher._lock),
    ("stats", tier, tier._stats._lock),
    ("host tier", tier, tier.tier._lock),
    ("kept bytes", tier, tier.hooks._kept._lock),
]
gc.disable()
x = torch.randn(64, 64, requires_grad=True)
for name, off, lock in cases:
    with off.step():
        y = (x * 2).sigmoid()      # y is saved: a Handle
        off.wait()
        cycle = [y.grad_fn]
        cycle.append(cycle)        # the graph (and its handle) now lives only in a cycle
        del y
    with lock:                     # the collector runs while our lock is held
        del cycle
        gc.collect()
    off.current_step_stats()       # a safe point: the dead handle is released here
    print(name, "released", off.cache.all_entries() == [])
disk.close()
tier.close()
print("done")
"""


def test_collecting_a_dead_handle_while_our_lock_is_held_does_not_hang(tmp_path):
    script = _COLLECT_UNDER_LOCK.format(path=str(tmp_path / "spill"))
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the step hung: the garbage collector ran our release under our own lock ({exc.stdout!r})")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert lines[-2] == "done", proc.stdout
    assert all(line.endswith("released True") for line in lines[:-2] if line), proc.stdout


def test_dead_handles_are_released_at_the_next_safe_point(tmp_path):
    """The deferred release still frees memory and extents: after backward the step's entries
    are gone as soon as the library runs again (here: ``end_step`` inside ``step()``)."""
    off = ssdoffload.Offloader(None, ssdoffload.OffloadConfig(
        path=str(tmp_path / "spill"), min_offload_bytes=0, policy="all", initial_file_bytes=1 << 20))
    try:
        x = torch.randn(256, 256, requires_grad=True)
        for _ in range(3):
            with off.step():
                loss = (x * 2).sigmoid().tanh().sum()
                off.wait()
                loss.backward()
            assert off.cache.all_entries() == []
            assert off.last_step_stats().resident_bytes == 0
            assert len(off.cache.releases) == 0
        assert off.stats().bytes_written > 0
    finally:
        off.close()
    assert os.listdir(tmp_path / "spill") == []
