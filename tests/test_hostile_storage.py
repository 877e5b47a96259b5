"""Storage that fails, fills, freezes or is shared with another user (issue 11).

Real mechanisms only: ext4 images loop-mounted (root), ``EXT4_IOC_SHUTDOWN`` for a dying drive
(every later I/O returns EIO, as when a disk drops off the bus), ``fsfreeze`` for a frozen
filesystem, a real second uid (65534) for ownership, real concurrent processes. Tests that
need root or loop devices skip with the reason where the machine does not allow them.
"""
import copy
import errno
import fcntl
import gc
import logging
import os
import struct
import subprocess
import sys
import threading
import warnings
import time

import pytest
import torch
from torch import nn

import ssdoffload
from ssdoffload.store import FILE_PREFIX, SpillStore
from helpers import offload_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHER_UID = 65534  # "nobody": a second local user
EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
EXT4_GOING_FLAGS_NOLOGFLUSH = 2

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown to a second uid, loop mounts)")


def _files(d):
    return sorted(n for n in os.listdir(d) if n.startswith(FILE_PREFIX)) if os.path.isdir(d) else []


class Ext4:
    """An ext4 image of ``size_mib`` loop-mounted at ``root``; unmounted (thawed first) at the end."""

    def __init__(self, tmp_path, size_mib: int) -> None:
        self.image = str(tmp_path / "disk.img")
        self.root = str(tmp_path / "mnt")
        os.mkdir(self.root)
        with open(self.image, "wb") as f:
            f.truncate(size_mib << 20)
        for cmd in (["mkfs.ext4", "-q", "-F", self.image], ["mount", "-o", "loop", self.image, self.root]):
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            except FileNotFoundError:
                pytest.skip(f"{cmd[0]} is not installed")
            if out.returncode != 0:
                pytest.skip(f"cannot {' '.join(cmd[:2])} here: {out.stderr.strip()}")
        self.frozen = False

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def shutdown(self) -> None:
        """The drive dies: from now on every read, write and unlink on it returns EIO."""
        fd = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(fd)

    def freeze(self) -> None:
        subprocess.run(["fsfreeze", "-f", self.root], check=True, timeout=60)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            subprocess.run(["fsfreeze", "-u", self.root], check=True, timeout=60)
            self.frozen = False

    def remove(self) -> None:
        self.thaw()
        if subprocess.run(["umount", self.root], capture_output=True, timeout=60).returncode != 0:
            subprocess.run(["umount", "-l", self.root], capture_output=True, timeout=60)


@pytest.fixture
def ext4(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to loop-mount an ext4 image")
    made = []

    def make(size_mib: int = 64) -> Ext4:
        sub = tmp_path / f"fs{len(made)}"
        sub.mkdir()
        made.append(Ext4(sub, size_mib))
        return made[-1]

    yield make
    for fs in made:
        fs.remove()


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))


