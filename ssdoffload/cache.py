"""One ``Entry`` per offloaded storage, with an explicit state machine, and the handles that
autograd holds instead of tensors.

States (``State``)::

    RESIDENT --write--> WRITING --done--> ON_DISK --load--> LOADING --done--> LOADED --last handle--> FREED
        ^                  |  |                 |              |                     ^
        +---- write failed-+  +--- done, backward already here ----------------------+
                                                |  read failed -+--> FAILED (unpack raises)
                                                +-- discarded (abort, close) --^

``RESIDENT`` and ``WRITING`` hold the original storage (backward that comes early is served
from it: "forwarding"); ``ON_DISK`` holds nothing but the extent; ``LOADED`` holds a fresh
buffer. Every transition is checked against ``_ALLOWED``; a wrong one is a bug and raises
``StateError``. The cache lock guards state, refcounts and the dedup index.

Resident bytes (``OffloadStats.resident_bytes``) follow the states: an entry counts from
``add`` while its state is in ``HOLDS_MEMORY`` (from ``LOADING`` on, with its reload buffer's
overhead: ``reload_buffers.reload_overhead``), and ``transition`` is the only place that
changes the count — no caller adds or subtracts by hand.

A ``Handle`` is what the pack hook returns: (entry, view spec). Autograd drops it when the graph
is freed; ``unref`` of the last one (run by ``transfers.Transfers.release`` at the next drain of
``releases``, never inside the garbage collector: see ``releases.py``) says the entry may be freed. Every handle of an entry was packed
from a view of one root tensor at one version (``StorageToken.matches``), so the entry's version
witness (``views.version_witness``) answers "was it modified in place since?" for all of them.
"""
from __future__ import annotations

import enum
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import chaos
from .errors import StateError
from .reload_buffers import reload_overhead
from .releases import ReleaseQueue
from .stats import StatsCollector
from .views import StorageToken, ViewSpec


class State(enum.Enum):
    # Members are singletons: hash them by identity, in C (Enum's own __hash__ is Python code,
    # run at every transition's table lookups).
    __hash__ = object.__hash__

    RESIDENT = "resident"
    WRITING = "writing"
    ON_DISK = "on disk"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"
    FREED = "freed"


_ALLOWED = {
    State.RESIDENT: {State.WRITING, State.FREED},
    State.WRITING: {State.ON_DISK, State.LOADED, State.RESIDENT, State.FREED},
    State.ON_DISK: {State.LOADING, State.FAILED, State.FREED},  # FAILED: discarded unread
    State.LOADING: {State.LOADED, State.FAILED, State.FREED, State.ON_DISK},  # ON_DISK: interrupted before it began
    State.LOADED: {State.FREED},
    State.FAILED: {State.FREED},
    State.FREED: set(),
}

#: States in which the entry holds the data in memory.
HOLDS_MEMORY = (State.RESIDENT, State.WRITING, State.LOADING, State.LOADED)

_ids = itertools.count()


@dataclass(eq=False, slots=True)
class Entry:
    """One offloaded storage and everything needed to bring it back (slots: one is made per
    offloaded tensor, and its fields are read on every hop)."""

    scope: Any
    group: int
    layer: Optional[int]
    nbytes: int
    device: torch.device
    label: Any                     # a ViewSpec (described when asked: formatting costs) or a str
    key: Any = None
    storage: Optional[torch.UntypedStorage] = None
    token: Optional[StorageToken] = None
    witness: Optional[torch.Tensor] = None  # shares the saved tensor's version counter, no memory
    place: Any = None              # the places.Place that holds it off the device
    extent: Any = None             # its location there (a spill-file Extent, a HostSlot)
    wanted: bool = False           # backward asked for it while it was being written: keep it
    state: State = State.RESIDENT
    refs: int = 0
    write_future: Any = None
    read_future: Any = None
    drain_future: Any = None       # host RAM moving it on to the drive (CUDA slots)
    ready_event: Any = None        # CUDA: when the reloaded buffer may be used
    compute_stream: Any = None     # CUDA: the stream the tensor was produced / reloaded for
    error: Optional[BaseException] = None
    checksums: Optional[List[int]] = None  # with verify: CRC-32C of each written piece
    prefetched: bool = False
    served: bool = False           # unpacked at least once (prefetch hit/miss counted)
    overhead: int = 0              # bytes its reload buffer holds beyond nbytes (reload_buffers)
    id: int = field(default_factory=lambda: next(_ids))

    def describe(self) -> str:
        where = f"layer {self.layer}" if self.layer is not None else "outside the layers"
        label = self.label.describe() if isinstance(self.label, ViewSpec) else self.label
        return f"activation {label} ({where}, micro-batch {self.scope!r})"


