"""The saved-tensor hooks: the only place autograd is touched.

``pack`` runs when autograd saves a tensor for backward. It either returns the tensor itself
(kept: parameters, small tensors, ...; see ``policy.py``), a ``Kept`` wrapper (a tensor the
plan keeps on the device: the wrapper only tells the profiler when backward reaches it), or a
``Handle`` to an entry whose storage is being written to the spill store or the host-RAM tier;
the graph then holds no reference to the memory. Where an offloadable tensor goes is the
``placement(scope)`` callable's answer (``"ssd"``, ``"ram"`` or ``"device"``), asked after the
dedup lookup, so a storage already offloaded is never kept twice.
``unpack`` runs when backward needs the tensor: a kept tensor is returned as is, a handle is
rebuilt as its exact view over the storage, read back (or still in memory).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Set, Tuple

import torch

from .cache import Entry, Handle, OffloadCache
from .config import OffloadConfig
from .policy import Decision, decide
from .prefetch import Prefetcher
from .stats import StatsCollector
from .transfers import Transfers
from .views import StorageToken, ViewSpec, rebuild, storage_key
from .layers import in_backward
from .profiling import StepProfiler


class Kept(NamedTuple):
    """A saved tensor the plan keeps on the device; unpacking reports backward progress.

    A named tuple, so tools that look for the tensors inside packed values (pytree
    flattening, e.g. the benchmark's memory meter) still find it.
    """

    tensor: torch.Tensor
    scope: Any


@dataclass
class ScopeState:
    """Where the forward of one micro-batch is: its key and current group / layer."""

    key: Any
    group: int = 0
    layer: Optional[int] = None


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
        self.scope: Optional[ScopeState] = None
        self.param_keys: Set[Tuple[str, int]] = set()

    def context(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor) -> Any:
        scope = self.scope
        decision = decide(tensor, self.param_keys, self.config.min_offload_bytes, in_backward())
        if decision is Decision.OFFLOAD and scope is None:
            decision = Decision.LAYER_KEPT
        if decision is not Decision.OFFLOAD:
            self.stats.add(tensors_kept=1, bytes_kept=tensor.untyped_storage().nbytes())
            return tensor
        key = storage_key(tensor)
        nbytes = tensor.untyped_storage().nbytes()
        if self.profiler is not None:
            self.profiler.saved(scope.key, scope.group, key, nbytes)
        entry = self.cache.lookup(key, tensor, scope.key)
        if entry is not None:
            self.stats.add(dedup_hits=1)
            return self.cache.new_handle(entry, tensor)
        place = self.placement(scope)
        if place == "device":
            self.stats.add(tensors_kept=1, bytes_kept=nbytes, plan_kept_bytes=nbytes)
            return Kept(tensor, scope.key) if self.profiler is not None else tensor
        storage = tensor.untyped_storage()
        entry = Entry(scope=scope.key, group=scope.group, layer=scope.layer, nbytes=storage.nbytes(),
                      device=tensor.device, label=ViewSpec.of(tensor).describe(), storage=storage,
                      token=StorageToken(tensor))
        self.cache.add(key, entry)
        handle = self.cache.new_handle(entry, tensor)
        self.stats.add(tensors_offloaded=1, offloadable_bytes=entry.nbytes)
        self.stats.resident(entry.nbytes)
        self.transfers.start_write(entry, place)
        return handle

    def unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, Handle):
            if isinstance(packed, Kept):
                if self.profiler is not None:
                    self.profiler.backward(packed.scope)
                return packed.tensor
            return packed
        entry = packed.entry
        if self.profiler is not None:
            self.profiler.backward(entry.scope)
        if packed.modified_in_place():
            raise RuntimeError(
                f"one of the tensors needed for gradient computation ({entry.describe()}) has been "
                "modified by an inplace operation after it was saved; autograd cannot compute a "
                "correct gradient (use out-of-place ops, or clone before modifying)")
        self.prefetcher.on_backward_reached(entry.scope, entry.group)
        storage = self.transfers.materialize(entry)
        return rebuild(storage, packed.spec)
