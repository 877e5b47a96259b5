"""The spill store: one preallocated, private file per process and spill directory.

Layout and lifetime rules:

* Each directory gets one file ``ssdoffload-<host>-<pid>-<random>.spill``, created with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600 inside a directory of mode 0700, preallocated
  with ``posix_fallocate`` and grown on demand. Tensors get 4 KiB-aligned extents from a
  free-list allocator (``allocator.py``); extents are freed when the last handle dies and
  reused next step, so the file does not grow from step to step.
* Extents are striped round-robin over the directories (one per drive).
* The owning process holds an exclusive ``flock`` on its file. On start, every
  ``ssdoffload-*.spill`` in the directory whose lock can be taken belongs to a dead process
  (a crash, SIGKILL) and is removed; the file of a live process is never touched.
* Files are unlinked on ``close()``; the offloader calls that on exit, on an exception, and at
  interpreter exit. A forked child never closes or writes its parent's files.
* I/O goes through a second descriptor opened with ``O_DIRECT`` where the filesystem accepts it
  (tmpfs does not: there the buffered descriptor is used).
"""
from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import os
import secrets
import socket
import stat
import threading
from dataclasses import dataclass
from typing import List, Optional, Sequence

from .allocator import ExtentAllocator, align_up
from .errors import SpillPathError

log = logging.getLogger("ssdoffload")

FILE_PREFIX = "ssdoffload-"
FILE_SUFFIX = ".spill"


@dataclass(frozen=True)
class Extent:
    """A range of one spill file that holds one storage."""

    file: "SpillFile"
    offset: int
    length: int

    def describe(self) -> str:
        return f"{self.file.path} at offset {self.offset}"


