"""The benchmark on the tiny preset: every strategy, the JSON schema, the plots, the loss check,
the temporary spill directory, and ``probe``. No timing assertions."""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import pytest
import torch

from ssdoffload.__main__ import main, parse_size
from ssdoffload.bench import analysis, probe
from ssdoffload.bench.memory import SavedBytesMeter
from ssdoffload.models.gpt import GPT, synthetic_batch
from ssdoffload.bench.presets import PRESETS, get_preset, parameter_count
from ssdoffload.bench.report import format_table
from ssdoffload.bench.runner import BenchOptions, run_bench
from ssdoffload.bench.strategies import STRATEGIES, parse_strategies, uses_offloader

STRATEGY_KEYS = {"step_seconds", "forward_seconds", "backward_seconds", "tokens_per_second", "peak_rss_bytes",
                 "losses", "final_loss", "peak_activation_bytes", "peak_activation_method", "ratio_to_keep"}
OFFLOAD_KEYS = {"bytes_written_per_step", "bytes_read_per_step", "write_bandwidth", "read_bandwidth",
                "stall_seconds_per_step", "prefetch_hit_rate", "peak_resident_bytes", "offloadable_bytes_per_step"}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One CLI run of the tiny preset (module-scoped: the other tests read its output)."""
    out = tmp_path_factory.mktemp("bench-out")
    tmp = tmp_path_factory.mktemp("tmp")
    old = tempfile.tempdir
    tempfile.tempdir = str(tmp)  # the default spill directory is created (and removed) here
    try:
        import io
        from contextlib import redirect_stdout

        buf = io.StringIO()
        with redirect_stdout(buf):
            rc = main(["bench", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--output", str(out),
                       "--no-progress", "--probe-size", "8M"])
    finally:
        tempfile.tempdir = old
    return rc, buf.getvalue(), out, tmp


def test_bench_cli_runs_every_strategy(bench_run):
    rc, text, out, _ = bench_run
    assert rc == 0, text
    for name in STRATEGIES:
        assert name in text
    assert text.strip().splitlines()[-1].startswith(f"results written to {out}")


def test_bench_json_schema(bench_run):
    _, _, out, _ = bench_run
    report = json.loads((out / "bench.json").read_text())
    assert report["schema"] == "ssdoffload-bench/1"
    for key in ("preset", "parameters", "device", "strategies", "loss_check", "probe", "bandwidth_bound",
                "targets", "environment", "offload_config", "timeline", "wall_seconds", "files"):
        assert key in report, key
    assert set(report["strategies"]) == set(STRATEGIES)
    for name, s in report["strategies"].items():
        assert STRATEGY_KEYS <= set(s), (name, STRATEGY_KEYS - set(s))
        assert len(s["losses"]) == 3 and s["step_seconds"]["median"] > 0
        assert uses_offloader(name) == ("offload" in s)
        if "offload" in s:
            assert OFFLOAD_KEYS <= set(s["offload"])
            assert s["offload"]["bytes_written_per_step"] > 0
    assert report["strategies"]["keep"]["ratio_to_keep"]["step_time"] == pytest.approx(1.0)
    # ssd frees activation memory; recompute keeps only block inputs (plus one recomputed block)
    keep_act = report["strategies"]["keep"]["peak_activation_bytes"]
    assert report["strategies"]["ssd"]["peak_activation_bytes"] < keep_act
    assert report["strategies"]["recompute"]["peak_activation_bytes"] < keep_act
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["spill_disks"][0]["fstype"]
    b = report["bandwidth_bound"]
    assert 0 < b["optimum_bytes"] <= b["offloadable_bytes"]
    assert {t["name"] for t in report["targets"]} >= {"final losses identical across strategies"}
    kinds = {t["kind"] for t in report["timeline"]["transfers"]}
    assert "write" in kinds and "read" in kinds


def test_losses_identical_asserted(bench_run):
    _, text, out, _ = bench_run
    report = json.loads((out / "bench.json").read_text())
    assert report["loss_check"]["identical"] is True, report["loss_check"]
    finals = set(report["loss_check"]["final_losses"].values())
    assert len(finals) == 1
    assert "bit-identical" in text


def test_plots_written(bench_run):
    _, _, out, _ = bench_run
    for name in ("memory_vs_step_time.png", "timeline_ssd_step.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_temporary_spill_directory_removed(bench_run):
    _, _, _, tmp = bench_run
    assert [n for n in os.listdir(tmp) if n.startswith("ssdoffload")] == []


def test_loss_mismatch_is_reported():
    base = {"step_seconds": {"median": 1.0, "min": 1.0, "max": 1.0}, "tokens_per_second": 1.0,
            "peak_rss_bytes": 1, "final_loss": 2.0, "peak_activation_bytes": 10}
    summaries = {"keep": dict(base, losses=[3.0, 2.0]), "ssd": dict(base, losses=[3.0, 2.0000001], final_loss=2.0000001)}
    analysis.add_ratios(summaries, cuda=False)
    check = analysis.loss_check(summaries)
    assert not check["identical"]
    assert check["mismatches"][0]["strategy"] == "ssd" and check["mismatches"][0]["step"] == 1
    targets = analysis.targets(summaries, check, None, False, 1e9, "tiny")
    assert targets[0]["met"] is False and "differs from keep" in targets[0]["note"]


def test_bench_subset_and_sweep(tmp_path, spill_dir):
    opts = BenchOptions(preset="tiny", overrides={"steps": 1, "warmup": 0}, strategies=("ssd",),
                        spill_paths=[spill_dir], progress=False, probe_bytes=4 << 20, sweep=True,
                        sweep_max_micro_batch=2, output=str(tmp_path), trace=True)
    report = run_bench(opts)
    trace = json.loads((tmp_path / "trace_ssd_step.json").read_text())
    assert any(str(e.get("name", "")).startswith("aten::") for e in trace["traceEvents"])
    assert list(report["strategies"]) == ["keep", "ssd"]  # keep is always the baseline
    assert report["loss_check"]["identical"]
    sweep = report["sweep"]
    assert set(sweep["best"]) == {"keep", "ssd"}
    assert all(r["micro_batch"] in (1, 2) for rows in sweep["rows"].values() for r in rows)
    assert "micro-batch sweep" in format_table(report)


def test_probe_measures_and_cleans_up(tmp_path):
    target = tmp_path / "probe"
    result = probe.measure(str(target), nbytes=8 << 20, block_bytes=2 << 20, threads=2)
    assert result.write_bytes_per_s > 0 and result.read_bytes_per_s > 0
    # The raw baseline moved the same bytes in the same requests (its own pass, same file).
    assert result.raw_write_bytes_per_s > 0 and result.raw_read_bytes_per_s > 0
    assert result.chunk_bytes == 4 << 20
    assert result.nbytes == 8 << 20
    assert not target.exists()  # the probe created it, so it removed it


def test_probe_cli(tmp_path, capsys):
    assert main(["probe", str(tmp_path / "p"), "--size", "4M", "--preset", "tiny"]) == 0
    text = capsys.readouterr().out
    assert "sequential write" in text and "to hide all I/O it needs" in text
    assert os.listdir(tmp_path) == []


def test_saved_bytes_meter_counts_activations_not_parameters():
    cfg = get_preset("tiny").model
    model = GPT(cfg)
    tokens, targets = synthetic_batch(cfg, 2, torch.device("cpu"), 0)
    meter = SavedBytesMeter([model], layers=model.blocks)
    with meter.hooks():
        loss = model(tokens, targets)
    assert meter.live_bytes == meter.peak_bytes > 0
    assert len(meter.layer_bytes) == cfg.layers
    loss.backward()
    del loss
    assert meter.live_bytes == 0  # all released once the graph is gone
    meter.close()


def test_helpers():
    assert parse_size("4096") == 4096 and parse_size("2M") == 2 << 20 and parse_size("1.5GiB") == 3 << 29
    assert parse_strategies("ssd,recompute") == ("keep", "recompute", "ssd")
    with pytest.raises(ValueError):
        parse_strategies("keep,nvme")
    with pytest.raises(ValueError):
        get_preset("huge")
    for p in PRESETS.values():
        n = parameter_count(p.model)
        assert n > 0
    assert parameter_count(get_preset("tiny").model) == sum(x.numel() for x in GPT(get_preset("tiny").model).parameters())
    assert 0.9e9 < parameter_count(get_preset("gpu-1b").model) < 1.3e9


def test_bare_command_prints_help_and_every_help_is_plain_text(capsys):
    """``python -m ssdoffload`` alone printed nothing helpful and started a benchmark; help
    texts showed raw reST (````...````) and some ``plan`` options had no help line."""
    from ssdoffload.__main__ import build_parser, main
    from ssdoffload.planner import build_parser as plan_parser

    assert main([]) == 2
    out = capsys.readouterr().out
    assert "usage: ssdoffload" in out and "bench" in out and "plan" in out
    parser = build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0]
    texts = [parser.format_help(), plan_parser().format_help()]
    texts += [sp.format_help() for name, sp in subparsers.choices.items() if name != "plan"]
    for text in texts:
        assert "``" not in text
    missing = [a.option_strings for a in plan_parser()._actions if not a.help]
    assert missing == [], f"plan options without a help line: {missing}"


def test_optimum_line_sits_at_the_lowest_peak_the_bandwidth_allows():
    """The memory plot drew 'keep - optimum' at y = 0 whenever the drive could hide full
    offload; the lowest peak is what is never offloadable plus at least one layer's
    activations (backward needs them), or what the bandwidth cannot hide if that is more."""
    from ssdoffload.bench.plots import optimum_memory_bytes

    bound = {"offloadable_bytes": 600.0, "optimum_bytes": 600.0}
    assert optimum_memory_bytes(650.0, bound, layers=6) == 50.0 + 100.0
    bound = {"offloadable_bytes": 600.0, "optimum_bytes": 200.0}  # bandwidth hides a third
    assert optimum_memory_bytes(650.0, bound, layers=6) == 50.0 + 400.0
    assert optimum_memory_bytes(650.0, {"offloadable_bytes": 600.0, "optimum_bytes": 600.0}, None) == 50.0


def test_probe_of_a_gpu_preset_on_a_cpu_host_computes_instead_of_building(tmp_path, capsys):
    """``probe --preset gpu-1b`` on a CPU built the 1.1 B model (22 GB of RAM, then killed)."""
    from ssdoffload.__main__ import main

    if torch.cuda.is_available():
        pytest.skip("with a GPU the preset runs for real")
    assert main(["probe", str(tmp_path / "d"), "--size", "8M", "--preset", "gpu-1b"]) == 0
    out = capsys.readouterr().out
    assert "computed from the activation model" in out and "computed for a GPU" in out
    assert "offloadable activations per step" in out


def test_budget_frontier_cli(tmp_path):
    """``bench --budgets``: every fixed plan, plain PyTorch and budget mode at each budget, in
    one run. A budget row over its budget must say so (overruns are counted, never silent), and
    a recomputing plan's memory includes the layer its recomputation rebuilds."""
    from ssdoffload.__main__ import main

    out = tmp_path / "out"
    rc = main(["bench", "--preset", "tiny", "--budgets", "1,0.3,0.01", "-o", str(out), "--no-progress", "-q"])
    assert rc == 0
    result = json.loads((out / "frontier.json").read_text())
    assert set(result["fixed"]) == {"keep", "recompute", "ckpt-input-ssd", "ssd"}
    assert set(result["plain"]) == {"plain keep", "plain recompute"}
    fixed = result["fixed"]
    assert fixed["recompute"]["memory_bytes"] < fixed["keep"]["memory_bytes"]
    assert fixed["ssd"]["memory_bytes"] < fixed["keep"]["memory_bytes"]
    rows = result["budgets"]
    # The fractions asked for, and one at exactly full recomputation's memory.
    at_recompute = fixed["recompute"]["memory_bytes"] / fixed["keep"]["memory_bytes"]
    assert [r["fraction"] for r in rows] == sorted([1.0, 0.3, 0.01, at_recompute], reverse=True)
    assert [r["at_recompute_peak"] for r in rows] == [r["fraction"] == at_recompute for r in rows]
    assert not rows[-1]["feasible"]  # 1% of keep: the largest group alone is bigger
    for row in rows[:-1]:
        assert row["feasible"]
        assert row["memory_bytes"] <= row["budget_bytes"] and row["budget_overruns"] == 0
    checks = result["checks"]
    assert [c["vs_recompute"] is not None for c in checks] == [r["at_recompute_peak"] for r in rows]
    # At a budget equal to keep's own memory with fixed shapes, budget mode keeps everything.
    assert rows[0]["plan"] == fixed["keep"]["plan"] and checks[0]["same_plan_as"] == "keep"
    assert (out / "frontier.png").exists()


