"""The pack/unpack pair on its own: what ``pack`` returns for each kind of saved tensor, the
reasons it records, and what ``unpack`` gives back — called directly on an Offloader's real
hooks (real spill files), without autograd in between."""
from __future__ import annotations

import gc

import pytest
import torch

import ssdoffload
from ssdoffload.cache import Handle, State
from ssdoffload.hooks import Kept, Saved
from ssdoffload.policy import Decision

from helpers import offload_config


@pytest.fixture
def off(tmp_path):
    o = ssdoffload.Offloader(None, offload_config(str(tmp_path / "spill"), policy="all", min_offload_bytes=1024))
    yield o
    o.close()


def _reasons(off):
    return off.current_step_stats().kept_by_reason


def test_outside_a_scope_tensors_are_kept_and_counted(off):
    t = torch.randn(64, 64)
    packed = off.hooks.pack(t)
    assert isinstance(packed, Saved) and off.hooks.unpack(packed) is t
    assert _reasons(off)[Decision.NO_SCOPE.value] == [1, t.nbytes]


def test_small_tensors_are_kept_and_checked_for_in_place_changes(off):
    t = torch.randn(8)
    with off.micro_batch("mb"):
        packed = off.hooks.pack(t)
    assert isinstance(packed, Saved) and not isinstance(packed, Kept)
    assert _reasons(off)[Decision.TOO_SMALL.value] == [1, 32]
    t.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        off.hooks.unpack(packed)


def test_an_offloaded_view_comes_back_as_the_same_view(off):
    base = torch.randn(128, 96)
    view = base.t()[3:50]
    expected, stride, offset = view.clone(), view.stride(), view.storage_offset()
    with off.micro_batch("mb"):
        packed = off.hooks.pack(view)
        again = off.hooks.pack(base)  # the same storage at the same version: one entry
    assert isinstance(packed, Handle) and isinstance(again, Handle) and packed.entry is again.entry
    assert off.current_step_stats().dedup_hits == 1 and len(off.cache.all_entries()) == 1
    off.wait()
    assert packed.entry.state is State.ON_DISK
    del base, view
    got = off.hooks.unpack(packed)
    assert torch.equal(got, expected) and got.stride() == stride and got.storage_offset() == offset


def test_an_offloaded_tensor_changed_in_place_raises_like_autograd(off):
    t = torch.randn(64, 64)
    with off.micro_batch("mb"):
        packed = off.hooks.pack(t)
    t.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        off.hooks.unpack(packed)


def test_a_group_the_plan_keeps_is_kept_and_counted_as_resident(tmp_path):
    config = offload_config(str(tmp_path / "spill"), policy="adaptive", min_offload_bytes=1024)
    with ssdoffload.Offloader(None, config) as off:
        off.set_plan(["device"] * 4)
        t = torch.randn(64, 64)
        with off.micro_batch("mb"):
            packed = off.hooks.pack(t)
        assert isinstance(packed, Kept) and off.hooks.unpack(packed) is t
        assert _reasons(off)[Decision.LAYER_KEPT.value] == [1, t.nbytes]
        assert off.current_step_stats().resident_bytes == t.nbytes
        assert off.cache.all_entries() == []
        del packed
        gc.collect()
        off.cache.releases.drain()
        assert off.current_step_stats().resident_bytes == 0
