"""Command line: ``python -m ssdoffload bench | probe | plan`` (also the ``ssdoffload`` script).

* ``bench``: train the built-in GPT under keep / recompute / cpu / ssd / ssd+recompute /
  ssd-adaptive / ram+ssd, interleaved, and report time, memory and I/O per strategy (table,
  JSON, PNG plots); ``--throttle-fraction`` / ``--throttle-bandwidth`` emulate a throttled drive.
* ``probe PATH``: the drive's sequential write and read bandwidth through ssdoffload's engine,
  and what a preset needs to hide all of its I/O.
* ``plan``: the micro-batch and bandwidth planner (``ssdoffload.planner``).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import Dict, List, Optional

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"512M"``, ``"1.5GiB"``, ``"4096"`` -> bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 512M, 2G)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _offload_option(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    for conv in (int, float):
        try:
            return key.strip(), conv(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return key.strip(), value.lower() == "true"
    return key.strip(), value


def _add_model_options(p: argparse.ArgumentParser) -> None:
    from .bench.presets import PRESETS

    g = p.add_argument_group("model (override the preset)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="model preset (default: cpu-small without a "
                   "GPU, gpu-1b with one)")
    for name, help_ in (("hidden", "hidden size"), ("layers", "number of blocks"), ("heads", "attention heads"),
                        ("seq", "sequence length"), ("vocab", "vocabulary size")):
        g.add_argument(f"--{name}", type=int, help=help_)
    g.add_argument("--micro-batch", type=int, help="sequences per step")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], help="float32, or bfloat16 autocast")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch compute threads (default on a CPU: cores - 1, "
                   "leaving one core to the I/O threads)")


def _overrides(args: argparse.Namespace) -> Dict[str, object]:
    keys = ("hidden", "layers", "heads", "seq", "vocab", "micro_batch", "dtype", "steps", "warmup",
            "min_offload_bytes", "prefetch_depth", "io_threads")
    return {k: getattr(args, k, None) for k in keys if getattr(args, k, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    from .bench.strategies import STRATEGIES

    parser = argparse.ArgumentParser(
        prog="ssdoffload",
        description="Activation offloading to NVMe: benchmark it, measure a drive, plan a run.",
        epilog="examples: python -m ssdoffload bench   (about a minute on a laptop CPU: a small GPT "
               "under each strategy); python -m ssdoffload probe /nvme/act; "
               "python -m ssdoffload plan --help. 'ssdoffload COMMAND --help' for the options.")
    sub = parser.add_subparsers(dest="command", metavar="{bench,probe,plan}")

    b = sub.add_parser("bench", help="compare keep, recompute, cpu and ssd offload on a built-in GPT",
                       description="Train the built-in GPT on synthetic tokens under each strategy, interleaved "
                                   "step by step, and report step time, memory and I/O.")
    _add_model_options(b)
    b.add_argument("--steps", type=int, help="measured steps per strategy")
    b.add_argument("--warmup", type=int, help="warm-up steps per strategy (not measured)")
    b.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"comma-separated subset of {','.join(STRATEGIES)} (keep is always run)")
    b.add_argument("--spill-path", action="append", default=[], metavar="DIR",
                   help="spill directory (repeat for several drives); default: a temporary directory, removed after")
    b.add_argument("--output", "-o", default="ssdoffload-bench", help="folder for the JSON and plots "
                   "(default ./ssdoffload-bench)")
    b.add_argument("--min-offload-bytes", type=parse_size, help="smaller saved tensors stay in memory")
    b.add_argument("--prefetch-depth", type=int, help="layers read ahead during backward")
    b.add_argument("--io-threads", type=int, help="ssdoffload I/O threads")
    b.add_argument("--offload-option", action="append", type=_offload_option, default=[], metavar="KEY=VALUE",
                   help="any other OffloadConfig field for the ssd strategies")
    b.add_argument("--throttle-fraction", type=float, metavar="F",
                   help="throttled drive: cap reads and writes of the ssd strategies at F x the write bandwidth "
                        "full offload needs (measured first with keep), e.g. 0.5")
    b.add_argument("--throttle-bandwidth", type=parse_size, metavar="BYTES_PER_S",
                   help="throttled drive: cap reads and writes of the ssd strategies at this many bytes/s (e.g. 100M)")
    b.add_argument("--host-cache", type=parse_size, metavar="SIZE",
                   help="host-RAM tier of the ram+ssd strategy (default: half the offloadable bytes)")
    b.add_argument("--probe-size", type=parse_size, default=256 << 20, help="bytes the drive probe moves (256M)")
    b.add_argument("--sweep-micro-batch", action="store_true",
                   help="also find the largest micro-batch each strategy fits in --memory-budget")
    b.add_argument("--memory-budget", type=parse_size, help="budget for the sweep (default: GPU memory; on a CPU "
                   "4x keep's activation bytes)")
    b.add_argument("--sweep-max-micro-batch", type=int, help="stop the sweep at this micro-batch")
    b.add_argument("--overhead", action="store_true",
                   help="instead of the comparison: what the hooks cost the compute thread per saved tensor "
                   "(64 tiny layers; plain, trivial hooks, ssdoffload keeping all, offloading all)")
    b.add_argument("--budgets", nargs="?", const="default", metavar="F,F,...",
                   help="instead of the comparison: the memory/step-time frontier (keep, recompute, "
                   "checkpoint-input offload, full SSD offload, and budget mode at these fractions of "
                   "keep's memory; default 1,0.7,0.5,0.35,0.25,0.15,0.1)")
    b.add_argument("--model", choices=["gpt", "hf-llama"], default="gpt",
                   help="with --budgets: the reference GPT (default), or a tiny random Hugging Face Llama of "
                        "the preset's sizes with its own gradient checkpointing on (needs transformers)")
    b.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms (CUDA)")
    b.add_argument("--trace", action="store_true", help="also write trace_ssd_step.json, a torch.profiler "
                   "trace of one ssd step (open in Perfetto): model ops and ssdoffload.stall spans; the "
                   "writes and reads are in timeline_ssd_step.png (they run on I/O threads the profiler "
                   "does not record)")
    b.add_argument("--no-plots", action="store_true")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--quiet", "-q", action="store_true", help="print only the last line")

    pr = sub.add_parser("probe", help="measure a spill path's bandwidth and what a preset needs",
                        description="Sequential write and read bandwidth of PATH through ssdoffload's engine "
                                    "(O_DIRECT), and the bandwidth a preset needs to hide all of its I/O.")
    pr.add_argument("path", help="spill directory to test (created if missing, files removed after)")
    pr.add_argument("--size", type=parse_size, default=1 << 30, help="bytes to write and read (default 1G)")
    pr.add_argument("--io-threads", type=int, default=4, help="I/O threads")
    pr.add_argument("--repeats", type=int, default=1, help="best of this many passes")
    pr.add_argument("--no-demand", action="store_true", help="skip measuring the preset's demand")
    pr.add_argument("--tflops", type=float, default=400.0,
                    help="achieved TFLOP/s assumed for a GPU preset on a host without a GPU (default 400)")
    _add_model_options(pr)

    sub.add_parser("plan", help="micro-batch and bandwidth planner", add_help=False)
    return parser


def _frontier(args: argparse.Namespace) -> int:
    import json

    from .bench import plots
    from .bench.frontier import DEFAULT_FRACTIONS, budget_frontier, format_frontier
    from .bench.runner import (BenchOptions, default_threads, offload_config_for, resolve_device, resolve_preset,
                               spill_directories, torch_threads)

    if args.budgets == "default":
        fractions = DEFAULT_FRACTIONS
    else:
        try:
            fractions = tuple(float(f) for f in args.budgets.split(","))
        except ValueError:
            raise SystemExit(f"--budgets {args.budgets!r}: give fractions of keep's memory, e.g. 1,0.5,0.25")
        if not fractions or any(not 0 < f <= 1 for f in fractions):
            raise SystemExit(f"--budgets {args.budgets!r}: each fraction must be in (0, 1]")
    device = resolve_device(args.device)
    preset = resolve_preset(BenchOptions(preset=args.preset, overrides=_overrides(args)), device)
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    with spill_directories(args.spill_path) as paths, torch_threads(args.threads or default_threads(device)):
        config = offload_config_for(preset, paths, dict(args.offload_option))
        result = budget_frontier(preset, device, config, seed=args.seed, fractions=fractions,
                                 progress=not (args.no_progress or args.quiet), model=args.model)
    result.update(preset=preset.as_dict(), device=str(device), command=sys.argv[:])
    with open(os.path.join(out, "frontier.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    files = []
    if not args.no_plots:
        try:
            files.append(plots.frontier(result, os.path.join(out, "frontier.png")))
        except ImportError:
            print("matplotlib is not installed: no plot (pip install 'ssdoffload[bench]')", file=sys.stderr)
    if not args.quiet:
        print(format_frontier(result))
    print(f"results written to {out} (frontier.json{', frontier.png' if files else ''})")
    return 0


def _overhead(args: argparse.Namespace) -> int:
    import json

    import torch

    from .bench.overhead import format_overhead, format_step_overhead, measure_overhead, measure_step_overhead
    from .bench.runner import BenchOptions, default_threads, resolve_device, resolve_preset, torch_threads

    spill = args.spill_path[0] if args.spill_path else ""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the hooks' cost, not the kernels' parallelism
    try:
        result = measure_overhead(spill_path=spill)
    finally:
        torch.set_num_threads(before)
    # The whole step of the preset (default: cpu-small on a CPU), nothing offloaded.
    device = resolve_device(args.device)
    preset = resolve_preset(BenchOptions(preset=args.preset, overrides=_overrides(args)), device)
    with torch_threads(args.threads or default_threads(device)):
        result["step"] = measure_step_overhead(preset, device, spill_path=spill)
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "overhead.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(format_overhead(result))
    print(format_step_overhead(result["step"]))
    print(f"results written to {out} (overhead.json)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.overhead:
        return _overhead(args)
    if args.budgets is not None:
        return _frontier(args)
    if args.model != "gpt":
        raise SystemExit(f"--model {args.model} is measured by --budgets only (bench --budgets --model {args.model})")
    from .bench import plots, report as report_mod
    from .bench.runner import BenchOptions, run_bench
    from .bench.strategies import parse_strategies

    options = BenchOptions(
        preset=args.preset, overrides=_overrides(args), device=args.device,
        strategies=parse_strategies(args.strategies), spill_paths=args.spill_path, output=args.output,
        seed=args.seed, probe_bytes=args.probe_size, offload_options=dict(args.offload_option),
        progress=not (args.no_progress or args.quiet), plots=not args.no_plots,
        deterministic=args.deterministic, sweep=args.sweep_micro_batch, memory_budget=args.memory_budget,
        sweep_max_micro_batch=args.sweep_max_micro_batch, threads=args.threads, trace=args.trace,
        throttle_fraction=args.throttle_fraction, throttle_bandwidth=args.throttle_bandwidth,
        host_cache_bytes=args.host_cache)
    report = run_bench(options)
    out = os.path.abspath(options.output)
    os.makedirs(out, exist_ok=True)
    files = []
    if options.plots:
        try:
            files = plots.write_all(report, out)
        except ImportError:
            print("matplotlib is not installed: no plots (pip install 'ssdoffload[bench]')", file=sys.stderr)
    trace = os.path.join(out, "trace_ssd_step.json")
    report["files"] = {"json": os.path.join(out, "bench.json"), "plots": files,
                       "trace": trace if options.trace and os.path.exists(trace) else None}
    report_mod.write_json(report, report["files"]["json"])
    if not args.quiet:
        print(report_mod.format_table(report))
        if not report["loss_check"]["identical"]:
            print("WARNING: the strategies' losses are not bit-identical (see above)", file=sys.stderr)
    print(f"results written to {out} (bench.json{', ' + ', '.join(os.path.basename(f) for f in files) if files else ''})")
    return 0 if report["loss_check"]["identical"] else 3


def _probe(args: argparse.Namespace) -> int:
    from .bench import probe
    from .bench.runner import BenchOptions, default_threads, resolve_device, resolve_preset, torch_threads

    result = probe.measure(args.path, nbytes=args.size, threads=args.io_threads, repeats=args.repeats)
    print(f"{result.path}: sequential write {result.write_bytes_per_s / 1e9:.2f} GB/s, read "
          f"{result.read_bytes_per_s / 1e9:.2f} GB/s ({result.nbytes / 2**20:.0f} MiB in "
          f"{result.block_bytes / 2**20:.0f} MiB requests, {result.threads} threads, "
          f"{'O_DIRECT' if result.direct else 'buffered: the filesystem refuses O_DIRECT'})")
    print(f"{'':>{len(result.path)}}  raw pwrite/pread, same {result.chunk_bytes >> 20} MiB requests and "
          f"{result.threads} threads: write {result.raw_write_bytes_per_s / 1e9:.2f} GB/s, read "
          f"{result.raw_read_bytes_per_s / 1e9:.2f} GB/s -> the engine reaches "
          f"{result.write_bytes_per_s / result.raw_write_bytes_per_s:.0%} / "
          f"{result.read_bytes_per_s / result.raw_read_bytes_per_s:.0%} of it")
    if args.no_demand:
        return 0
    from .bench.demand import analytic_demand, measure_demand

    device = resolve_device(args.device)
    preset = resolve_preset(BenchOptions(preset=args.preset, overrides=_overrides(args)), device)
    if preset.for_device == "cuda" and device.type != "cuda":
        # A GPU model on a CPU host: computed from its shape, not built (it may not fit in RAM).
        d = analytic_demand(preset, tflops=args.tflops)
        print(f"preset {preset.name} is for a GPU and this host has none: its demand is computed "
              f"from the activation model at {args.tflops:g} TFLOP/s, not measured")
    else:
        with torch_threads(args.threads or default_threads(device)):
            d = measure_demand(preset, device, seed=args.seed)
    frac = d.movable_fraction(result.write_bytes_per_s, result.read_bytes_per_s)
    where = "computed for a GPU" if preset.for_device == "cuda" and device.type != "cuda" else f"on {device}"
    print(f"preset {preset.name}, micro-batch {preset.micro_batch} {where}: "
          f"{d.offloadable_bytes / 2**20:.1f} MiB offloadable activations per step; forward "
          f"{d.forward_seconds:.3f} s, backward {d.backward_seconds:.3f} s")
    print(f"to hide all I/O it needs {d.write_bytes_per_s / 1e9:.2f} GB/s write and "
          f"{d.read_bytes_per_s / 1e9:.2f} GB/s read: this drive can move {frac:.0%} of it "
          f"({'enough' if frac >= 1 else 'offload less or add drives'})")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plan":
        from .planner import main as plan_main

        return plan_main(argv[1:])
    parser = build_parser()
    if not argv:  # a newcomer typing the bare command gets help, not a minute-long benchmark
        parser.print_help()
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.command == "probe":
            return _probe(args)
        return _bench(args)
    except ValueError as exc:
        parser.exit(2, f"ssdoffload: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
