"""A script whose Offloader could not be built prints the error and exits at once (issue 21).

The most common first mistake — a wrong spill path — used to hang the process at exit:
``Offloader.__del__`` started a thread from the garbage collector during interpreter shutdown,
where a new thread never runs and ``Thread.start`` waits for ever. Each case here is a real
process making that mistake the way a user would (the bare class, ``offload()``, the Hugging
Face and Lightning callbacks, the Megatron wrapper, the DeepSpeed example script), with a real
cause (a missing parent, a file, a read-only or full filesystem, ``RLIMIT_FSIZE``, a bad
``$SSDOFFLOAD_PATH``). Each must exit with status 1 soon after it printed the error (the
bound is for a hang, not for speed: the time is taken from the error to the exit), with no
thread of ours left running at that point and no spill file or directory left on disk.
Then the same constructions (and steps, aborts and closes) with the collector run at every
allocation: nothing of ours may run, or block, inside it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Exit within this long after the error was printed (interpreter teardown of torch takes
#: well under a second; a hang is for ever).
EXIT_BOUND_S = 5.0

# Every in-process case: build the thing that fails inside `attempt()`, and the child reports
# (on stdout) when the error was raised and which of our threads were alive then.
_PRELUDE = r"""
import os, sys, threading, time
sys.path.insert(0, {repo!r})
import torch
import ssdoffload
from ssdoffload import Offloader, OffloadConfig
BAD = {bad!r}
model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(3)])

def our_threads():
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{{tid}}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    py = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    return [n for n in names + py if "ssdoffload" in n]

def attempt():
{body}

try:
    attempt()
except Exception as exc:
    print("ERROR-AT", time.monotonic(), type(exc).__name__, "THREADS", our_threads(), flush=True)
    raise
print("NO-ERROR", flush=True)
"""

_CASES = {
    "the bare class": "    Offloader(model, OffloadConfig(path=BAD))",
    "keyword arguments": "    Offloader(model, path=BAD, memory_budget=1 << 20)",
    "offload()": "    with ssdoffload.offload(path=BAD):\n        model(torch.randn(4, 32)).sum()",
    "$SSDOFFLOAD_PATH": "    os.environ['SSDOFFLOAD_PATH'] = BAD\n"
                        "    with ssdoffload.offload():\n        model(torch.randn(4, 32)).sum()",
    "the Hugging Face callback": "    from ssdoffload.integrations.huggingface import SSDOffloadCallback\n"
                                 "    SSDOffloadCallback(path=BAD).on_train_begin(None, None, None, model=model)",
    "the Lightning callback": "    from ssdoffload.integrations.lightning import SSDOffloadCallback\n"
                              "    SSDOffloadCallback(path=BAD).on_fit_start(None, model)",
    "the Megatron wrapper": "    from megatron.core.pipeline_parallel import schedules\n"
                            "    from megatron.core.transformer.transformer_config import TransformerConfig\n"
                            "    from ssdoffload.integrations import megatron\n"
                            "    model.config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,\n"
                            "                                     use_cpu_initialization=True)\n"
                            "    megatron.wrap(schedules.forward_backward_no_pipelining, model, path=BAD)",
}


def _run_until_exit(cmd, env=None, cwd=None):
    """Run ``cmd``; returns (exit status, output, seconds from the error line to the exit)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=cwd)
    lines, error_at = [], []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if not error_at and ("ERROR-AT" in line or "Error:" in line):
                error_at.append(time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=300)  # a hang, not a slow machine
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        reader.join(10)
        pytest.fail("the process did not exit within 300 s after a failed construction:\n"
                    + "".join(lines)[-4000:])
    exited = time.monotonic()
    reader.join(30)
    out = "".join(lines)
    assert error_at, f"no error was printed (exit {rc}):\n{out[-4000:]}"
    return rc, out, exited - error_at[0]


def _check(rc, out, after_error, root):
    assert rc == 1, f"exit status {rc}, wanted 1:\n{out[-4000:]}"
    assert after_error < EXIT_BOUND_S, f"exited {after_error:.1f} s after the error:\n{out[-3000:]}"
    for line in out.splitlines():
        if line.startswith("ERROR-AT"):
            assert line.endswith("THREADS []"), f"our threads were still running: {line}"
    left = [os.path.join(r, n) for r, ds, fs in os.walk(root) for n in ds + fs]
    assert not left, f"left on disk: {left}"


