"""Regression tests for correctness holes in the saved-tensor offloading (CPU, real spill files).

Every test runs the same program twice, once under plain autograd and once inside
``Offloader.step()``, and requires the same outcome: bit-identical gradients (``torch.equal``)
or, where plain autograd refuses (``RuntimeError: ... modified by an inplace operation``),
a ``RuntimeError`` from the offloaded run too.

Timing: writes run on I/O threads, so each hole is exercised at several points of the write's
life. ``sync()`` inside a program is ``off.wait()`` in the offloaded run (every write started so
far has finished) and a no-op under plain autograd; ``max_write_bandwidth`` makes writes lag
behind the compute. The *assertions* never depend on timing: a correct offloader gives plain
autograd's answer whenever its writes happen.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Callable, List, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import ssdoffload
from ssdoffload import OffloadError
from ssdoffload.views import storage_key
from helpers import TINY, offload_config

Sync = Callable[[], None]


# -- harness ---------------------------------------------------------------------------------

# every saved tensor offloaded, no prefetch: the harness decides when reads happen
_cfg = functools.partial(offload_config, subdir="drive0", min_offload_bytes=0, policy="all", prefetch_depth=0)


def _grads(tensors) -> List[Optional[torch.Tensor]]:
    return [None if t.grad is None else t.grad.detach().clone() for t in tensors]


def _run(program, off: Optional[ssdoffload.Offloader], model: Optional[nn.Module] = None):
    """One forward+backward of ``program(sync[, model]) -> (loss, leaves)``.

    Returns the leaves' gradients, or the RuntimeError (OffloadError included) it raised.
    """
    torch.manual_seed(0)
    args = () if model is None else (model,)
    try:
        if off is None:
            loss, leaves = program(lambda: None, *args)
            loss.backward()
        else:
            with off.step():
                loss, leaves = program(off.wait, *args)
                loss.backward()
    except RuntimeError as exc:
        return exc
    return _grads(leaves)


def _assert_same(ref, got, allow_offload_error: bool = False) -> None:
    """``got`` (offloaded) has the outcome of ``ref`` (plain autograd)."""
    if isinstance(ref, BaseException):
        assert isinstance(got, RuntimeError), (
            f"plain autograd raised {type(ref).__name__}({ref}) but the offloaded run "
            f"{'returned gradients' if not isinstance(got, BaseException) else 'raised ' + repr(got)}")
        if "inplace" in str(ref):
            assert "inplace" in str(got), f"the offloaded run's error does not say 'inplace': {got}"
        return
    if isinstance(got, BaseException):
        if allow_offload_error and isinstance(got, OffloadError):
            return
        raise AssertionError(f"plain autograd computed gradients, the offloaded run raised {got!r}") from got
    assert len(ref) == len(got)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert (a is None) == (b is None), f"gradient {i}: {a is None} vs {b is None}"
        if a is not None:
            assert torch.equal(a, b), (
                f"gradient {i} {tuple(a.shape)} differs from plain autograd "
                f"(max abs diff {(a - b).abs().max().item():.3g})")


def _compare(program, spill_dir: str, make_model=None, allow_offload_error: bool = False, **cfg):
    """Run ``program`` plainly and offloaded; assert the same outcome; return both."""
    model = None
    if make_model is not None:
        torch.manual_seed(1)
        model = make_model()
        state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _run(program, None, model)
    if model is not None:
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
    with ssdoffload.Offloader(model, _cfg(spill_dir, **cfg)) as off:
        got = _run(program, off, model)
        stats = off.stats()
    _assert_same(ref, got, allow_offload_error)
    return ref, got, stats


class WaitBeforeMutation(TorchDispatchMode):
    """Calls ``sync()`` before every mutating aten op: inside a fused composite (GRU cells),
    every write started by an earlier save has finished before the next in-place op runs."""

    def __init__(self, sync: Sync) -> None:
        super().__init__()
        self.sync = sync

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.is_mutable:
            self.sync()
        return func(*args, **(kwargs or {}))


WRITE_TIMINGS = {
    # name: (extra config, sync between the first save and the alias's in-place op)
    "wait_between": ({}, True),
    "no_wait": ({}, False),
    "lagging_writes": ({"max_write_bandwidth": 50e6}, False),
}


# -- 1. dedup across storages shared without a shared version counter -----------------------

@pytest.mark.parametrize("timing", list(WRITE_TIMINGS))
@pytest.mark.parametrize("pattern", ["sigmoid_both", "add_sigmoid_both", "brief_mixed"])
def test_unsafe_chunk_pieces_do_not_dedup(spill_dir, pattern, timing):
    """Hole 1 (dedup trusts one version counter per storage): ``unsafe_chunk`` pieces share a
    storage but each has its own version counter, so two pieces saved at the same version
    number must not be deduplicated onto one entry whose copy was taken before the second
    piece was modified in place."""
    extra, wait_between = WRITE_TIMINGS[timing]

    def program(sync):
        x = torch.randn(256, 512)          # 512 KiB: its write books the bandwidth cap
        w = torch.randn(512, 256, requires_grad=True)
        c, d = torch.randn(256, 128), torch.randn(256, 128)
        h = x @ w
        a, b = h.unsafe_chunk(2, dim=-1)
        if pattern == "sigmoid_both":
            a = a.sigmoid_()                # saves a at version 1
            if wait_between:
                sync()
            b = b.sigmoid_()                # saves b at version 1 (another counter)
        elif pattern == "add_sigmoid_both":
            a = a.add_(1).sigmoid_()        # version 2
            if wait_between:
                sync()
            b = b.add_(1).sigmoid_()        # version 2
        else:
            a = a.sigmoid_()                # version 1
            if wait_between:
                sync()
            b = b.add_(1).sigmoid_()        # version 2
        return (a * c).sum() + (b * d).sum(), [w]

    _compare(program, spill_dir, **extra)


@pytest.mark.parametrize("timing", list(WRITE_TIMINGS))
@pytest.mark.parametrize("alias", ["data", "set_"])
def test_alias_modified_then_saved_does_not_dedup(spill_dir, alias, timing):
    """Hole 1 (dedup trusts one version counter per storage): a ``.data`` or ``set_`` alias
    has its own version counter; modified in place and saved at the version number the base
    had when it was saved, it must not be served from the base's (older) spill copy."""
    extra, wait_between = WRITE_TIMINGS[timing]

    def program(sync):
        x = torch.randn(256, 512)
        w = torch.randn(512, 256, requires_grad=True)
        w2 = torch.randn(256, 128, requires_grad=True)
        h = x @ w
        h.mul_(2)
        h.add_(1)                           # h at version 2
        s = h[:, :128].sin()                # saves the left half (version 2)
        if wait_between:
            sync()
        if alias == "data":
            e = h.data[:, 128:]             # fresh counter at version 0
            e.mul_(3)
            e.add_(1)                       # version 2
        else:
            e = torch.empty(0)
            e.set_(h.untyped_storage(), 128, (256, 128), (256, 1))   # version 1
            e.mul_(3)                       # version 2
        o = e * w2                          # saves e (for w2's gradient) at version 2
        return s.sum() + o.sum(), [w, w2]

    _compare(program, spill_dir, **extra)


