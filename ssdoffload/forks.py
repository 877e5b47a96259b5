"""Which process this is, without a system call per question.

The hooks ask "is this still the process that built the graph?" for every tensor autograd
unpacks (a forked DataLoader worker must not wait on the parent's I/O); ``os.getpid()`` is a
system call each time. The answer only changes at a fork, so it is kept here and refreshed in
the child by a fork handler.
"""
from __future__ import annotations

import os

_pid = os.getpid()


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


def current_pid() -> int:
    """``os.getpid()``, without the system call."""
    return _pid
