"""The host-RAM tier: its byte budget is never exceeded, overflow goes to the spill files,
reloads from RAM need no disk I/O, and gradients stay bit-identical (CPU; CUDA marked)."""
import functools

import pytest
import torch

import ssdoffload
from ssdoffload.host_ram import HostTier
from helpers import TINY, assert_bit_identical, offload_config, train


_cfg = functools.partial(offload_config, subdir="d")


def test_budget_is_strict():
    tier = HostTier(100_000)          # rounded down to 24 pages of 4 KiB
    assert tier.budget == 98_304
    slots = []
    while True:
        s = tier.reserve(5000)        # 8 KiB each once aligned
        if s is None:
            break
        slots.append(s)
        assert tier.used <= tier.budget
    assert len(slots) == 12 and tier.used == tier.budget
    assert tier.reserve(1) is None and tier.reserve(200_000) is None
    tier.free(slots.pop())
    assert tier.reserve(8192) is not None
    assert tier.peak <= tier.budget
    tier.close()


@pytest.mark.parametrize("policy", ["all", "adaptive"])
def test_ram_first_overflow_to_ssd_budget_never_exceeded(spill_dir, policy):
    budget = 384 << 10
    reference = train(None, steps=4)
    peaks = []

    def after(off, step):
        assert off.tier.used == 0  # every slot returned once backward freed its tensors
        peaks.append(off.tier.peak)  # the most ever reserved at once (checked at every reserve)

    losses, grads, stats = train(_cfg(spill_dir, policy=policy, host_cache_bytes=budget), steps=4,
                                 after_step=after)
    highest = max(peaks)
    assert_bit_identical(reference, (losses, grads))
    assert stats.peak_host_tier_bytes <= budget and highest <= budget
    if policy == "adaptive":
        # On a CPU host the tier would keep tensors in place, which saves no memory: the
        # adaptive plan leaves it out (it places layers on the drive or keeps them).
        assert stats.peak_host_tier_bytes == 0 and stats.plan_version >= 1
    else:
        assert stats.peak_host_tier_bytes > 0 and stats.host_bytes_written > 0
        # The tier filled first; what did not fit went to the drive.
        assert stats.bytes_written > 0
        assert stats.peak_host_tier_bytes > budget // 2


def test_tier_large_enough_for_everything_needs_no_disk_io(spill_dir):
    reference = train(None, steps=2)
    got = train(_cfg(spill_dir, policy="all", host_cache_bytes=64 << 20), steps=2)
    assert_bit_identical(reference, got)
    stats = got[2]
    assert stats.bytes_written == 0 and stats.bytes_read == 0
    assert stats.host_bytes_written > 0 and stats.peak_host_tier_bytes <= 64 << 20


@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["all", "adaptive"])
def test_cuda_tier_bit_identical_and_within_budget(spill_dir, policy):
    budget = 1 << 20
    reference = train(None, steps=4, device="cuda")
    got = train(_cfg(spill_dir, policy=policy, host_cache_bytes=budget, backend="native"), steps=4,
                device="cuda")
    assert_bit_identical(reference, got)
    stats = got[2]
    assert 0 < stats.peak_host_tier_bytes <= budget
    assert stats.host_bytes_written > 0 and stats.host_bytes_read > 0
    if policy == "all":
        assert stats.bytes_written > 0  # overflow


@pytest.mark.cuda
def test_cuda_tier_frees_device_memory(spill_dir):
    from ssdoffload.models.gpt import GPT, synthetic_batch
    torch.manual_seed(0)
    model = GPT(TINY).cuda()
    with ssdoffload.Offloader(model, _cfg(spill_dir, policy="all", host_cache_bytes=64 << 20)) as off:
        tokens, targets = synthetic_batch(TINY, 8, torch.device("cuda"), 0)
        with off.step():
            loss = model(tokens, targets)
            off.wait()
            stats = off.current_step_stats()
            assert stats.resident_bytes <= 0.1 * stats.offloadable_bytes
            assert stats.bytes_written == 0  # all of it fit in RAM
            loss.backward()
        assert off.stats().host_bytes_read > 0


def test_a_ram_stage_smaller_than_the_step_still_offloads_everything(spill_dir):
    """Host RAM for a quarter of what a step offloads: every offloadable tensor still leaves
    (the oldest drained from RAM to the drive as the stage fills), RAM never holds more than
    its budget, and at the end of forward what stays in memory is at most the stage — the
    newest tensors, which backward reads first. Gradients bit-identical."""
    probe = train(_cfg(spill_dir, policy="all"), steps=1)
    offloadable = probe[2].offloadable_bytes
    budget = offloadable // 4
    reference = train(None, steps=2)
    seen = {}

    def before_backward(off, step):
        seen.setdefault("forward", []).append(off.current_step_stats())

    from ssdoffload.models.gpt import GPT, synthetic_batch

    torch.manual_seed(0)
    model = GPT(TINY)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, grads = [], []
    with ssdoffload.Offloader(model, _cfg(spill_dir, policy="all", host_cache_bytes=budget)) as off:
        for step in range(2):
            tokens, targets = synthetic_batch(TINY, 4, torch.device("cpu"), seed=step)
            with off.step():
                loss = model(tokens, targets)
                off.wait()
                before_backward(off, step)
                loss.backward()
            losses.append(loss.detach().clone())
            grads.append([p.grad.detach().clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad(set_to_none=True)
        stats = off.stats()
    assert_bit_identical(reference, (losses, grads))
    for fwd in seen["forward"]:
        assert fwd.offloadable_bytes == offloadable and fwd.host_bytes_drained > 0
        assert fwd.resident_bytes <= off.tier.budget  # the rest is on the drive
    assert stats.peak_host_tier_bytes <= off.tier.budget and stats.bytes_written > 0