@pytest.mark.parametrize("timing", ["wait_before_each_inplace", "no_wait", "lagging_writes"])
@pytest.mark.parametrize("kind", ["GRUCell", "GRU2"])
def test_gru_training_matches_plain_autograd(spill_dir, kind, timing):
    """Hole 1 (dedup trusts one version counter per storage): the CPU GRU kernels do
    addmm -> unsafe_chunk -> add_ -> sigmoid_ and save the reset and update gates, two pieces
    of one storage at the same version number (2). A few SGD steps must match plain autograd."""
    extra = {"max_write_bandwidth": 50e6} if timing == "lagging_writes" else {}
    torch.manual_seed(0)
    steps, seq, batch, n_in, n_hid = 3, 6, 32, 48, 64
    data = [(torch.randn(seq, batch, n_in), torch.randn(batch, n_hid)) for _ in range(steps)]

    def make():
        torch.manual_seed(1)
        return nn.GRUCell(n_in, n_hid) if kind == "GRUCell" else nn.GRU(n_in, n_hid, num_layers=2)

    def train(off):
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        if off is not None:
            off = ssdoffload.Offloader(model, off)
        out_grads = []
        try:
            for xs, h0 in data:
                scope = off.step() if off is not None else contextlib.nullcontext()
                sync = off.wait if off is not None else (lambda: None)
                mode = WaitBeforeMutation(sync) if timing == "wait_before_each_inplace" \
                    else contextlib.nullcontext()
                with scope:
                    with mode:
                        if kind == "GRUCell":
                            h, outs = h0, []
                            for x in xs:
                                h = model(x, h)
                                outs.append(h)
                            y = torch.stack(outs)
                        else:
                            y, _ = model(xs, h0.unsqueeze(0).expand(2, -1, -1).contiguous())
                        loss = (y * y).mean()
                    loss.backward()
                out_grads.append(_grads(list(model.parameters())))
                opt.step()
                opt.zero_grad(set_to_none=True)
        finally:
            if off is not None:
                off.close()
        return out_grads

    ref = train(None)
    got = train(_cfg(spill_dir, **extra))
    for step, (r, g) in enumerate(zip(ref, got)):
        for i, (a, b) in enumerate(zip(r, g)):
            assert torch.equal(a, b), f"{kind}: gradient {i} differs from plain autograd at step {step}"