def _grads(model, x, settle=None):
    """Gradients of one step; with ``settle`` (an Offloader) its writes finish before backward,
    so whether a write happens does not depend on who wins the race to the tensor."""
    model.zero_grad(set_to_none=True)
    loss = model(x).square().mean()
    if settle is not None:
        settle.wait()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _our_spill_fds():
    """Descriptors of this process that point at a spill file (a leak after close)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if os.path.basename(target).startswith(FILE_PREFIX):
            out.append(target)
    return out


# -- 3. one dying drive ------------------------------------------------------------------
@pytest.mark.parametrize("when", ["during_forward", "before_backward"])
def test_a_dying_drive_leaves_training_on_the_healthy_one(ext4, tmp_path, when, caplog):
    """Two spill paths; the first drive dies (EIO on everything). Gradients stay exact: writes
    that fail keep their tensors in memory and later ones go to the healthy drive; data already
    on the dead drive fails loudly in backward. The user's exception is never replaced by the
    dead drive's EIO, the healthy drive's file is closed and removed, and the next steps train
    (bit-identically) on what still works."""
    dying = ext4()
    a, b = os.path.join(dying.root, "spill"), str(tmp_path / "healthy")
    model, ref = _mlp(), _mlp()
    xs = [torch.randn(512, 256, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    caplog.set_level(logging.WARNING, logger="ssdoffload")
    off = ssdoffload.Offloader(model, offload_config([a, b]))
    try:
        with off.step():
            _assert_same(_grads(model, xs[0]), _grads(ref, xs[0]))
        assert len(_files(a)) == 1 and len(_files(b)) == 1
        if when == "during_forward":
            dying.shutdown()
            with pytest.warns(RuntimeWarning, match="keeping it in memory"):
                with off.step():
                    _assert_same(_grads(model, xs[1], settle=off), _grads(ref, xs[1]))
            assert off.stats().write_failures >= 1
            written = off.stats().bytes_written
            with off.step():  # the dead file is set aside: everything goes to the healthy one
                _assert_same(_grads(model, xs[2], settle=off), _grads(ref, xs[2]))
            assert off.stats().bytes_written > written
            with pytest.raises(ZeroDivisionError):  # the user's error, not the drive's EIO
                with off.step():
                    model(xs[3]).sum()
                    1 / 0
        else:
            with pytest.raises(ssdoffload.SpillReadError):  # not EIO from removing the dead file
                with off.step():
                    loss = model(xs[1]).square().mean()
                    off.wait()
                    dying.shutdown()
                    loss.backward()
        assert _files(b) == [], "the healthy drive's file was left behind by the abort"
        assert any("could not remove spill file" in r.message for r in caplog.records)
        for x in xs[4:]:  # training goes on, on the healthy drive only
            with off.step():
                _assert_same(_grads(model, x), _grads(ref, x))
            assert off.spill_files and all(p.startswith(b) for p in off.spill_files)
        assert any("spilling without" in r.message for r in caplog.records)
    finally:
        off.close()
    assert _files(b) == []
    assert _our_spill_fds() == []


# -- 5. other users' directories; never reopen by name -----------------------------------
@needs_root
def test_directories_another_user_controls_are_refused(tmp_path):
    foreign = tmp_path / "rank0"  # pre-created in shared scratch by someone else
    foreign.mkdir()
    os.chmod(foreign, 0o1777)
    os.chown(foreign, OTHER_UID, OTHER_UID)
    with pytest.raises(ssdoffload.SpillPathError, match=f"owned by uid {OTHER_UID}"):
        ssdoffload.Offloader(None, offload_config(str(foreign)))

    theirs = tmp_path / "theirs"  # a parent they own: they could rename our directory away
    theirs.mkdir()
    os.chown(theirs, OTHER_UID, OTHER_UID)
    with pytest.raises(ssdoffload.SpillPathError, match="parent .* owned by uid"):
        ssdoffload.Offloader(None, offload_config(str(theirs / "spill")))
    assert not (theirs / "spill").exists()

    shared = tmp_path / "groupshared"  # group-writable without the sticky bit
    shared.mkdir()
    os.chmod(shared, 0o775)
    with pytest.raises(ssdoffload.SpillPathError, match="writable by its group"):
        ssdoffload.Offloader(None, offload_config(str(shared / "spill")))

    planted = tmp_path / "scratch"  # a symlink in a parent, leading into their directory
    planted.symlink_to(theirs)
    with pytest.raises(ssdoffload.SpillPathError, match="owned by uid"):
        ssdoffload.Offloader(None, offload_config(str(planted / "spill")))

    ours = tmp_path / "nvme"  # a symlink in a parent that leads to a directory of ours is fine
    ours.mkdir(mode=0o700)
    (tmp_path / "alias").symlink_to(ours)
    with ssdoffload.Offloader(None, offload_config(str(tmp_path / "alias" / "spill"))) as off:
        assert off.spill_files[0].startswith(str(ours / "spill"))


def test_the_spill_file_is_never_reopened_by_name(tmp_path):
    """Swap our spill file's name with a decoy after creation (what a ``renameat2`` attacker
    does): every byte still goes to our file, the decoy is neither written nor removed."""
    d = tmp_path / "act"
    model, ref = _mlp(), _mlp()
    with ssdoffload.Offloader(model, offload_config(str(d), initial_file_bytes=4 << 20)) as off:
        (path,) = off.spill_files
        decoy = d / "decoy"
        decoy.write_bytes(b"\0" * (4 << 20))
        os.rename(path, str(d / "ours-moved"))
        os.rename(str(decoy), path)  # the decoy now has our file's name
        for i in range(3):
            x = torch.randn(512, 256, generator=torch.Generator().manual_seed(i))
            with off.step():
                loss = model(x).square().mean()
                off.wait()
                model.zero_grad(set_to_none=True)
                loss.backward()
            _assert_same([p.grad for p in model.parameters()], _grads(ref, x))
        assert off.stats().bytes_written > 0
    with open(path, "rb") as f:
        assert f.read() == b"\0" * (4 << 20), "our data went to the file now under our name"
    assert os.path.exists(path), "close() removed the decoy that took our name"


# -- 6. concurrent starts -----------------------------------------------------------------
_STARTS = """
import os, sys
sys.path.insert(0, {repo!r})
from ssdoffload.store import SpillStore
bad = 0
for i in range({n}):
    try:
        store = SpillStore([{d!r}], 4096)
    except Exception as exc:
        bad += 1
        print("start failed:", exc, file=sys.stderr)
        continue
    f = store.files[0]
    try:
        if os.stat(f.path).st_ino != os.fstat(f.fd).st_ino:
            bad += 1
    except FileNotFoundError:
        bad += 1  # removed by another process's reclaim between create and lock
    store.close()
