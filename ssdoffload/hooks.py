"""The saved-tensor hooks: the only place autograd is touched.

``pack`` runs when autograd saves a tensor for backward. It returns a ``Saved`` wrapper (kept:
parameters, small tensors, ...; see ``policy.py``), a ``Kept`` wrapper (a tensor the plan keeps
on the device: it also tells the profiler when backward reaches it and counts its bytes as
resident while autograd holds it), or a ``Handle`` to an entry whose storage is being written
to the spill store or the host-RAM tier; the graph then holds no reference to the memory.

Autograd does not check saved tensors' versions when saved-tensor hooks are set, so every
wrapper carries the version at pack time and ``unpack`` raises the error autograd would raise
("modified by an inplace operation") when it changed — for kept tensors as for offloaded ones. Where an offloadable tensor goes is the
``placement(scope)`` callable's answer (``"ssd"``, ``"ram"`` or ``"device"``), asked after the
dedup lookup, so a storage already offloaded is never kept twice.
``unpack`` runs when backward needs the tensor: a kept tensor is returned as is, a handle is
rebuilt as its exact view over the storage, read back (or still in memory).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Set, Tuple

import torch

from .cache import Entry, Handle, OffloadCache
from .config import OffloadConfig
from .errors import OffloadError
from .policy import Decision, decide, saved_nbytes
from .prefetch import Prefetcher
from .stats import StatsCollector
from .transfers import Transfers
from .views import StorageToken, ViewSpec, rebuild, storage_key, version_witness
from .layers import in_backward
from .profiling import StepProfiler


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
    """A saved tensor the plan keeps on the device. Unpacking it reports backward progress to
    the profiler; its bytes count as resident (``OffloadStats.resident_bytes``) from the pack
    until autograd drops the last ``Kept`` of that storage (released at the next drain of the
    cache's ``ReleaseQueue``: no finaliser), so ``peak_resident_bytes`` is the true peak of
    offloadable activation memory under any plan."""

    __slots__ = ("scope", "__weakref__")

    def __init__(self, tensor: torch.Tensor, scope: Any) -> None:
        super().__init__(tensor, tensor._version)
        self.scope = scope


class _KeptBytes:
    """Storages held by ``Kept`` objects (each counted once), feeding ``StatsCollector.resident``."""

    def __init__(self, stats: StatsCollector) -> None:
        self.stats = stats
        self._lock = threading.Lock()
        self._live: dict = {}

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


@dataclass
class ScopeState:
    """Where the forward of one micro-batch is: its key and current group / layer."""

    key: Any
    group: int = 0
    layer: Optional[int] = None
    thread: int = 0  # threading.get_ident() of the thread that opened it
    filled: int = 0  # bytes offloaded into the current group (grouping by bytes)


class SavedTensorHooks:
    """The pack/unpack pair, bound to one offloader's cache, transfers and prefetcher."""

    def __init__(self, config: OffloadConfig, cache: OffloadCache, transfers: Transfers,
                 prefetcher: Prefetcher, stats: StatsCollector,
                 placement: Callable[[ScopeState], str] = lambda scope: "ssd",
                 profiler: Optional[StepProfiler] = None) -> None:
        self.config = config
        self.cache = cache
        self.transfers = transfers
        self.prefetcher = prefetcher
        self.stats = stats
        self.placement = placement
        self.profiler = profiler
        self._kept = _KeptBytes(stats)
        self.scope: Optional[ScopeState] = None
        self._pid = os.getpid()  # handles are only good in the process whose threads and files they use
        self.param_keys: Set[Tuple[str, int]] = set()
        #: With no layers to group by: start a new prefetch group every this many offloaded
        #: bytes, in pack order (backward consumes them roughly in reverse). None: layers group.
        self.group_bytes: Optional[int] = None

    def context(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor) -> Any:
        if torch.compiler.is_compiling():
            # torch.compile tracing a region under our hooks (fake tensors, no storage): keep
            # them out of the graph. At run time the compiled region's own saved tensors come
            # through this hook eagerly and are offloaded then.
            return tensor
        self.cache.releases.drain()
        scope = self.scope
        decision = decide(tensor, self.param_keys, self.config.min_offload_bytes, in_backward())
        if decision is Decision.OFFLOAD and (scope is None or self.transfers.closed):
            decision = Decision.NO_SCOPE if scope is None else Decision.CLOSED
        if decision is not Decision.OFFLOAD:
            self.stats.kept(decision.value, saved_nbytes(tensor))
            return keep(tensor)
        # A forward after a backward in the same scope (gradient accumulation inside one
        # step()): the backward's prefetch state must not make the new writes stay in memory.
        self.prefetcher.forward_resumed(scope.key)
        key = storage_key(tensor)
        nbytes = tensor.untyped_storage().nbytes()
        if self.group_bytes is not None:
            self._group_by_bytes(scope, nbytes)
        if self.profiler is not None:
            self.profiler.saved(scope.key, scope.group, key, nbytes)
        entry = self.cache.lookup(key, tensor, scope.key)
        if entry is not None:
            self.stats.add(dedup_hits=1)
            return self.cache.new_handle(entry, tensor)
        place = self.placement(scope)
        if place == "device":
            self.stats.kept(Decision.LAYER_KEPT.value, nbytes, plan=True)
            kept = Kept(tensor, scope.key)
            self._kept.add(key, nbytes)
            self.cache.releases.watch(kept, self._kept.drop, key)
            return kept
        storage = tensor.untyped_storage()
        entry = Entry(scope=scope.key, group=scope.group, layer=scope.layer, nbytes=storage.nbytes(),
                      device=tensor.device, label=ViewSpec.of(tensor).describe(), storage=storage,
                      token=StorageToken(tensor), witness=version_witness(tensor))
        self.cache.add(key, entry)
        handle = self.cache.new_handle(entry, tensor)
        self.stats.add(tensors_offloaded=1, offloadable_bytes=entry.nbytes)
        self.stats.resident(entry.nbytes)
        self.transfers.start_write(entry, place)
        return handle

    def _group_by_bytes(self, scope: ScopeState, nbytes: int) -> None:
        """Open a new group once the current one holds ``group_bytes`` (each group then is
        read back as a unit, ``depth`` groups ahead of backward, as a layer would be)."""
        assert self.group_bytes is not None
        if scope.filled and scope.filled + nbytes > self.group_bytes:
            scope.group += 1
            scope.filled = 0
            if self.profiler is not None:
                self.profiler.group(scope.key, scope.group)
        scope.filled += nbytes

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):  # kept as is (also what pack returns while tracing)
            return packed
        self.cache.releases.drain()
        if not isinstance(packed, Handle):
            if isinstance(packed, Saved):
                if isinstance(packed, Kept) and self.profiler is not None:
                    self.profiler.backward(packed.scope)
                return packed.get()
            return packed
        entry = packed.entry
        if os.getpid() != self._pid:
            # A forked child (a DataLoader worker, a multiprocessing helper) inherited the graph
            # but none of the I/O threads: waiting for a read would wait forever.
            raise OffloadError(
                f"ssdoffload: {entry.describe()} belongs to process {self._pid}; backward of a graph "
                f"built there cannot run in forked process {os.getpid()} (run backward in the "
                "parent, or build the graph in the child with its own Offloader)")
        if self.profiler is not None:
            self.profiler.backward(entry.scope)
        if packed.modified_in_place():
            raise modified_error(entry.describe())
        self.prefetcher.on_backward_reached(entry.scope, entry.group)
        storage = self.transfers.materialize(entry)
        return rebuild(storage, packed.spec)
