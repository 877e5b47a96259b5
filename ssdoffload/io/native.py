"""The native backend: our C++ engine (``csrc/native_engine.cpp``) for host memory.

The engine splits each request into ``chunk_bytes`` pieces, runs them on its own worker threads
with ``pwrite``/``pread`` on the O_DIRECT descriptor (bouncing through aligned buffers when the
caller's memory is not 4 KiB-aligned) and releases the GIL while Python waits. CUDA tensors go
through ``StagedCudaBackend`` (``staging.py``), which copies them through pinned memory and then
uses this engine.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .. import _native
from ..store import Extent
from .base import Backend, check_crc


class NativeEngine:
    """A thin owner of one ``_native.Engine``; the CPU and staged backends share it."""

    def __init__(self, threads: int, chunk_bytes: int) -> None:
        self.engine = _native.Engine(threads, chunk_bytes)

    def write(self, address: int, nbytes: int, extent: Extent) -> None:
        """Blocking write of ``nbytes`` at ``address`` into ``extent`` (GIL released)."""
        self.engine.write(extent.file.io_fd, address, nbytes, extent.offset, extent.file.path).result()

    def read(self, address: int, nbytes: int, extent: Extent, offset: int = 0) -> None:
        """Blocking read of ``nbytes`` from ``extent`` (+``offset``) to ``address`` (GIL released)."""
        self.engine.read(extent.file.io_fd, address, nbytes, extent.offset + offset, extent.file.path).result()

    def write_at(self, address: int, nbytes: int, extent: Extent, offset: int):
        """Non-blocking write of a piece of an extent; returns the engine's request."""
        return self.engine.write(extent.file.io_fd, address, nbytes, extent.offset + offset, extent.file.path)

    def close(self) -> None:
        self.engine.close()


class NativeHostBackend(Backend):
    """Host (CPU) tensors written straight from their memory by the native engine."""

    name = "native"

    def __init__(self, engine: NativeEngine) -> None:
        self.engine = engine

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def write(self, src: torch.Tensor, extent: Extent, ready: Optional[object],
              verify: bool = False, stop=None) -> Optional[List[int]]:
        # Host memory is not device memory: a write in flight costs only drive time, and the
        # engine already splits it into chunks, so it is not abandoned half-way.
        crc = _native.crc32c(src.data_ptr(), src.numel()) if verify else None
        self.engine.write(src.data_ptr(), src.numel(), extent)
        return [crc] if verify else None

    def read(self, dst: torch.Tensor, extent: Extent, allocated: Optional[object],
             expected: Optional[List[int]] = None) -> None:
        self.engine.read(dst.data_ptr(), dst.numel(), extent)
        if expected is not None:
            check_crc(dst.data_ptr(), dst.numel(), expected[0], extent, 0)
        return None

    def close(self) -> None:
        self.engine.close()
