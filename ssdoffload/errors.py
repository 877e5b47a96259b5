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
