"""The spill store: one preallocated, private file per process and spill directory.

Layout and lifetime rules:

* Each directory gets one file ``ssdoffload-<host>-<pid>-<random>.spill`` of mode 0600 inside
  a directory of mode 0700, preallocated with ``posix_fallocate`` and grown on demand. Tensors
  get 4 KiB-aligned extents from a free-list allocator (``allocator.py``); extents are freed
  when the last handle dies and reused next step, so the file does not grow from step to step.
* Extents are striped round-robin over the directories (one per drive). A file whose drive
  fails (EIO, EROFS) is set aside and the others carry on.
* The owning process holds an exclusive ``flock`` on its file. On start, every
  ``ssdoffload-*.spill`` in the directory whose lock can be taken belongs to a dead process
  (a crash, SIGKILL) and is removed; the file of a live process is never touched.
* Files are unlinked on ``close()``; the offloader calls that on exit, on an exception, and at
  interpreter exit. A forked child never closes or writes its parent's files.

Trust rules (another local user must not be able to redirect, read or plant our data):

* The directory is opened once (``SpillDirectory``), walking its real path from ``/`` one
  component at a time with ``O_NOFOLLOW``; every component must be owned by us or root and
  must not be writable by others unless it has the sticky bit. Every later operation (create,
  list, lock, unlink) is relative to that descriptor, never to a path.
* A file is made unnamed (``O_TMPFILE``), locked, and only then linked under its name, so a
  concurrent start's reclaim never sees it unlocked. Where ``O_TMPFILE`` is not supported it
  is created ``O_EXCL`` and locked at once; reclaim then also skips the names of live
  processes of this host, which covers that window.
* The file is opened once: I/O goes through the same descriptor, switched to ``O_DIRECT``
  with ``fcntl`` where the filesystem accepts it (tmpfs does not: then buffered). kvikio,
  which opens by name, is given ``/proc/self/fd/<fd>``: the same inode, whatever the name now
  points to.
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
from typing import List, Optional, Sequence, Tuple

from .allocator import ExtentAllocator, align_up
from .errors import SpillPathError

log = logging.getLogger("ssdoffload")

FILE_PREFIX = "ssdoffload-"
FILE_SUFFIX = ".spill"
#: Errors that say a drive (not one request) is gone: its file is set aside for good.
DEAD_DRIVE_ERRNOS = frozenset({errno.EIO, errno.EROFS, errno.ENODEV, errno.ENXIO, errno.ESTALE,
                               errno.EUCLEAN if hasattr(errno, "EUCLEAN") else errno.EIO})
#: Growth failures after which a smaller request may still succeed.
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Extent:
    """A range of one spill file that holds one storage."""

    file: "SpillFile"
    offset: int
    length: int

    def describe(self) -> str:
        return f"{self.file.path} at offset {self.offset}"


# -- directories ---------------------------------------------------------------------------
def _unsafe_reason(st: os.stat_result) -> Optional[str]:
    """Why a directory with this status lets another user replace what is inside, or None."""
    if st.st_uid not in (0, os.geteuid()):
        return f"is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}) or root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        who = "every user" if st.st_mode & stat.S_IWOTH else "its group"
        return f"is writable by {who} and has no sticky bit"
    return None


def _walk_to(real_dir: str) -> int:
    """A descriptor of ``real_dir`` (an absolute path without symlinks), opened component by
    component with ``O_NOFOLLOW``, each checked with ``_unsafe_reason``."""
    fd = os.open("/", _DIR_FLAGS)
    walked = "/"
    try:
        for part in [p for p in real_dir.split("/") if p] + [None]:
            reason = _unsafe_reason(os.fstat(fd))
            if reason is not None:
                raise SpillPathError(
                    f"spill directory parent {walked!r} {reason}, so another user could swap the "
                    "spill directory under it; put the spill directory below directories owned by "
                    "you or root (e.g. a per-user scratch directory)")
            if part is None:
                return fd
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise SpillPathError(
                    f"cannot open {os.path.join(walked, part)!r} while checking the spill path: "
                    f"{exc.strerror} (it changed while we checked, or it is not a directory)") from exc
            os.close(fd)
            fd, walked = nxt, os.path.join(walked, part)
        raise AssertionError("unreachable")
    except BaseException:
        os.close(fd)
        raise


class SpillDirectory:
    """One checked spill directory, held open: files are made, listed and removed relative to
    its descriptor, so nothing renamed in the path later can redirect them."""

    def __init__(self, fd: int, path: str, parent_fd: int, name: str, created: bool) -> None:
        self.fd = fd
        self.path = path
        self._parent_fd = parent_fd
        self._name = name
        #: Whether we made the last level (a failed construction removes it again).
        self.created = created

    @classmethod
    def open(cls, path: str) -> "SpillDirectory":
        """Check (and create) one spill directory.

        The parent must exist (a missing parent usually means the drive is not mounted); the
        last level is created with mode 0700. A file, a symlink, a directory we cannot write, or
        one another user could change (see ``_unsafe_reason``, applied to every component of
        its real path) is refused with a reason.
        """
        given = os.path.abspath(os.fspath(path))
        if os.path.islink(given):
            raise SpillPathError(
                f"spill path {path!r} is a symbolic link (to {os.readlink(given)!r}); "
                "give the real directory so spill data cannot be redirected elsewhere")
        parent, name = os.path.split(given.rstrip("/") or "/")
        if not name:
            raise SpillPathError(f"spill path {path!r} is the root directory; give a directory below it")
        # Symlinks in the parents are resolved once, here; the walk then refuses any that
        # appears later (O_NOFOLLOW) and checks who owns what the resolution led to.
        real_parent = os.path.realpath(parent)
        if not os.path.isdir(real_parent):
            raise SpillPathError(
                f"spill path {path!r}: its parent {parent!r} does not exist; is the drive "
                "mounted? Create the parent directory or choose another path")
        parent_fd = _walk_to(real_parent)
        created = False
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
            created = True
        except FileExistsError:
            pass
        except OSError as exc:
            os.close(parent_fd)
            raise SpillPathError(
                f"cannot create spill directory {path!r}: {exc.strerror}; choose a writable path") from exc
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            os.close(parent_fd)
            what = ("is a symbolic link" if exc.errno == errno.ELOOP else
                    "exists and is not a directory" if exc.errno == errno.ENOTDIR else exc.strerror)
            raise SpillPathError(f"spill path {path!r} {what}; point path at a directory") from exc
        # From here the object owns both descriptors; a refusal closes them (and removes the
        # directory if it is ours and empty).
        self = cls(fd, os.path.join(real_parent, name), parent_fd, name, created)
        try:
            self._check(path)
        except BaseException:
            self.close(remove_if_created=True)
            raise
        return self

    def _check(self, path: str) -> None:
        st = os.fstat(self.fd)
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise SpillPathError(
                f"spill directory {path!r} is writable by every user and has no sticky bit, "
                "so another user could replace spill files; use a private directory (chmod 700)")
        reason = _unsafe_reason(st)
        if reason is not None:
            raise SpillPathError(
                f"spill directory {path!r} {reason}, so another user could read or replace "
                "spill files; use a directory of your own (or remove it and let ssdoffload "
                "create it with mode 0700)")
        if not os.access(self._name, os.W_OK | os.X_OK, dir_fd=self._parent_fd):
            raise SpillPathError(f"spill directory {path!r} is not writable by this user; choose another path")

    def names(self) -> List[str]:
        return os.listdir(self.fd)

    def close(self, remove_if_created: bool = False) -> None:
        """Close the descriptors; with ``remove_if_created``, remove the directory again if we
        made it and it is empty (a failed construction leaves nothing behind)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._parent_fd >= 0:
            if remove_if_created and self.created:
                try:
                    os.rmdir(self._name, dir_fd=self._parent_fd)
                except OSError:
                    pass  # not empty (another process uses it) or already gone
            os.close(self._parent_fd)
            self._parent_fd = -1


