"""Megatron-core integration: offload inside Megatron's own schedules.

The end-to-end tests launch real processes (``python -m torch.distributed.run``, gloo, CPU)
that train a tiny megatron-core GPT through ``forward_backward_no_pipelining`` (one stage) and
the 1F1B ``forward_backward_pipelining_without_interleaving`` (two stages), without and with
ssdoffload, and compare losses and gradients bit for bit. Megatron's schedules hard-code CUDA
calls: on a CPU host the worker's test fixture (``tests/workers/megatron_common.py``,
``redirect_cuda_to_cpu``) points them at the CPU -- in the tests only.
"""
import json
import os
import socket
import subprocess
import sys
import types
import warnings

import pytest
import torch

pytest.importorskip("megatron.core")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "workers", "megatron_train.py")
sys.path.insert(0, os.path.join(HERE, "workers"))

import megatron_common  # noqa: E402

ssd_megatron = megatron_common.import_integration()

STEPS = 2
LAUNCHES = {
    1: "none:fp32:4,full:fp32:4",
    2: "none:fp32:4,full:fp32:5,selective:bf16:6",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_results: dict = {}


def _launch(pp: int, tmp_path_factory) -> dict:
    if pp in _results:
        return _results[pp]
    work = tmp_path_factory.mktemp(f"megatron_pp{pp}")
    out, spill = work / "out", work / "spill"
    out.mkdir()
    spill.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={pp}",
           f"--master_port={_free_port()}", "--master_addr=127.0.0.1", WORKER, "--pp", str(pp),
           "--scenarios", LAUNCHES[pp], "--steps", str(STEPS), "--spill", str(spill), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stdout[-6000:]}"
    ranks = {}
    for r in range(pp):
        with open(out / f"rank{r}.json") as f:
            ranks[r] = json.load(f)
    leftovers = [os.path.join(d, f) for d, _, files in os.walk(spill) for f in files]
    assert not leftovers, f"spill files left behind: {leftovers}"
    _results[pp] = ranks
    return ranks


CASES = [(pp, s) for pp, scenarios in LAUNCHES.items() for s in scenarios.split(",")]


@pytest.mark.slow
@pytest.mark.parametrize("pp,scenario", CASES, ids=[f"pp{pp}-{s.replace(':', '-')}" for pp, s in CASES])
def test_megatron_schedule_bit_identical(pp, scenario, tmp_path_factory):
    ranks = _launch(pp, tmp_path_factory)
    recompute, _, microbatches = scenario.split(":")
    microbatches = int(microbatches)
    for rank, results in ranks.items():
        res = results[scenario]
        assert res["problems"] == [], f"rank {rank}: {res['problems'][:5]}"
        stats = res["stats"]
        # Every stage wrote activations in every step, and read them back.
        assert stats["bytes_written"] > 0, f"rank {rank} wrote nothing"
        assert stats["bytes_read"] > 0 or stats["prefetch_hits"] > 0
        assert all(step["bytes_written"] > 0 for step in res["steps"]), res["steps"]
        assert res["spill_files_during"], "no spill file was open during training"
        assert res["spill_files_left"] == []
        if recompute == "none":
            assert stats["prefetch_hits"] > 0
            assert stats["tensors_offloaded"] >= microbatches * STEPS
    last = ranks[pp - 1][scenario]
    assert last["n_losses"] == STEPS * microbatches  # the last stage reports every micro-batch


def test_full_recompute_writes_less(tmp_path_factory):
    """With full recompute only the checkpointed chunks' inputs are saved (and offloaded)."""
    ranks = _launch(1, tmp_path_factory)
    full = ranks[0]["full:fp32:4"]["stats"]["bytes_written"]
    keep = ranks[0]["none:fp32:4"]["stats"]["bytes_written"]
    assert 0 < full < keep / 3


