"""I/O backends behind one interface (``base.Backend``) and the engine that runs them.

* ``native``: host memory, our C++ engine (O_DIRECT, GIL-free worker pool).
* ``native-staged``: CUDA memory through a pinned pool, then the native engine.
* ``kvikio``: CUDA memory through kvikio (GDS, or its compatibility mode).
"""
from __future__ import annotations

import logging
import threading
from typing import Dict

import torch

from ..config import OffloadConfig
from .base import Backend, IOEngine, byte_view, close_backends
from .kvikio_backend import KvikioBackend, kvikio_available
from .native import NativeEngine, NativeHostBackend
from .staging import StagedCudaBackend

log = logging.getLogger("ssdoffload")

__all__ = ["Backend", "IOEngine", "BackendSet", "byte_view", "kvikio_available"]


class BackendSet(dict):
    """Device type -> backend, chosen from the config; CUDA backends are made on first use."""

    def __init__(self, config: OffloadConfig) -> None:
        super().__init__()
        if config.backend == "kvikio" and not kvikio_available():
            raise ValueError(
                "OffloadConfig.backend='kvikio' but kvikio cannot be imported; install the "
                "'gds' extra (pip install kvikio-cu13) or use backend='native'"
            )
        if config.backend == "kvikio" and config.verify:  # asked for explicitly
            raise ValueError("OffloadConfig.verify=True needs backend='native' or 'auto' (kvikio "
                             "moves device memory directly, so there is no host copy to checksum)")
        self.config = config
        self.native = NativeEngine(config.io_threads, config.chunk_bytes)
        self["cpu"] = NativeHostBackend(self.native, config.chunk_bytes)
        self._lock = threading.Lock()

    def get(self, device_type, default=None):
        if device_type == "cuda" and "cuda" not in self:
            with self._lock:
                if "cuda" not in self:
                    self["cuda"] = self._make_cuda_backend()
        return super().get(device_type, default)

    def _make_cuda_backend(self) -> Backend:
        cfg = self.config
        # verify checksums pieces in pinned host memory, which kvikio's path never touches.
        if not cfg.checksums and (cfg.backend == "kvikio" or (cfg.backend == "auto" and kvikio_available())):
            backend = KvikioBackend(cfg.io_threads, cfg.chunk_bytes)
            log.info("ssdoffload: CUDA tensors go through kvikio (compat mode: %s)", backend.compat_mode)
            return backend
        log.info("ssdoffload: CUDA tensors are staged through %d MiB of pinned memory",
                 cfg.pinned_pool_bytes >> 20)
        return StagedCudaBackend(self.native, cfg.pinned_pool_bytes, cfg.chunk_bytes,
                                 torch.device("cuda", torch.cuda.current_device()))


def make_engine(config: OffloadConfig) -> IOEngine:
    """The backends and the engine, with every I/O thread already started: a limit on threads
    fails here with ``ResourceLimitError`` (nothing left running), not in the first step."""
    backends: Dict[str, Backend] = BackendSet(config)
    try:
        return IOEngine(backends, config.io_threads, host_pool=config.host_cache_bytes > 0)
    except BaseException:
        close_backends(backends)  # stops the native engine's workers
        raise
