"""Exceptions raised by ssdoffload."""
from __future__ import annotations


class OffloadError(RuntimeError):
    """Base class of every error ssdoffload raises on its own account."""


class SpillPathError(OffloadError, ValueError):
    """A spill directory cannot be used (missing drive, a file, not writable, unsafe)."""


class SpillReadError(OffloadError):
    """An activation could not be read back intact; the gradient would be wrong, so we stop."""


class StateError(OffloadError):
    """An entry was asked to make a transition its state machine does not allow (a bug)."""


class IntegrityError(OffloadError):
    """A spill extent read back does not match the checksum taken when it was written."""

    def __init__(self, path: str, offset: int, expected: int, got: int) -> None:
        super().__init__(f"checksum mismatch in {path} at offset {offset}: "
                         f"expected crc32c {expected:#010x}, read {got:#010x}")
        self.path, self.offset = path, offset


class WriteAbandoned(OffloadError):
    """A write stopped between pieces because backward already used and freed its tensor."""


class ResourceLimitError(OffloadError):
    """The offloader could not start its I/O threads: a process, thread or address-space limit
    stopped it. The message names the part that failed and the limits with their values."""
