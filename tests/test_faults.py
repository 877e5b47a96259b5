"""Reliability with real faults: corrupted and truncated spill files, a file-size limit, the
spill directory removed mid-run, a second process on the same path, fork, interrupts, and a
soak test that injects them at random. No mocks: the faults happen to real files."""
import functools
import gc
import os
import random
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch
from torch import nn

import ssdoffload
from ssdoffload.cache import State
from ssdoffload.store import FILE_PREFIX
from helpers import offload_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Net(nn.Module):
    def __init__(self, width=256, depth=4):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x).square().mean()


_config = functools.partial(offload_config, prefetch_depth=1)


def _grads(model, x, off=None, between=None):
    model.zero_grad(set_to_none=True)
    if off is None:
        model(x).backward()
    else:
        with off.step():
            loss = model(x)
            off.wait()
            if between is not None:
                between(off)
            loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def _spill_files(d):
    return [n for n in os.listdir(d) if n.startswith(FILE_PREFIX)] if os.path.isdir(d) else []


def _on_disk_entries(off):
    return [e for e in off.cache.all_entries() if e.state is State.ON_DISK]


def _flip_byte(entry):
    # Through the open file (a buffered descriptor on the same inode; ours is O_DIRECT): the
    # directory may have been removed by an earlier fault.
    fd = os.open(entry.extent.file.proc_path, os.O_RDWR)
    try:
        pos = entry.extent.offset + entry.nbytes // 2
        b = os.pread(fd, 1, pos)
        os.pwrite(fd, bytes([b[0] ^ 0x5A]), pos)
    finally:
        os.close(fd)


def _truncate(entry):
    os.ftruncate(entry.extent.file.fd, entry.extent.offset + 100)


def test_corruption_is_detected_with_verify(tmp_path):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(64, 256)
    ref = _grads(model, x)
    d = str(tmp_path / "act")
    with ssdoffload.Offloader(model, _config(d, verify=True)) as off:
        with pytest.raises(ssdoffload.SpillReadError) as err:
            _grads(model, x, off, between=lambda o: _flip_byte(_on_disk_entries(o)[0]))
        msg = str(err.value)
        assert "checksum mismatch" in msg and "layer 0" in msg and ".spill at offset" in msg
        assert "(64, 256) float32" in msg
        assert _spill_files(d) == []  # the failed step removed its files
        got = _grads(model, x, off)    # the next step is whole again
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_truncated_file_is_a_short_read_error(tmp_path):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(64, 256)
    d = str(tmp_path / "act")
    with ssdoffload.Offloader(model, _config(d)) as off:
        with pytest.raises(ssdoffload.SpillReadError, match="short read"):
            _grads(model, x, off, between=lambda o: _truncate(_on_disk_entries(o)[-1]))
    assert _spill_files(d) == []


