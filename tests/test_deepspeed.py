"""DeepSpeed integration: real DeepSpeed processes over gloo on the CPU, launched with
``python -m torch.distributed.run``; each rank trains the same steps with the ``ssd_offload``
block disabled and enabled (tests/workers/ds_worker.py) and reports back in JSON.

Checked: losses of every micro-batch and the final parameters are bit-identical; bytes were
written on every rank (every pipeline stage); no spill file is left; the pipeline prefetches
across micro-batches; DeepSpeed's checkpoint inputs are offloaded; a bad block fails on every
rank before training. Plus in-process checks of the config block, the schedule look-ahead and
the offloadable checkpoint function.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")

from ssdoffload.integrations import deepspeed as ssd_ds  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "workers", "ds_worker.py")
STEPS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path_factory, mode: str, nproc: int, cases: str = "") -> list:
    """Run the worker on ``nproc`` ranks; returns each rank's JSON report."""
    work = tmp_path_factory.mktemp(f"ds-{mode}-{nproc}")
    spill, out = work / "spill", work / "out"
    spill.mkdir()
    out.mkdir()
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=ROOT,
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", WORKER, "--mode", mode, "--cases", cases,
           "--spill", str(spill), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=str(work), capture_output=True, text=True, timeout=900)
    reports = []
    for rank in range(nproc):
        path = out / f"{mode}-rank{rank}.json"
        assert path.exists(), (f"rank {rank} wrote no report (exit {proc.returncode}):\n"
                               f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        report = json.loads(path.read_text())
        assert "error" not in report, f"rank {rank} failed:\n{report['error']}"
        reports.append(report)
    assert proc.returncode == 0, proc.stderr[-8000:]
    leftovers = [os.path.join(r, f) for r, _, files in os.walk(spill) for f in files]
    assert not leftovers, f"spill files left behind: {leftovers}"
    return reports


def check_case(report: dict, case: str) -> dict:
    """The checks every case shares; returns the enabled run's report."""
    rank = report["rank"]
    off, on = report["cases"][case]["disabled"], report["cases"][case]["enabled"]
    assert len(on["losses"]) == len(off["losses"]) >= STEPS
    for i, (a, b) in enumerate(zip(off["losses"], on["losses"])):
        assert a == b, f"rank {rank} case {case}: loss {i} differs: {a!r} (plain) vs {b!r} (offloaded)"
    assert off["digest"] == on["digest"], f"rank {rank} case {case}: parameters differ after training"
    assert not off["attached"], "enabled: false must leave the engine alone"
    assert off["engine_class"] in ("DeepSpeedEngine", "PipelineEngine")
    assert on["attached"] and on["engine_class"].startswith("SSDOffload")
    stats = on["stats"]
    assert stats["bytes_written"] > 0 and stats["tensors_offloaded"] > 0, f"rank {rank} case {case}: {stats}"
    assert stats["steps"] == STEPS and len(on["step_bytes_written"]) == STEPS
    assert stats["write_failures"] == 0
    assert on["leftover_files"] == [] and off["leftover_files"] == []
    return on


# --------------------------------------------------------------------------------------------
# Plain engine
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain1(tmp_path_factory):
    return launch(tmp_path_factory, "plain", 1, "0:fp32:2,2:bf16:1")


@pytest.fixture(scope="module")
def plain2(tmp_path_factory):
    return launch(tmp_path_factory, "plain", 2, "0:fp32:1,2:bf16:2,1:fp32:2")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["0:fp32:2", "2:bf16:1"])
def test_plain_engine_one_process(plain1, case):
    on = check_case(plain1[0], case)
    assert on["paths"][0].endswith(os.path.join("", "rank0")), "default: a rank subdirectory"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["0:fp32:1", "2:bf16:2", "1:fp32:2"])
def test_plain_engine_two_processes(plain2, case):
    paths = set()
    for report in plain2:
        on = check_case(report, case)
        paths.update(on["paths"])
        assert on["paths"][0].endswith(f"rank{report['rank']}")
        assert on["schedule_prefetch_calls"] > 0  # the backward start asked for the last layers
    assert len(paths) == 2, "each rank spills to its own directory"


# --------------------------------------------------------------------------------------------
# Pipeline engine: 2 stages, 4 micro-batches, with and without activation checkpointing
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe2(tmp_path_factory):
    return launch(tmp_path_factory, "pipe", 2, "0,1")


