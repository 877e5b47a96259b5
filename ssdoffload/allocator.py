"""A first-fit free-list allocator of 4 KiB-aligned extents inside one spill file.

Pure bookkeeping (no I/O), so it is tested on its own. Freed extents are merged with their
neighbours, so a training loop that frees everything at the end of each step gets the same
offsets back the next step and the file stops growing after the first step.
"""
from __future__ import annotations

import bisect
from typing import List, Tuple

ALIGNMENT = 4096


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


class ExtentAllocator:
    """Hands out ``(offset, length)`` ranges of a file of ``capacity`` bytes.

    ``allocate`` returns ``None`` when no free range is large enough; the caller then grows the
    file with ``grow`` and tries again. Lengths are rounded up to ``ALIGNMENT``.
    """

    def __init__(self, capacity: int = 0) -> None:
        if capacity % ALIGNMENT:
            raise ValueError(f"capacity {capacity} is not a multiple of {ALIGNMENT}")
        self.capacity = capacity
        # Sorted, non-overlapping, non-adjacent free ranges.
        self._starts: List[int] = []
        self._lengths: List[int] = []
        if capacity:
            self._starts.append(0)
            self._lengths.append(capacity)
        self.used = 0

    def allocate(self, nbytes: int):
        length = align_up(max(nbytes, 1))
        for i, free in enumerate(self._lengths):
            if free >= length:
                offset = self._starts[i]
                if free == length:
                    del self._starts[i], self._lengths[i]
                else:
                    self._starts[i] += length
                    self._lengths[i] -= length
                self.used += length
                return offset, length
        return None

    def free(self, offset: int, length: int) -> None:
        if offset % ALIGNMENT or length % ALIGNMENT or length <= 0 or offset + length > self.capacity:
            raise ValueError(f"bad extent ({offset}, {length}) for capacity {self.capacity}")
        i = bisect.bisect_left(self._starts, offset)
        if (i < len(self._starts) and self._starts[i] < offset + length) or \
                (i > 0 and self._starts[i - 1] + self._lengths[i - 1] > offset):
            raise ValueError(f"extent ({offset}, {length}) is already free (double free)")
        self.used -= length
        merge_prev = i > 0 and self._starts[i - 1] + self._lengths[i - 1] == offset
        merge_next = i < len(self._starts) and self._starts[i] == offset + length
        if merge_prev and merge_next:
            self._lengths[i - 1] += length + self._lengths[i]
            del self._starts[i], self._lengths[i]
        elif merge_prev:
            self._lengths[i - 1] += length
        elif merge_next:
            self._starts[i] = offset
            self._lengths[i] += length
        else:
            self._starts.insert(i, offset)
            self._lengths.insert(i, length)

    def grow(self, new_capacity: int) -> None:
        if new_capacity % ALIGNMENT or new_capacity < self.capacity:
            raise ValueError(f"cannot grow from {self.capacity} to {new_capacity}")
        added = new_capacity - self.capacity
        if not added:
            return
        old = self.capacity
        self.capacity = new_capacity
        if self._starts and self._starts[-1] + self._lengths[-1] == old:
            self._lengths[-1] += added
        else:
            self._starts.append(old)
            self._lengths.append(added)

    def free_ranges(self) -> List[Tuple[int, int]]:
        return list(zip(self._starts, self._lengths))
