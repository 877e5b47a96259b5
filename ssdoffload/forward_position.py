"""Where the forward is: the one record of the open micro-batch scope and of the group its
forward is in.

Groups number the forward's stretches in order, and backward meets them in reverse. With
layers, entering and leaving a layer each start a new group, so in a forward that runs its
layers in order group 0 is what runs before the first layer, ``2i + 1`` layer ``i`` and
``2i + 2`` what runs after it (``group_name``). Without layers, a new group starts every
``group_bytes`` offloaded bytes in pack order. Both rules, and their decoding, live here only.

Threads: everything here runs on the thread that runs forward (the compute thread), inside the
scope it opened; ``scope`` is read by the hooks on that thread.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Tuple

from .errors import OffloadError

if TYPE_CHECKING:
    from .profiling import StepProfiler


def layer_group(index: int) -> int:
    """The group of layer ``index`` in a forward that runs its layers in order."""
    return 2 * index + 1


def group_name(group: int, by_bytes: bool = False) -> str:
    """A group's name in plans and logs (see the module docstring for the numbering)."""
    if by_bytes:  # no layers: groups are runs of saved bytes in pack order
        return f"bytes group {group}"
    if group == 0:
        return "before the layers"
    if group % 2:
        return f"layer {(group - 1) // 2}"
    return f"after layer {(group - 2) // 2}"


@dataclass
class ScopeState:
    """The forward of one micro-batch: its key and current group / layer."""

    key: Any
    group: int = 0
    layer: Optional[int] = None
    thread: int = 0  # threading.get_ident() of the thread that opened it
    filled: int = 0  # bytes offloaded into the current group (grouping by bytes)


class ForwardPosition:
    """The open scope (at most one) and the group rules. The profiler, when there is one,
    gets a mark at every group change."""

    def __init__(self, profiler: Optional["StepProfiler"] = None) -> None:
        self.profiler = profiler
        self.scope: Optional[ScopeState] = None
        #: Without layers: start a new group every this many offloaded bytes. None: layers group.
        self.group_bytes: Optional[int] = None
        #: A layer's forward hook ran (``Offloader.end_step`` uses it to see compiled layers).
        self.layer_seen = False

    @property
    def by_bytes(self) -> bool:
        return self.group_bytes is not None

    def open(self, key: Any, cuda: bool) -> ScopeState:
        """Open micro-batch ``key``'s scope, or raise ``OffloadError`` if one is open."""
        active = self.scope
        if active is not None:
            where = "on this thread" if active.thread == threading.get_ident() else "on another thread"
            raise OffloadError(
                f"micro-batch {key!r} started while micro-batch {active.key!r} is open {where}; "
                "scopes do not nest and one Offloader serves one training loop: close one "
                "before opening the next (use one Offloader per thread that trains)")
        scope = ScopeState(key, thread=threading.get_ident())
        self.scope = scope
        if self.profiler is not None:
            self.profiler.open(key, cuda)
        return scope

    def close(self, scope: ScopeState) -> None:
        # One plain store, no call: an interrupt can surface only at a call, so once this
        # starts the scope is closed.
        if self.scope is scope:
            self.scope = None

    def enter_layer(self, index: int, input_bytes: int = 0) -> None:
        """Layer ``index`` starts, called with ``input_bytes`` of tensor inputs."""
        self.layer_seen = True
        scope = self.scope
        if scope is not None:
            scope.layer = index
            self._next_group(scope)
            if self.profiler is not None and input_bytes:
                self.profiler.layer_input(scope.key, scope.group, input_bytes)

    def exit_layer(self, index: int) -> Optional[Tuple[Any, int]]:
        """Leave the layer; returns ``(scope key, the layer's group)`` for its backward trigger."""
        scope = self.scope
        if scope is None:
            return None
        token = (scope.key, scope.group)
        scope.layer = None
        self._next_group(scope)
        return token

    def saved(self, scope: ScopeState, nbytes: int) -> None:
        """``nbytes`` are offloaded in ``scope``: without layers, open a new group once the
        current one holds ``group_bytes`` (each group is then read back as a unit, as a layer
        would be)."""
        if self.group_bytes is None:
            return
        if scope.filled and scope.filled + nbytes > self.group_bytes:
            scope.filled = 0
            self._next_group(scope)
        scope.filled += nbytes

    def _next_group(self, scope: ScopeState) -> None:
        scope.group += 1
        if self.profiler is not None:
            self.profiler.group(scope.key, scope.group)
