"""Spill-file lifetime and bad input: real files, real processes, real signals."""
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import ssdoffload
from ssdoffload.store import FILE_PREFIX
from helpers import offload_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files(d):
    return sorted(n for n in os.listdir(d) if n.startswith(FILE_PREFIX)) if os.path.isdir(d) else []


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))


def test_private_preallocated_files_removed_on_close(tmp_path):
    d = str(tmp_path / "act")
    model = _model()
    off = ssdoffload.Offloader(model, offload_config(d))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    (path,) = off.spill_files
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.stat(path).st_size >= 1 << 20  # preallocated
    sizes = []
    for _ in range(4):
        with off.step():
            model(torch.randn(512, 256)).sum().backward()
        sizes.append(os.stat(path).st_size)
    assert off.stats().bytes_written > 0
    assert len(set(sizes[1:])) == 1, f"spill file grows from step to step: {sizes}"
    off.close()
    assert _files(d) == []


def test_files_removed_after_exception_in_step(tmp_path):
    d = str(tmp_path / "act")
    model = _model()
    with ssdoffload.Offloader(model, offload_config(d)) as off:
        with pytest.raises(ZeroDivisionError):
            with off.step():
                model(torch.randn(512, 256)).sum()
                1 / 0
        assert _files(d) == []
        # The next step works again (a fresh file is made).
        with off.step():
            model(torch.randn(512, 256)).sum().backward()
        assert len(_files(d)) == 1
    assert _files(d) == []


def _child_script(d, body):
    """A Python program that makes an Offloader on ``d`` for a small model, then runs ``body``."""
    head = f"""
        import os, signal, sys, torch, ssdoffload
        from torch import nn
        model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))
        off = ssdoffload.Offloader(model, ssdoffload.OffloadConfig(path={d!r}, min_offload_bytes=4096,
                                                                   initial_file_bytes=1 << 20))
    """
    return textwrap.dedent(head) + textwrap.dedent(body)


def test_files_removed_when_the_process_exits_without_close(tmp_path):
    d = str(tmp_path / "act")
    script = _child_script(d, """
        with off.step():
            model(torch.randn(512, 256)).sum().backward()
        print(off.spill_files[0]); sys.stdout.flush()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(d)
    assert _files(d) == []


def test_crashed_process_files_reclaimed_by_next_start(tmp_path):
    d = str(tmp_path / "act")
    script = _child_script(d, """
        with off.step():
            loss = model(torch.randn(512, 256)).sum()
            off.wait()
            print(off.spill_files[0]); sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == -signal.SIGKILL
    left = _files(d)
    assert len(left) == 1 and os.path.join(d, left[0]) == out.stdout.strip()
    # A live process's file is never reclaimed: start one that holds its file, then reclaim.
    with ssdoffload.Offloader(_model(), offload_config(d)) as live:
        assert _files(d) == [os.path.basename(live.spill_files[0])]
        with ssdoffload.Offloader(_model(), offload_config(d)) as second:
            assert sorted(_files(d)) == sorted(os.path.basename(p) for p in live.spill_files + second.spill_files)
    assert _files(d) == []


@pytest.mark.parametrize("field,value,words", [
    ("prefetch_depth", -1, "prefetch_depth=-1"),
    ("min_offload_bytes", "big", "min_offload_bytes='big'"),
    ("backend", "posix", "backend='posix'"),
    ("io_threads", 0, "io_threads=0"),
    ("chunk_bytes", 5000, "multiple of 4096"),
    ("path", "", "path=''"),
    ("path", ["/a", "/a"], "twice"),
    ("verify", "yes", "verify='yes'"),
    ("path", 123, "path=123"),                      # was a raw TypeError without the field
    ("path", {"a": 1}, "path="),
    ("max_read_bandwidth", 1, "did you mean 1e6"),  # MB/s written as a number: backward hung
    ("max_write_bandwidth", 500, "did you mean 500e6"),
])
def test_invalid_config_values(field, value, words):
    kwargs = {"path": "/tmp/x", field: value}
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("(", r"\(")):
        ssdoffload.OffloadConfig(**kwargs)