def prepare_directory(path: str) -> str:
    """Check (and create) one spill directory; returns its real path (see
    ``SpillDirectory.open``)."""
    d = SpillDirectory.open(path)
    d.close()
    return d.path


def prepare_rank_parents(templates: Sequence[str], rank: int) -> None:
    """For each spill path template that ends in ``rank{rank}`` (one directory per rank under
    a directory of the job's), create that shared parent if it is missing — checked like any
    spill directory — so every rank can make its own below it. Other templates are left
    alone: a missing parent there usually means an unmounted drive, which must fail."""
    suffix = os.path.join("", "rank{rank}")
    for template in templates:
        if not template.rstrip("/").endswith(suffix):
            continue
        parent = os.path.dirname(os.path.abspath(os.path.expanduser(
            template.rstrip("/").replace("{rank}", str(rank)))))
        if not os.path.isdir(parent):
            prepare_directory(parent)


# -- files ---------------------------------------------------------------------------------
def _new_name() -> str:
    return f"{FILE_PREFIX}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}{FILE_SUFFIX}"


def _create_locked(directory: SpillDirectory, name: str) -> int:
    """A new private file named ``name`` in ``directory``, exclusively flocked before anyone
    can see its name."""
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=directory.fd)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            raise
        fd = None  # no O_TMPFILE here: named create below
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=directory.fd, follow_symlinks=True)
            return fd
        except OSError as exc:
            os.close(fd)
            if exc.errno != errno.ENOENT:  # ENOENT: no /proc; fall back to the named create
                raise
    flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o600, dir_fd=directory.fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        _unlink_quietly(directory, name)
        raise
    return fd


