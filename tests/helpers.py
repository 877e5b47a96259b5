"""Shared test helpers: the tests' ``OffloadConfig`` and training loops, the same steps with and
without offloading."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

import ssdoffload
from ssdoffload.models.gpt import GPT, GPTConfig, synthetic_batch

TINY = GPTConfig(vocab=256, seq=64, hidden=64, heads=4, layers=4, dropout=0.1)


def offload_config(path: Union[str, Sequence[str]], nspill: int = 1, *, subdir: Optional[str] = None,
                   min_offload_bytes: int = 4096, initial_file_bytes: int = 1 << 20,
                   **overrides) -> ssdoffload.OffloadConfig:
    """The tests' ``OffloadConfig``: small spill files (1 MiB preallocated) and a 4 KiB
    ``min_offload_bytes``; any other field in ``overrides``.

    Without ``subdir``, ``path`` is the spill path (or list of paths) as given, nothing is
    created. With ``subdir``, ``path`` is a directory (e.g. the ``spill_dir`` fixture) that is
    created here, and the spill paths are ``path/subdir`` formatted with ``i`` = 0 ..
    ``nspill - 1`` (``subdir="drive{i}"`` gives drive0, drive1, ...); one path is passed as a
    string, several as a list.
    """
    if subdir is None:
        if nspill != 1:
            raise ValueError("nspill needs subdir (a name with {i})")
        spill = path
    else:
        names = [subdir.format(i=i) for i in range(nspill)]
        if len(set(names)) != nspill:
            raise ValueError(f"subdir={subdir!r} does not name {nspill} distinct directories")
        os.makedirs(path, exist_ok=True)
        paths = [os.path.join(path, name) for name in names]
        spill = paths if nspill > 1 else paths[0]
    return ssdoffload.OffloadConfig(path=spill, min_offload_bytes=min_offload_bytes,
                                    initial_file_bytes=initial_file_bytes, **overrides)


def train(config: Optional[ssdoffload.OffloadConfig], steps: int = 3, cfg: GPTConfig = TINY,
          micro_batch: int = 4, autocast: Optional[torch.dtype] = None, recompute: bool = False,
          device: str = "cpu", seed: int = 0,
          before_step: Optional[Callable[[ssdoffload.Offloader, int], None]] = None,
          after_step: Optional[Callable[[ssdoffload.Offloader, int], None]] = None,
          settle_writes: bool = False,
          ) -> Tuple[List[torch.Tensor], List[List[torch.Tensor]], Optional[ssdoffload.OffloadStats]]:
    """Train ``steps`` SGD steps; returns losses, the gradients of every step, and the stats.

    ``before_step(off, step)`` / ``after_step(off, step)`` run around each offloaded step (to
    change caps, record plans, or check the offloader's state while it is still open).
    ``settle_writes`` waits for the forward's writes before backward: a test that counts bytes
    written or read must not depend on whether the writer beat backward to a tensor.
    """
    torch.manual_seed(seed)
    model = GPT(cfg, recompute=recompute).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    off = ssdoffload.Offloader(model, config) if config is not None else None
    losses, grads = [], []
    try:
        for step in range(steps):
            tokens, targets = synthetic_batch(cfg, micro_batch, torch.device(device), seed=step)
            if off is not None and before_step is not None:
                before_step(off, step)
            scope = off.step() if off is not None else contextlib.nullcontext()
            amp = torch.autocast(device_type=device, dtype=autocast) if autocast else contextlib.nullcontext()
            with scope:
                with amp:
                    loss = model(tokens, targets)
                if off is not None and settle_writes:
                    off.wait()
                loss.backward()
            losses.append(loss.detach().clone())
            grads.append([p.grad.detach().clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad(set_to_none=True)
            if off is not None and after_step is not None:
                after_step(off, step)
        stats = off.stats() if off is not None else None
    finally:
        if off is not None:
            off.close()
    return losses, grads, stats


def assert_bit_identical(a, b) -> None:
    losses_a, grads_a = a[0], a[1]
    losses_b, grads_b = b[0], b[1]
    assert len(losses_a) == len(losses_b)
    for step, (la, lb) in enumerate(zip(losses_a, losses_b)):
        assert torch.equal(la, lb), f"loss differs at step {step}: {la.item()!r} vs {lb.item()!r}"
    for step, (ga, gb) in enumerate(zip(grads_a, grads_b)):
        for i, (x, y) in enumerate(zip(ga, gb)):
            assert torch.equal(x, y), f"gradient {i} {tuple(x.shape)} differs at step {step}"


def wait_child(pid: int, timeout: float, what: str) -> int:
    """``os.waitpid`` for a forked child, killing it and failing the test if it runs past
    ``timeout`` seconds (a hang must fail the test, not stop the run). Returns its status."""
    import os
    import signal
    import time

    import pytest

    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"{what}: the forked child hung")
        time.sleep(0.05)


class LateCompletions:
    """The slow ordering of a busy machine, made deterministic: the drive's direct (engine)
    writes are real, but the compute thread sees none of them done (``poll``, ``done()``)
    until it waits for one; at that wait every write queued so far is finished — the engine
    ran while the compute thread was descheduled — and each becomes visible as the compute
    thread next looks at it. ``install(off)`` patches ``off.places.drive.direct_write`` (the
    engine boundary); ``late=False`` only counts, completions as they come.

    ``writes`` counts the write requests the engine was given: outside the statistics, it
    says whether a tensor the plan keeps was sent to the drive."""

    def __init__(self, late: bool = True) -> None:
        import threading

        self.late = late
        self.writes = 0
        self._hidden: list = []
        self._lock = threading.Lock()

    def install(self, off: ssdoffload.Offloader) -> None:
        drive = off.places.drive
        assert drive.direct(torch.device("cpu")), "host writes do not go straight to the engine"
        submit = drive.direct_write

        def direct_write(*args):
            request = submit(*args)
            with self._lock:
                self.writes += 1
                if not self.late:
                    return request
                hidden = _LateRequest(request, self)
                self._hidden.append(hidden)
            return hidden

        drive.direct_write = direct_write

    def reveal(self) -> None:
        with self._lock:
            hidden, self._hidden = self._hidden, []
        for request in hidden:
            request.real.wait()
            request.visible = True


class _LateRequest:
    """A native request seen done only once ``LateCompletions.reveal`` ran (at a wait)."""

    def __init__(self, real, late: LateCompletions) -> None:
        self.real, self.late, self.visible = real, late, False

    def done(self) -> bool:
        return self.visible and self.real.done()

    def wait(self, *args):
        self.late.reveal()
        return self.real.wait(*args)

    def __getattr__(self, name):
        return getattr(self.real, name)