# -- the schedules' order, without processes ---------------------------------------------------
@pytest.mark.parametrize("pp", [1, 2, 4])
@pytest.mark.parametrize("m", [1, 3, 4, 8])
def test_one_f_one_b_order(pp, m):
    for rank in range(pp):
        order = ssd_megatron.schedule_order("1f1b", m, pp, rank)
        assert sorted(order) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
        warmup = min(pp - rank - 1, m)
        assert order[:warmup] == [("F", i) for i in range(warmup)]
        assert [i for op, i in order if op == "B"] == list(range(m))  # backwards in forward order
        for i in range(m):
            assert order.index(("F", i)) < order.index(("B", i))
        # 1F1B keeps at most pp - rank micro-batches in flight on rank `rank`.
        assert ssd_megatron.in_flight(order) == min(pp - rank, m)


def test_no_pipelining_order():
    assert ssd_megatron.schedule_order("no_pipelining", 3) == [
        ("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]
    assert ssd_megatron.in_flight(ssd_megatron.schedule_order("no_pipelining", 5)) == 1


def test_step_state_next_op():
    state = ssd_megatron._StepState(0, ssd_megatron.schedule_order("1f1b", 4, 4, 1))
    # rank 1 of 4: F0 F1 | F2 B0 F3 B1 | B2 B3
    assert state.after("F", 0) == ("F", 1)
    assert state.after("F", 2) == ("B", 0)
    assert state.after("B", 0) == ("F", 3)
    assert state.after("B", 2) == ("B", 3)
    assert state.after("B", 3) is None


# -- clear errors --------------------------------------------------------------------------
def _model(**config):
    from megatron.core.transformer.transformer_config import TransformerConfig

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                                     use_cpu_initialization=True, **config)
    return model


def test_interleaved_schedule_is_refused(tmp_path):
    from megatron.core.pipeline_parallel import schedules

    with pytest.raises(ssd_megatron.UnsupportedScheduleError, match="interleaved"):
        ssd_megatron.wrap(schedules.forward_backward_pipelining_with_interleaving, _model(),
                          path=str(tmp_path / "s"))
    with pytest.raises(ssd_megatron.UnsupportedScheduleError, match="model chunk"):
        ssd_megatron.wrap(schedules.forward_backward_no_pipelining, [_model(), _model()],
                          path=str(tmp_path / "s"))


def test_unknown_schedule_is_refused(tmp_path):
    with pytest.raises(ssd_megatron.UnsupportedScheduleError, match="only megatron"):
        ssd_megatron.wrap(lambda **kw: None, _model(), path=str(tmp_path / "s"))


@pytest.mark.parametrize("setting,match", [
    (dict(fine_grained_activation_offloading=True, offload_modules=["core_attn"]),
     "fine_grained_activation_offloading"),
    (dict(cpu_offloading=True, cpu_offloading_num_layers=1), "cpu_offloading"),
])
def test_megatron_offloading_on_is_refused(tmp_path, setting, match):
    from megatron.core.pipeline_parallel import schedules

    with pytest.raises(ssd_megatron.UnsupportedScheduleError, match=match):
        ssd_megatron.wrap(schedules.forward_backward_no_pipelining, _model(**setting),
                          path=str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()  # refused before any spill file was made


def test_megatron_offloading_switched_on_later_is_refused(tmp_path):
    """The config is checked again on every call: switching Megatron's offloading on later fails."""
    from megatron.core.pipeline_parallel import schedules

    model = _model()
    func = ssd_megatron.wrap(schedules.forward_backward_no_pipelining, model, path=str(tmp_path / "s"))
    try:
        model.config.fine_grained_activation_offloading = True
        with pytest.raises(ssd_megatron.UnsupportedScheduleError, match="fine_grained"):
            func(forward_step_func=None, data_iterator=None, model=model, num_microbatches=1,
                 seq_length=1, micro_batch_size=1)
        with pytest.raises(ValueError, match="not the model"):
            func(forward_step_func=None, data_iterator=None, model=_model(), num_microbatches=1,
                 seq_length=1, micro_batch_size=1)
    finally:
        func.close()
    assert func.offloader.spill_files == []


def test_cuda_graphs_are_refused(tmp_path):
    from megatron.core.pipeline_parallel import schedules

    model = _model()
    model.config = types.SimpleNamespace(cuda_graph_impl="local")
    with pytest.raises(ssd_megatron.UnsupportedScheduleError, match="CUDA graph"):
        ssd_megatron.wrap(schedules.forward_backward_no_pipelining, model, path=str(tmp_path / "s"))