@pytest.mark.slow
def test_pipeline_two_stages(pipe2):
    assert sorted(r["cases"]["0"]["enabled"]["stage"] for r in pipe2) == [0, 1]
    reads = 0
    for report in pipe2:
        on = check_case(report, "0")
        assert on["paths"][0].endswith(os.path.join("", str(report["rank"]))), "{rank} in the path"
        assert on["num_layers"] >= 3  # the stage's forward_funcs are the layers
        # One schedule-directed prefetch per micro-batch and step, issued before its backward.
        assert on["schedule_prefetch_calls"] == 4 * STEPS
        assert on["stats"]["prefetch_hits"] > 0
        reads += on["schedule_prefetch_reads"]
    assert reads > 0, "the prefetch across micro-batches started reads"
    # Losses are the pipeline's (the same on both stages).
    assert pipe2[0]["cases"]["0"]["enabled"]["losses"] == pipe2[1]["cases"]["0"]["enabled"]["losses"]


@pytest.mark.slow
def test_pipeline_activation_checkpointing(pipe2):
    for report in pipe2:
        on = check_case(report, "1")
        plain = report["cases"]["0"]["enabled"]
        # Our checkpoint function ran (DeepSpeed's keeps its inputs out of autograd's sight)
        # and DeepSpeed's came back afterwards.
        assert on["ckpt_func"].startswith("ssdoffload.integrations.deepspeed"), on["ckpt_func"]
        assert on["ckpt_func_after"].startswith("deepspeed."), on["ckpt_func_after"]
        # Two checkpointed blocks per stage: at least their inputs, every micro-batch and step.
        assert on["stats"]["tensors_offloaded"] >= 2 * 4 * STEPS
        assert on["stats"]["bytes_written"] < plain["stats"]["bytes_written"]
        assert on["schedule_prefetch_calls"] == 4 * STEPS
    # Checkpointing does not change the numbers either.
    assert pipe2[0]["cases"]["1"]["enabled"]["losses"] == pipe2[0]["cases"]["0"]["enabled"]["losses"]


# --------------------------------------------------------------------------------------------
# A bad block fails on every rank before training
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad2(tmp_path_factory):
    return launch(tmp_path_factory, "bad", 2)


@pytest.mark.slow
def test_bad_block_fails_on_every_rank(bad2):
    for report in bad2:
        cases, rank = report["cases"], report["rank"]
        for name, res in cases.items():
            assert res["raised"] is not None, f"rank {rank}: {name} trained"
            assert res["is_value_error"], f"rank {rank}: {name} raised {res['raised']}"
        assert "prefetch_dept" in cases["unknown_key"]["message"]
        assert "valid keys are" in cases["unknown_key"]["message"]
        assert "prefetch_depth" in cases["bad_value"]["message"]
        assert cases["missing_parent"]["raised"] == "SpillPathError"
        assert "does not exist" in cases["missing_parent"]["message"]
        # Only rank 1's directory is bad; rank 0 learns it too instead of hanging.
        assert cases["one_rank_bad"]["raised"] == "SpillPathError"
        assert "r1" in cases["one_rank_bad"]["message"]
        assert "ZeRO stage 3" in cases["zero3"]["message"]
    assert "rank(s) [1]" in bad2[0]["cases"]["one_rank_bad"]["message"]


# --------------------------------------------------------------------------------------------
# In-process checks (no launcher)
# --------------------------------------------------------------------------------------------
def test_offload_config_block(tmp_path):
    assert ssd_ds.offload_config({"train_batch_size": 8}) is None
    cfg = ssd_ds.offload_config({"ssd_offload": {"path": "/nvme/act"}})
    assert cfg.enabled and cfg.paths == (os.path.join("/nvme/act", "rank{rank}"),)
    assert cfg.resolved_paths(3) == [os.path.join("/nvme/act", "rank3")]
    cfg = ssd_ds.offload_config({"ssd_offload": {"path": ["/a/{rank}", "/b"], "prefetch_depth": 1}})
    assert cfg.paths == ("/a/{rank}", os.path.join("/b", "rank{rank}")) and cfg.prefetch_depth == 1
    disabled = ssd_ds.offload_config({"ssd_offload": {"enabled": False, "path": "/x"}})
    assert disabled is not None and not disabled.enabled
    with pytest.raises(ValueError, match="valid keys are"):
        ssd_ds.offload_config({"ssd_offload": {"enabled": False, "path": "/x", "pth": 1}})
    with pytest.raises(ValueError, match="path"):
        ssd_ds.offload_config({"ssd_offload": {"enabled": True}})
    with pytest.raises(ValueError, match="JSON object"):
        ssd_ds.offload_config({"ssd_offload": "/nvme"})
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_batch_size": 8, "ssd_offload": {"path": "/n/{rank}"}}))
    assert ssd_ds.offload_config(str(f)).paths == ("/n/{rank}",)


