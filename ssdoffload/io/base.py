"""The one interface every I/O backend implements.

A backend moves the bytes of one storage between memory and an extent of a spill file. Its
two methods are *blocking* and run on the offloader's I/O threads (never on the compute
thread); ``IOEngine`` runs them on job pools (``jobs.py``) and returns ``IOFuture``s, so
callers only ever see futures. Host tensors skip the pools: ``NativeHostBackend.submit_write``
/ ``submit_read`` hand the request to the native engine's own queue from the compute thread
(``places.DrivePlace.direct``), and ``IOFuture.of_request`` makes it the same future type.

Buffers are 1-D ``uint8`` tensors over the whole storage (``byte_view``). Extents start at a
4096-byte file offset and are at least ``nbytes`` rounded up to 4096 long; a backend may write
zero padding up to the extent's end.

CUDA stream rules (all backends):

* ``write``: ``ready`` is an event recorded on the compute stream right after the tensor was
  saved. The backend must not read the device memory before that event completed. It returns
  once it no longer needs the source memory; the caller then drops its reference, which hands
  the memory back to the caching allocator (no ``record_stream``).
* ``read``: ``dst`` was allocated on the compute stream and ``allocated`` recorded there; the
  backend must not write ``dst`` before that event completed (the allocator may have handed out
  memory that kernels queued earlier still use). It returns an event the compute stream must
  wait on before using ``dst``, or ``None`` when the data is already in place.
"""
from __future__ import annotations

import abc
import threading
from typing import Callable, List, Optional

import torch

from . import _native
from ..errors import IntegrityError
from ..store import Extent
from .jobs import IOFuture, JobPool


def check_crc(address: int, nbytes: int, expected: int, extent: Extent, offset: int) -> None:
    """Raise ``IntegrityError`` unless the CRC-32C of the memory matches ``expected``."""
    got = _native.crc32c(address, nbytes)
    if got != expected:
        raise IntegrityError(extent.file.path, extent.offset + offset, expected, got)


def byte_view(storage: torch.UntypedStorage) -> torch.Tensor:
    """A 1-D uint8 tensor over all of ``storage`` (no copy)."""
    out = torch.empty(0, dtype=torch.uint8, device=storage.device)
    out.set_(storage, 0, (storage.nbytes(),), (1,))
    return out


class Backend(abc.ABC):
    """Moves storage bytes to and from spill-file extents. Methods block; threads call them."""

    name: str = "?"

    @abc.abstractmethod
    def supports(self, device: torch.device) -> bool:
        """Whether this backend can move tensors living on ``device``."""

    @abc.abstractmethod
    def write(self, src: torch.Tensor, extent: Extent, ready: Optional["torch.cuda.Event"],
              verify: bool = False, stop: Optional[Callable[[], bool]] = None) -> Optional[List[int]]:
        """Write all of ``src`` at ``extent``. Raises ``OSError`` on failure.

        With ``verify``, returns the CRC-32C of each piece written (the backend's granularity),
        to be handed back to ``read``. Backends that write in pieces call ``stop()`` between
        pieces and raise ``WriteAbandoned`` when it is true (the tensor was freed: finishing the
        write would only hold device memory and drive time for nothing).
        """

    @abc.abstractmethod
    def read(self, dst: torch.Tensor, extent: Extent, allocated: Optional["torch.cuda.Event"],
             expected: Optional[List[int]] = None) -> Optional["torch.cuda.Event"]:
        """Fill all of ``dst`` from ``extent``. Raises ``OSError`` on failure, and
        ``IntegrityError`` when ``expected`` checksums do not match what was read (before any
        of it reaches ``dst`` on a device)."""

    def close(self) -> None:
        """Release what the backend holds (threads, pinned memory, file handles)."""


class IOEngine:
    """Runs backend calls on two thread pools and hands back futures.

    Reads get their own pool so a backward that waits on a prefetch is never queued behind
    forward's writes. Every pool is started to full size here (``jobs.JobPool``), and the
    host-RAM tier's copy thread too when ``host_pool``: a limit on threads then fails
    construction with ``ResourceLimitError`` rather than the first step.
    """

    def __init__(self, backends: dict, threads: int, host_pool: bool = False) -> None:
        self.backends = backends  # device type -> Backend
        self._writers: Optional[JobPool] = None
        self._readers: Optional[JobPool] = None
        self._host: Optional[JobPool] = None
        self._host_lock = threading.Lock()
        per_pool = max(1, threads // 2)
        try:
            self._writers = JobPool(per_pool, "ssdoffload-write", f"the {per_pool} write threads")
            self._readers = JobPool(per_pool, "ssdoffload-read", f"the {per_pool} read threads")
            if host_pool:
                self._host = JobPool(1, "ssdoffload-host", "the host-RAM tier's copy thread")
        except BaseException:
            # The pools already started are stopped; the backends stay the caller's to close.
            self._shutdown_pools()
            raise

    def backend_for(self, device: torch.device) -> Backend:
        backend = self.backends.get(device.type)
        if backend is None:
            raise ValueError(f"no I/O backend for tensors on {device}")
        return backend

    def submit_write(self, fn, *args) -> IOFuture:
        return self._writers.submit(fn, *args)

    def submit_read(self, fn, *args) -> IOFuture:
        return self._readers.submit(fn, *args)

    def submit_host(self, fn, *args) -> IOFuture:
        """Copies to and from the host-RAM tier: their own thread, so they never queue behind
        the drive's writes or reads (reloads take from RAM first). Started at construction when
        the engine was told of a host tier, else made on first use."""
        with self._host_lock:
            if self._host is None:
                self._host = JobPool(1, "ssdoffload-host", "the host-RAM tier's copy thread")
            return self._host.submit(fn, *args)

    def _shutdown_pools(self) -> None:
        with self._host_lock:
            pools = [self._writers, self._readers, self._host]
            self._host = None
        for pool in pools:
            if pool is not None:
                pool.shutdown()

    def close(self) -> None:
        self._shutdown_pools()
        close_backends(self.backends)


def close_backends(backends: dict) -> None:
    """Close each backend once (one backend may serve several device types)."""
    closed = set()
    for backend in backends.values():
        if id(backend) not in closed:
            closed.add(id(backend))
            backend.close()
