"""The memory a read-back lands in, and what it costs.

On the CPU a reload buffer starts on a page boundary, so the engine reads straight into it with
O_DIRECT (torch's allocator aligns to 64 bytes, which sends every read through the engine's
bounce buffer at about half the speed). It is a numpy array one page longer than the tensor,
the tensor's storage starting at the first page boundary inside it: that page is memory the
read-back holds, and the cache counts it (``reload_overhead``) from the read's start to the
release, so a budget is met in memory, not only in tensor bytes (a 16 KiB tensor's buffer is
20 KiB). Elsewhere (CUDA, or a tensor under a page) it is ``torch.empty``: no overhead.
"""
from __future__ import annotations

import numpy
import torch

PAGE = 4096


def reload_overhead(nbytes: int, device: torch.device) -> int:
    """Bytes a reload buffer for ``nbytes`` on ``device`` allocates beyond them."""
    return PAGE if device.type == "cpu" and nbytes >= PAGE else 0


def reload_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """A buffer to read ``nbytes`` back into (see the module docstring); its storage is
    exactly ``nbytes`` long and starts at the buffer, like ``torch.empty``'s."""
    if not reload_overhead(nbytes, device):
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    raw = numpy.empty(nbytes + PAGE, dtype=numpy.uint8)
    skip = (-raw.ctypes.data) % PAGE
    return torch.from_numpy(raw[skip:skip + nbytes])