print(bad)
"""


@pytest.mark.slow
def test_concurrent_starts_never_remove_each_others_files(tmp_path):
    d = str(tmp_path / "shared")
    os.mkdir(d, 0o700)
    script = _STARTS.format(repo=REPO, n=400, d=d)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(6)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), [r[1][-2000:] for r in results]
    lost = [int(out.strip().splitlines()[-1]) for out, _ in results]
    assert sum(lost) == 0, f"stores whose new file another start removed: {lost}; {results[0][1][-500:]}"
    assert _files(d) == []


# -- 7. edges: a failed construction, a frozen filesystem ----------------------------------
def test_a_failed_construction_removes_the_directory_it_made(tmp_path):
    made = tmp_path / "new"
    with pytest.raises(ssdoffload.SpillPathError, match="does not exist"):
        ssdoffload.Offloader(None, offload_config([str(made), str(tmp_path / "missing" / "x")]))
    assert not made.exists()
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o700)
    with pytest.raises(ValueError, match="kvikio"):  # fails after the spill files were made
        ssdoffload.Offloader(None, offload_config([str(made), str(existing)], backend="kvikio"))
    assert not made.exists() and existing.exists() and _files(existing) == []


def _returns(fn, what):
    """Run ``fn`` on a thread and fail if it is still blocked after a generous guard (a hang,
    not a slow machine); returns what ``fn`` returned."""
    got = []
    t = threading.Thread(target=lambda: got.append(fn()), daemon=True)
    t.start()
    t.join(timeout=300)
    assert not t.is_alive(), f"{what} did not return while the filesystem was frozen"
    return got[0]


def _wait_removed(path):
    """Once the drive answers again, the background finisher removes the spill file."""
    for _ in range(3000):
        if not os.path.exists(path):
            break
        threading.Event().wait(0.1)
    assert not os.path.exists(path)


@pytest.mark.slow
def test_close_on_a_frozen_filesystem_returns_and_finishes_later(ext4, caplog):
    fs = ext4()
    d = os.path.join(fs.root, "spill")
    model = _mlp()
    caplog.set_level(logging.WARNING, logger="ssdoffload")
    # Room for the whole step up front: growing the file (fallocate) would block the forward
    # itself on the frozen filesystem, before close() is ever reached.
    off = ssdoffload.Offloader(model, offload_config(d, initial_file_bytes=16 << 20))
    (path,) = off.spill_files
    fs.freeze()
    try:
        with off.step():
            model(torch.randn(512, 256)).sum()  # writes now block in the kernel
            assert off.transfers.pending_writes() > 0
        assert _returns(lambda: off.close(timeout=1.0), "close()") is False
        assert any("gave up waiting" in r.message and path in r.message for r in caplog.records)
    finally:
        fs.thaw()
    _wait_removed(path)


IO_TIMEOUT = 2.0
#: A step on a frozen drive must end within io_timeout plus this (a hang is for ever; this
#: only has to be finite and generous for a loaded machine).
SLACK_S = 60.0


def test_a_frozen_drive_fails_a_read_clearly_and_the_step_can_be_retried(ext4):
    """Backward needs a tensor whose only copy is on a drive that froze (the engine's one
    worker is stuck in a write the freeze holds, so the read never starts): after
    ``io_timeout`` backward raises ``SpillReadError`` naming the file and the time waited (it
    used to wait for ever). Once the drive answers, the step runs again exactly, and nothing
    is left on disk."""
    fs = ext4()
    model, ref = _mlp(), _mlp()
    x, x2 = torch.randn(512, 256), torch.randn(512, 256)

    def two_forwards(m, settle=None):
        m.zero_grad(set_to_none=True)
        first = m(x).square().mean()
        if settle is not None:
            settle()
        return first + m(x2).square().mean()

    two_forwards(ref).backward()
    want = [p.grad.clone() for p in ref.parameters()]
    path = os.path.join(fs.root, "spill")
    off = ssdoffload.Offloader(model, offload_config(path, initial_file_bytes=16 << 20, io_timeout=IO_TIMEOUT,
                                                     io_threads=1))
    (first_file,) = off.spill_files
    try:
        t0 = time.monotonic()
        with pytest.raises(ssdoffload.SpillReadError) as got:
            with off.step():
                # The first forward's activations are on the drive only, then it freezes.
                loss = two_forwards(model, settle=lambda: (off.wait(), fs.freeze()))
                assert off.wait() is False  # the second forward's writes: held by the freeze
                loss.backward()
        waited = time.monotonic() - t0
        assert waited < IO_TIMEOUT + SLACK_S, f"backward failed only after {waited:.0f} s"
        message = str(got.value)
        assert first_file in message and "io_timeout" in message and "frozen" in message
        assert off.stats().io_timeouts >= 1
    finally:
        fs.thaw()
    with off.step():  # the retry, once the drive answers
        two_forwards(model).backward()
    _assert_same([p.grad.clone() for p in model.parameters()], want)
    assert off.close() is True
    _wait_removed(first_file)
    assert _files(path) == []


def test_a_frozen_drive_during_forward_keeps_training_exact(ext4):
    """The spill file must grow in forward, and the drive is frozen: the growth does not
    answer, so after ``io_timeout`` the tensors stay in memory (counted in ``io_timeouts``)
    and the step finishes with exact gradients instead of blocking in the kernel for ever.
    Once the drive answers, the growth is used and tensors are written again."""
    fs = ext4()
    model, ref = _mlp(), _mlp()
    x = torch.randn(512, 256)
    want = _grads(ref, x)
    path = os.path.join(fs.root, "spill")
    off = ssdoffload.Offloader(model, offload_config(path, initial_file_bytes=4096, io_timeout=IO_TIMEOUT))
    try:
        fs.freeze()
        t0 = time.monotonic()
        with pytest.warns(RuntimeWarning, match="keeping it in memory"):
            with off.step():
                got_grads = _grads(model, x)
        waited = time.monotonic() - t0
        assert waited < IO_TIMEOUT + SLACK_S, f"the step took {waited:.0f} s on a frozen drive"
        _assert_same(got_grads, want)
        st = off.last_step_stats()
        assert st.io_timeouts >= 1 and st.bytes_written == 0 and st.write_failures > 0
    finally:
        fs.thaw()
    for _ in range(3000):  # the growth given up on ends once the drive answers
        if all(f._growth is None or f._growth.done.is_set() for f in off.places.drive.store.files):
            break
        threading.Event().wait(0.01)
    with off.step():
        got_grads = _grads(model, x, settle=off)
    _assert_same(got_grads, want)
    assert off.last_step_stats().bytes_written > 0 and off.last_step_stats().io_timeouts == 0
    assert off.close() is True
    assert _files(path) == []


@pytest.mark.slow
def test_dropping_an_unclosed_offloader_never_blocks_the_thread_that_drops_it(ext4):
    """Dropping an Offloader runs nothing of ours inside the garbage collector, and the next
    safe point only starts its teardown: on a frozen filesystem both return at once, and the
    files go once the drive answers."""
    fs = ext4()
    model = _mlp()
    holder = [ssdoffload.Offloader(model, offload_config(os.path.join(fs.root, "spill"),
                                                         initial_file_bytes=16 << 20))]
    (path,) = holder[0].spill_files
    with holder[0].step():
        model(torch.randn(512, 256)).square().mean().backward()
    holder[0].wait()
    del model  # its layer hooks refer to the offloader: the two form a cycle
    fs.freeze()  # now removing the spill file blocks in the kernel
    try:
        _returns(lambda: (holder.clear(), gc.collect()), "dropping an Offloader")
        # (offloaders other tests dropped may be found too)
        assert _returns(ssdoffload.shutdown.close_dropped, "the next safe point") >= 1
    finally:
        fs.thaw()
    _wait_removed(path)


# -- 10. space ------------------------------------------------------------------------------
def test_growth_takes_what_fits_and_gives_back_what_it_could_not_use(ext4):
    fs = ext4(64)
    d = os.path.join(fs.root, "spill")
    filler = os.open(os.path.join(fs.root, "filler"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.posix_fallocate(filler, 0, fs.free_bytes() - (12 << 20))  # 12 MiB left
        store = SpillStore([d], 4096)
        try:
            free_before = fs.free_bytes()
            got = []
            with pytest.raises(OSError) as err:
                for _ in range(13):
                    got.append(store.allocate(4 << 20))
            assert err.value.errno == errno.ENOSPC
            # The growth asked for 16 MiB first; it retried with just the 4 MiB needed.
            assert len(got) >= 2, f"only {len(got)} of 13 4-MiB extents with 12 MiB free"
            # The failed growth's partly allocated blocks went back to the drive at once.
            assert fs.free_bytes() >= free_before - store.capacity - (1 << 20)
            other = os.open(os.path.join(fs.root, "other-rank"), os.O_CREAT | os.O_RDWR, 0o600)
            try:
                os.posix_fallocate(other, 0, max(fs.free_bytes() - (1 << 20), 4096))  # another rank
            finally:
                os.close(other)
        finally:
            store.close()
    finally:
        os.close(filler)


def test_a_full_drive_keeps_training_exact(ext4):
    fs = ext4(64)
    filler = os.open(os.path.join(fs.root, "filler"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.posix_fallocate(filler, 0, fs.free_bytes() - (6 << 20))  # room for about 6 MiB
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.Tanh()) for _ in range(8)])
        ref = copy.deepcopy(model)
        x = torch.randn(2048, 256)  # 2 MiB per saved activation, ~32 MiB saved in all
        with pytest.warns(RuntimeWarning, match="keeping it in memory"):
            config = offload_config(os.path.join(fs.root, "spill"), initial_file_bytes=4096)
            with ssdoffload.Offloader(model, config) as off:
                with off.step():
                    got = _grads(model, x, settle=off)
                st = off.stats()
        _assert_same(got, _grads(ref, x))
        assert st.bytes_written > 0 and st.write_failures > 0
    finally:
        os.close(filler)



def test_failed_writes_pin_nothing_once_the_graph_is_gone(ext4):
    """Writes that fail for lack of space keep their tensors in memory only while autograd
    needs them: once the graph is freed (and the collector never runs), every saved tensor is
    gone. The stored errors' tracebacks used to hold the frames — and the tensors — that saw
    them, in reference cycles only the collector frees (invisible to it on a GPU)."""
    import weakref

    fs = ext4(64)
    filler = os.open(os.path.join(fs.root, "filler"), os.O_CREAT | os.O_RDWR, 0o600)
    gc.collect()
    gc.disable()
    try:
        os.posix_fallocate(filler, 0, fs.free_bytes() - (1 << 20))  # room for less than one tensor
        torch.manual_seed(0)
        layers = [nn.Linear(256, 256) for _ in range(6)]
        x = torch.randn(2048, 256)  # 2 MiB per activation: none fits
        config = offload_config(os.path.join(fs.root, "spill"), initial_file_bytes=4096)
        with pytest.warns(RuntimeWarning, match="keeping it in memory"):
            with ssdoffload.Offloader(None, config) as off:
                for _ in range(2):  # the second step meets the same full drive again
                    watched = []
                    with off.step():
                        h = x
                        for layer in layers:
                            h = torch.tanh(layer(h))  # tanh saves its output: h itself
                            watched.append(weakref.ref(h))
                        loss = h.square().mean()
                        del h
                        loss.backward()
                        del loss
                    off.current_step_stats()  # a safe point
                    alive = [i for i, w in enumerate(watched) if w() is not None]
                    assert not alive, f"saved tensors of layers {alive} outlived their graph"
                assert off.stats().write_failures >= len(layers)
    finally:
        gc.enable()
        os.close(filler)


def test_a_thin_volume_that_runs_out_leaves_no_file(tmp_path):
    """ext4 on a thin-provisioned volume (a sparse image on a small tmpfs, loop-mounted) whose
    backing store runs out: the device refuses writes, ext4 soon aborts its journal and
    remounts read-only — after which no name can be removed. Training stays exact (a refused
    write keeps its tensor; data the device lost would be a ``SpillReadError``), and no spill
    file is left, not even after a remount: the name goes at the first refused write."""
    if os.geteuid() != 0:
        pytest.skip("needs root to loop-mount an ext4 image")
    back, mnt = tmp_path / "back", tmp_path / "mnt"
    back.mkdir()
    mnt.mkdir()
    image = back / "disk.img"
    mounted = []
    try:
        for cmd in (["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(back)],
                    ["truncate", "-s", "256M", str(image)],
                    ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", str(image)],
                    ["mount", "-o", "loop", str(image), str(mnt)]):
            subprocess.run(cmd, check=True, capture_output=True, timeout=60)
            if cmd[0] == "mount":
                mounted.insert(0, cmd[-1])
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(1024, 1024), nn.Tanh()) for _ in range(8)])
        ref = copy.deepcopy(model)
        x = torch.randn(2048, 1024)  # 8 MiB per activation: 3 steps write more than the volume holds
        path = str(mnt / "spill")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "keeping it in memory"
            with ssdoffload.Offloader(model, offload_config(path, initial_file_bytes=4096)) as off:
                for _ in range(3):
                    try:
                        with off.step():
                            got = _grads(model, x, settle=off)
                        _assert_same(got, _grads(ref, x))
                    except ssdoffload.SpillReadError:
                        pass  # data the device lost, caught by the checksum: clear, not wrong
                assert off.stats().write_failures > 0, "the volume never ran out: the test tests nothing"
        assert _files(path) == []
        subprocess.run(["umount", str(mnt)], check=True, capture_output=True, timeout=60)
        subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True, capture_output=True, timeout=60)
        assert _files(path) == [], "a spill file came back after a remount"
    finally:
        for m in mounted:
            subprocess.run(["umount", "-l", m], capture_output=True, timeout=60)


# -- 1. integrity checking is on by default ------------------------------------------------
FS_IOC_FIEMAP = 0xC020660B
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2


def _physical_offset(fd: int, pos: int) -> int:
    """Where byte ``pos`` of the file lives on its block device (FIEMAP, synced first)."""
    header = struct.pack("QQIIII", pos, 1, 1, 0, 1, 0)  # start, length, FLAG_SYNC, -, 1 extent, -
    out = fcntl.ioctl(fd, FS_IOC_FIEMAP, header + b"\0" * 56)
    mapped = struct.unpack_from("I", out, 20)[0]
    assert mapped == 1, "no extent maps that byte"
    logical, physical = struct.unpack_from("QQ", out, 32)
    return physical + (pos - logical)


def _flip_in_another_process(entry, fs):
    pos = entry.extent.offset + entry.nbytes // 2
    code = ("import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); p = int(sys.argv[2]); "
            "b = os.pread(fd, 1, p); os.pwrite(fd, bytes([b[0] ^ 0x40]), p); os.fsync(fd)")
    subprocess.run([sys.executable, "-c", code, entry.extent.file.path, str(pos)], check=True, timeout=60)


def _punch_hole(entry, fs):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(entry.extent.file.proc_path, os.O_RDWR)
    try:
        rc = libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, ctypes.c_long(entry.extent.offset),
                            ctypes.c_long(4096))
        assert rc == 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)


def _flip_under_the_filesystem(entry, fs):
    """Flip one bit in the disk image below ext4: the filesystem never sees a write."""
    pos = entry.extent.offset + entry.nbytes // 2
    physical = _physical_offset(entry.extent.file.fd, pos)
    fd = os.open(fs.image, os.O_RDWR)
    try:
        b = os.pread(fd, 1, physical)
        os.pwrite(fd, bytes([b[0] ^ 0x40]), physical)  # bit 6 of a float's top byte: an exponent bit
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("fault", [_flip_in_another_process, _punch_hole, _flip_under_the_filesystem],
                         ids=["another_process", "hole_punched", "under_the_filesystem"])
def test_corruption_is_caught_with_the_default_config(ext4, tmp_path, fault):
    """With no ``verify`` given, a bit flipped in a spill extent (by another process, or on
    the device under ext4) or a hole punched into the file raises ``SpillReadError`` in
    backward instead of handing the optimizer a wrong gradient; the next step is exact."""
    fs = ext4() if fault is _flip_under_the_filesystem else None
    d = os.path.join(fs.root, "spill") if fs is not None else str(tmp_path / "act")
    model, ref = _mlp(), _mlp()
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(0))
    cfg = offload_config(d)
    assert cfg.verify is None and cfg.checksums
    with ssdoffload.Offloader(model, cfg) as off:
        with pytest.raises(ssdoffload.SpillReadError, match="checksum mismatch"):
            with off.step():
                loss = model(x).square().mean()
                off.wait()
                on_disk = [e for e in off.cache.all_entries() if e.extent is not None and e.nbytes >= 1 << 19]
                fault(on_disk[0], fs)
                loss.backward()
        with off.step():
            _assert_same(_grads(model, x), _grads(ref, x))


def test_verify_can_be_turned_off_and_kvikio_defaults_to_off():
    assert ssdoffload.OffloadConfig(path="/tmp/x", verify=False).checksums is False
    assert ssdoffload.OffloadConfig(path="/tmp/x", backend="kvikio").checksums is False
    assert ssdoffload.OffloadConfig(path="/tmp/x", backend="native").checksums is True
