"""Sequential write and read bandwidth of a spill path, through ssdoffload's own engine, and
the same transfers made directly (the raw baseline the engine is judged against).

The probe writes a preallocated spill file (``store.SpillFile``: the same O_DIRECT descriptor,
extents and native C++ engine the offloader uses) in large blocks, then reads it back, and
reports bytes per second for each direction. Then the raw baseline moves the same bytes with
the same request size and parallelism without the engine: ``threads`` Python threads, each
``os.pwrite``/``os.pread`` of ``chunk_bytes`` requests on the same O_DIRECT descriptor (the GIL
is released in the syscalls, as in parallel ``dd oflag=direct`` streams). Buffers are 4 KiB-
aligned and filled with random bytes (some drives compress zeros). The file is removed
afterwards, and so is the directory when the probe created it.
"""
from __future__ import annotations

import logging
import mmap
import os
import threading
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
    raw_write_bytes_per_s: float = 0.0
    raw_read_bytes_per_s: float = 0.0
    chunk_bytes: int = 0

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
        # One untimed pass first: the first write into preallocated space also converts the
        # filesystem's unwritten extents, which only the first of the two measurements would pay.
        for req in [engine.write_at(buf.data_ptr(), block_bytes, ext, 0) for ext in extents]:
            req.result()
        best_w = best_r = float("inf")
        for _ in range(max(1, repeats)):
            # Every block submitted at once, then waited for: the engine's queue stays full,
            # as the raw baseline's threads do (waiting block by block would measure the gap).
            t0 = time.perf_counter()
            for req in [engine.write_at(buf.data_ptr(), block_bytes, ext, 0) for ext in extents]:
                req.result()
            best_w = min(best_w, time.perf_counter() - t0)
            t0 = time.perf_counter()
            for req in [engine.read_at(buf.data_ptr(), block_bytes, ext, 0) for ext in extents]:
                req.result()
            best_r = min(best_r, time.perf_counter() - t0)
        raw_w, raw_r = _raw(spill.io_fd, [(e.offset, block_bytes) for e in extents], chunk_bytes, threads,
                            repeats)
        result = ProbeResult(path=directory.path, nbytes=nbytes, block_bytes=block_bytes, threads=threads,
                             direct=spill.is_direct, write_bytes_per_s=nbytes / best_w,
                             read_bytes_per_s=nbytes / best_r, write_seconds=best_w, read_seconds=best_r,
                             raw_write_bytes_per_s=nbytes / raw_w, raw_read_bytes_per_s=nbytes / raw_r,
                             chunk_bytes=chunk_bytes)
    finally:
        engine.close()
        spill.close()
        directory.close(remove_if_created=True)  # a directory the probe made goes again
    log.info("ssdoffload: probe %s: write %.2f GB/s, read %.2f GB/s (O_DIRECT: %s)", directory,
             result.write_bytes_per_s / 1e9, result.read_bytes_per_s / 1e9, result.direct)
    return result


def _raw(fd: int, ranges: Sequence[tuple], chunk_bytes: int, threads: int, repeats: int) -> tuple:
    """Best (write, read) seconds of moving ``ranges`` of the file in ``chunk_bytes`` requests
    spread over ``threads`` threads, with plain ``os.pwrite``/``os.pread``."""
    requests = [(off + start, min(chunk_bytes, length - start))
                for off, length in ranges for start in range(0, length, chunk_bytes)]
    buffers = []
    for _ in range(threads):
        buf = mmap.mmap(-1, chunk_bytes)  # page-aligned, as O_DIRECT needs
        buf.write(os.urandom(chunk_bytes))
        buffers.append(buf)

    def run(write: bool) -> float:
        lock = threading.Lock()
        todo = iter(requests)
        errors: List[BaseException] = []

        def worker(buf: mmap.mmap) -> None:
            view = memoryview(buf)
            try:
                while True:
                    with lock:
                        req = next(todo, None)
                    if req is None:
                        return
                    off, n = req
                    if write:
                        os.pwrite(fd, view[:n], off)
                    else:
                        os.preadv(fd, [view[:n]], off)
            except BaseException as exc:  # surfaced below, not lost in the thread
                errors.append(exc)
            finally:
                view.release()

        workers = [threading.Thread(target=worker, args=(b,), name="ssdoffload-probe-raw") for b in buffers]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if errors:
            raise errors[0]
        return time.perf_counter() - t0

    try:
        best_w = min(run(True) for _ in range(max(1, repeats)))
        best_r = min(run(False) for _ in range(max(1, repeats)))
    finally:
        for b in buffers:
            b.close()
    return best_w, best_r


def measure_all(paths: Sequence[str], nbytes: int = 256 << 20, threads: int = 4) -> List[ProbeResult]:
    """Probe each spill directory in turn (one per drive; their bandwidths add up when striped)."""
    return [measure(p, nbytes=max(ALIGN, nbytes // max(1, len(paths))), threads=threads) for p in paths]


def total_bandwidth(results: Sequence[ProbeResult]) -> tuple:
    """(write, read) bytes per second of all paths together (striping adds them)."""
    return (sum(r.write_bytes_per_s for r in results), sum(r.read_bytes_per_s for r in results))