def test_budget_frontier_of_a_hugging_face_llama_with_its_own_checkpointing(tmp_path):
    """``bench --budgets --model hf-llama``: a tiny random Llama that checkpoints its own
    layers. Its baselines are the user's (keep = no checkpointing, recompute = their
    checkpointing), the fixed plans that mean something for it (keep, ssd), and budget mode;
    every budget is met or refused clearly, and ``--model`` without ``--budgets`` is an error."""
    pytest.importorskip("transformers")
    from ssdoffload.__main__ import main

    out = tmp_path / "out"
    rc = main(["bench", "--preset", "tiny", "--model", "hf-llama", "--budgets", "1,0.6,0.05", "-o", str(out),
               "--no-progress", "--no-plots", "-q"])
    assert rc == 0
    result = json.loads((out / "frontier.json").read_text())
    assert result["model"] == "hf-llama"
    assert set(result["fixed"]) == {"keep", "ssd"} and set(result["plain"]) == {"plain keep", "plain recompute"}
    rows = result["budgets"]
    assert rows and not rows[-1]["feasible"]  # 5%: below one layer's recomputation
    for row in rows:
        if row["feasible"]:  # met, or every moment over it counted (never silent)
            assert row["memory_bytes"] <= row["budget_bytes"] or row["budget_overruns"] > 0, row
        else:
            assert "recomputed by your own gradient checkpointing" in row["plan_text"], row
    with pytest.raises(SystemExit, match="--budgets only"):
        main(["bench", "--preset", "tiny", "--model", "hf-llama", "-o", str(tmp_path / "x")])


