"""The saved-tensor hooks: with ``recompute_watch`` (which only counts, passing every tensor
on), the only place autograd is touched.

``pack`` runs when autograd saves a tensor for backward. It returns a ``Saved`` wrapper (kept:
parameters, small tensors, ...; see ``policy.py``), a ``Kept`` wrapper (a tensor the plan keeps
on the device: it also tells the profiler when backward reaches it and counts its bytes as
resident while autograd holds it), or a ``Handle`` to an entry whose storage is being written
to the spill store or the host-RAM tier; the graph then holds no reference to the memory.

Autograd does not check saved tensors' versions when saved-tensor hooks are set, so every
wrapper carries the version at pack time and ``unpack`` raises the error autograd would raise
("modified by an inplace operation") when it changed — for kept tensors as for offloaded ones.
Where an offloadable tensor goes is ``placement.place_for(group)``'s answer (a ``places.Place``),
asked after the dedup lookup, so a storage already offloaded is never kept twice; why a tensor
was kept is counted in ``OffloadStats.kept`` by reason.

``unpack`` runs when backward needs the tensor: a kept tensor is returned as is, a handle is
rebuilt as its exact view over the storage, read back (or still in memory). Either way backward
reached the tensor's group, which ``Prefetcher.backward_reached`` hears.
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Optional, Set, Tuple

import torch

from .cache import Entry, Handle, OffloadCache, State
from .config import OffloadConfig
from .errors import OffloadError
from .forks import current_pid
from .forward_position import ForwardPosition, group_name
from .layers import in_backward, is_compiling
from .placement import Placement
from .policy import Decision, classify, saved_nbytes
from .recompute import RecomputedLayers
from .reload_buffers import reload_overhead
from .prefetch import Prefetcher
from .stats import StatsCollector
from .transfers import Transfers
from .views import StorageToken, ViewSpec, rebuild, version_witness


def modified_error(what: str) -> RuntimeError:
    """The error autograd raises for a saved tensor changed in place (same class: RuntimeError)."""
    return RuntimeError(
        f"one of the variables needed for gradient computation ({what}) has been modified by an "
        "inplace operation after it was saved; autograd cannot compute a correct gradient (use "
        "out-of-place ops, or clone before modifying)")


class Saved:
    """A saved tensor kept in memory, with its version at pack time."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor, version: int) -> None:
        self.tensor = tensor
        self.version = version

    def get(self) -> torch.Tensor:
        tensor = self.tensor
        if tensor._version != self.version:
            raise modified_error(f"{tuple(tensor.shape)} {str(tensor.dtype).replace('torch.', '')}, "
                                 f"at version {tensor._version}, saved at version {self.version}")
        return tensor


def keep(tensor: torch.Tensor) -> Any:
    """What ``pack`` returns for a tensor kept as it is."""
    try:
        return Saved(tensor, tensor._version)
    except RuntimeError:  # no version counter to check (inference tensors cannot be saved anyway)
        return tensor


class Kept(Saved):
    """A saved tensor the plan keeps on the device. Unpacking it reports backward progress
    (``Prefetcher.backward_reached``); its bytes count as resident (``OffloadStats.resident_bytes``) from the pack
    until autograd drops the last ``Kept`` of that storage (released at the next drain of the
    cache's ``ReleaseQueue``: no finaliser), so ``peak_resident_bytes`` is the true peak of
    offloadable activation memory under any plan."""

    __slots__ = ("scope", "group", "__weakref__")

    def __init__(self, tensor: torch.Tensor, scope: Any, group: int) -> None:
        super().__init__(tensor, tensor._version)
        self.scope = scope
        self.group = group


class _KeptBytes:
    """Storages held by ``Kept`` objects (each counted once), feeding ``StatsCollector.resident``."""

    def __init__(self, stats: StatsCollector) -> None:
        self.stats = stats
        self._lock = threading.Lock()
        self._live: dict = {}

    def holds(self, key: Any) -> bool:
        """Whether a live ``Kept`` holds the storage ``key`` (it cannot be reused meanwhile)."""
        return key in self._live

    def add(self, key: Any, nbytes: int) -> None:
        with self._lock:
            slot = self._live.get(key)
            if slot is None:
                self._live[key] = [1, nbytes]
            else:
                slot[0] += 1
                return
        self.stats.resident(nbytes)

    def drop(self, key: Any) -> None:
        with self._lock:
            slot = self._live.get(key)
            if slot is None:
                return
            slot[0] -= 1
            if slot[0] > 0:
                return
            del self._live[key]
        self.stats.resident(-slot[1])


class _Transient:
    """A recomputation's activations counted as resident: added once (grown when measured
    larger), removed once."""

    __slots__ = ("stats", "group", "nbytes")

    def __init__(self, stats: StatsCollector, group: int, nbytes: int) -> None:
        self.stats, self.group, self.nbytes = stats, group, nbytes
        stats.resident(nbytes)

    def grow_to(self, nbytes: int) -> None:
        if nbytes > self.nbytes:
            self.stats.resident(nbytes - self.nbytes)
            self.nbytes = nbytes

    def close(self) -> None:
        nbytes, self.nbytes = self.nbytes, 0
        if nbytes:
            self.stats.resident(-nbytes)