def test_example_config_is_valid():
    path = os.path.join(ROOT, "integrations", "examples", "deepspeed", "ds_config.json")
    cfg = ssd_ds.offload_config(path)
    assert cfg is not None and cfg.enabled


@pytest.mark.parametrize("stage", [0, 1])
def test_lookahead_prefetches_before_each_backward(stage):
    from deepspeed.runtime.pipe import schedule as sched

    plain = sched.TrainSchedule(micro_batches=4, stages=2, stage_id=stage)
    events = []
    wrapped = ssd_ds._LookaheadSchedule(sched.TrainSchedule(micro_batches=4, stages=2, stage_id=stage),
                                        lambda b: events.append(("prefetch", b)))
    assert wrapped.num_pipe_buffers() == plain.num_pipe_buffers()
    flat = []
    for step in wrapped:
        assert len(step) == 1
        flat.append(step[0])
        events.append(step[0])
    assert [repr(c) for c in flat] == [repr(c) for s in plain for c in s], "same instructions, same order"
    for i, ev in enumerate(events):
        if isinstance(ev, sched.BackwardPass):
            # The prefetch of this buffer came right after the previous compute instruction,
            # i.e. before the send/receive instructions in between.
            j = max(k for k in range(i) if isinstance(events[k], (sched.ForwardPass, sched.BackwardPass)))
            assert events[j + 1] == ("prefetch", ev.buffer_id), events[j:i + 1]


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Dropout(0.1)) for _ in range(3))

    def forward(self, x, ckpt):
        for b in self.blocks:
            x = ckpt(b, x)
        return x.square().mean()


def _ckpt_run(ckpt, spill_dir=None):
    import ssdoffload

    torch.manual_seed(0)
    net = _Net()
    off = None
    if spill_dir is not None:
        os.makedirs(spill_dir, exist_ok=True)
        off = ssdoffload.Offloader(net, ssdoffload.OffloadConfig(
            path=os.path.join(spill_dir, "a"), min_offload_bytes=1024, initial_file_bytes=1 << 20))
    try:
        x = torch.randn(32, 64, requires_grad=True)
        if off is not None:
            with off.step():
                loss = net(x, ckpt)
                loss.backward()
            stats = off.stats()
        else:
            loss = net(x, ckpt)
            loss.backward()
            stats = None
    finally:
        if off is not None:
            off.close()
    return loss.detach(), [p.grad.clone() for p in net.parameters()] + [x.grad.clone()], stats


def test_checkpoint_inputs_are_offloaded(spill_dir):
    from deepspeed.runtime.activation_checkpointing import checkpointing as ds_ckpt

    ref_loss, ref_grads, _ = _ckpt_run(ds_ckpt.checkpoint)
    ds_loss, ds_grads, ds_stats = _ckpt_run(ds_ckpt.checkpoint, spill_dir)
    loss, grads, stats = _ckpt_run(ssd_ds.checkpoint, spill_dir)
    for other_loss, other_grads in ((ds_loss, ds_grads), (loss, grads)):
        assert torch.equal(ref_loss, other_loss)
        for a, b in zip(ref_grads, other_grads):
            assert torch.equal(a, b)
    # DeepSpeed's function hides its inputs from autograd: only the loss's input is offloaded.
    # Ours hands them to save_for_backward: the block inputs are offloaded as well, except the
    # first, ``x``: a leaf that requires grad is the caller's (never offloaded: writing it frees
    # nothing).
    assert ds_stats.tensors_offloaded <= 1
    assert stats.tensors_offloaded >= ds_stats.tensors_offloaded + 2, (ds_stats, stats)