class SpillFile:
    """One preallocated spill file and its extent allocator."""

    def __init__(self, directory: str, initial_bytes: int) -> None:
        name = f"{FILE_PREFIX}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}{FILE_SUFFIX}"
        self.path = os.path.join(directory, name)
        self.owner_pid = os.getpid()
        flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd = os.open(self.path, flags, 0o600)
        self.direct_fd: Optional[int] = None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._lock = threading.Lock()
            self.allocator = ExtentAllocator(0)
            self._reserve(align_up(initial_bytes))
            self.direct_fd = _open_direct(self.path)
        except BaseException:
            self._remove()
            raise

    @property
    def io_fd(self) -> int:
        """The descriptor I/O goes through (O_DIRECT where the filesystem allows it)."""
        return self.direct_fd if self.direct_fd is not None else self.fd

    @property
    def is_direct(self) -> bool:
        return self.direct_fd is not None

    @property
    def capacity(self) -> int:
        return self.allocator.capacity

    def allocate(self, nbytes: int) -> Extent:
        """An extent for ``nbytes``; grows the file when the free list has no room.

        Raises ``OSError`` (ENOSPC, EFBIG, ...) when the file cannot grow.
        """
        with self._lock:
            found = self.allocator.allocate(nbytes)
            if found is None:
                need = align_up(max(nbytes, 1))
                cap = self.allocator.capacity
                self._reserve(max(cap + need, cap + cap // 4, cap + (16 << 20)))
                found = self.allocator.allocate(nbytes)
            offset, length = found
            return Extent(self, offset, length)

    def free(self, extent: Extent) -> None:
        with self._lock:
            self.allocator.free(extent.offset, extent.length)

    def _reserve(self, new_capacity: int) -> None:
        new_capacity = align_up(new_capacity)
        old = self.allocator.capacity
        if new_capacity > old:
            try:
                os.posix_fallocate(self.fd, old, new_capacity - old)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(self.fd, new_capacity)  # filesystems without fallocate
            self.allocator.grow(new_capacity)

    def close(self) -> None:
        if os.getpid() != self.owner_pid:
            return  # a forked child: the parent owns (and removes) this file
        self._remove()

    def _remove(self) -> None:
        for fd in (self.direct_fd, self.fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.direct_fd = None
        self.fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _open_direct(path: str) -> Optional[int]:
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_RDWR | os.O_DIRECT | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # tmpfs and friends
            log.info("ssdoffload: %s does not support O_DIRECT; using buffered I/O", path)
            return None
        raise


def prepare_directory(path: str) -> str:
    """Check (and create) one spill directory; returns its real path.

    The parent must exist (a missing parent usually means the drive is not mounted); the last
    level is created with mode 0700. A file, a symlink, a directory we cannot write, or a
    directory others may write to without the sticky bit is refused with a reason.
    """
    parent = os.path.dirname(path.rstrip("/")) or "/"
    if os.path.islink(path):
        raise SpillPathError(
            f"spill path {path!r} is a symbolic link (to {os.readlink(path)!r}); "
            "give the real directory so spill data cannot be redirected elsewhere"
        )
    if not os.path.exists(path):
        if not os.path.isdir(parent):
            raise SpillPathError(
                f"spill path {path!r}: its parent {parent!r} does not exist; is the drive "
                "mounted? Create the parent directory or choose another path"
            )
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise SpillPathError(
                f"cannot create spill directory {path!r}: {exc.strerror}; choose a writable path"
            ) from exc
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise SpillPathError(
            f"spill path {path!r} exists and is not a directory; point path at a directory"
        )
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise SpillPathError(
            f"spill directory {path!r} is writable by every user and has no sticky bit, so "
            "another user could replace spill files; use a private directory (chmod 700)"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise SpillPathError(f"spill directory {path!r} is not writable by this user; choose another path")
    return os.path.realpath(path)


def reclaim_stale_files(directory: str) -> List[str]:
    """Remove spill files left by dead processes (their ``flock`` is free); returns their paths."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(FILE_PREFIX) and name.endswith(FILE_SUFFIX)):
            continue
        path = os.path.join(directory, name)
        try:
            # O_NONBLOCK: a FIFO planted under a spill file's name must not hang us in open().
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                log.warning("ssdoffload: leaving %s alone: named like a spill file, but not a regular "
                            "file of ours", path)
                continue  # only files we could have made are ever locked or removed
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live process holds it
            now = os.stat(path, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                continue  # replaced since we opened it: not the file we checked
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    if removed:
        log.warning("ssdoffload: removed %d spill file(s) left by a dead process in %s", len(removed), directory)
    return removed


class SpillStore:
    """The spill files of this process, one per directory, with round-robin striping."""

    def __init__(self, directories: Sequence[str], initial_file_bytes: int) -> None:
        self.directories = [prepare_directory(d) for d in directories]
        for d in self.directories:
            reclaim_stale_files(d)
        self.files: List[SpillFile] = []
        try:
            per_file = align_up(initial_file_bytes // max(len(self.directories), 1))
            for d in self.directories:
                try:
                    self.files.append(SpillFile(d, per_file))
                except OSError as exc:
                    raise SpillPathError(
                        f"cannot create a spill file in {d!r}: {exc.strerror}; choose a writable "
                        "path with free space"
                    ) from exc
        except BaseException:
            self.close()
            raise
        self._next = itertools.count()

    def allocate(self, nbytes: int) -> Extent:
        """An extent on the next file in round-robin order (falls over to the others when full)."""
        start = next(self._next) % len(self.files)
        last_error: Optional[OSError] = None
        for i in range(len(self.files)):
            try:
                return self.files[(start + i) % len(self.files)].allocate(nbytes)
            except OSError as exc:
                last_error = exc
        assert last_error is not None
        raise last_error

    def free(self, extent: Extent) -> None:
        extent.file.free(extent)

    @property
    def capacity(self) -> int:
        return sum(f.capacity for f in self.files)

    @property
    def used(self) -> int:
        return sum(f.allocator.used for f in self.files)

    def paths(self) -> List[str]:
        return [f.path for f in self.files]

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.files = []

