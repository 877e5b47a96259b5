"""The I/O job queue and its future (``ssdoffload.io.jobs``): real threads, real signals."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from ssdoffload.io.jobs import CancelledError, JobPool


def test_result_exception_and_callbacks():
    pool = JobPool(2, "t", "test threads")
    try:
        seen = []
        ok = pool.submit(lambda a, b: a + b, 2, 3)
        ok.add_done_callback(lambda f: seen.append(("ok", f.result())))
        assert ok.result() == 5 and ok.exception() is None and ok.done()
        bad = pool.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            bad.result()
        assert isinstance(bad.exception(), ZeroDivisionError)
        # A callback added after the job finished runs at once, on the adding thread.
        bad.add_done_callback(lambda f: seen.append(("bad", threading.current_thread().name)))
        deadline = time.monotonic() + 60
        while ("ok", 5) not in seen and time.monotonic() < deadline:  # the worker runs it
            time.sleep(0.001)
        assert ("ok", 5) in seen and ("bad", threading.current_thread().name) in seen
    finally:
        pool.shutdown()


def test_cancel_before_start_and_after():
    pool = JobPool(1, "t", "test threads")
    gate = threading.Event()
    ran = []
    try:
        started = threading.Event()
        first = pool.submit(lambda: (started.set(), gate.wait())[1])  # holds the only worker
        assert started.wait(60)
        queued = pool.submit(ran.append, "queued")
        calls = []
        queued.add_done_callback(calls.append)
        assert queued.cancel() and not queued.cancel()  # once only
        assert not first.cancel()  # running: too late
        gate.set()
        with pytest.raises(CancelledError):
            queued.exception()
        assert queued.cancelled() and ran == [] and calls == [queued]
        assert first.result() is True and not first.cancel()
    finally:
        gate.set()
        pool.shutdown()


def test_shutdown_runs_what_is_queued():
    pool = JobPool(2, "t", "test threads")
    out = []
    futures = [pool.submit(out.append, i) for i in range(50)]
    pool.shutdown()
    assert sorted(out) == list(range(50)) and all(f.done() for f in futures)


def test_timeout():
    pool = JobPool(1, "t", "test threads")
    gate = threading.Event()
    try:
        fut = pool.submit(gate.wait)
        with pytest.raises(TimeoutError):
            fut.result(timeout=0.01)
    finally:
        gate.set()
        pool.shutdown()


_HAMMERED = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from ssdoffload.io.jobs import JobPool

    armed = [False]

    def interrupt(signum, frame):
        # Raise only inside the hammered region (disarmed first, so a second signal cannot
        # land in the except clause): the test must not die at its own loop's bookkeeping.
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    pool = JobPool(2, "w", "workers")
    print("ready", flush=True)
    interrupts = 0
    while not os.path.exists({stop!r}):
        try:
            armed[0] = True
            futures = [pool.submit(sum, range(200)) for _ in range(20)]
            for i, f in enumerate(futures):
                f.add_done_callback(lambda f: None)
                if i % 3 == 0:
                    f.cancel()
                f.done()
                try:
                    f.exception()
                except Exception:
                    pass
            armed[0] = False
        except KeyboardInterrupt:
            interrupts += 1
    pool.shutdown()  # hangs if an interrupt left a lock an I/O thread needs
    print("done", interrupts, flush=True)
""")


def test_interrupts_never_strand_an_io_thread(tmp_path):
    """The compute thread is interrupted (real SIGINTs) all through submit, cancel, done,
    exception and add_done_callback; the I/O threads still finish every job and stop.
    (``concurrent.futures`` left a future's lock held by such an interrupt, and the worker
    that finished that future blocked on it forever.)"""
    stop = tmp_path / "stop"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-u", "-c", _HAMMERED.format(root=root, stop=str(stop))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        for _ in range(300):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.002)
        time.sleep(0.5)  # the last interrupt is handled inside the loop, not at shutdown
        stop.touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.startswith("done"), (out, err)
    assert int(out.split()[1]) > 0, "no interrupt landed in the hammered region"