# -- 2. in-place changes after saving ---------------------------------------------------------

@pytest.mark.parametrize("wait", [True, False], ids=["written", "unwritten"])
def test_inplace_on_kept_tensor_is_refused(spill_dir, wait):
    """Hole 2a (in-place after save unnoticed): a tensor kept in memory (below
    ``min_offload_bytes``) and modified in place after it was saved: plain autograd raises."""

    def program(sync):
        x = torch.randn(8, 8, requires_grad=True)
        y = x * 2
        z = y.sin()                  # saves y (256 bytes: kept)
        if wait:
            sync()
        y.add_(1)
        return z.sum(), [x]

    _compare(program, spill_dir, min_offload_bytes=1 << 20)


@pytest.mark.parametrize("wait", [True, False], ids=["written", "unwritten"])
def test_parameter_modified_between_forward_and_backward_is_refused(spill_dir, wait):
    """Hole 2b (in-place after save unnoticed): a parameter (kept, never offloaded: Linear
    saves ``weight.t()``) changed in place under ``no_grad`` between forward and backward."""

    def program(sync, model):
        x = torch.randn(64, 64, requires_grad=True)
        out = model(x)
        if wait:
            sync()
        with torch.no_grad():
            model.weight.add_(0.5)
        return out.square().sum(), [x] + list(model.parameters())

    _compare(program, spill_dir, make_model=lambda: nn.Linear(64, 64))


@pytest.mark.parametrize("wait", [True, False], ids=["written", "unwritten"])
@pytest.mark.parametrize("case", ["linear_3d_input", "attention_k_transpose", "mm_transposed_operand"])
def test_inplace_on_base_of_temporary_saved_view_is_refused(spill_dir, case, wait):
    """Hole 2c (in-place after save unnoticed): the op saves a temporary view that dies at the
    end of forward (Linear's reshape of a 3-D input, matmul's reshape of ``k.transpose``,
    ``mm``'s ``b.t()``), then the base is modified in place: the shared version counter bumps,
    plain autograd raises, but there is no live saved tensor left to compare versions on."""

    def program(sync, model):
        if case == "linear_3d_input":
            leaves = [torch.randn(4, 32, 64, requires_grad=True)]
            base = leaves[0] * 1.0
            out = model(base)                          # saves base.reshape(-1, 64)
        elif case == "attention_k_transpose":
            leaves = [torch.randn(2, 4, 32, 16, requires_grad=True) for _ in range(2)]
            q, base = leaves[0] * 1.0, leaves[1] * 1.0
            out = q @ base.transpose(-2, -1)           # saves reshaped views of q and k^T
        else:
            leaves = [torch.randn(64, 64, requires_grad=True) for _ in range(2)]
            a, base = leaves[0] * 1.0, leaves[1] * 1.0
            out = a @ base.t()                         # saves a and base.t()
        if wait:
            sync()
        base.add_(1)
        return out.square().sum(), leaves + list(model.parameters())

    _compare(program, spill_dir, make_model=lambda: nn.Linear(64, 64))