def test_overhead_cli(tmp_path):
    """``bench --overhead`` measures the four set-ups and the per-tensor cost; the offloaded
    set-up really offloads every tensor, the kept one none."""
    from ssdoffload.__main__ import main

    assert main(["bench", "--overhead", "--preset", "tiny", "-o", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "overhead.json").read_text())
    # The whole step with nothing offloaded: the plan keeps every group, and no tensor is written.
    step = result["step"]
    assert step["preset"] == "tiny" and step["offloaded_in_last_step"] == 0
    assert step["plan"] and set(step["plan"]) == {"device"}
    assert len(step["step_seconds_all"]["plain"]) == len(step["step_seconds_all"]["nothing offloaded"]) == 10
    runs = result["results"]
    assert set(runs) == {"plain", "trivial hooks", "ssdoffload, all kept", "ssdoffload, all offloaded"}
    assert result["saved_tensors_per_step"] >= 4 * result["layers"]
    offloaded = runs["ssdoffload, all offloaded"]["tensors_offloaded_per_step"]
    # Everything but each Linear's weight (a parameter) and tensors sharing a storage (dedup).
    assert result["saved_tensors_per_step"] - 2 * result["layers"] <= offloaded < result["saved_tensors_per_step"]
    assert runs["ssdoffload, all kept"]["tensors_offloaded_per_step"] == 0