def test_file_size_limit_keeps_tensors_in_memory(tmp_path):
    """A full drive, made real with RLIMIT_FSIZE (SIGXFSZ ignored) in a subprocess."""
    d = str(tmp_path / "act")
    script = textwrap.dedent(f"""
        import resource, signal, sys, warnings, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import ssdoffload
        from test_faults import Net, _config, _grads
        torch.manual_seed(0)
        model, x = Net(width=512), torch.randn(256, 512)
        ref = _grads(model, x)
        off = ssdoffload.Offloader(model, _config({d!r}, initial_file_bytes=1 << 20))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                got = _grads(model, x, off)
                assert all(torch.equal(a, b) for a, b in zip(ref, got)), "wrong gradient"
        s = off.stats()
        off.close()
        n_warn = sum("keeping it in memory" in str(w.message) for w in caught)
        print("failures", s.write_failures, "written", s.bytes_written, "warnings", n_warn)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    words = out.stdout.split()
    failures, written, n_warn = int(words[1]), int(words[3]), int(words[5])
    assert failures > 0 and n_warn == 1
    assert written > 0  # what fitted was still offloaded
    assert _spill_files(d) == []


def test_spill_directory_removed_mid_run(tmp_path):
    import shutil
    torch.manual_seed(0)
    model, x = Net(), torch.randn(64, 256)
    ref = _grads(model, x)
    d = str(tmp_path / "act")
    with ssdoffload.Offloader(model, _config(d)) as off:
        assert torch.equal(_grads(model, x, off)[0], ref[0])
        shutil.rmtree(d)  # the open files live on until closed
        got = _grads(model, x, off)
        assert all(torch.equal(a, b) for a, b in zip(ref, got))
        assert off.stats().write_failures == 0
    assert not os.path.exists(d) or _spill_files(d) == []


def test_second_process_on_the_same_directory(tmp_path):
    d = str(tmp_path / "act")
    script = textwrap.dedent(f"""
        import sys, ssdoffload
        off = ssdoffload.Offloader(None, ssdoffload.OffloadConfig(path={d!r}, initial_file_bytes=1 << 20))
        print(off.spill_files[0], flush=True)
        sys.stdin.readline()
        off.close()
    """)
    other = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=REPO)
    try:
        other_file = other.stdout.readline().strip()
        torch.manual_seed(0)
        model, x = Net(), torch.randn(64, 256)
        ref = _grads(model, x)
        with ssdoffload.Offloader(model, _config(d)) as off:
            assert os.path.exists(other_file), "a live process's file was reclaimed"
            assert off.spill_files[0] != other_file
            got = _grads(model, x, off)
            assert all(torch.equal(a, b) for a, b in zip(ref, got))
        assert _spill_files(d) == [os.path.basename(other_file)]
    finally:
        other.communicate("\n", timeout=60)
    assert _spill_files(d) == []


def test_fork_children_do_not_touch_the_parent(tmp_path):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(64, 256)
    ref = _grads(model, x)
    d = str(tmp_path / "act")
    with ssdoffload.Offloader(model, _config(d)) as off:
        _grads(model, x, off)
        pid = os.fork()
        if pid == 0:  # the child: using it is refused, closing it leaves the parent's files
            code = 0
            try:
                with off.step():
                    pass
                code = 3
            except ssdoffload.OffloadError:
                off.close()
            except BaseException:
                code = 4
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        assert len(_spill_files(d)) == 1
        # A DataLoader with forked workers alongside the offloader.
        data = torch.utils.data.TensorDataset(torch.randn(32, 256))
        loader = torch.utils.data.DataLoader(data, batch_size=16, num_workers=2,
                                             multiprocessing_context="fork")
        for (batch,) in loader:
            assert batch.shape == (16, 256)
        got = _grads(model, x, off)
        assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert _spill_files(d) == []


def test_forked_child_running_backward_of_the_parents_graph_raises(tmp_path):
    """A forked child that runs backward on a graph it inherited hung forever waiting for a
    read the parent's I/O threads would do; now the unpack says why it cannot."""
    from helpers import wait_child

    torch.manual_seed(0)
    model, x = Net(), torch.randn(64, 256)
    with ssdoffload.Offloader(model, _config(str(tmp_path / "act"))) as off:
        with off.step():
            loss = model(x).square().mean()
            off.wait()  # everything offloaded is on disk: backward must read it back
            pid = os.fork()
            if pid == 0:
                code = 3
                try:
                    loss.backward()
                except ssdoffload.OffloadError as exc:
                    code = 0 if "forked process" in str(exc) else 4
                except BaseException:
                    code = 5
                os._exit(code)
            status = wait_child(pid, 60, "backward of the parent's graph")
            assert os.WEXITSTATUS(status) == 0, os.WEXITSTATUS(status)
            loss.backward()  # the parent's backward is unaffected


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_keyboard_interrupt_leaves_nothing(tmp_path, where):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(64, 256)
    d = str(tmp_path / "act")

    def interrupt(*_):
        raise KeyboardInterrupt

    with ssdoffload.Offloader(model, _config(d)) as off:
        with pytest.raises(KeyboardInterrupt):
            with off.step():
                if where == "forward":
                    h = model.blocks[2].register_forward_hook(interrupt)
                    try:
                        model(x)
                    finally:
                        h.remove()
                loss = model(x)
                loss.register_hook(interrupt)
                loss.backward()
        assert _spill_files(d) == []
    assert _spill_files(d) == []


def _spill_size(off):
    """Bytes of the open spill files (by descriptor: the directory may be gone)."""
    store = off.places.drive.store
    return max((os.fstat(f.fd).st_size for f in store.files), default=0) if store else 0


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_soak_random_faults(tmp_path):
    """Hundreds of steps with faults at random points: never a wrong gradient, no growth."""
    import shutil
    rng = random.Random(1234)
    torch.manual_seed(0)
    model, d = Net(width=256, depth=6), str(tmp_path / "act")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    steps, injected, survived = 240, 0, 0
    counts = {}
    old_xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_fsize = resource.getrlimit(resource.RLIMIT_FSIZE)
    warm = None
    try:
        with ssdoffload.Offloader(model, _config(d, verify=True, prefetch_depth=2)) as off, \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in range(steps):
                x = torch.randn(rng.choice([32, 64, 96]), 256)
                ref = _grads(model, x)
                fault = rng.choice([None] * 5 + ["flip", "truncate", "fsize", "rmdir", "interrupt"])
                damaged = []

                def inject(o, fault=fault):
                    entries = _on_disk_entries(o)
                    if fault == "flip" and entries:
                        _flip_byte(rng.choice(entries))
                        damaged.append(fault)
                    elif fault == "truncate" and entries:
                        _truncate(rng.choice(entries))
                        damaged.append(fault)
                    elif fault == "interrupt":
                        damaged.append(fault)
                        raise KeyboardInterrupt

                if fault == "fsize":
                    cap = _spill_size(off) or (1 << 20)
                    resource.setrlimit(resource.RLIMIT_FSIZE, (cap, old_fsize[1]))
                if fault == "rmdir":
                    shutil.rmtree(d, ignore_errors=True)
                try:
                    got = _grads(model, x, off, between=inject if fault else None)
                    assert not damaged, f"step {step}: {fault} went unnoticed"
                    for a, b in zip(ref, got):
                        assert torch.equal(a, b), f"step {step}: wrong gradient after fault {fault}"
                except (ssdoffload.SpillReadError, KeyboardInterrupt):
                    assert damaged, f"step {step}: unexpected error with fault {fault}"
                finally:
                    resource.setrlimit(resource.RLIMIT_FSIZE, old_fsize)
                if fault:
                    injected += 1
                    survived += 1
                    counts[fault] = counts.get(fault, 0) + 1
                for p, g in zip(model.parameters(), ref):
                    p.grad = g
                opt.step()
                if step == 40:
                    gc.collect()
                    warm = (_open_fds(), threading.active_count(), _rss_bytes(), _spill_size(off))
            gc.collect()
            end = (_open_fds(), threading.active_count(), _rss_bytes(), _spill_size(off))
            stats = off.stats()
    finally:
        signal.signal(signal.SIGXFSZ, old_xfsz)
        resource.setrlimit(resource.RLIMIT_FSIZE, old_fsize)
    print(f"\nsoak: {steps} steps, {injected} faults injected ({counts}), {survived} survived; "
          f"fds {warm[0]}->{end[0]}, threads {warm[1]}->{end[1]}, rss {warm[2] >> 20}->{end[2] >> 20} MiB, "
          f"spill bytes {warm[3]}->{end[3]}; write_failures={stats.write_failures}")
    assert end[0] <= warm[0] and end[1] <= warm[1]
    assert end[3] <= max(warm[3], 8 << 20)
    assert end[2] <= warm[2] + (64 << 20)
    assert _spill_files(d) == []