@pytest.mark.parametrize("wait", [True, False], ids=["written", "unwritten"])
@pytest.mark.parametrize("name", ["kept", "dropped"])
def test_inplace_through_detach_alias_is_refused(spill_dir, name, wait):
    """Hole 2d (in-place after save unnoticed): ``y.detach()`` shares y's version counter, so
    an in-place op through it after y was saved makes plain autograd raise, whether or not the
    program still holds a reference to ``y`` itself."""

    held = []   # "kept": the program's caller holds y until after backward

    def program(sync):
        x = torch.randn(64, 64, requires_grad=True)
        y = x * 2
        z = y.sin()                  # saves y (offloaded)
        d = y.detach()
        if name == "kept":
            held.append(y)
        del y
        if wait:
            sync()
        d.add_(1)
        return z.sum(), [x]

    _compare(program, spill_dir)


# -- 3. a storage that shrinks before its write -------------------------------------------------

@pytest.mark.parametrize("when", ["shrunk_then_wait", "shrunk_under_lagging_write",
                                  "refilled_before_lagging_write", "written_before_shrink"])
def test_storage_resized_to_zero_and_refilled(spill_dir, when):
    """Hole 3 (a storage that shrinks before its write): FSDP2-style
    ``untyped_storage().resize_(0)`` right after the op that saved a tensor, then ``resize_``
    back and refilled with the same bytes before backward. Plain autograd sees the refilled
    values; the offloaded run must give the same gradient or raise OffloadError, never
    another gradient."""
    lagging = when in ("shrunk_under_lagging_write", "refilled_before_lagging_write")

    def program(sync):
        x = torch.randn(256, 256, requires_grad=True)
        pre = (x * 1.5).sin()        # saves a 256 KiB tensor first: books the write cap
        t = x * 2.0                  # not a leaf
        u = t.cos()                  # saves t
        storage = t.untyped_storage()
        backup = storage.clone()
        nbytes = storage.nbytes()
        if when == "written_before_shrink":
            sync()
        storage.resize_(0)
        if when in ("shrunk_then_wait", "shrunk_under_lagging_write"):
            sync()                   # the (lagging) write runs while the storage is empty;
            #                          without the cap it may also have run before the shrink
        storage.resize_(nbytes)
        storage.copy_(backup)
        return pre.sum() + u.sum(), [x]

    _compare(program, spill_dir, allow_offload_error=True,
             **({"max_write_bandwidth": 50e6} if lagging else {}))


# -- 4. parameters recognised at pack time -------------------------------------------------------

def _pattern(shape, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3.14159 + 0.577


def _spill_bytes(off) -> bytes:
    content = b""
    for path in off.spill_files:
        with open(path, "rb") as f:
            content += f.read()
    return content


@pytest.mark.parametrize("case", ["new_param_not_in_model", "frozen_param_no_model",
                                  "frozen_param_created_after_offloader",
                                  "autocast_copy_new_param"])
def test_parameter_never_written_to_spill_file(spill_dir, case):
    """Hole 4 (parameters recognised at pack time): a leaf ``nn.Parameter`` the offloader was
    not told about (created after it, not in the model, or frozen with ``requires_grad=False``)
    is saved through a temporary ``.t()`` view or a bf16 autocast copy; neither may be written
    to the spill file (the parameter stays alive anyway: writing it only costs I/O).

    Not here on purpose: a bf16 autocast copy of a *frozen* parameter. Autocast caches only
    casts of leaves that require grad, so each use makes a fresh copy with no ``grad_fn`` that
    nothing but the graph holds: offloading it frees memory, and it is offloaded."""
    frozen = "frozen" in case
    amp = case.startswith("autocast")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.Tanh())
    x = torch.randn(64, 128)
    with ssdoffload.Offloader(None if case == "frozen_param_no_model" else model, _cfg(spill_dir)) as off:
        # 128 x 128 fp32 = 64 KiB of a distinctive pattern, made after the offloader.
        param = nn.Parameter(_pattern((128, 128), 7), requires_grad=not frozen)
        raw = param.detach().numpy().tobytes()
        needles = [raw[4096:8192], raw[-4096:]]
        if amp:
            raw16 = param.detach().to(torch.bfloat16).view(torch.int16).numpy().tobytes()
            needles += [raw16[2048:4096], raw16[-2048:]]

        def forward():
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
            with ctx:
                h = model(x)                 # requires grad (model parameters)
                out = F.linear(h, param)     # saves param.t() (or its bf16 copy's .t())
            return out.float().square().mean()

        torch.manual_seed(0)
        ref_loss = forward()
        ref_loss.backward()
        ref = _grads(list(model.parameters()) + ([] if frozen else [param]))
        model.zero_grad(set_to_none=True)
        param.grad = None
        with off.step():
            loss = forward()
            off.wait()
            content = _spill_bytes(off)
            written = off.current_step_stats().bytes_written
            loss.backward()
        got = _grads(list(model.parameters()) + ([] if frozen else [param]))
    assert written > 0 and content.count(b"\0") < len(content), "no activation was written at all"
    for needle in needles:
        assert needle not in content, f"{case}: the parameter (or its autocast copy) was written to the spill file"
    _assert_same(ref, got)