class Handle:
    """What autograd keeps for an offloaded tensor. It has no finaliser: the cache watches it
    (``releases.ReleaseQueue``) and releases its entry at the next safe point after it died."""

    __slots__ = ("entry", "spec", "__weakref__")

    def __init__(self, entry: Entry, spec: ViewSpec) -> None:
        self.entry = entry
        self.spec = spec

    def modified_in_place(self) -> bool:
        """Whether the saved tensor (or anything sharing its version counter: its base, its
        views, ``detach()`` aliases) was changed in place after it was saved. Autograd would
        refuse to run backward; we refuse too, instead of returning the old values."""
        entry = self.entry
        return entry.witness is not None and entry.witness._version != entry.token.version


class OffloadCache:
    """Entries by scope, the storage-dedup index, reference counting and the resident bytes."""

    def __init__(self, stats: StatsCollector) -> None:
        self.lock = threading.RLock()
        #: Dead handles waiting for their release (drained by the hooks and the offloader).
        self.releases = ReleaseQueue()
        self.stats = stats
        self._index: Dict[Tuple[str, int], Entry] = {}
        # scope -> group -> its entries (a dict as an ordered set: removing one is O(1)).
        self.scopes: Dict[Any, Dict[int, Dict[Entry, None]]] = {}

    # -- state machine -------------------------------------------------------------------
    def transition(self, entry: Entry, new: State) -> None:
        if chaos.ON: chaos.pause()  # SSDOFFLOAD_CHAOS: state changes come late
        old = entry.state
        if new not in _ALLOWED[old]:
            raise StateError(f"{entry.describe()}: illegal transition {old.value} -> {new.value}")
        entry.state = new
        before = entry.nbytes + entry.overhead if old in HOLDS_MEMORY else 0
        if new is State.LOADING:  # a reload buffer is allocated for it next: its page counts too
            entry.overhead = reload_overhead(entry.nbytes, entry.device)
        elif new not in HOLDS_MEMORY:
            entry.overhead = 0
        after = entry.nbytes + entry.overhead if new in HOLDS_MEMORY else 0
        if after != before:
            self.stats.resident(after - before)

    # -- dedup ---------------------------------------------------------------------------
    def lookup(self, key: Tuple[str, int], tensor: torch.Tensor, scope: Any) -> Optional[Entry]:
        """The live entry whose bytes provably are ``tensor``'s bytes now (same storage object,
        same root tensor, same version: ``StorageToken.matches``), if any."""
        with self.lock:
            entry = self._index.get(key)
            if entry is None or entry.scope != scope or entry.token is None or not entry.token.matches(tensor):
                return None
            if entry.state in (State.FREED, State.FAILED):
                return None
            return entry

    def knows(self, key: Tuple[str, int]) -> bool:
        """Whether an entry (live or not yet dropped) is indexed under storage ``key``."""
        return key in self._index

    def add(self, key: Tuple[str, int], entry: Entry) -> None:
        """Index a new (RESIDENT) entry; its bytes count as resident from now on."""
        assert entry.state is State.RESIDENT
        with self.lock:
            entry.key = key
            self._index[key] = entry
            self.scopes.setdefault(entry.scope, {}).setdefault(entry.group, {})[entry] = None
        self.stats.resident(entry.nbytes)

    def new_handle(self, entry: Entry, tensor: torch.Tensor, spec: Optional[ViewSpec] = None) -> Handle:
        """A handle to ``entry`` for ``tensor``'s view (one more reference). The caller
        watches it (``releases.watch``) and calls ``unref`` when it died."""
        handle = Handle(entry, spec if spec is not None else ViewSpec.of(tensor))
        with self.lock:
            entry.refs += 1
        return handle

    # -- lifetime ------------------------------------------------------------------------
    def unref(self, entry: Entry) -> bool:
        """One handle of ``entry`` died; True when it was the last (the entry is then out of
        the index and the scope lists, and the caller frees it)."""
        with self.lock:
            entry.refs -= 1
            if entry.refs > 0:
                return False
            self._forget(entry)
        return True

    def _forget(self, entry: Entry) -> None:
        if self._index.get(entry.key) is entry:
            del self._index[entry.key]
        groups = self.scopes.get(entry.scope)
        if groups is not None:
            members = groups.get(entry.group)
            if members is not None:
                members.pop(entry, None)
                if not members:
                    del groups[entry.group]
            if not groups:
                del self.scopes[entry.scope]

    def has_entries(self, scope: Any) -> bool:
        """Whether ``scope`` has live entries (one dict lookup, no lock: a hint for the hot
        paths, which look again under the lock before acting)."""
        return scope in self.scopes

    def groups_of(self, scope: Any) -> List[int]:
        with self.lock:
            return sorted(self.scopes.get(scope, {}))

    def entries(self, scope: Any, group: int) -> List[Entry]:
        with self.lock:
            return list(self.scopes.get(scope, {}).get(group, ()))

    def all_entries(self) -> List[Entry]:
        with self.lock:
            return [e for groups in self.scopes.values() for members in groups.values() for e in members]
