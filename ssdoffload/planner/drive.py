"""A quick sequential O_DIRECT probe of the drive holding a path (``probe_drive``)."""
from __future__ import annotations

import mmap
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

from .spec import GB


# -- the plan ---------------------------------------------------------------------------------
@dataclass
class Drive:
    """The spill drive(s) of one GPU: bandwidth in GB/s, endurance in TB written."""

    write_gbps: float = 3.0
    read_gbps: float = 6.0
    tbw: Optional[float] = None          # rated terabytes written
    dwpd: Optional[float] = None         # or drive writes per day over the warranty ...
    capacity_tb: Optional[float] = None  # ... of this capacity
    warranty_years: float = 5.0
    gpus_per_drive: float = 1.0
    source: str = "assumed"

    @property
    def endurance_tb(self) -> Optional[float]:
        if self.tbw is not None:
            return self.tbw
        if self.dwpd is not None and self.capacity_tb is not None:
            return self.dwpd * self.capacity_tb * 365 * self.warranty_years
        return None


# -- a quick drive probe --------------------------------------------------------------------
def probe_drive(path: str, nbytes: int = 256 << 20, chunk: int = 4 << 20) -> Drive:
    """Measure sequential O_DIRECT write and read bandwidth of the drive holding ``path``."""
    os.makedirs(path, exist_ok=True)
    fd_tmp, name = tempfile.mkstemp(prefix=".ssdoffload-probe-", dir=path)
    os.close(fd_tmp)
    buf = mmap.mmap(-1, chunk)
    buf.write(os.urandom(chunk))
    flags = getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(name, os.O_WRONLY | flags)
        try:
            t0 = time.perf_counter()
            for off in range(0, nbytes, chunk):
                os.pwrite(fd, buf, off)
            os.fsync(fd)
            wt = time.perf_counter() - t0
        finally:
            os.close(fd)
        fd = os.open(name, os.O_RDONLY | flags)
        try:
            t0 = time.perf_counter()
            for off in range(0, nbytes, chunk):
                os.preadv(fd, [buf], off)
            rt = time.perf_counter() - t0
        finally:
            os.close(fd)
    finally:
        os.unlink(name)
        buf.close()
    return Drive(write_gbps=nbytes / wt / GB, read_gbps=nbytes / rt / GB,
                 source=f"probed {nbytes >> 20} MiB at {path}")