class _Wrapper(torch.Tensor):
    """A minimal wrapper tensor subclass (like DTensor: no storage of its own)."""

    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype, device=elem.device,
                                                   requires_grad=elem.requires_grad)

    def __init__(self, elem):
        self.elem = elem

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map
        unwrap = lambda t: t.elem if isinstance(t, _Wrapper) else t   # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        return tree_map(lambda t: _Wrapper(t) if isinstance(t, torch.Tensor) else t, out)


def test_parameter_storages_tolerates_wrapper_subclass_parameters(spill_dir):
    """Hole 4 (parameters recognised at pack time): ``policy.parameter_storages`` (run at
    every step) must not crash on a module whose parameters are wrapper tensor subclasses
    (FSDP2's DTensor shards); the plain parameters next to them are still recognised."""
    from ssdoffload.policy import parameter_storages
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    model[1].weight = nn.Parameter(_Wrapper(torch.randn(64, 64)))
    keys = parameter_storages([model])
    assert storage_key(model[0].weight) in keys
    x = torch.randn(8, 64)
    with ssdoffload.Offloader(model, _cfg(spill_dir)) as off:
        with off.step():
            model[0](x).sum().backward()
    assert model[0].weight.grad is not None


def test_parameter_storages_tolerates_dtensor_parameters(spill_dir):
    """Hole 4 (parameters recognised at pack time): a real DTensor parameter (1-rank gloo group
    over an in-memory store) in the model must not crash ``parameter_storages`` / ``step()``."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed with gloo and no process group already up")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from ssdoffload.policy import parameter_storages
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
        model[1].weight = nn.Parameter(distribute_tensor(model[1].weight.detach(), mesh, [Shard(0)]))
        keys = parameter_storages([model])
        assert storage_key(model[0].weight) in keys
        with ssdoffload.Offloader(model, _cfg(spill_dir)) as off:
            with off.step():
                model[0](torch.randn(8, 64)).sum().backward()
        assert model[0].weight.grad is not None
    finally:
        dist.destroy_process_group()


# -- 5. sparse saved tensors ------------------------------------------------------------------

def test_saved_sparse_tensor_does_not_break_pack(spill_dir):
    """Hole 5 (sparse saved tensor): ``torch.sparse.mm(S, W)`` saves the sparse COO ``S``
    for W's gradient; pack must keep it (not crash) and the gradients equal plain autograd."""

    def program(sync):
        s = torch.randn(128, 128).relu().to_sparse()
        w = torch.randn(128, 64, requires_grad=True)
        v = torch.randn(128, 64, requires_grad=True)
        out = torch.sparse.mm(s, w) + (v * 2).sin()   # sparse saved, dense offloaded
        return out.square().sum(), [w, v]

    _, got, stats = _compare(program, spill_dir)
    assert stats.tensors_offloaded > 0


# -- 6. a refused step must not abort the live one ----------------------------------------------

