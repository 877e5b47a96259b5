"""Chaos mode (``SSDOFFLOAD_CHAOS=<seed>``, ``ssdoffload/chaos.py``): random pauses at every
submission, completion and state change, the native engine's chunks in random order, the
collector every 50 allocations. Every test runs its program in a child process with the
variable set (it is read once, at import), on real files with the real engine: nothing mocked.

To run any other suite under chaos, export the variable for pytest: the test process and every
process it starts read it (``SSDOFFLOAD_CHAOS=1 python -m pytest tests/test_fuzz.py``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
BANNER = "chaos mode is on"


def _run(code: str, chaos, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run ``code`` in a child process, chaos mode on with seed ``chaos`` (None: off). A child
    that hangs fails the test (killed after ``timeout``), one that fails shows its output."""
    env = dict(os.environ)
    env.pop("SSDOFFLOAD_CHAOS", None)
    if chaos is not None:
        env["SSDOFFLOAD_CHAOS"] = str(chaos)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("PYTHONFAULTHANDLER", "1")
    try:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the child hung (killed after {timeout} s); output:\n{exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, f"child exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return proc


# -- the native engine -----------------------------------------------------------------------

_ENGINE = """
    import os, sys
    import numpy as np
    import ssdoffload
    from ssdoffload import chaos
    from ssdoffload.io import _native

    spill = sys.argv[1] if len(sys.argv) > 1 else {spill!r}
    os.makedirs(spill, exist_ok=True)
    path = os.path.join(spill, "engine.bin")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    except OSError:  # a filesystem without O_DIRECT (tmpfs)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(path)
    print("seed", _native.CHAOS_SEED, chaos.SEED, chaos.ON)

    # One worker: the chunks run one at a time, so the order the requests finished in is the
    # order of the times the engine recorded -- no clock threshold involved.
    engine = _native.Engine(threads=1, chunk_bytes=4096)
    rng = np.random.default_rng(0)
    n = 48
    sizes = [int(rng.integers(1, 3 * 4096)) for _ in range(n)]   # 1 to 3 chunks, odd tails
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += -(-size // 4096) * 4096
    # Data at an odd address (the bounce buffers too), distinct per request.
    src = [np.frombuffer(rng.bytes(s + 1), dtype=np.uint8)[1:] for s in sizes]

    def finish_order(requests):
        for r in requests:
            assert r.result() == r.nbytes      # wait on each, in submission order
        ends = [r.times()[1] for r in requests]
        return sorted(range(len(requests)), key=ends.__getitem__)

    writes = [engine.write(fd, a.ctypes.data, a.nbytes, off, path, verify=(i % 3 == 0))
              for i, (a, off) in enumerate(zip(src, offsets))]
    w_order = finish_order(writes)
    sums = [w.checksums() for w in writes]

    dst = [np.frombuffer(bytearray(s + 1), dtype=np.uint8)[1:] for s in sizes]
    reads = [engine.read(fd, d.ctypes.data, d.nbytes, off, path,
                         expected=sums[i] if sums[i] is not None else None)
             for i, (d, off) in enumerate(zip(dst, offsets))]
    r_order = finish_order(reads)
    for i, (a, b) in enumerate(zip(src, dst)):
        assert np.array_equal(a, b), f"request {{i}} read back different bytes"
    engine.close()
    os.close(fd)
    print("writes", w_order)
    print("reads", r_order)
    print("OK")
"""


def _orders(out: str):
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    return eval(lines["writes"]), eval(lines["reads"]), lines["seed"]


@pytest.mark.parametrize("seed", [1, 2024])
def test_engine_completes_out_of_order_under_chaos_with_exact_data(spill_dir, seed):
    proc = _run(_ENGINE.format(spill=os.path.join(spill_dir, "chaos")), chaos=seed)
    writes, reads, seeds = _orders(proc.stdout)
    assert seeds == f"{seed} {seed} True"
    n = len(writes)
    assert sorted(writes) == list(range(n)) and sorted(reads) == list(range(n))
    assert writes != list(range(n)), "chaos mode: writes still finished in submission order"
    assert reads != list(range(n)), "chaos mode: reads still finished in submission order"
    # Logged once, at WARNING, with the seed.
    assert proc.stderr.count(BANNER) == 1 and f"SSDOFFLOAD_CHAOS={seed}" in proc.stderr


def test_engine_without_chaos_is_fifo(spill_dir):
    """The control: the same program with chaos off finishes in submission order (one worker,
    FIFO queue), says nothing, and leaves the collector's thresholds alone."""
    proc = _run(_ENGINE.format(spill=os.path.join(spill_dir, "quiet")), chaos=None)
    writes, reads, seeds = _orders(proc.stdout)
    assert seeds == "None None False"
    assert writes == list(range(len(writes))) and reads == list(range(len(reads)))
    assert BANNER not in proc.stderr


def test_chaos_seed_is_checked():
    env = dict(os.environ, SSDOFFLOAD_CHAOS="not-a-seed", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", "import ssdoffload"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "SSDOFFLOAD_CHAOS must be a non-negative integer" in proc.stderr
    env["SSDOFFLOAD_CHAOS"] = ""  # empty: off
    proc = subprocess.run([sys.executable, "-c", "import gc, ssdoffload, ssdoffload.io._native as n; "
                           "print(n.CHAOS_SEED, ssdoffload.chaos.ON, gc.get_threshold()[0])"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split()[:2] == ["None", "False"], proc.stderr
    assert int(proc.stdout.split()[2]) != 50


# -- whole training runs: bit-identical gradients under chaos ---------------------------------

_TRAIN = """
    import gc, os, sys, threading
    import torch
    import ssdoffload
    from ssdoffload import chaos
    from helpers import TINY, assert_bit_identical, offload_config, train

    assert chaos.ON and gc.get_threshold() == (50, 5, 5)
    torch.set_num_threads(1)
    spill = {spill!r}
    reference = train(None, steps={steps})
    for name, kw in {configs}:
        if kw.get("memory_budget") == "quarter":  # of what one step offloads with everything on the SSD
            probe = train(offload_config(os.path.join(spill, "probe"), policy="all"), steps=1)
            kw["memory_budget"] = probe[2].offloadable_bytes // 4
        got = train(offload_config(os.path.join(spill, name), **kw), steps={steps})
        assert_bit_identical(reference, got)
        stats = got[2]
        assert stats.bytes_written > 0 and stats.bytes_read > 0, (name, stats)
        assert stats.write_failures == 0, (name, stats)
        print(name, "ok", stats.tensors_offloaded, "offloaded", stats.peak_resident_bytes, "peak")
        if kw.get("memory_budget"):
            assert stats.peak_resident_bytes <= kw["memory_budget"] and stats.budget_overruns == 0, stats
    left = [os.path.join(r, f) for r, _, fs in os.walk(spill) for f in fs]
    assert not left, left
    extra = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    print("threads", extra)
    print("OK")
"""


def _train_under_chaos(spill_dir, seed, configs, steps=3):
    os.makedirs(spill_dir, exist_ok=True)
    proc = _run(_TRAIN.format(spill=spill_dir, steps=steps, configs=configs), chaos=seed, timeout=600)
    assert proc.stdout.rstrip().endswith("OK"), proc.stdout
    assert proc.stderr.count(BANNER) == 1
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 7])
def test_gpt_offload_all_bit_identical_under_chaos(spill_dir, cpu_hog, seed):
    """Everything offloaded (direct requests, and through the I/O threads with verify and two
    spill paths), with a CPU hog: the same gradients as plain autograd, no file left, exit 0."""
    configs = [
        ("all", dict(policy="all", min_offload_bytes=0, prefetch_depth=2)),
        ("all-verify", dict(policy="all", verify=True, min_offload_bytes=0)),
    ]
    _train_under_chaos(spill_dir, seed, repr(configs))


@pytest.mark.slow
def test_gpt_budget_and_adaptive_bit_identical_under_chaos(spill_dir, cpu_hog):
    """Budget mode (back-pressure on writes finishing in random order) and the adaptive policy:
    the same gradients, the budget met, no file left."""
    configs = [
        ("budget", dict(memory_budget="quarter")),
        ("adaptive", dict(policy="adaptive")),
    ]
    _train_under_chaos(spill_dir, 3, repr(configs), steps=4)


_MLP = """
    import os
    import torch
    import ssdoffload
    from helpers import assert_bit_identical

    def run(config):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU())
                                      for _ in range(6)], torch.nn.Linear(256, 1))
        off = ssdoffload.Offloader(model, config) if config is not None else None
        losses, grads = [], []
        try:
            for step in range(4):
                x = torch.randn(64, 256, generator=torch.Generator().manual_seed(step))
                ctx = off.step() if off is not None else torch.enable_grad()
                with ctx:
                    loss = model(x).square().mean()
                    loss.backward()
                losses.append(loss.detach())
                grads.append([p.grad.clone() for p in model.parameters()])
                model.zero_grad(set_to_none=True)
        finally:
            if off is not None:
                off.close()
        return losses, grads

    spill = {spill!r}
    assert_bit_identical(run(None), run(ssdoffload.OffloadConfig(path=spill, policy="all", min_offload_bytes=0)))
    assert not [f for _, _, fs in os.walk(spill) for f in fs]
    print("OK")
"""


def test_mlp_bit_identical_under_chaos(spill_dir):
    os.makedirs(spill_dir, exist_ok=True)
    proc = _run(_MLP.format(spill=os.path.join(spill_dir, "mlp")), chaos=5)
    assert proc.stdout.rstrip().endswith("OK")
