"""Thread limits (issue 11, item 9): every I/O thread starts at construction, and a limit that
refuses one fails construction with ``ResourceLimitError`` naming the part and the limit.

Real limits in a child process: the child sets RLIMIT_NPROC (which counts the threads of its
user) just above, or exactly at, the number of tasks its user has. RLIMIT_NPROC does not bind
root, so as root the child first becomes a uid no other process uses; without root it counts
its own user's tasks. The exact threshold is found with fork() probes (a forked child is gone
once waitpid returns, so the count is exact), not assumed from how the kernel counts; where
the limit cannot be made to bind, the tests skip and say why.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from ssdoffload.store import FILE_PREFIX

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IO_THREADS = 4  # the native engine starts 4 workers; 2 write and 2 read threads

_CHILD = textwrap.dedent("""
    import errno, json, os, resource, sys, threading, time
    sys.path.insert(0, {repo!r})
    import torch
    from torch import nn
    import ssdoffload
    from ssdoffload.store import FILE_PREFIX

    top, case, io_threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    spill = os.path.join(top, "act")

    def report(**kw):
        print("RESULT " + json.dumps(kw), flush=True)
        os._exit(0)

    # Nothing but the offloader may need a new thread once the limit is set: one compute
    # thread, and one plain step first so torch has made whatever it makes lazily.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))
    model(torch.randn(512, 256)).sum().backward()

    def tasks_of(uid):
        n = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                for tid in os.listdir(f"/proc/{{pid}}/task"):
                    with open(f"/proc/{{pid}}/task/{{tid}}/status") as f:
                        real = next(l for l in f if l.startswith("Uid:")).split()[1]
                    n += int(real) == uid
            except (OSError, StopIteration):
                pass  # gone meanwhile, or hidden
        return n

    if os.getuid() == 0:
        # RLIMIT_NPROC does not bind root: become a uid no process uses, so that the count
        # is this process's own threads.
        uid = next(u for u in range(61000 + os.getpid() % 3000, 65000) if tasks_of(u) == 0)
        os.chown(top, uid, uid)
        try:
            os.setgroups([]); os.setgid(uid); os.setuid(uid)
        except OSError as e:
            report(skip=f"cannot become uid {{uid}} to make RLIMIT_NPROC bind: {{e}}")

    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]

    def set_soft(n):
        resource.setrlimit(resource.RLIMIT_NPROC, (n, hard))

    def can_fork():
        try:
            pid = os.fork()
        except OSError as e:
            if e.errno != errno.EAGAIN:
                raise
            return False
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)  # reaped: the user's count is back where it was
        return True

    # The largest soft limit at which no new task can start ("zero headroom").
    guess, zero = tasks_of(os.getuid()), None
    for soft in range(max(0, guess - 4), guess + 64):
        if hard != resource.RLIM_INFINITY and soft > hard:
            break
        set_soft(soft)
        if can_fork():
            zero = soft - 1
            break
    if zero is None or zero < 0:
        report(skip=f"RLIMIT_NPROC threshold not found near {{guess}} tasks of uid {{os.getuid()}}")
    set_soft(zero)
    if can_fork():
        report(skip="RLIMIT_NPROC does not bind this process (a capability such as "
                    "CAP_SYS_RESOURCE, or no way to drop root)")

    # Room for: nothing / the native workers and one write thread / every I/O thread.
    room = {{"none": 0, "native": io_threads + 1, "all": io_threads + 2 * (io_threads // 2)}}[case]
    limit = zero + room
    if hard != resource.RLIM_INFINITY and limit > hard:
        report(skip=f"RLIMIT_NPROC hard limit {{hard}} leaves no room for {{room}} threads")
    set_soft(limit)

    def task_count():
        return len(os.listdir("/proc/self/task"))

    def leftovers():
        return sorted(n for n in os.listdir(spill) if n.startswith(FILE_PREFIX)) if os.path.isdir(spill) else []

    before = task_count()
    config = ssdoffload.OffloadConfig(path=spill, io_threads=io_threads, min_offload_bytes=4096,
                                      initial_file_bytes=1 << 20)
    try:
        off = ssdoffload.Offloader(model, config)
    except Exception as e:
        # A joined thread leaves /proc/self/task when the kernel reaps it, just after the join
        # returns: wait (bounded) for the count to settle rather than race it.
        deadline = time.monotonic() + 30
        while task_count() > before and time.monotonic() < deadline:
            time.sleep(0.01)
        report(where="construct", type=type(e).__name__,
               limit_error=isinstance(e, getattr(ssdoffload, "ResourceLimitError", ())),
               message=str(e), limit=limit, tasks_before=before, tasks_after=task_count(),
               py_threads=[t.name for t in threading.enumerate() if t.name.startswith("ssdoffload")],
               files=leftovers())
    try:
        with off.step():
            loss = model(torch.randn(512, 256)).sum()
            off.wait()  # the writes happen (not skipped because backward freed them first)
            loss.backward()
        written = off.stats().bytes_written
    except Exception as e:
        report(where="step", type=type(e).__name__, message=str(e), limit=limit)
    finally:
        off.close()
    report(where="trained", bytes_written=written, limit=limit, files=leftovers())
""")


def _run_child(case: str) -> dict:
    top = tempfile.mkdtemp(prefix="ssdoffload-limits-")  # reachable by the uid the child becomes
    try:
        script = _CHILD.format(repo=REPO)
        out = subprocess.run([sys.executable, "-c", script, top, case, str(IO_THREADS)],
                             capture_output=True, text=True, timeout=300)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        assert lines, f"child exited {out.returncode} without a result:\n{out.stdout}\n{out.stderr}"
        result = json.loads(lines[-1][len("RESULT "):])
        spill = os.path.join(top, "act")
        files = sorted(n for n in os.listdir(spill) if n.startswith(FILE_PREFIX)) if os.path.isdir(spill) else []
        assert files == [], f"spill files left behind: {files}"
    finally:
        shutil.rmtree(top, ignore_errors=True)
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


def _assert_clean_construction_failure(result: dict, part: str) -> str:
    """Construction failed with ResourceLimitError naming ``part`` and the binding limit, and
    nothing it started is left running."""
    assert result["where"] == "construct", result
    assert result["limit_error"], f"{result['type']}: {result['message']}"
    message = result["message"]
    assert part in message, message
    assert f"RLIMIT_NPROC soft {result['limit']}," in message, message  # the limit, with its value
    assert "io_threads" in message, message  # what to do about it
    assert result["py_threads"] == [], result
    assert result["tasks_after"] <= result["tasks_before"], result  # no native worker left
    assert result["files"] == [], result
    return message


def test_no_room_for_any_thread_fails_construction_clearly():
    """Before: a bare ``BlockingIOError: [Errno 11] Resource temporarily unavailable``."""
    result = _run_child("none")
    _assert_clean_construction_failure(result, f"the native I/O engine's {IO_THREADS} worker threads")


def test_room_for_the_native_workers_only_fails_construction_not_the_step():
    """Before: construction worked and the first step failed with "can't start new thread".
    Now the write threads start at construction: the first one starts, the second is refused,
    and the one that started is stopped again."""
    result = _run_child("native")
    assert result["where"] != "step", f"the step failed: {result['type']}: {result['message']}"
    _assert_clean_construction_failure(result, f"the {IO_THREADS // 2} write threads")


def test_room_for_every_thread_trains_without_starting_more():
    """With exactly the threads construction starts, a step needs no new one."""
    result = _run_child("all")
    assert result["where"] == "trained", f"{result['where']}: {result.get('type')}: {result.get('message')}"
    assert result["bytes_written"] > 0
    assert result["files"] == []


def _native_workers() -> int:
    """Threads of this process the native engine named ``ssdoffload-io``."""
    count = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                count += f.read().strip() == "ssdoffload-io"
        except OSError:
            pass  # exited meanwhile
    return count


@pytest.mark.parametrize("host_cache_bytes", [0, 8 << 20])
def test_every_io_thread_runs_once_constructed(tmp_path, host_cache_bytes):
    """No thread is left to start lazily in a step: all of them run right after construction."""
    import collections
    import gc
    import threading

    import ssdoffload

    def ours():
        return collections.Counter(t.name.rsplit("_", 1)[0] for t in threading.enumerate()
                                   if t.name.startswith("ssdoffload"))

    gc.collect()  # an Offloader another test dropped unclosed closes now, not during this test
    before, natives = ours(), _native_workers()
    config = ssdoffload.OffloadConfig(path=str(tmp_path / "act"), io_threads=IO_THREADS,
                                      host_cache_bytes=host_cache_bytes, initial_file_bytes=1 << 20)
    with ssdoffload.Offloader(None, config):
        expected = {"ssdoffload-write": IO_THREADS // 2, "ssdoffload-read": IO_THREADS // 2}
        if host_cache_bytes:
            expected["ssdoffload-host"] = 1
        assert ours() - before == collections.Counter(expected)
        assert _native_workers() == natives + IO_THREADS
    assert ours() == before  # joined on close