def test_bad_rank_variable_is_named(monkeypatch):
    monkeypatch.setenv("RANK", "abc")
    with pytest.raises(ValueError, match="RANK='abc'"):
        ssdoffload.OffloadConfig(path="/tmp/{rank}/x").resolved_paths()
    monkeypatch.setenv("RANK", "-2")
    with pytest.raises(ValueError, match="RANK='-2'"):
        ssdoffload.OffloadConfig(path="/tmp/{rank}/x").resolved_paths()
    monkeypatch.setenv("RANK", "5")
    assert ssdoffload.OffloadConfig(path="/tmp/{rank}/x").resolved_paths() == ["/tmp/5/x"]


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="valid keys are: .*prefetch_depth"):
        ssdoffload.OffloadConfig.from_dict({"path": "/tmp/x", "prefetch": 2})
    cfg = ssdoffload.OffloadConfig.from_dict({"path": "/nvme/{rank}/act", "prefetch_depth": 1})
    assert cfg.resolved_paths(rank=3) == ["/nvme/3/act"]


def test_path_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ssdoffload.SpillPathError, match="not a directory"):
        ssdoffload.Offloader(_model(), offload_config(str(f)))


def test_path_on_a_missing_drive(tmp_path):
    with pytest.raises(ssdoffload.SpillPathError, match="does not exist; is the drive"):
        ssdoffload.Offloader(_model(), offload_config(str(tmp_path / "nvme9" / "act")))


def test_missing_last_level_is_created(tmp_path):
    d = tmp_path / "act"
    with ssdoffload.Offloader(_model(), offload_config(str(d))):
        assert d.is_dir() and stat.S_IMODE(d.stat().st_mode) == 0o700


def test_unwritable_path():
    """A directory this user cannot write. As root (CI), the check runs as 'nobody'."""
    import shutil
    import tempfile
    top = tempfile.mkdtemp(prefix="ssdoffload-ro-", dir="/tmp")
    try:
        os.chmod(top, 0o755)
        d = os.path.join(top, "ro")
        os.mkdir(d, 0o555)
        os.chmod(d, 0o555)
        script = textwrap.dedent(f"""
            import os, sys
            sys.path.insert(0, {REPO!r})
            import ssdoffload  # imported before dropping root: the interpreter lives under /root
            if os.getuid() == 0:
                os.setgid(65534); os.setuid(65534)
            try:
                ssdoffload.Offloader(None, ssdoffload.OffloadConfig(path={d!r}))
            except ssdoffload.SpillPathError as e:
                print("ERROR:", e)
        """)
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert "ERROR:" in out.stdout and "not writable" in out.stdout, out.stdout + out.stderr
    finally:
        shutil.rmtree(top)


def test_world_writable_without_sticky_bit_and_symlink_refused(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(ssdoffload.SpillPathError, match="writable by every user"):
        ssdoffload.Offloader(None, offload_config(str(d)))
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ssdoffload.SpillPathError, match="symbolic link"):
        ssdoffload.Offloader(None, offload_config(str(link)))


def test_planted_fifo_or_foreign_file_is_never_opened_blocking_or_removed(tmp_path):
    """Reclaiming stale spill files opened every matching name with a blocking O_RDONLY: a FIFO
    planted under a spill file's name hung ``Offloader(...)`` forever. Only regular files of
    ours are ever locked or removed; anything else named like one is left alone."""
    import threading

    from ssdoffload.store import FILE_PREFIX, FILE_SUFFIX

    d = tmp_path / "act"
    d.mkdir(mode=0o700)
    fifo = d / f"{FILE_PREFIX}planted-1-00000000{FILE_SUFFIX}"
    os.mkfifo(fifo, 0o600)
    foreign = d / f"{FILE_PREFIX}planted-2-00000000{FILE_SUFFIX}"
    foreign.write_bytes(b"x" * 4096)
    os.chown(foreign, 65534, 65534)  # another user's file (we run as root in CI)
    made = []
    t = threading.Thread(target=lambda: made.append(ssdoffload.Offloader(_model(), offload_config(str(d)))),
                         daemon=True)
    t.start()
    t.join(timeout=60)
    if t.is_alive():
        with open(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK), "wb"):  # lets the blocked open return
            pass
        t.join(timeout=10)
        pytest.fail("Offloader(...) hung opening a FIFO named like a spill file")
    (off,) = made
    try:
        assert fifo.exists() and foreign.exists()
    finally:
        off.close()
    assert sorted(_files(str(d))) == sorted([fifo.name, foreign.name])
