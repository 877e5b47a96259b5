"""Real 2-rank training over gloo on the CPU with FSDP2 (``fully_shard``) and DDP, launched
with ``python -m torch.distributed.run`` on 127.0.0.1 (tests/workers/fsdp_ddp_worker.py).

Each rank trains the same steps without offloading (twice: the run must be deterministic for
bit-for-bit to mean anything) and with the ``Offloader`` (path ``.../{rank}``), and checks:

* losses and this rank's gradients (FSDP2: the local shards of the DTensor gradients) are
  bit-identical with and without offloading;
* something was written, on every rank, into that rank's own directory;
* exactly the activations were offloaded: per step, ``tensors_offloaded`` and
  ``offloadable_bytes`` equal the number and bytes of the distinct non-parameter storages
  forward saved (at least ``min_offload_bytes``), as a saved-tensor spy in the plain run
  counted them, where "parameter" includes FSDP2's unsharded parameters and views of them;
* no parameter was written: after ``off.wait()``, between forward and backward, the spill
  files hold none of the (full, unsharded) parameters' bytes, while they do hold the input
  batch (positive control of the scan);
* no spill file is left on any rank after ``close()``, nor in ``spill_dir`` at the end.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "workers", "fsdp_ddp_worker.py")
NPROC = 2
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(text: str, n: int = 6000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


def _fault_dumps(text: str, n: int = 8000) -> str:
    """What the fault handler printed for a rank killed by a signal (conftest turns it on),
    whole: the other rank's traceback and the launcher's summary that follow it can push it
    out of the tail."""
    dumps, start = [], 0
    while (at := text.find("Fatal Python error", start)) >= 0:
        # The native stack the worker's crash handler printed just before (io._native).
        native = text.rfind("native stack of the crashing thread", start, at)
        begin = text.rfind("\n", start, native) + 1 if native >= 0 else at
        dumps.append(text[begin:at + n])
        start = at + n
    return "".join(f"--- fault handler ---\n{d}\n" for d in dumps)


def launch(mode: str, spill_dir: str, out_dir: str) -> list:
    """Run the worker on ``NPROC`` ranks; returns each rank's report (asserting that every
    rank finished without error, with the launcher's output in the message otherwise)."""
    os.makedirs(spill_dir, exist_ok=True)
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1",
               MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={NPROC}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           WORKER, "--mode", mode, "--spill", spill_dir, "--out", out_dir]
    # A session of its own: on a timeout the launcher *and* its ranks are killed.
    proc = subprocess.Popen(cmd, env=env, cwd=out_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{mode}: the ranks did not finish within {TIMEOUT_S} s:\n{_tail(output)}")
    reports, problems = [], []
    for rank in range(NPROC):
        path = os.path.join(out_dir, f"{mode}-rank{rank}.json")
        if not os.path.exists(path):
            problems.append(f"rank {rank} wrote no report")
            continue
        with open(path) as fh:
            report = json.load(fh)
        reports.append(report)
        if "error" in report:
            problems.append(f"rank {rank} failed in phase {report['phase']!r}:\n{report['error']}")
        elif report.get("phase") != "done":
            problems.append(f"rank {rank} stopped in phase {report.get('phase')!r} (killed or crashed)")
    assert not problems and proc.returncode == 0, (
        f"{mode}: launcher exit {proc.returncode}\n" + "\n".join(problems)
        + f"\n{_fault_dumps(output)}--- launcher output ---\n{_tail(output)}")
    return reports


def check(reports: list, spill_dir: str, mode: str) -> None:
    paths = set()
    for report in reports:
        rank = report["rank"]
        who = f"{mode} rank {rank}"
        plain, off = report["plain"], report["offload"]

        assert not report["plain_deterministic"], (
            f"{who}: two runs without offloading differ, so bit-for-bit comparison is "
            f"meaningless: {report['plain_deterministic']}")
        assert not report["offload_vs_plain"], (
            f"{who}: offloading changed the numbers:\n  " + "\n  ".join(report["offload_vs_plain"]))
        assert plain["losses"] == off["losses"]

        total = off["total"]
        assert total["bytes_written"] > 0 and total["tensors_offloaded"] > 0, f"{who}: {total}"
        assert total["write_failures"] == 0, f"{who}: {total}"
        assert len(off["paths"]) == 1 and os.path.basename(off["paths"][0]) == str(rank), off["paths"]
        assert off["paths"][0].startswith(os.path.abspath(spill_dir)), off["paths"]
        paths.update(off["paths"])

        for step, (expected, stats, found) in enumerate(zip(plain["expected"], off["stats"], off["scans"])):
            params = [r for r in expected["saved"] if r["kind"] == "param"]
            got = (stats["tensors_offloaded"], stats["offloadable_bytes"], stats["bytes_written"])
            want = (expected["tensors"], expected["bytes"], expected["bytes"])
            assert got == want, (
                f"{who} step {step}: (tensors_offloaded, offloadable_bytes, bytes_written) = {got}, "
                f"expected {want} (the distinct activation storages >= min_offload_bytes forward "
                f"saved); forward also saved {len(params)} parameter tensors: "
                f"{[(r['shape'], r['storage_bytes']) for r in params]}")
            leaked = [n for n in found["found"] if n != "<input batch>"]
            assert not leaked, f"{who} step {step}: parameters written to the spill files: {leaked}"
            assert "<input batch>" in found["found"], (
                f"{who} step {step}: the input batch is not in the spill files ({found}); the "
                "scan cannot see what was written")
        assert off["leftovers"] == [], f"{who}: spill files left after close(): {off['leftovers']}"
    assert len(paths) == NPROC, f"each rank spills to its own directory: {paths}"
    leftovers = [os.path.join(r, f) for r, _, files in os.walk(spill_dir) for f in files]
    assert not leftovers, f"spill files left behind: {leftovers}"


def check_budget(reports) -> None:
    """Budget mode on each rank: bit-identical to the run without offloading, a plan of its
    own, and each planned step's activation peak, measured from outside the library, within
    ``BUDGET_FRACTION`` of the rank's plain peak (x 1.10, as tests/test_budget_outside.py)."""
    for report in reports:
        who = f"{report['mode']} rank {report['rank']}"
        budget, run = report["memory_budget"], report["budget"]
        assert not report["budget_vs_plain"], (
            f"{who}: budget mode changed the numbers:\n  " + "\n  ".join(report["budget_vs_plain"]))
        assert 0 < budget < max(report["measured"]["peaks"]), (who, budget, report["measured"]["peaks"])
        assert run["plan"] is not None, f"{who}: no plan after {len(run['peaks'])} steps"
        total = run["total"]
        assert total["bytes_written"] > 0 and total["bytes_read"] > 0, f"{who}: {total}"
        # Planned steps within 1.10x. The first step profiles (everything to the SSD) with
        # nothing measured yet; while its forward waits for writes, the layer running still
        # holds tensors whose writes finished — no longer ours to count, more of them the slower
        # the machine (1.04x quiet, 1.14x once under a CPU hog: benchmarks/RESULTS.md).
        assert max(run["peaks"][1:]) <= 1.10 * budget and run["peaks"][0] <= 1.25 * budget, (
            f"{who}: measured peaks {run['peaks']} over memory_budget={budget} "
            f"(plain {report['measured']['peaks']}); plan {run['plan']['describe']}")
        assert total["budget_overruns"] == 0, f"{who}: {total}"
        assert run["leftovers"] == [], f"{who}: spill files left after close(): {run['leftovers']}"


@pytest.mark.slow
def test_fsdp2_fully_shard_two_ranks(spill_dir, tmp_path):
    reports = launch("fsdp2", spill_dir, str(tmp_path / "out"))
    # FSDP2 really sharded: each rank holds half of every (even) dim-0.
    shapes = reports[0]["plain"]["grad_shapes"]
    assert shapes["blocks.0.fc1.weight"] == [128, 64], shapes
    # Forward saved FSDP2's unsharded parameters (and views of them): the case under test.
    saved = reports[0]["plain"]["expected"][0]["saved"]
    assert any(r["kind"] == "param" and not r["is_parameter"] and r["storage_bytes"] >= 4096 for r in saved)
    check(reports, spill_dir, "fsdp2")
    check_budget(reports)


@pytest.mark.slow
def test_ddp_two_ranks(spill_dir, tmp_path):
    reports = launch("ddp", spill_dir, str(tmp_path / "out"))
    assert reports[0]["plain"]["grad_shapes"]["blocks.0.fc1.weight"] == [256, 64]
    check(reports, spill_dir, "ddp")
    check_budget(reports)