@pytest.mark.parametrize("how", ["nested_step", "nested_micro_batch", "other_thread"])
def test_refused_step_keeps_the_live_step(spill_dir, how):
    """Hole 6 (refused nested step aborts the outer one): opening a scope while one is open is
    refused with OffloadError; the refusal must not discard the open step's spill data, whose
    backward then gives plain autograd's gradients (and the next step works too)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128))
    batches = [torch.randn(64, 128) for _ in range(2)]
    ref = []
    for xb in batches:
        model(xb).square().mean().backward()
        ref.append(_grads(model.parameters()))
        model.zero_grad(set_to_none=True)

    with ssdoffload.Offloader(model, _cfg(spill_dir)) as off:
        got = []
        for i, xb in enumerate(batches):
            with off.step():
                loss = model(xb).square().mean()
                off.wait()                              # the activations are on disk
                if i == 0:
                    if how == "other_thread":
                        errors = []

                        def other():
                            try:
                                with off.step():
                                    pass
                            except BaseException as exc:  # noqa: BLE001 - reported below
                                errors.append(exc)
                        th = threading.Thread(target=other)
                        th.start()
                        th.join()
                        assert len(errors) == 1 and isinstance(errors[0], OffloadError), errors
                    else:
                        with pytest.raises(OffloadError):
                            with (off.step() if how == "nested_step" else off.micro_batch("inner")):
                                pass
                loss.backward()
            got.append(_grads(model.parameters()))
            model.zero_grad(set_to_none=True)
        assert off.stats().bytes_read > 0
    for r, g in zip(ref, got):
        _assert_same(r, g)


# -- 7. close() inside an open step ---------------------------------------------------------------

@pytest.mark.parametrize("depth", [0, 2])
def test_close_inside_step_then_backward_raises_offload_error(spill_dir, depth):
    """Hole 7 (close inside a step): after ``off.close()`` the spilled activations are gone;
    backward must fail with ssdoffload.OffloadError (not the executor's raw RuntimeError
    'cannot schedule new futures after shutdown')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128))
    off = ssdoffload.Offloader(model, _cfg(spill_dir, prefetch_depth=depth))
    try:
        with pytest.raises(OffloadError):
            with off.step():
                loss = model(torch.randn(64, 128)).square().mean()
                off.wait()                  # every activation is on disk
                assert off.current_step_stats().bytes_written > 0
                off.close()
                loss.backward()
    finally:
        off.close()


# -- 8. gradient accumulation inside one step -------------------------------------------------------

def test_gradient_accumulation_frees_every_micro_batch(spill_dir):
    """Hole 8 (gradient accumulation): several forward+backward pairs in ONE ``off.step()``:
    each micro-batch's activations must leave memory once written (not only the first
    micro-batch's), and the accumulated gradients equal plain autograd's."""
    from ssdoffload.models.gpt import GPT, synthetic_batch
    n_micro = 3

    def run(cfg):
        torch.manual_seed(0)
        model = GPT(TINY)
        batches = [synthetic_batch(TINY, 4, torch.device("cpu"), seed=i) for i in range(n_micro)]
        if cfg is None:
            for tokens, targets in batches:
                model(tokens, targets).backward()
            return _grads(model.parameters()), []
        fractions = []
        with ssdoffload.Offloader(model, cfg) as off:
            with off.step():
                for tokens, targets in batches:
                    loss = model(tokens, targets)
                    off.wait()
                    entries = off.cache.all_entries()
                    total = sum(e.nbytes for e in entries)
                    alive = sum(e.nbytes for e in entries if e.token.alive)
                    resident = off.current_step_stats().resident_bytes
                    fractions.append((alive, resident, total))
                    loss.backward()
        return _grads(model.parameters()), fractions

    ref, _ = run(None)
    got, fractions = run(_cfg(spill_dir, prefetch_depth=1, min_offload_bytes=4096))
    for i, (alive, resident, total) in enumerate(fractions):
        assert total > 0
        assert alive <= 0.1 * total, f"micro-batch {i}: {alive} of {total} offloaded bytes still in memory"
        assert resident <= 0.1 * total, f"micro-batch {i}: resident_bytes {resident} of {total}"
    _assert_same(ref, got)


# -- found by the fuzzer -----------------------------------------------------------------------

