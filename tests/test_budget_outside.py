"""Budget mode measured from outside the library (``tests/memory_meter.py``: weak references to
every storage autograd saves, what checkpoint recomputations save, numpy reload buffers from
allocation to release), on models and checkpointing we did not write.

The promise: each step's measured activation peak is within ``memory_budget`` x 1.10, or no
plan can meet it and the run says so (a warning with the figures) and counts the moments over
it (``OffloadStats.budget_overruns``) — never silent. Gradients stay bit-identical throughout.
"""
from __future__ import annotations

import logging
import os
import sys

import pytest
import torch

import ssdoffload
from ssdoffload.budget import DEVICE, RECOMPUTE, RECOMPUTE_SSD

sys.path.insert(0, os.path.dirname(__file__))
from helpers import assert_bit_identical, offload_config  # noqa: E402
from memory_meter import ActivationMeter  # noqa: E402
from test_budget import _BNNet  # noqa: E402

TOLERANCE = 1.10


def run(make_model, batches, loss_fn, config=None, choices=None, per_op=True, step_stats=None, allocator=None):
    """Train one fresh model on ``batches``: per step the measured peak, the losses and
    gradients, and the offloader's final stats (None without one). ``per_op=False`` for
    compiled models (see ``ActivationMeter.measuring``); ``step_stats``, a list, gets each
    step's ``last_step_stats()``; ``allocator``, a list, each step's CUDA allocator peak above
    what was allocated before it."""
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    off = ssdoffload.Offloader(model, config) if config is not None else None
    peaks, losses, grads = [], [], []
    try:
        for step, batch in enumerate(batches):
            if off is not None and choices is not None and step == 1:
                off.set_plan(choices)
            if allocator is not None:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            torch.manual_seed(100 + step)
            meter = ActivationMeter(model)
            with meter.measuring(per_op=per_op):
                with (off.step() if off is not None else torch.enable_grad()):
                    with meter.saving():
                        loss = loss_fn(model, batch)
                        loss.backward()
            peaks.append(meter.peak)
            if allocator is not None:
                torch.cuda.synchronize()
                allocator.append(torch.cuda.max_memory_allocated() - base)
            if off is not None and step_stats is not None:
                step_stats.append(off.last_step_stats())
            losses.append(loss.detach().clone())
            grads.append([p.grad.detach().clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad(set_to_none=True)
        stats = off.stats() if off is not None else None
    finally:
        if off is not None:
            off.close()
    return peaks, (losses, grads), stats


# -- Hugging Face Llama with the user's own gradient checkpointing ----------------------------
def _llama(reentrant: bool):
    transformers = pytest.importorskip("transformers")

    def make():
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=8,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                       attn_implementation="eager", use_cache=False)
        model = transformers.LlamaForCausalLM(cfg).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        return model
    return make


def _llama_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


LLAMA_BATCHES = [torch.randint(0, 128, (2, 128), generator=torch.Generator().manual_seed(s)) for s in range(4)]


@pytest.mark.slow
@pytest.mark.parametrize("reentrant", [False, True])
def test_users_own_checkpointing_is_planned_with_and_the_budget_is_met(tmp_path, reentrant, caplog):
    """HF ``gradient_checkpointing_enable``: our hooks see only each layer's input (2·h per
    token); backward's recomputation holds the layer's activations (~17x more), which the
    library now measures and plans with. A budget between one layer's recomputation and the
    plain peak is met (measured); on d069554 the peak was 2x a budget of half of it, silently."""
    make = _llama(reentrant)
    plain, reference, _ = run(make, LLAMA_BATCHES, _llama_loss)
    budget = int(0.92 * plain[-1])
    with caplog.at_level(logging.WARNING, logger="ssdoffload"):
        peaks, got, stats = run(make, LLAMA_BATCHES, _llama_loss,
                                offload_config(str(tmp_path / "a"), memory_budget=budget, min_offload_bytes=4096))
    assert_bit_identical(reference, got)
    assert stats.bytes_written > 0 and stats.bytes_read > 0  # the inputs were offloaded to make room
    # The first step profiles (everything to the SSD) and meets the layers' recomputations
    # before it has measured them: how far its read-ahead got by then depends on the machine's
    # speed. Every planned step is within the budget.
    assert max(peaks[1:]) <= TOLERANCE * budget, (peaks, budget, plain)
    assert "no plan meets" not in caplog.text


@pytest.mark.parametrize("reentrant", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_checkpointed_step_frees_its_saved_tensors_without_a_collection(tmp_path, reentrant):
    """What a step with the user's checkpointing saved is freed when the step ends, with the
    cyclic collector off — as without ssdoffload. The pass-through hooks that watch the user's
    checkpointing once kept themselves alive in a cycle, and with them the checkpoint's frame
    and the layer inputs it saved: each step's inputs outlived it until a collection (11 MiB a
    step on a 12-layer Llama, counted by the library as resident: phantom overruns)."""
    import gc

    make = _llama(reentrant)

    def alive_after_steps(config):
        torch.manual_seed(0)
        model = make()
        off = ssdoffload.Offloader(model, config) if config is not None else None
        left = []
        gc.collect()
        gc.disable()
        try:
            for ids in LLAMA_BATCHES[:3]:
                meter = ActivationMeter(model)
                with meter.measuring(), (off.step() if off is not None else torch.enable_grad()), meter.saving():
                    _llama_loss(model, ids).backward()
                model.zero_grad(set_to_none=True)
                left.append(meter.saved_now())  # storages this step saved that are still alive
            return left, (off.stats().resident_bytes if off is not None else None)
        finally:
            gc.enable()
            if off is not None:
                off.close()

    plain, _ = alive_after_steps(None)
    got, resident = alive_after_steps(offload_config(str(tmp_path / "a"), memory_budget=1 << 30,
                                                     min_offload_bytes=4096))
    assert got == plain, (got, plain)
    # What the library still counts is the last step's, released at the next step's start.
    assert resident <= max(plain) + (1 << 20), resident


@pytest.mark.slow
def test_a_budget_below_one_recomputed_layer_is_refused_clearly(tmp_path, caplog):
    """Half the plain peak is less than one checkpointed layer's recomputation: no plan can
    meet it. The first plan says so with the figures, and every moment over it is counted."""
    make = _llama(False)
    plain, reference, _ = run(make, LLAMA_BATCHES[:3], _llama_loss)
    budget = int(0.5 * plain[-1])
    with caplog.at_level(logging.WARNING, logger="ssdoffload"):
        peaks, got, stats = run(make, LLAMA_BATCHES[:3], _llama_loss,
                                offload_config(str(tmp_path / "a"), memory_budget=budget, min_offload_bytes=4096))
    assert_bit_identical(reference, got)
    assert "no plan meets the budget (memory_budget=" in caplog.text and "recomputed by your own gradient checkpointing" in caplog.text
    assert "over memory_budget" in caplog.text
    assert stats.budget_overruns > 0 and stats.peak_resident_bytes > budget


# -- every block torch.compile'd, torchtitan's way ----------------------------------------------
def _compiled_llama(make_plain, how):
    def make():
        model = make_plain()
        for i, layer in enumerate(model.model.layers):
            if how == "in-place":
                layer.compile(backend="aot_eager")  # what Module.compile does: _compiled_call_impl
            else:
                model.model.layers[i] = torch.compile(layer, backend="aot_eager")  # an OptimizedModule
        return model
    return make


def _plain_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                   attn_implementation="eager", use_cache=False)
    return transformers.LlamaForCausalLM(cfg).train()


@pytest.mark.parametrize("how", ["in-place", pytest.param("wrapped", marks=pytest.mark.slow)])
def test_compiled_blocks_are_layers_and_the_budget_is_met(tmp_path, how, caplog):
    """Each block compiled (AOTAutograd: its saved tensors are saved when its compiled forward
    ends, and its backward, one node, reads them all at once). ``block.compile()`` traces the
    block's hooks into its graph: on d069554 the layers went unseen, saved tensors were grouped
    by bytes across block boundaries and a budget of half the plain peak was 1.26x exceeded
    (counted, not met) though one block needs far less. Now each compiled block is one group,
    the budget is met from the first step, gradients are bit-identical to the compiled run
    without offloading."""
    make = _compiled_llama(_plain_llama, how)
    torch._dynamo.reset()
    # Compile before measuring (the meter's per-save sampling slows Dynamo's tracing); later
    # fresh models reuse the compiled code.
    warm = make()
    _llama_loss(warm, LLAMA_BATCHES[0]).backward()
    plain, reference, _ = run(make, LLAMA_BATCHES[:3], _llama_loss, per_op=False)
    budget = int(0.5 * plain[-1])
    per_step = []
    with caplog.at_level(logging.WARNING, logger="ssdoffload"):
        peaks, got, stats = run(make, LLAMA_BATCHES[:3], _llama_loss,
                                offload_config(str(tmp_path / "a"), memory_budget=budget, min_offload_bytes=4096),
                                per_op=False, step_stats=per_step)
    assert_bit_identical(reference, got)
    assert stats.bytes_written > 0 and stats.bytes_read > 0
    # Planned steps within the promise; the profiling step holds, besides, forward's own working
    # set while it waits for writes (see test_distributed.check_budget).
    assert max(peaks[1:]) <= TOLERANCE * budget and peaks[0] <= 1.25 * budget, (peaks, budget, plain)
    # The profiling step (everything to the SSD, nothing measured yet) reads each block back
    # whole when its backward needs it, which may touch the budget; planned steps do not.
    assert [s.budget_overruns for s in per_step[1:]] == [0] * (len(per_step) - 1), per_step
    assert "hooks did not run" not in caplog.text


@pytest.mark.slow
def test_a_model_compiled_whole_is_planned_as_one_backward(tmp_path, caplog):
    """``model.compile()``: one graph, whose backward reads every saved tensor at once. A budget
    of half the plain peak cannot be met by any placement: the first plan says so (naming the
    fix: compile each block), and every moment over it is counted. A budget above the whole
    is met, by keeping (no I/O that could not lower the peak)."""
    def make():
        model = _plain_llama()
        model.compile(backend="aot_eager")
        return model
    torch._dynamo.reset()
    _llama_loss(make(), LLAMA_BATCHES[0]).backward()  # compile before measuring (see above)
    plain, reference, _ = run(make, LLAMA_BATCHES[:3], _llama_loss, per_op=False)
    with caplog.at_level(logging.WARNING, logger="ssdoffload"):
        _, got, stats = run(make, LLAMA_BATCHES[:3], _llama_loss,
                            offload_config(str(tmp_path / "a"), memory_budget=int(0.5 * plain[-1]),
                                           min_offload_bytes=4096), per_op=False)
    assert_bit_identical(reference, got)
    assert "the model is compiled as one graph" in caplog.text and "Compile each block instead" in caplog.text
    assert stats.budget_overruns > 0
    budget = int(1.05 * plain[-1])
    peaks, got, stats = run(make, LLAMA_BATCHES[:3], _llama_loss,
                            offload_config(str(tmp_path / "b"), memory_budget=budget, min_offload_bytes=4096),
                            per_op=False)
    assert_bit_identical(reference, got)
    assert max(peaks) <= budget and stats.budget_overruns == 0, (peaks, budget, stats)


# -- a drive slower than compute -------------------------------------------------------------
def test_a_slow_drive_does_not_take_the_budget_with_it(tmp_path):
    """Writes and reads capped at 40 MB/s (a throttled drive): forward waits for writes,
    read-ahead is cut short, and backward drops entries whose reads are still queued. Every
    byte alive counts — on d069554 a freed entry's reload buffer, still being filled, did not,
    and the first steps measured 1.13x a budget of 0.2 of the plain peak (3 runs in 10).

    The bound here is looser (1.25): while forward waits for a write, the layer running holds
    tensors it saved whose writes already finished (its own variables keep them alive), which
    the library does not count — up to ~10% of this budget, measured (benchmarks/RESULTS.md)."""
    from ssdoffload.models.gpt import GPT, GPTConfig, synthetic_batch

    cfg = GPTConfig(vocab=128, seq=64, hidden=64, heads=4, layers=4, dropout=0.1)
    batches = [synthetic_batch(cfg, 4, torch.device("cpu"), seed=s) for s in range(4)]

    def loss_fn(model, batch):
        return model(*batch)
    plain, reference, _ = run(lambda: GPT(cfg), batches, loss_fn)
    budget = int(0.3 * max(plain))  # feasible (0.2 is not: one layer's backward needs 0.23)
    peaks, got, stats = run(lambda: GPT(cfg), batches, loss_fn,
                            offload_config(str(tmp_path / "a"), memory_budget=budget, min_offload_bytes=4096,
                                           max_write_bandwidth=40e6, max_read_bandwidth=40e6))
    assert_bit_identical(reference, got)
    assert stats.bytes_written > 0 and stats.bytes_read > 0
    assert max(peaks) <= 1.25 * budget, (peaks, budget, plain)


# -- on a GPU ------------------------------------------------------------------------------
@pytest.mark.cuda
def test_budget_on_cuda_measured_outside_and_by_the_allocator(tmp_path):
    """The reference GPT on CUDA at half its plain activation peak: the peak of saved storages
    (and device reload buffers from their unpack) measured from outside within 1.10x the
    budget, the allocator's own peak (``torch.cuda.max_memory_allocated``, which also holds
    gradients and temporaries) lower than without offloading, gradients bit-identical.
    Run by ``benchmarks/gpu.sh`` (``pytest -m cuda``)."""
    from ssdoffload.models.gpt import GPT, GPTConfig, synthetic_batch

    device = torch.device("cuda")
    cfg = GPTConfig(vocab=256, seq=256, hidden=256, heads=4, layers=6, dropout=0.1)
    batches = [synthetic_batch(cfg, 8, device, seed=s) for s in range(4)]

    def make():
        return GPT(cfg).to(device)

    def loss_fn(model, batch):
        return model(*batch)
    plain_allocator, allocator = [], []
    plain, reference, _ = run(make, batches, loss_fn, allocator=plain_allocator)
    budget = int(0.5 * max(plain))
    peaks, got, stats = run(make, batches, loss_fn, offload_config(str(tmp_path / "a"), memory_budget=budget,
                                                                   min_offload_bytes=4096), allocator=allocator)
    assert_bit_identical(reference, got)
    assert stats.bytes_written > 0 and stats.bytes_read > 0
    assert max(peaks) <= TOLERANCE * budget, (peaks, budget, plain)
    assert max(allocator[1:]) < max(plain_allocator), (allocator, plain_allocator)


# -- a BatchNorm CNN under a pinned recompute plan ------------------------------------------
def _bn_net():
    return _BNNet(width=256, depth=4)


BN_BATCHES = [torch.randn(256, 256, generator=torch.Generator().manual_seed(s)) for s in range(4)]


def test_a_refused_recomputation_counts_no_overrun_that_did_not_happen(tmp_path):
    """A pinned plan recomputes blocks with a training-mode batch norm: refused (running
    statistics), so they save their activations as usual. On d069554 backward still counted
    each one's recomputation on top (120 moments over the budget, none measured)."""
    choices = [DEVICE, RECOMPUTE, DEVICE, RECOMPUTE_SSD, DEVICE, RECOMPUTE, DEVICE, RECOMPUTE_SSD, DEVICE]
    plain, reference, _ = run(_bn_net, BN_BATCHES, lambda m, x: m(x))
    budget = int(1.02 * max(plain))
    peaks, got, stats = run(_bn_net, BN_BATCHES, lambda m, x: m(x),
                            offload_config(str(tmp_path / "a"), memory_budget=budget, min_offload_bytes=0), choices)
    assert_bit_identical(reference, got)
    assert max(peaks) <= budget, (peaks, budget)
    assert stats.budget_overruns == 0, stats
