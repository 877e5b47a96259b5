"""The native backend: our C++ engine (``csrc/native_engine.cpp``) for host memory.

The engine splits each request into ``chunk_bytes`` pieces, runs them on its own worker threads
with ``pwrite``/``pread`` on the O_DIRECT descriptor (bouncing through aligned buffers when the
caller's memory is not 4 KiB-aligned) and releases the GIL while Python waits. CUDA tensors go
through ``StagedCudaBackend`` (``staging.py``), which copies them through pinned memory and then
uses this engine.
"""
from __future__ import annotations

import threading
from typing import List, Optional

import torch

from .. import chaos
from . import _native
from ..allocator import ALIGNMENT, align_up
from ..store import Extent
from .base import Backend, check_crc
from .threads import is_thread_start_failure, resource_limit_error


class NativeEngine:
    """A thin owner of one ``_native.Engine``; the CPU and staged backends share it."""

    def __init__(self, threads: int, chunk_bytes: int) -> None:
        try:
            # Starts all ``threads`` workers now; on failure the C++ side joins the ones that
            # started and raises OSError with pthread_create's errno (EAGAIN, ENOMEM).
            self.engine = _native.Engine(threads, chunk_bytes)
        except (OSError, MemoryError) as exc:
            if is_thread_start_failure(exc):
                raise resource_limit_error(f"the native I/O engine's {threads} worker threads", exc) from exc
            raise

    def write(self, address: int, nbytes: int, extent: Extent) -> None:
        """Blocking write of ``nbytes`` at ``address`` into ``extent`` (GIL released)."""
        self.engine.write(extent.file.io_fd, address, nbytes, extent.offset, extent.file.path).result()

    def read(self, address: int, nbytes: int, extent: Extent, offset: int = 0) -> None:
        """Blocking read of ``nbytes`` from ``extent`` (+``offset``) to ``address`` (GIL released)."""
        self.engine.read(extent.file.io_fd, address, nbytes, extent.offset + offset, extent.file.path).result()

    def write_at(self, address: int, nbytes: int, extent: Extent, offset: int):
        """Non-blocking write of a piece of an extent; returns the engine's request."""
        return self.engine.write(extent.file.io_fd, address, nbytes, extent.offset + offset, extent.file.path)

    def read_at(self, address: int, nbytes: int, extent: Extent, offset: int):
        """Non-blocking read of a piece of an extent; returns the engine's request."""
        return self.engine.read(extent.file.io_fd, address, nbytes, extent.offset + offset, extent.file.path)

    def close(self) -> None:
        self.engine.close()


class _AlignedBuffers:
    """Page-aligned host buffers of ``nbytes`` each, made on demand and reused (at most one per
    writer thread is ever out at once)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = align_up(nbytes)
        self._free: List[torch.Tensor] = []
        self._lock = threading.Lock()

    def acquire(self) -> torch.Tensor:
        with self._lock:
            if self._free:
                return self._free.pop()
        raw = torch.empty(self.nbytes + ALIGNMENT, dtype=torch.uint8)
        skip = (-raw.data_ptr()) % ALIGNMENT
        return raw[skip:skip + self.nbytes]

    def release(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)

    def close(self) -> None:
        with self._lock:
            self._free.clear()


class NativeHostBackend(Backend):
    """Host (CPU) tensors written straight from their memory by the native engine.

    With ``verify`` each piece is first copied into an aligned buffer, checksummed there and
    written from there, so the checksum describes exactly the bytes the drive got even while
    the compute thread changes other bytes of the same storage (another ``unsafe_split``
    piece: the saved tensor's own bytes do not change, but the storage's do).
    """

    name = "native"

    def __init__(self, engine: NativeEngine, piece_bytes: int = 4 << 20) -> None:
        self.engine = engine
        self.piece_bytes = align_up(piece_bytes)
        self._buffers = _AlignedBuffers(self.piece_bytes)

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def write(self, src: torch.Tensor, extent: Extent, ready: Optional[object],
              verify: bool = False, stop=None) -> Optional[List[int]]:
        # Host memory is not device memory: a write in flight costs only drive time, and the
        # engine already splits it into chunks, so it is not abandoned half-way.
        if not verify:
            self.engine.write(src.data_ptr(), src.numel(), extent)
            return None
        crcs: List[int] = []
        buf = self._buffers.acquire()
        try:
            base, nbytes, step = src.data_ptr(), src.numel(), self.piece_bytes
            for start in range(0, nbytes, step):
                n = min(step, nbytes - start)
                # Through the kernel, GIL released: a storage the compute thread frees
                # meanwhile (resize_(0)) raises EFAULT here instead of crashing the process.
                _native.copy(buf.data_ptr(), base + start, n)
                crcs.append(_native.crc32c(buf.data_ptr(), n))
                self.engine.write_at(buf.data_ptr(), n, extent, start).result()
        finally:
            self._buffers.release(buf)
        return crcs

    def submit_write(self, address: int, nbytes: int, extent: Extent, verify: bool):
        """Non-blocking, from any thread: the engine's request for writing ``nbytes`` at
        ``address`` to ``extent``. With ``verify`` the engine copies each chunk into an aligned
        buffer, checksums it there and writes from there (``request.checksums()``): the same
        rule as ``write``, done by the engine's own workers."""
        if chaos.ON: chaos.pause()  # SSDOFFLOAD_CHAOS: the submission comes late
        return self.engine.engine.write(extent.file.io_fd, address, nbytes, extent.offset, extent.file.path,
                                        verify=verify)

    def submit_read(self, address: int, nbytes: int, extent: Extent, expected: Optional[List[int]]):
        """Non-blocking: the engine's request for reading ``extent`` into ``address``, each
        chunk checked against ``expected`` (the checksums of ``submit_write`` or ``write``:
        both are per ``chunk_bytes`` piece)."""
        if chaos.ON: chaos.pause()  # SSDOFFLOAD_CHAOS: the submission comes late
        return self.engine.engine.read(extent.file.io_fd, address, nbytes, extent.offset, extent.file.path,
                                       expected=expected)

    def read(self, dst: torch.Tensor, extent: Extent, allocated: Optional[object],
             expected: Optional[List[int]] = None) -> None:
        self.engine.read(dst.data_ptr(), dst.numel(), extent)
        if expected is not None:
            step = self.piece_bytes
            for i, start in enumerate(range(0, dst.numel(), step)):
                check_crc(dst.data_ptr() + start, min(step, dst.numel() - start), expected[i], extent, start)
        return None

    def close(self) -> None:
        self._buffers.close()
        self.engine.close()