def _child(tmp_path, bad, body, env=None):
    script = tmp_path / "child.py"
    script.write_text(_PRELUDE.format(repo=REPO, bad=bad, body=body))
    env = dict(os.environ if env is None else env, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return _run_until_exit([sys.executable, str(script)], env=env)


_HEAVY = {"the Hugging Face callback", "the Lightning callback", "the Megatron wrapper"}  # imports: seconds


@pytest.mark.parametrize("how", [pytest.param(h, marks=pytest.mark.slow) if h in _HEAVY else h for h in _CASES])
def test_a_missing_parent_exits_at_once(tmp_path, how):
    root = tmp_path / "drive"
    root.mkdir()
    rc, out, after = _child(tmp_path, str(root / "no-such-parent" / "act"), _CASES[how])
    assert "does not exist" in out
    _check(rc, out, after, root)


def test_a_file_as_the_path_exits_at_once(tmp_path):
    root = tmp_path / "drive"
    root.mkdir()
    (root / "afile").write_text("not a directory")
    rc, out, after = _child(tmp_path, str(root / "afile"), _CASES["the bare class"])
    assert "SpillPathError" in out
    assert sorted(os.listdir(root)) == ["afile"]
    (root / "afile").unlink()
    _check(rc, out, after, root)


def _mount_tmpfs(where, options):
    where.mkdir()
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                         capture_output=True, text=True, timeout=60)
    if got.returncode != 0:
        pytest.skip(f"needs root to mount a tmpfs: {got.stderr.strip()}")


@pytest.fixture
def mounts():
    made = []
    yield made
    for m in made:
        subprocess.run(["umount", str(m)], capture_output=True, timeout=60)


def test_a_read_only_filesystem_exits_at_once(tmp_path, mounts):
    root = tmp_path / "ro"
    _mount_tmpfs(root, "ro,size=16m")
    mounts.append(root)
    rc, out, after = _child(tmp_path, str(root / "act"), _CASES["the bare class"])
    assert "read-only file system" in out.lower()
    _check(rc, out, after, root)


def test_a_full_filesystem_at_start_up_exits_at_once(tmp_path, mounts):
    root = tmp_path / "full"
    _mount_tmpfs(root, "size=4m")
    mounts.append(root)
    filler = root / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    body = "    Offloader(model, OffloadConfig(path=BAD, initial_file_bytes=64 << 20))"
    rc, out, after = _child(tmp_path, str(root / "act"), body)
    assert "space" in out.lower(), out[-3000:]
    filler.unlink()
    _check(rc, out, after, root)


def test_rlimit_fsize_exits_at_once(tmp_path):
    root = tmp_path / "drive"
    root.mkdir()
    body = ("    import resource\n"
            "    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
            "    Offloader(model, OffloadConfig(path=BAD, initial_file_bytes=64 << 20))")
    rc, out, after = _child(tmp_path, str(root / "act"), body)
    _check(rc, out, after, root)


@pytest.mark.slow
def test_the_deepspeed_example_with_a_bad_spill_exits_at_once(tmp_path):
    pytest.importorskip("deepspeed")
    root = tmp_path / "drive"
    root.mkdir()
    example = os.path.join(REPO, "integrations", "examples", "deepspeed", "train.py")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONUNBUFFERED="1",
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rc, out, after = _run_until_exit([sys.executable, example, "--spill", str(root / "no" / "act"), "--steps", "1"],
                                     env=env, cwd=str(tmp_path))
    assert "SpillPathError" in out and "does not exist" in out
    _check(rc, out, after, root)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the collector at every allocation -------------------------------------------------------
_GC_EVERY_ALLOCATION = r"""
import gc, os, sys
sys.path.insert(0, {repo!r})
import torch
import ssdoffload
from ssdoffload import Offloader, OffloadConfig, SpillPathError
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(3)])
x = torch.randn(16, 64)
gc.set_threshold(1)   # a collection at (nearly) every allocation, from here to exit
kept = []   # a script that keeps its last error (as a REPL's sys.last_value does) keeps the
            # half-built object in the traceback's frames until the interpreter shuts down
for i in range(3):
    try:
        Offloader(model, OffloadConfig(path={bad!r}))
    except SpillPathError as exc:
        kept.append(exc)
def grads(off):
    model.zero_grad(set_to_none=True)
    if off is None:
        model(x).square().mean().backward()
    else:
        with off.step():
            model(x).square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]
ref = grads(None)
off = Offloader(model, OffloadConfig(path={good!r}, min_offload_bytes=0, policy="all"))
for _ in range(2):
    assert all(torch.equal(a, b) for a, b in zip(ref, grads(off))), "gradients differ"
try:
    with off.step():
        model(x).sum()
        raise KeyboardInterrupt
except KeyboardInterrupt:
    pass
assert all(torch.equal(a, b) for a, b in zip(ref, grads(off))), "gradients differ after an abort"
off.close()
dropped = Offloader(model, OffloadConfig(path={good!r}, min_offload_bytes=0, policy="all"))
with dropped.step():
    model(x).square().mean().backward()
del dropped   # never closed: ended at a safe point or at exit
Offloader(None, OffloadConfig(path={good!r})).close()  # a safe point
print("done", flush=True)
"""


def test_collection_at_every_allocation_never_hangs(tmp_path):
    good = tmp_path / "spill"
    script = tmp_path / "gc_child.py"
    script.write_text(_GC_EVERY_ALLOCATION.format(repo=REPO, bad=str(tmp_path / "no" / "act"), good=str(good)))
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    try:
        got = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hung with the collector at every allocation:\n{exc.stdout}\n{exc.stderr}")
    assert got.returncode == 0 and "done" in got.stdout, got.stderr[-4000:]
    left = [os.path.join(r, n) for r, ds, fs in os.walk(good) for n in fs]
    assert not left, f"spill files left: {left}"
