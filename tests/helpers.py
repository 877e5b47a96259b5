"""Shared training loops for the tests: the same steps with and without offloading."""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Tuple

import torch

import ssdoffload
from ssdoffload.models.gpt import GPT, GPTConfig, synthetic_batch

TINY = GPTConfig(vocab=256, seq=64, hidden=64, heads=4, layers=4, dropout=0.1)


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
