"""Gradients with offloading are bit-identical to gradients without it (CPU, real files,
real threads, real native engine)."""
import functools
import os

import pytest
import torch
from torch import nn

import ssdoffload
from helpers import TINY, assert_bit_identical, offload_config, train


_cfg = functools.partial(offload_config, subdir="drive{i}")  # _cfg(spill_dir, nspill, **fields)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("nspill", [1, 2])
def test_gpt_bit_identical(spill_dir, autocast, depth, nspill):
    reference = train(None, autocast=autocast)
    # Depth 1 lets backward race the writes; the others wait for them, so the counts are exact.
    settle = depth != 1
    offloaded = train(_cfg(spill_dir, nspill, prefetch_depth=depth), autocast=autocast, settle_writes=settle)
    assert_bit_identical(reference, offloaded)
    stats = offloaded[2]
    assert stats.tensors_offloaded > 0
    if settle:
        assert stats.bytes_written > 0 and stats.bytes_read > 0
        if depth:
            assert stats.prefetch_hits > 0
    for i in range(nspill):
        assert os.listdir(os.path.join(spill_dir, f"drive{i}")) == []


def test_checkpoint_composes(spill_dir):
    reference = train(None, recompute=True)
    offloaded = train(_cfg(spill_dir), recompute=True, settle_writes=True)
    assert_bit_identical(reference, offloaded)
    assert offloaded[2].bytes_written > 0  # the checkpoint inputs


def test_forward_frees_offloadable_memory(spill_dir):
    torch.manual_seed(0)
    from ssdoffload.models.gpt import GPT, synthetic_batch
    model = GPT(TINY)
    with ssdoffload.Offloader(model, _cfg(spill_dir, prefetch_depth=2, policy="all")) as off:
        tokens, targets = synthetic_batch(TINY, 8, torch.device("cpu"), 0)
        with off.step():
            loss = model(tokens, targets)
            off.wait()
            entries = off.cache.all_entries()
            total = sum(e.nbytes for e in entries)
            alive = sum(e.nbytes for e in entries if e.token.alive)
            stats = off.current_step_stats()
            assert total > 0
            # Direct check: the storages themselves are gone from memory.
            assert alive <= 0.1 * total, f"{alive} of {total} offloadable bytes still in memory"
            assert stats.resident_bytes <= 0.1 * stats.offloadable_bytes
            loss.backward()
        step = off.last_step_stats()
        assert step.peak_resident_bytes < step.offloadable_bytes