def _enable_direct(fd: int, path: str) -> bool:
    """Switch ``fd`` to O_DIRECT; False where the filesystem refuses (tmpfs and friends)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            log.info("ssdoffload: %s does not support O_DIRECT; using buffered I/O", path)
            return False
        raise
    # Older kernels ignore the flag silently on filesystems without direct I/O.
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def _unlink_quietly(directory: SpillDirectory, name: str) -> Optional[OSError]:
    """Remove ``name``; returns the error instead of raising (a dead drive must not stop the
    cleanup of the others, nor replace the exception being handled)."""
    try:
        os.unlink(name, dir_fd=directory.fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        return exc
    return None


def _grow(fd: int, old: int, new: int) -> None:
    """Make the file ``new`` bytes long, its blocks allocated."""
    try:
        os.posix_fallocate(fd, old, new - old)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            # A failed fallocate may keep the blocks it got (ext4 does): give them back
            # now, not at close(), or other processes on the drive run out too.
            try:
                os.ftruncate(fd, old)
            except OSError:
                pass
            raise
        os.ftruncate(fd, new)  # filesystems without fallocate


class _Growth:
    """One growth on a thread of its own, through its own descriptor (the file may be closed,
    and its number reused, while the drive keeps this one in the kernel)."""

    def __init__(self, fd: int, old: int, new: int) -> None:
        self.new = new
        self.error: Optional[OSError] = None
        self.done = threading.Event()
        self._fd = os.dup(fd)
        try:
            threading.Thread(target=self._run, args=(old,), name="ssdoffload-grow", daemon=True).start()
        except BaseException:
            os.close(self._fd)
            raise

    def _run(self, old: int) -> None:
        try:
            _grow(self._fd, old, self.new)
        except OSError as exc:
            self.error = OSError(exc.errno, exc.strerror)  # no traceback: no frames kept
        finally:
            os.close(self._fd)
            self.done.set()


class SpillFile:
    """One preallocated spill file and its extent allocator."""

    def __init__(self, directory: SpillDirectory, initial_bytes: int, grow_timeout: Optional[float] = None) -> None:
        self.directory = directory
        self.name = _new_name()
        self.path = os.path.join(directory.path, self.name)
        self.owner_pid = os.getpid()
        #: Set when the drive failed (EIO, EROFS, ...): nothing more is allocated here.
        self.failed: Optional[OSError] = None
        #: Seconds a growth may take before the caller gives up (``OffloadConfig.io_timeout``;
        #: not the first one, made here), and the growth it gave up on, still in the kernel.
        self.grow_timeout: Optional[float] = None
        self._growth: Optional[_Growth] = None
        self.named = True  # False once ``unname`` removed the name early
        self._lock = threading.Lock()
        self.allocator = ExtentAllocator(0)
        self.fd = _create_locked(directory, self.name)
        try:
            self._reserve(align_up(initial_bytes))
            self._direct = _enable_direct(self.fd, self.path)
        except BaseException:
            self._remove()
            raise
        self.grow_timeout = grow_timeout

    @property
    def io_fd(self) -> int:
        """The descriptor I/O goes through (O_DIRECT where the filesystem allows it)."""
        return self.fd

    @property
    def is_direct(self) -> bool:
        return self._direct

    @property
    def proc_path(self) -> str:
        """A name that opens this very file (for libraries that open by name, like kvikio)."""
        return f"/proc/self/fd/{self.fd}"

    @property
    def capacity(self) -> int:
        return self.allocator.capacity

    def allocate(self, nbytes: int) -> Extent:
        """An extent for ``nbytes``; grows the file when the free list has no room.

        Growth asks for a quarter more (at least 16 MiB) so the file grows rarely; when the
        drive has less than that, it retries with just what ``nbytes`` needs. Raises
        ``OSError`` (ENOSPC, EFBIG, the drive's error) when the file cannot grow.
        """
        with self._lock:
            self._settle_growth()
            if self.failed is not None:
                # A fresh exception each time: re-raising the stored one would chain every
                # caller's frames (and the tensors they hold) onto its traceback for good.
                raise OSError(self.failed.errno, self.failed.strerror or str(self.failed), self.path)
            found = self.allocator.allocate(nbytes)
            if found is None:
                need = align_up(max(nbytes, 1))
                cap = self.allocator.capacity
                generous = max(cap + need, cap + cap // 4, cap + (16 << 20))
                try:
                    self._reserve(generous)
                except OSError as exc:
                    if exc.errno not in _NO_SPACE_ERRNOS or generous == cap + need:
                        raise
                    self._reserve(cap + need)
                found = self.allocator.allocate(nbytes)
            offset, length = found
            return Extent(self, offset, length)

    def free(self, extent: Extent) -> None:
        with self._lock:
            self.allocator.free(extent.offset, extent.length)

    def mark_failed(self, exc: OSError) -> bool:
        """Set this file aside after a drive error; True the first time."""
        with self._lock:
            first = self.failed is None
            if first:
                self.failed = OSError(exc.errno, exc.strerror or str(exc))  # no traceback: no frames kept
        return first

    def _reserve(self, new_capacity: int) -> None:
        new_capacity = align_up(new_capacity)
        old = self.allocator.capacity
        if new_capacity <= old:
            return
        growth = None
        if self.grow_timeout is not None:
            # The compute thread must not sit in the kernel for ever (a frozen filesystem
            # blocks fallocate uninterruptibly): the growth runs on a thread of its own...
            try:
                growth = _Growth(self.fd, old, new_capacity)
            except RuntimeError:  # ...unless the process has no thread to spare: grow here
                growth = None
        if growth is None:
            _grow(self.fd, old, new_capacity)
        else:
            if not growth.done.wait(self.grow_timeout):
                self._growth = growth  # settled by a later allocate, once the drive answers
                raise OSError(errno.ETIMEDOUT, f"growing {self.path} got no answer from the drive in "
                                               f"{self.grow_timeout:g} s (OffloadConfig.io_timeout)")
            error, growth = growth.error, None  # (no frame of ours in a cycle with the error)
            if error is not None:
                raise OSError(error.errno, error.strerror)
        self.allocator.grow(new_capacity)

    def _settle_growth(self) -> None:
        """A growth given up on (``_reserve``): while it is still in the kernel the drive is
        not answering, so nothing waits on it again; once it ended, its space is used."""
        growth = self._growth
        if growth is None:
            return
        if not growth.done.is_set():
            raise OSError(errno.ETIMEDOUT, f"the drive holding {self.path} has not answered a growth "
                                           "of the spill file yet (frozen or hung?)")
        self._growth = None
        if growth.error is None:
            self.allocator.grow(growth.new)

    def _still_named(self) -> bool:
        """Whether our name still leads to our file (never unlink what another put there)."""
        try:
            named = os.stat(self.name, dir_fd=self.directory.fd, follow_symlinks=False)
            ours = os.fstat(self.fd)
        except OSError:
            return True  # let the unlink report why (or find it already gone)
        if (named.st_dev, named.st_ino) == (ours.st_dev, ours.st_ino):
            return True
        log.warning("ssdoffload: %s is no longer our spill file (renamed or replaced by someone "
                    "else); leaving that name alone", self.path)
        return False

    def close(self) -> Optional[OSError]:
        """Close and remove the file; returns the error that kept it on disk, if any."""
        if os.getpid() != self.owner_pid:
            return None  # a forked child: the parent owns (and removes) this file
        return self._remove()

    def unname(self) -> None:
        """Remove the file's name now, keeping the file open: I/O goes on through the
        descriptor, and the kernel frees it when we close it — or when the process dies. Done
        at the first write the drive refused: a device that runs out of space under the
        filesystem (a thin-provisioned volume) soon has ext4 abort its journal and remount
        read-only, after which no name can be removed and the file would stay on disk."""
        with self._lock:
            if not self.named or self.fd < 0 or os.getpid() != self.owner_pid or not self._still_named():
                return
            error = _unlink_quietly(self.directory, self.name)
            if error is None:
                self.named = False
                log.info("ssdoffload: %s unlinked early (the drive refused a write); still in use "
                         "through its descriptor", self.path)

    def _remove(self) -> Optional[OSError]:
        # Unlink before closing: the flock held until then keeps a concurrent reclaim away.
        error = None
        if self.fd >= 0 and self.named and self._still_named():
            error = _unlink_quietly(self.directory, self.name)
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        return error


def _live_here(name: str) -> bool:
    """Whether ``name`` was made by a live process of this host (which may not have locked it
    yet where files are created by name)."""
    stem = name[len(FILE_PREFIX):-len(FILE_SUFFIX)]
    parts = stem.rsplit("-", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def reclaim_stale_files(directory: SpillDirectory) -> List[str]:
    """Remove spill files left by dead processes (their ``flock`` is free); returns their paths."""
    removed = []
    try:
        names = directory.names()
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(FILE_PREFIX) and name.endswith(FILE_SUFFIX)) or _live_here(name):
            continue
        path = os.path.join(directory.path, name)
        try:
            # O_NONBLOCK: a FIFO planted under a spill file's name must not hang us in open().
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=directory.fd)
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
            now = os.stat(name, dir_fd=directory.fd, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                continue  # replaced since we opened it: not the file we checked
            os.unlink(name, dir_fd=directory.fd)
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    if removed:
        log.warning("ssdoffload: removed %d spill file(s) left by a dead process in %s", len(removed),
                    directory.path)
    return removed


class SpillStore:
    """The spill files of this process, one per directory, with round-robin striping.

    With ``require_all=False`` (re-creating the store after a failed step) a directory that
    cannot take a file is left out with a warning instead of failing the store; a store with
    no file at all then refuses every allocation (tensors stay in memory).
    """

    def __init__(self, directories: Sequence[str], initial_file_bytes: int, require_all: bool = True,
                 grow_timeout: Optional[float] = None) -> None:
        self.dirs: List[SpillDirectory] = []
        self.files: List[SpillFile] = []
        self.left_out: List[Tuple[str, str]] = []
        try:
            per_file = align_up(initial_file_bytes // max(len(directories), 1))
            for path in directories:
                try:
                    d = SpillDirectory.open(path)
                except SpillPathError as exc:
                    if require_all:
                        raise
                    self.left_out.append((path, str(exc)))
                    continue
                self.dirs.append(d)
                reclaim_stale_files(d)
                try:
                    self.files.append(SpillFile(d, per_file, grow_timeout))
                except OSError as exc:
                    error = SpillPathError(
                        f"cannot create a spill file in {d.path!r}: {exc.strerror}; choose a writable "
                        "path with free space")
                    if require_all:
                        raise error from exc
                    self.left_out.append((path, str(error)))
        except BaseException:
            self.close(failed=True)
            raise
        for path, why in self.left_out:
            log.warning("ssdoffload: spilling without %s: %s", path, why)
        self._next = itertools.count()

    @property
    def directories(self) -> List[str]:
        return [d.path for d in self.dirs]

    def allocate(self, nbytes: int) -> Extent:
        """An extent on the next file in round-robin order (falls over to the others when full
        or failed)."""
        n = len(self.files)
        if n == 0:
            raise OSError(errno.ENOSPC, "no usable spill file (every spill path failed)")
        start = next(self._next) % n
        last_error: Optional[OSError] = None
        for i in range(n):
            try:
                return self.files[(start + i) % n].allocate(nbytes)
            except OSError as exc:
                last_error = exc
        assert last_error is not None
        try:
            raise last_error
        finally:
            last_error = None  # the error's traceback holds this frame: no cycle left behind

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

    def close(self, failed: bool = False) -> List[Tuple[str, OSError]]:
        """Close and remove every file (each, even when another fails); returns the files that
        could not be removed and why (also logged). ``failed``: a construction that failed
        also removes the directories it made."""
        kept = []
        for f in self.files:
            error = f.close()
            if error is not None:
                kept.append((f.path, error))
                log.warning("ssdoffload: could not remove spill file %s: %s (remove it by hand once "
                            "the drive is back; nothing will read it)", f.path, error)
        self.files = []
        for d in self.dirs:
            d.close(remove_if_created=failed)
        self.dirs = []
        return kept