def test_verify_checksums_the_bytes_written_while_another_piece_changes(spill_dir):
    """Fuzzer find (``verify=True``): piece ``a`` of an ``unsafe_chunk`` is saved and written
    while the compute thread changes piece ``b`` of the same storage in place (legal: ``a``'s
    bytes never change). The checksum was taken of the storage before the write and the write
    copied it later, so backward raised a false ``SpillReadError``. The checksum now describes
    exactly the bytes the drive got."""

    def program(off):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(64, 32768))  # h: 32 MiB, so the write takes a while
        h = torch.ones(128, 64) @ w
        a, b = h.unsafe_chunk(2, dim=0)
        a = a.sigmoid_()                      # saved: the storage is queued for writing
        flips = 0
        if off is not None:
            entries = off.cache.all_entries()
            assert entries, "a was not offloaded"
            while not all(e.write_future is None or e.write_future.done() for e in entries):
                b.neg_()                      # b's bytes change while a's storage is written
                flips += 1
            if flips % 2:
                b.neg_()
        loss = a.sum() + (b * 2).sum()
        loss.backward()
        return w.grad

    reference = program(None)
    with ssdoffload.Offloader(None, _cfg(spill_dir, verify=True)) as off:
        with off.step():
            got = program(off)
        assert off.stats().bytes_written > 0
    assert torch.equal(reference, got)


class _Returns(nn.Module):
    """A layer whose forward is ``fn(x)``; in a ModuleList, so the layer tracker hooks it."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _OneLayer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.layers = nn.ModuleList([_Returns(fn)])

    def forward(self, x):
        return self.layers[0](x)


def _split_piece_of_changed_base(t0):
    t1, _, _, _ = t0.split(2, dim=0)
    with torch.no_grad():
        t0.sigmoid_()
    return t1


def test_layer_returning_a_split_piece_of_a_changed_base(spill_dir):
    """Fuzzer find: a layer returned a ``split`` piece whose base it then changed in place
    under no_grad. Plain autograd is fine (the piece is never used); the layer tracker's
    gradient hook touched the piece's grad_fn and raised "Output 0 of SplitBackward0 is a view
    and its base ... has been modified inplace"."""

    def program(off, model):
        torch.manual_seed(0)
        t0 = torch.randn(8, requires_grad=True) * 1
        scope = off.step() if off is not None else contextlib.nullcontext()
        with scope:
            model(t0)
            loss = (t0 * t0).sum()
            loss.backward()
        return loss.detach()

    reference = program(None, _OneLayer(_split_piece_of_changed_base))
    model = _OneLayer(_split_piece_of_changed_base)
    with ssdoffload.Offloader(model, _cfg(spill_dir)) as off:
        assert off.layers == [model.layers[0]]
        got = program(off, model)
    assert torch.equal(reference, got)


_VIEW_OF_CHANGED_BASE = r"""
import os, sys
sys.path.insert(0, {tests!r})
sys.path.insert(0, os.path.dirname({tests!r}))  # this checkout's package, whatever is installed
import torch, ssdoffload
from torch import nn
from helpers import offload_config
from test_regressions import _OneLayer

def view_of_changed_base(x):
    h = x * 1
    v = h[1:3]
    with torch.no_grad():
        h.add_(1)
    return v

x = torch.randn(8, requires_grad=True)
model = _OneLayer(view_of_changed_base)
cfg = offload_config({path!r}, min_offload_bytes=0, policy="all")
with ssdoffload.Offloader(model, cfg) as off:
    with off.step():
        model(x)
        (x * 2).sum().backward()
print("survived", x.grad.sum().item())
"""


def test_layer_returning_a_view_of_a_changed_base_does_not_crash(spill_dir):
    """Fuzzer find: ``register_hook`` on a view whose base was changed in place under no_grad
    kills the process (SIGSEGV, torch 2.13); the layer tracker called it on every layer
    output. It now hooks only outputs that are not views. Run in a child process: a crash
    must fail this test, not end the test run."""
    import subprocess
    import sys

    os.makedirs(spill_dir, exist_ok=True)
    script = _VIEW_OF_CHANGED_BASE.format(tests=os.path.dirname(os.path.abspath(__file__)),
                                          path=os.path.join(spill_dir, "drive0"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "survived 16.0" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr)
