"""Sequential write and read bandwidth of a spill path, through ssdoffload's own engine.

The probe writes a preallocated spill file (``store.SpillFile``: the same O_DIRECT descriptor,
extents and native C++ engine the offloader uses) in large blocks, then reads it back, and
reports bytes per second for each direction. Buffers are 4 KiB-aligned and filled with random
bytes (some drives compress zeros). The file is removed afterwards, and so is the directory
when the probe created it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import List, Sequence

import torch

from ..io.native import NativeEngine
from ..store import SpillDirectory, SpillFile

log = logging.getLogger("ssdoffload")

ALIGN = 4096


@dataclass
class ProbeResult:
    """Measured sequential bandwidth of one spill directory (bytes per second)."""

    path: str
    nbytes: int
    block_bytes: int
    threads: int
    direct: bool
    write_bytes_per_s: float
    read_bytes_per_s: float
    write_seconds: float
    read_seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def _aligned_buffer(nbytes: int) -> torch.Tensor:
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    start = (-raw.data_ptr()) % ALIGN
    buf = raw[start:start + nbytes]
    buf.random_(0, 256, generator=torch.Generator().manual_seed(0))
    return buf


def measure(path: str, nbytes: int = 256 << 20, block_bytes: int = 64 << 20, threads: int = 4,
            chunk_bytes: int = 4 << 20, repeats: int = 1) -> ProbeResult:
    """Write then read ``nbytes`` sequentially in ``block_bytes`` requests; best of ``repeats``."""
    if nbytes <= 0 or block_bytes <= 0:
        raise ValueError(f"probe sizes must be positive (nbytes={nbytes}, block_bytes={block_bytes})")
    block_bytes = min(block_bytes, nbytes)
    block_bytes -= block_bytes % ALIGN or 0
    block_bytes = max(block_bytes, ALIGN)
    blocks = max(1, nbytes // block_bytes)
    nbytes = blocks * block_bytes
    directory = SpillDirectory.open(path)
    try:
        spill = SpillFile(directory, nbytes)
    except BaseException:
        directory.close(remove_if_created=True)
        raise
    engine = NativeEngine(threads, chunk_bytes)
    try:
        buf = _aligned_buffer(block_bytes)
        extents = [spill.allocate(block_bytes) for _ in range(blocks)]
        best_w = best_r = float("inf")
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            for ext in extents:
                engine.write(buf.data_ptr(), block_bytes, ext)
            best_w = min(best_w, time.perf_counter() - t0)
            t0 = time.perf_counter()
            for ext in extents:
                engine.read(buf.data_ptr(), block_bytes, ext)
            best_r = min(best_r, time.perf_counter() - t0)
        result = ProbeResult(path=directory.path, nbytes=nbytes, block_bytes=block_bytes, threads=threads,
                             direct=spill.is_direct, write_bytes_per_s=nbytes / best_w,
                             read_bytes_per_s=nbytes / best_r, write_seconds=best_w, read_seconds=best_r)
    finally:
        engine.close()
        spill.close()
        directory.close(remove_if_created=True)  # a directory the probe made goes again
    log.info("ssdoffload: probe %s: write %.2f GB/s, read %.2f GB/s (O_DIRECT: %s)", directory,
             result.write_bytes_per_s / 1e9, result.read_bytes_per_s / 1e9, result.direct)
    return result


def measure_all(paths: Sequence[str], nbytes: int = 256 << 20, threads: int = 4) -> List[ProbeResult]:
    """Probe each spill directory in turn (one per drive; their bandwidths add up when striped)."""
    return [measure(p, nbytes=max(ALIGN, nbytes // max(1, len(paths))), threads=threads) for p in paths]


def total_bandwidth(results: Sequence[ProbeResult]) -> tuple:
    """(write, read) bytes per second of all paths together (striping adds them)."""
    return (sum(r.write_bytes_per_s for r in results), sum(r.read_bytes_per_s for r in results))
