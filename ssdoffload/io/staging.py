"""CUDA tensors through pinned host memory and the native engine (GPU hosts without kvikio).

Lifetime rules:

* Slabs come from a fixed pool of pinned buffers allocated once (``PinnedPool``); nothing is
  pinned per tensor, so the pinned footprint is bounded by ``pinned_pool_bytes``.
* Write: a side stream waits on the tensor's ``ready`` event (recorded on the compute stream
  when autograd saved it), copies one slab-sized piece device-to-host, and the I/O thread
  synchronizes that copy before the engine writes the slab. Pieces are pipelined: the copy of
  piece i+1 runs while piece i is written. The method returns after the last device-to-host
  copy finished, so the caller may drop the device tensor (no ``record_stream``: the side stream
  is done with it).
* Read: the engine reads a piece into a slab, a side stream waits on the ``allocated`` event
  (the destination was allocated on the compute stream; kernels queued before may still use
  that memory) and copies the slab to the device. The returned event covers every piece; a
  slab goes back to the pool only after its copy completed.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import List, Optional

import torch

from ..allocator import align_up
from ..store import Extent
from . import _native
from ..errors import WriteAbandoned
from .base import Backend, check_crc
from .native import NativeEngine


class PinnedPool:
    """A fixed set of equally sized pinned host buffers; ``acquire`` blocks until one is free."""

    def __init__(self, total_bytes: int, slab_bytes: int) -> None:
        slab_bytes = align_up(slab_bytes)
        count = max(2, total_bytes // slab_bytes)
        self.slab_bytes = slab_bytes
        self._free: List[torch.Tensor] = [
            torch.empty(slab_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(count)
        ]
        self._cond = threading.Condition()

    def acquire(self) -> torch.Tensor:
        with self._cond:
            while not self._free:
                self._cond.wait()
            return self._free.pop()

    def release(self, slab: torch.Tensor) -> None:
        with self._cond:
            self._free.append(slab)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._free.clear()


class StagedCudaBackend(Backend):
    """Device memory staged through a pinned pool on side streams, written by the native engine."""

    name = "native-staged"

    def __init__(self, engine: NativeEngine, pool_bytes: int, slab_bytes: int, device: torch.device) -> None:
        self.engine = engine
        self.pool = PinnedPool(pool_bytes, slab_bytes)
        self.device = device
        self._d2h = torch.cuda.Stream(device)
        self._h2d = torch.cuda.Stream(device)

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def write(self, src: torch.Tensor, extent: Extent, ready: Optional[torch.cuda.Event],
              verify: bool = False, stop=None) -> Optional[List[int]]:
        nbytes = src.numel()
        crcs: List[int] = []
        slab_bytes = self.pool.slab_bytes
        inflight: deque = deque()  # (slab, request)
        try:
            for start in range(0, nbytes, slab_bytes):
                if stop is not None and start and stop():
                    raise WriteAbandoned(f"write abandoned after {start} of {nbytes} bytes")
                n = min(slab_bytes, nbytes - start)
                slab = self.pool.acquire()
                try:
                    with torch.cuda.stream(self._d2h):
                        if ready is not None:
                            self._d2h.wait_event(ready)
                        slab[:n].copy_(src[start:start + n], non_blocking=True)
                        copied = torch.cuda.Event()
                        copied.record(self._d2h)
                    copied.synchronize()
                except BaseException:
                    self.pool.release(slab)
                    raise
                if verify:
                    crcs.append(_native.crc32c(slab.data_ptr(), n))
                inflight.append((slab, self.engine.write_at(slab.data_ptr(), n, extent, start)))
                while len(inflight) > 1:  # keep one write in flight while the next piece copies
                    self._finish(inflight.popleft())
            while inflight:
                self._finish(inflight.popleft())
            return crcs if verify else None
        finally:
            while inflight:  # an error: wait for the rest before the slabs are reused
                slab, request = inflight.popleft()
                request.wait()
                self.pool.release(slab)

    def _finish(self, item) -> None:
        slab, request = item
        try:
            request.result()
        finally:
            self.pool.release(slab)

    def read(self, dst: torch.Tensor, extent: Extent, allocated: Optional[torch.cuda.Event],
             expected: Optional[List[int]] = None) -> Optional[torch.cuda.Event]:
        nbytes = dst.numel()
        slab_bytes = self.pool.slab_bytes
        pending: deque = deque()  # (slab, event) whose host-to-device copy may still run
        done = torch.cuda.Event()
        try:
            if allocated is not None:
                self._h2d.wait_event(allocated)
            for start in range(0, nbytes, slab_bytes):
                n = min(slab_bytes, nbytes - start)
                slab = self.pool.acquire()
                try:
                    self.engine.read(slab.data_ptr(), n, extent, start)
                    if expected is not None:
                        check_crc(slab.data_ptr(), n, expected[start // slab_bytes], extent, start)
                    with torch.cuda.stream(self._h2d):
                        dst[start:start + n].copy_(slab[:n], non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(self._h2d)
                except BaseException:
                    self.pool.release(slab)
                    raise
                pending.append((slab, ev))
                while len(pending) > 2 or (pending and pending[0][1].query()):
                    old_slab, old_ev = pending.popleft()
                    old_ev.synchronize()
                    self.pool.release(old_slab)
            done.record(self._h2d)
            return done
        finally:
            while pending:
                slab, ev = pending.popleft()
                ev.synchronize()
                self.pool.release(slab)

    def close(self) -> None:
        self.pool.close()
