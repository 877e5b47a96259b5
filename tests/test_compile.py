"""torch.compile (issue 12, item 3): whole-model, ``fullgraph=True``, per-block (torchtitan's
``block.compile(fullgraph=True)``), and a model compiled and run before the Offloader existed.
Each must train with tensors offloaded every step, no graph break caused by us, and gradients
bit-identical to the same compiled training without offloading."""
import copy
import logging

import pytest
import torch
import torch._dynamo

import ssdoffload
from ssdoffload.models.gpt import GPT, GPTConfig, synthetic_batch

CFG = GPTConfig(vocab=128, seq=64, hidden=64, heads=4, layers=4, dropout=0.0)


def _compiled(model, mode, backend):
    if mode == "per-block":
        for block in model.blocks:
            block.compile(fullgraph=True, backend=backend)
        return model
    return torch.compile(model, fullgraph=(mode == "fullgraph"), backend=backend)


def _step_and_compare(off, i, offloaded, reference):
    """One training step of each (model, compiled callable) pair, the first under ``off``;
    gradients compared bitwise, then zeroed."""
    (model, cm), (ref, cr) = offloaded, reference
    t, y = synthetic_batch(CFG, 4, torch.device("cpu"), seed=i)
    with off.step():
        cm(t, y).backward()
    cr(t, y).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), f"step {i}: {name}.grad differs"
    model.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)


def _run(mode, backend, spill_dir, caplog):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = GPT(CFG)
    ref = copy.deepcopy(model)
    cm, cr = _compiled(model, mode, backend), _compiled(ref, mode, backend)
    if mode == "compiled-before":  # compiled and run first; the Offloader comes later
        t, y = synthetic_batch(CFG, 4, torch.device("cpu"), seed=99)
        cm(t, y).backward()
        cr(t, y).backward()
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    caplog.set_level(logging.WARNING, logger="ssdoffload")
    cfg = ssdoffload.OffloadConfig(path=spill_dir, min_offload_bytes=1024, policy="all")
    with ssdoffload.Offloader(model, cfg) as off:
        for i in range(3):
            _step_and_compare(off, i, (model, cm), (ref, cr))
            assert off.last_step_stats().tensors_offloaded > 0, f"step {i} offloaded nothing"
        if mode == "per-block":  # each compiled block is followed as a layer (one group each)
            assert off.position.group_bytes is None and off.position.layer_seen
        else:  # layer hooks are traced into the model's graph: saved tensors grouped by bytes
            assert off.position.group_bytes is not None
    assert any("did not run" in r.message for r in caplog.records) == (mode != "per-block")
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}


@pytest.mark.parametrize("mode", ["default", "fullgraph", "per-block", "compiled-before"])
def test_compiled_training_offloads_exactly(mode, spill_dir, caplog):
    _run(mode, "aot_eager", spill_dir, caplog)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fullgraph", "per-block"])
def test_inductor(mode, spill_dir, caplog):
    # One thread: inductor's multi-threaded CPU reductions differ between two compilations of
    # the same graph (1.9e-9, with or without offloading); the comparison must be exact.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(mode, "inductor", spill_dir, caplog)
    finally:
        torch.set_num_threads(threads)


def test_a_compiled_block_is_not_recomputed_and_says_why(spill_dir, caplog):
    """A plan that recomputes a block compiled in place (pinned: budget mode never chooses it,
    the block reports no recomputable input): our checkpoint would be traced into its graph.
    Refused with the reason, once; the block runs as compiled, gradients bit-identical, and
    no recomputation is counted against the budget."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(CFG)
    ref = copy.deepcopy(model)
    cm, cr = _compiled(model, "per-block", "aot_eager"), _compiled(ref, "per-block", "aot_eager")
    caplog.set_level(logging.WARNING, logger="ssdoffload")
    cfg = ssdoffload.OffloadConfig(path=spill_dir, min_offload_bytes=1024, memory_budget=1 << 30)
    with ssdoffload.Offloader(model, cfg) as off:
        for i in range(3):
            if i == 1:
                off.set_plan(["device", "recompute"] * CFG.layers + ["device"])
            _step_and_compare(off, i, (model, cm), (ref, cr))
        assert off.stats().budget_overruns == 0
    refusals = [r.message for r in caplog.records if "not recomputing" in r.message]
    assert len(refusals) == CFG.layers and all("torch.compile'd" in m for m in refusals), refusals
