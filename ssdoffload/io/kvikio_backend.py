"""The kvikio backend: CUDA tensors through kvikio's ``CuFile`` (GPUDirect Storage where the
host has it, kvikio's compatibility mode with its own bounce buffers where not).

Install with the ``gds`` extra (``kvikio-cu13``). kvikio's futures complete only when the data
is where it belongs, so:

* write: the I/O thread first synchronizes the tensor's ``ready`` event (the producing kernel
  finished), then ``pwrite``s the device memory and waits; afterwards the caller may drop the
  tensor.
* read: the I/O thread synchronizes the ``allocated`` event (kernels queued earlier on the
  compute stream no longer use the destination memory), then ``pread``s into it and waits; the
  data is in device memory when the future is done, so no event is returned.

``KVIKIO_NTHREADS`` defaults to 1 in kvikio; we set it from ``io_threads`` unless the user did.
"""
from __future__ import annotations

import os
import threading
from typing import Dict, Optional

import torch

from ..errors import WriteAbandoned
from ..store import Extent
from .base import Backend


#: Size of one kvikio request; between requests a write checks whether it is still wanted.
PIECE_BYTES = 64 << 20


def kvikio_available() -> bool:
    try:
        import kvikio  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA library underneath
        return False
    return True


class KvikioBackend(Backend):
    name = "kvikio"

    def __init__(self, threads: int, task_bytes: int) -> None:
        os.environ.setdefault("KVIKIO_NTHREADS", str(threads))
        import kvikio
        import kvikio.defaults

        self._kvikio = kvikio
        self._task_bytes = task_bytes
        self._files: Dict[str, object] = {}
        self._lock = threading.Lock()
        self.compat_mode = bool(getattr(kvikio.defaults, "is_compat_mode_preferred", lambda: False)())

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def _file(self, extent: Extent):
        path = extent.file.path
        with self._lock:
            f = self._files.get(path)
            if f is None:
                f = self._kvikio.CuFile(extent.file.proc_path, "r+")  # same inode, not the name
                self._files[path] = f
            return f

    def write(self, src: torch.Tensor, extent: Extent, ready: Optional[torch.cuda.Event],
              verify: bool = False, stop=None) -> None:
        if verify:  # BackendSet never routes verified writes here
            raise ValueError("the kvikio backend does not checksum; use the staged native backend")
        if ready is not None:
            ready.synchronize()
        f = self._file(extent)
        total = src.numel()
        # Pieces of PIECE_BYTES, so a write whose tensor backward already freed stops early.
        for start in range(0, total, PIECE_BYTES):
            if stop is not None and start and stop():
                raise WriteAbandoned(f"write abandoned after {start} of {total} bytes")
            n = min(PIECE_BYTES, total - start)
            done = f.pwrite(src[start:start + n], n, extent.offset + start, self._task_bytes).get()
            if done != n:
                raise OSError(5, f"short write: {done} of {n} bytes at {extent.offset + start}",
                              extent.file.path)

    def read(self, dst: torch.Tensor, extent: Extent, allocated: Optional[torch.cuda.Event],
             expected=None) -> Optional[torch.cuda.Event]:
        if allocated is not None:
            allocated.synchronize()
        n = self._file(extent).pread(dst, dst.numel(), extent.offset, self._task_bytes).get()
        if n != dst.numel():
            raise OSError(5, f"short read: {n} of {dst.numel()} bytes", extent.file.path)
        return None

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()
