"""Starting the offloader's I/O threads up front, and saying which limit stopped them.

Every thread the offloader needs is started when it is constructed: a limit on processes,
threads or address space then fails construction with ``ResourceLimitError``, naming the part
that could not start and the limits in force, instead of a bare ``BlockingIOError`` here or a
"can't start new thread" from inside the first forward.
"""
from __future__ import annotations

import errno
import logging
import os
import pathlib
import resource
import threading
from typing import List, Optional

from ..errors import ResourceLimitError

log = logging.getLogger("ssdoffload")

# What a refused thread looks like: CPython's threading raises RuntimeError with this text;
# the native engine raises OSError from pthread_create's errno (EAGAIN, or ENOMEM for the
# stack); an allocation under RLIMIT_AS on the way may raise MemoryError.
_START_FAILED = "can't start new thread"
_START_ERRNOS = (errno.EAGAIN, errno.ENOMEM)


def is_thread_start_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the system refusing a new thread (not a bug or a bad argument)."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _START_ERRNOS
    return isinstance(exc, RuntimeError) and _START_FAILED in str(exc)


def _fmt_limit(value: int, unit: str = "") -> str:
    if value == resource.RLIM_INFINITY:
        return "unlimited"
    if unit == "bytes":
        return f"{value / 2**20:.0f} MiB"
    return str(value)


def _rlimit(name: str, unit: str = "") -> Optional[str]:
    which = getattr(resource, name, None)
    if which is None:
        return None
    try:
        soft, hard = resource.getrlimit(which)
    except (OSError, ValueError):
        return None
    return f"soft {_fmt_limit(soft, unit)}, hard {_fmt_limit(hard, unit)}"


def _read(path: str) -> Optional[str]:
    """A small /proc or /sys file's text, or None where it cannot be read."""
    try:
        return pathlib.Path(path).read_text().strip()
    except OSError:
        return None


def _cgroup_pids_max() -> Optional[str]:
    """``pids.max`` of this process's cgroup (v2), the container's task limit, if readable."""
    groups = _read("/proc/self/cgroup") or ""
    for line in groups.splitlines():
        if line.startswith("0::"):
            return _read(os.path.join("/sys/fs/cgroup", line[3:].lstrip("/"), "pids.max"))
    return None


def _process_status() -> str:
    """This process's thread count and address-space size, from /proc/self/status."""
    fields = {}
    for line in (_read("/proc/self/status") or "").splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmSize"):
            fields[key] = value.strip()
    if not fields:
        return f"this process has {threading.active_count()} Python threads"
    return (f"this process: {fields.get('Threads', '?')} threads, "
            f"{fields.get('VmSize', '?')} of address space")


def describe_limits() -> str:
    """The limits that can refuse a new thread, with their current values."""
    parts: List[str] = []
    for name, what, unit in (("RLIMIT_NPROC", "processes and threads of this user; ulimit -u", ""),
                             ("RLIMIT_AS", "address space; ulimit -v; each thread's stack counts", "bytes"),
                             ("RLIMIT_STACK", "stack reserved per thread; ulimit -s", "bytes")):
        value = _rlimit(name, unit)
        if value is not None:
            parts.append(f"{name} {value} ({what})")
    threads_max = _read("/proc/sys/kernel/threads-max")
    if threads_max is not None:
        parts.append(f"kernel.threads-max {threads_max}")
    pids_max = _cgroup_pids_max()
    if pids_max is not None:
        parts.append(f"cgroup pids.max {pids_max}")
    return "; ".join(parts) + "; " + _process_status()


def resource_limit_error(part: str, exc: BaseException) -> ResourceLimitError:
    """A ``ResourceLimitError`` saying that ``part`` could not start because of ``exc``."""
    return ResourceLimitError(
        f"ssdoffload could not start {part}: {type(exc).__name__}: {exc}. A limit on processes, "
        f"threads or address space refused a new thread. Limits now: {describe_limits()}. "
        f"Lower OffloadConfig.io_threads (the offloader starts io_threads native workers, "
        f"io_threads // 2 write and as many read threads, at least one each, and one more with a "
        f"host tier) or raise the limit that binds.")