class SharedStorage(nn.Module):
    """Saved tensors that share storage: split views, a transpose, one tensor saved twice."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(256, 256)

    def forward(self, x):
        h = self.lin(x)                 # saves x
        q, k = h.split(128, dim=-1)     # two views of h's storage
        y = q * k                       # saves q and k
        z = torch.sin(h)                # saves h (same storage again)
        w = h.t() @ h                   # saves h.t() (a transposed view) and h again
        return y.sum() + z.sum() + w.sum() + (h[:, ::2] * 2.0).exp().sum()


def test_dedup_writes_each_storage_once(spill_dir):
    torch.manual_seed(0)
    model = SharedStorage()
    x = torch.randn(64, 256)

    def grads(off):
        model.zero_grad()
        if off is None:
            model(x).backward()
        else:
            with off.step():
                loss = model(x)
                off.wait()  # every write done before backward, so the byte count is exact
                loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    ref = grads(None)
    with ssdoffload.Offloader(model, _cfg(spill_dir)) as off:
        got = grads(off)
        stats = off.stats()
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    # Saved: x (lin), q and k (mul), h (sin), h.t() and h (mm), exp output.
    # Storages: x, h, exp's output; every other save is a dedup hit.
    unique = x.untyped_storage().nbytes() + 64 * 256 * 4 + 64 * 128 * 4
    assert stats.tensors_offloaded == 3
    assert stats.dedup_hits == 4
    assert stats.bytes_written == unique


def test_views_come_back_exactly(spill_dir):
    """Non-contiguous views, transposes and offsets are rebuilt over the reloaded storage."""
    base = torch.randn(32, 48, requires_grad=True)
    captured = {}

    def f(t):
        a = t * 1.0
        views = [a.t(), a[3:, 5:17], a[:, ::3], a.view(-1)[7:200], a.unsqueeze(0).expand(2, 32, 48)]
        outs = []
        for v in views:
            outs.append((v * v).sum())  # mul saves v (twice: self and other)
        return sum(outs), views

    loss_ref, _ = f(base)
    loss_ref.backward()
    g_ref = base.grad.clone()
    base.grad = None
    with ssdoffload.Offloader(None, _cfg(spill_dir, prefetch_depth=0, min_offload_bytes=0)) as off:
        with off.step():
            loss, views = f(base)
            captured["specs"] = [(tuple(v.shape), v.stride(), v.storage_offset()) for v in views]
            del views
            off.wait()
            loss.backward()
        assert off.stats().bytes_read > 0
        assert off.stats().dedup_hits >= 9
    assert torch.equal(g_ref, base.grad)


def test_parameters_never_written(spill_dir):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 512))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 3.14159)
    x = torch.randn(128, 512)
    with ssdoffload.Offloader(model, _cfg(spill_dir)) as off:
        with off.step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            off.wait()
            files = off.spill_files
            content = b"".join(open(f, "rb").read() for f in files)
            out.float().sum().backward()
        assert off.stats().bytes_written > 0
    needles = []
    for p in model.parameters():
        raw = p.detach().contiguous().view(-1)
        needles.append(raw[:64].numpy().tobytes())
        needles.append(raw[:64].to(torch.bfloat16).view(torch.int16).numpy().tobytes())  # autocast copy
        needles.append(p.detach().t().contiguous().view(-1)[:64].numpy().tobytes() if p.dim() == 2 else b"")
    assert content.count(b"\0") < len(content)  # the file holds the activations
    for needle in needles:
        if needle:
            assert needle not in content, "a parameter (or its autocast copy) was written to the spill file"


def test_micro_batches_in_flight_and_prefetch(spill_dir):
    """Pipeline-style: forward 4 micro-batches, then backward them in order with prefetch."""
    from ssdoffload.models.gpt import GPT, synthetic_batch

    def run(off):
        torch.manual_seed(0)
        model = GPT(TINY)
        if off is not None:
            off = ssdoffload.Offloader(model, off)
        losses = []
        for mb in range(4):
            tokens, targets = synthetic_batch(TINY, 4, torch.device("cpu"), mb)
            if off is None:
                losses.append(model(tokens, targets))
            else:
                with off.micro_batch(mb):
                    losses.append(model(tokens, targets))
        if off is not None:
            off.wait()
        for mb, loss in enumerate(losses):
            if off is not None:
                off.prefetch(mb)
            loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        stats = None
        if off is not None:
            stats = off.stats()
            off.close()
        return [l.detach() for l in losses], [grads], stats

    ref = run(None)
    got = run(_cfg(spill_dir, prefetch_depth=2))
    assert_bit_identical(ref, got)
    assert got[2].prefetch_hits > 0


def test_in_place_modification_after_save_is_refused(spill_dir):
    x = torch.randn(128, 128, requires_grad=True)
    with ssdoffload.Offloader(None, _cfg(spill_dir)) as off:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            with off.step():
                y = x * 2
                z = y.sin()   # saves y
                y.add_(1)
                z.sum().backward()


def test_disabled_config_is_a_no_op(tmp_path):
    model = nn.Linear(8, 8)
    off = ssdoffload.Offloader(model, ssdoffload.OffloadConfig(path=str(tmp_path / "never"), enabled=False))
    with off.step():
        model(torch.randn(4, 8)).sum().backward()
    assert off.stats().bytes_written == 0
    assert not (tmp_path / "never").exists()
    off.close()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "kvikio"])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpt_bit_identical_cuda(spill_dir, backend, autocast):
    if backend == "kvikio":
        from ssdoffload.io import kvikio_available
        if not kvikio_available():
            pytest.skip("kvikio is not installed")
    reference = train(None, autocast=autocast, device="cuda", micro_batch=8)
    offloaded = train(_cfg(spill_dir, backend=backend, prefetch_depth=2), autocast=autocast,
                      device="cuda", micro_batch=8)
    assert_bit_identical(reference, offloaded)
    assert offloaded[2].bytes_written > 0 and offloaded[2].bytes_read > 0


def test_queued_writes_do_not_keep_freed_activations_alive(spill_dir):
    """Writes waiting in the queue (here: held back by a tiny bandwidth cap) hold no memory:
    once backward has used and freed a tensor, its storage is gone at once."""
    from ssdoffload.models.gpt import GPT, synthetic_batch
    reference = train(None, steps=1)
    torch.manual_seed(0)
    model = GPT(TINY)
    cfg = _cfg(spill_dir, policy="all", max_write_bandwidth=1 << 20)  # 1 MiB/s: writes queue up
    with ssdoffload.Offloader(model, cfg) as off:
        tokens, targets = synthetic_batch(TINY, 4, torch.device("cpu"), 0)
        with off.step():
            loss = model(tokens, targets)
            entries = off.cache.all_entries()
            tokens_ = [e.token for e in entries]
            loss.backward()
        alive = sum(t.alive for t in tokens_)
        assert len(tokens_) > 4
        assert alive <= 2, f"{alive} of {len(tokens_)} freed activations still held by queued writes"
        grads = [p.grad for p in model.parameters()]
    for a, b in zip(reference[1][0], grads):
        assert torch.equal(a, b)
    assert off.stats().writes_skipped > 0


def test_stats_say_why_tensors_were_kept(spill_dir):
    """``policy.decide`` knew why a tensor stayed in memory and the pack hook dropped it; the
    reasons (tensors and bytes) are in ``OffloadStats.kept_by_reason`` now."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 8))
    x = torch.randn(256, 512)
    cfg = ssdoffload.OffloadConfig(path=spill_dir, min_offload_bytes=64 << 10, policy="all")
    with ssdoffload.Offloader(model, cfg) as off:
        with off.step():
            model(x).square().mean().backward()
        st = off.last_step_stats()
        live = off.current_step_stats()
    reasons = st.kept_by_reason
    assert reasons["parameter"][0] >= 1  # the second weight (W.t(), for the input's gradient)
    assert reasons["below min_offload_bytes"][0] >= 1  # the (256, 8) output of the last layer
    assert sum(n for n, _ in reasons.values()) == st.tensors_kept
    assert sum(b for _, b in reasons.values()) == st.bytes_kept
    assert st.tensors_offloaded > 0
    reasons["parameter"][0] += 1000  # a snapshot shares nothing with the live record
    assert off.last_step_stats().kept_by_reason["parameter"][0] < 1000
    assert live.kept_by_reason == {}
