"""Per-step measurements for the adaptive policy: per forward group the offloadable bytes saved
and the compute time, and the backward time of each micro-batch scope.

Groups are the offloader's prefetch groups (numbered and named by ``forward_position``). A *mark* is taken
at every group change: ``time.perf_counter()`` on a CPU host, a timing ``torch.cuda.Event``
recorded on the current stream on CUDA (so the times are GPU times; nothing synchronizes: a
scope whose events have not completed yet is finished at a later ``collect``).

Threads and lifetime: ``open``/``group``/``saved`` run on the compute thread inside a scope;
``backward`` runs on whatever thread autograd calls hooks on; ``collect`` runs in
``Offloader.end_step``. One lock guards the scope records; a record lives from the scope's
forward until ``collect`` turned it into ``GroupTiming``s (or it was dropped as stale).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from .adaptive import GroupTiming
from .forward_position import group_name


@dataclass
class _ScopeRecord:
    cuda: bool
    marks: List[Tuple[int, Any]] = field(default_factory=list)   # (group, mark) in forward order
    nbytes: Dict[int, int] = field(default_factory=dict)
    inputs: Dict[int, int] = field(default_factory=dict)  # layer group -> bytes of its tensor inputs
    overhead: Dict[int, int] = field(default_factory=dict)  # group -> its reload buffers' extra bytes
    bwd_start: Any = None
    bwd_end: Any = None
    age: int = 0


class StepProfiler:
    """Collects group marks and saved bytes per scope; ``collect`` turns finished scopes into
    per-group timings."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scopes: Dict[Any, _ScopeRecord] = {}
        self._in_flight = 0  # most scopes forwarded and not backwarded at once, since the last take
        self._recomputed: Dict[int, int] = {}  # layer group -> bytes its user recomputation saved

    @staticmethod
    def _mark(cuda: bool) -> Any:
        if cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def open(self, key: Any, cuda: bool) -> None:
        """A forward of scope ``key`` begins (group 0)."""
        rec = _ScopeRecord(cuda=cuda)
        rec.marks.append((0, self._mark(cuda)))
        with self._lock:
            # Micro-batches whose backward has not begun still hold all they saved (a
            # pipeline's warm-up forwards): with this one, that many plans' worth at once.
            waiting = sum(1 for r in self._scopes.values() if r.bwd_start is None and r.nbytes)
            self._in_flight = max(self._in_flight, waiting + 1)
            self._scopes[key] = rec

    def take_in_flight(self) -> int:
        """The most micro-batches in flight at once since the last call (at least 1)."""
        with self._lock:
            n, self._in_flight = self._in_flight, 0
        return max(n, 1)

    def group(self, key: Any, group: int) -> None:
        """The forward of ``key`` entered ``group``."""
        with self._lock:
            rec = self._scopes.get(key)
        if rec is not None and rec.bwd_start is None:
            rec.marks.append((group, self._mark(rec.cuda)))

    def saved(self, key: Any, group: int, nbytes: int, reload_overhead: int = 0) -> None:
        """New offloadable bytes were saved in ``group`` (the hooks call this once per storage
        and step: not for dedup hits or storages a kept tensor already holds); reading them
        back would allocate ``reload_overhead`` bytes more (``reload_buffers``)."""
        with self._lock:
            rec = self._scopes.get(key)
            if rec is not None:
                rec.nbytes[group] = rec.nbytes.get(group, 0) + nbytes
                if reload_overhead:
                    rec.overhead[group] = rec.overhead.get(group, 0) + reload_overhead

    def layer_input(self, key: Any, group: int, nbytes: int) -> None:
        """The layer whose forward is ``group`` was called with ``nbytes`` of tensor inputs."""
        with self._lock:
            rec = self._scopes.get(key)
            if rec is not None:
                rec.inputs[group] = rec.inputs.get(group, 0) + nbytes

    def recomputed(self, group: int, nbytes: int) -> None:
        """The user's checkpointing recomputed the layer of ``group`` in backward, saving
        ``nbytes`` (the most seen since the last ``collect``; not per scope: backward does
        not say which micro-batch a recomputation belongs to)."""
        with self._lock:
            self._recomputed[group] = max(self._recomputed.get(group, 0), nbytes)

    def backward(self, key: Any) -> None:
        """Backward of ``key`` is running (an unpack or a layer's gradient trigger)."""
        with self._lock:
            rec = self._scopes.get(key)
        if rec is None:
            return
        mark = self._mark(rec.cuda)
        if rec.bwd_start is None:
            rec.bwd_start = mark
        rec.bwd_end = mark

    def discard(self) -> None:
        with self._lock:
            self._scopes.clear()

    def collect(self, stall_seconds: float,
                by_bytes: bool = False) -> Optional[Tuple[Tuple[GroupTiming, ...], float]]:
        """Per-group timings of the scopes whose backward ran and whose marks are complete
        (averaged when several finished), and their compute seconds; ``None`` when none.
        ``by_bytes``: the groups are byte runs, not layers (only their names differ).

        ``stall_seconds`` (backward waiting on reads in the step) is taken out of the
        backward time, which is spread over the groups in proportion to their forward time.
        """
        with self._lock:
            ready, keep = [], {}
            for key, rec in self._scopes.items():
                if rec.bwd_start is not None and rec.bwd_end is not None and self._complete(rec):
                    ready.append(rec)
                else:
                    rec.age += 1
                    if rec.age < 64:  # a scope that never ran backward is dropped eventually
                        keep[key] = rec
            self._scopes = keep
            recomputed = self._recomputed if ready else {}
            if ready:
                self._recomputed = {}
        if not ready:
            return None
        per_scope_stall = stall_seconds / len(ready)
        results = [self._timings(rec, per_scope_stall, by_bytes) for rec in ready]
        results = [r for r in results if r is not None]
        if not results:
            return None
        n = max(len(r[0]) for r in results)
        results = [r for r in results if len(r[0]) == n]
        groups = tuple(
            GroupTiming(nbytes=max(r[0][i].nbytes for r in results),
                        input_bytes=max(r[0][i].input_bytes for r in results),
                        reload_overhead=max(r[0][i].reload_overhead for r in results),
                        forward_seconds=sum(r[0][i].forward_seconds for r in results) / len(results),
                        backward_seconds=sum(r[0][i].backward_seconds for r in results) / len(results),
                        name=results[0][0][i].name, recompute_bytes=recomputed.get(i, 0))
            for i in range(n))
        return groups, sum(r[1] for r in results) / len(results)

    @staticmethod
    def _complete(rec: _ScopeRecord) -> bool:
        if not rec.cuda:
            return True
        return bool(rec.bwd_end.query())

    @staticmethod
    def _elapsed(rec: _ScopeRecord, a: Any, b: Any) -> float:
        if rec.cuda:
            return max(a.elapsed_time(b) / 1e3, 0.0)
        return max(b - a, 0.0)

    def _timings(self, rec: _ScopeRecord, stall: float,
                 by_bytes: bool) -> Optional[Tuple[Tuple[GroupTiming, ...], float]]:
        marks = rec.marks + [(None, rec.bwd_start)]
        last = max(g for g, _ in rec.marks)
        fwd = [0.0] * (last + 1)
        for (g, a), (_, b) in zip(marks, marks[1:]):
            fwd[g] += self._elapsed(rec, a, b)
        t_fwd = sum(fwd)
        t_bwd = max(self._elapsed(rec, rec.bwd_start, rec.bwd_end) - stall, 0.0)
        if t_fwd <= 0:
            return None
        ratio = t_bwd / t_fwd if t_bwd > 0 else 2.0
        groups = tuple(GroupTiming(nbytes=rec.nbytes.get(g, 0), input_bytes=rec.inputs.get(g, 0),
                                   reload_overhead=rec.overhead.get(g, 0),
                                   forward_seconds=fwd[g],
                                   backward_seconds=fwd[g] * ratio, name=group_name(g, by_bytes))
                       for g in range(last + 1))
        return groups, t_fwd + t_fwd * ratio