class SavedTensorHooks:
    """The pack/unpack pair, bound to one offloader's parts (built before it, passed in)."""

    def __init__(self, config: OffloadConfig, cache: OffloadCache, transfers: Transfers,
                 prefetcher: Prefetcher, placement: Placement, position: ForwardPosition,
                 stats: StatsCollector, recomputed: Optional["RecomputedLayers"] = None) -> None:
        self.config = config
        self.cache = cache
        self.transfers = transfers
        self.prefetcher = prefetcher
        self.placement = placement
        self.position = position
        self.stats = stats
        self.recomputed = recomputed
        self._kept = _KeptBytes(stats)
        self._recomputing: "weakref.WeakSet" = weakref.WeakSet()  # inputs unpacked for a recompute
        self._recompute_open: dict = {}  # scope -> the _Transient of the recomputation running
        self._user_recompute: Optional[_Transient] = None  # the user's checkpoint's, running
        self.packs = 0
        self._pid = os.getpid()  # handles are only good in the process whose threads and files they use
        #: Storages of the model's parameters and buffers (refreshed when a scope opens).
        self.param_keys: Set[Tuple[str, int]] = set()

    def context(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor) -> Any:
        self.packs += 1  # recompute_watch: did a tensor reach us, or did a checkpoint take it?
        if is_compiling():
            # torch.compile tracing a region under our hooks (fake tensors, no storage): keep
            # them out of the graph. At run time the compiled region's own saved tensors come
            # through this hook eagerly and are offloaded then.
            return tensor
        self.cache.releases.drain()
        self.transfers.poll()
        scope = self.position.scope
        decision, key, nbytes = classify(tensor, self.param_keys, self.config.min_offload_bytes, in_backward())
        if decision is Decision.OFFLOAD and (scope is None or self.transfers.closed):
            decision = Decision.NO_SCOPE if scope is None else Decision.CLOSED
        if decision is not Decision.OFFLOAD:
            self.stats.kept(decision._value_, nbytes or saved_nbytes(tensor))
            return keep(tensor)
        # A forward after a backward in the same scope (gradient accumulation inside one
        # step()): the backward's prefetch state must not make the new writes stay in memory.
        self.prefetcher.forward_resumed(scope.key)
        self.position.saved(scope, nbytes)
        entry = self.cache.lookup(key, tensor, scope.key)
        if entry is not None:
            self.stats.add(dedup_hits=1)
            return self.transfers.new_handle(entry, tensor)
        budget = self.placement.memory_budget
        if self._kept.holds(key):
            # A kept tensor already holds this storage in memory: writing it would free
            # nothing, and keeping it again adds nothing (so the budget is not asked).
            place = self.placement.places.device
            budget = None
        else:
            place = self.placement.place_for(scope.group)
            profiler = self.position.profiler
            if profiler is not None:  # new bytes this step (dedup hits and kept storages are not)
                profiler.saved(scope.key, scope.group, nbytes, reload_overhead(nbytes, tensor.device))
        if budget is not None and not self.transfers.make_room(nbytes, budget) and not place.offloads:
            # The budget is full of what cannot leave (kept, or read back): this one goes to
            # the SSD instead of staying, and forward waits for its write.
            place = self.placement.places.drive
            self.stats.over_budget(f"a tensor saved in {group_name(scope.group)} that the plan keeps (the "
                                   "budget is full of what cannot leave: sent to the SSD instead)",
                                   self.stats.resident_now() + nbytes, budget, diverted=True)
        if not place.offloads:
            self.stats.kept(Decision.LAYER_KEPT.value, nbytes, plan=True)
            kept = Kept(tensor, scope.key, scope.group)
            self._kept.add(key, nbytes)
            self.cache.releases.watch(kept, self._kept.drop, key)
            return kept
        storage = tensor.untyped_storage()
        spec = ViewSpec.of(tensor)
        entry = Entry(scope=scope.key, group=scope.group, layer=scope.layer, nbytes=storage.nbytes(),
                      device=tensor.device, label=spec, storage=storage,
                      token=StorageToken(tensor), witness=version_witness(tensor))
        self.cache.add(key, entry)
        handle = self.transfers.new_handle(entry, tensor, spec)
        self.stats.add(tensors_offloaded=1, offloadable_bytes=entry.nbytes)
        self.transfers.start_write(entry, place)
        if budget is not None and not self.transfers.make_room(0, budget) and place.offloads:
            # Nothing left to wait for: over, and counted.
            self.stats.over_budget(f"a tensor saved in {group_name(scope.group)} (its write has not "
                                   "finished and no other is left to wait for)", self.stats.resident_now(), budget)
        return handle

    def _count_recompute(self, packed: Any, scope: Any, group: int) -> None:
        """Backward unpacked a tensor of ``group``. If it is a recomputed layer's input, its
        recomputation is about to hold the layer's activations, which no hook of ours sees:
        count them as resident (their size as measured) until backward moves below the group
        (or the input is released), so the budget and the stats include them."""
        open_ = self._recompute_open.get(scope)
        if open_ is not None and open_.group > group:
            open_.close()
        user = self._user_recompute
        if user is not None and user.group > group:
            self.close_user_recompute()  # backward left that layer: its recomputed tensors are freed
        nbytes = self.placement.recompute_bytes(group)
        if nbytes and self.recomputed is not None and self.recomputed.runs_as_is(group):
            nbytes = 0  # refused (a batch norm, a KV cache): nothing is recomputed
        if nbytes and packed not in self._recomputing:
            self._recomputing.add(packed)
            budget = self.placement.memory_budget
            if budget is not None:
                # Backward can start while forward's last writes are in flight: the
                # recomputation waits for them as forward would (back-pressure).
                self.transfers.make_room(nbytes, budget)
            span = _Transient(self.stats, group, nbytes)
            self._recompute_open[scope] = span
            self.cache.releases.watch(packed, _Transient.close, span)
            budget = self.placement.memory_budget
            if budget is not None and self.stats.resident_now() > budget:  # the recomputation runs over
                self.stats.over_budget(f"the recomputation of {group_name(group)}", self.stats.resident_now(), budget)

    # -- the user's own checkpointing (recompute_watch.RecomputeWatch) -------------------
    def holds(self, key: Any) -> bool:
        """Whether our hooks already count storage ``key`` (offloaded, or kept)."""
        return self.cache.knows(key) or self._kept.holds(key)

    def user_recompute_started(self, group: int) -> None:
        """Backward runs the forward of the layer of ``group`` again (the user's checkpointing).
        What it will hold (as measured before) counts as resident from now until the next one
        starts or the step ends; with a budget, writes in flight make room first, as for our
        own recomputations."""
        self.close_user_recompute()
        nbytes = self.placement.user_recompute_bytes(group)
        budget = self.placement.memory_budget
        if nbytes and budget is not None:
            self.transfers.make_room(nbytes, budget)
        self._user_recompute = _Transient(self.stats, group, nbytes)

    def user_recompute_seen(self, group: int, nbytes: int, backward: bool) -> None:
        """The user's checkpointing of the layer of ``group`` has so far dropped (forward) or
        recomputed (backward) ``nbytes`` that our hooks do not hold: the profiler learns it; in
        backward the span grows to it if the plan knew less and a budget exceeded is counted."""
        profiler = self.position.profiler
        if profiler is not None:
            profiler.recomputed(group, nbytes)
        span = self._user_recompute
        if not backward or span is None or span.group != group:
            return
        span.grow_to(nbytes)
        budget = self.placement.memory_budget
        if budget is not None and self.stats.resident_now() > budget:
            self.stats.over_budget(f"the recomputation of {group_name(group)} by your own checkpointing",
                                   self.stats.resident_now(), budget)

    def close_user_recompute(self) -> None:
        span, self._user_recompute = self._user_recompute, None
        if span is not None:
            span.close()

    def unpack(self, packed: Any) -> torch.Tensor:
        kind = type(packed)  # exact types, most common first: one comparison each
        if kind is Saved:
            self.cache.releases.drain()
            return packed.get()
        if kind is Kept:
            self.cache.releases.drain()
            self.prefetcher.backward_reached(packed.scope, packed.group)
            self._count_recompute(packed, packed.scope, packed.group)
            return packed.get()
        if kind is not Handle:  # a tensor kept as is (also what pack returns while tracing)
            return packed
        self.cache.releases.drain()
        self.transfers.poll()
        entry = packed.entry
        if current_pid() != self._pid:
            # A forked child (a DataLoader worker, a multiprocessing helper) inherited the graph
            # but none of the I/O threads: waiting for a read would wait forever.
            raise OffloadError(
                f"ssdoffload: {entry.describe()} belongs to process {self._pid}; backward of a graph "
                f"built there cannot run in forked process {os.getpid()} (run backward in the "
                "parent, or build the graph in the child with its own Offloader)")
        if packed.modified_in_place():
            raise modified_error(entry.describe())
        self.prefetcher.backward_reached(entry.scope, entry.group)
        self._count_recompute(packed, entry.scope, entry.group)
        budget = self.placement.memory_budget
        if budget is not None and entry.state is State.ON_DISK:
            self.transfers.make_room(entry.nbytes, budget)  # a read now: writes in flight first
        storage = self.transfers.materialize(entry)
        budget = self.placement.memory_budget
        if budget is not None and self.stats.resident_now() > budget:
            # Read because backward needs it now, over the budget (a plan that cannot fit).
            self.stats.over_budget(f"a read of {entry.describe()} that backward needs now",
                                   self.stats.resident_now(), budget)
        return rebuild(storage, packed.spec)
