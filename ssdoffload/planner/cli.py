"""``python -m ssdoffload plan``: the planner's command line."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .spec import ModelSpec, SCHEDULES
from .profile import profile_benchmark_gpt
from .drive import Drive, probe_drive
from .solve import plan


# -- command line ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m ssdoffload plan",
        description="How large can the micro-batch grow with activations kept, recomputed or "
                    "offloaded to SSD, and what must the drive sustain?",
        epilog="example: python -m ssdoffload plan --layers 32 --hidden 4096 --heads 32 --seq 4096 "
               "--vocab 50304 --pp 4 --gpu-memory 80 --global-batch 512 --dp 8 --write-gbps 6 "
               "--read-gbps 12 --tbw 7000")
    m = ap.add_argument_group("model (description)")
    m.add_argument("--layers", type=int, default=24, help="transformer layers (default 24)")
    m.add_argument("--hidden", type=int, default=2048, help="hidden size h (default 2048)")
    m.add_argument("--heads", type=int, default=16, help="attention heads (default 16)")
    m.add_argument("--seq", type=int, default=2048, help="sequence length in tokens (default 2048)")
    m.add_argument("--vocab", type=int, default=50304, help="vocabulary size (default 50304)")
    m.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="activation dtype (default bf16)")
    m.add_argument("--no-flash", action="store_true", help="attention without flash attention (saves the s x s matrix)")
    m.add_argument("--autocast", action="store_true", help="16-bit autocast over an fp32 residual stream")
    m.add_argument("--no-dropout", action="store_true", help="the model has no dropout (no masks saved)")
    m.add_argument("--mlp-ratio", type=int, default=4, help="MLP width / hidden (default 4)")
    m.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    m.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages (default 1)")
    m.add_argument("--sequence-parallel", action="store_true", help="Megatron sequence parallelism (activations split over tp)")
    m.add_argument("--schedule", default=None, choices=SCHEDULES,
                   help="default: 1f1b when --pp > 1, else no_pipelining")
    m.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="kernel conventions of the activation model")
    m.add_argument("--profile", action="store_true",
                   help="measure the benchmark GPT of these dimensions on this machine instead of the analytic model")
    m.add_argument("--profile-micro-batch", type=int, default=2, help="micro-batch used by --profile (default 2)")
    b = ap.add_argument_group("memory and batch")
    b.add_argument("--budget", type=float, help="GiB of GPU memory for activations")
    b.add_argument("--gpu-memory", type=float, help="GiB of GPU memory; model state and --reserve are taken off")
    b.add_argument("--bytes-per-param", type=float, default=18.0, help="model state per parameter (18: bf16 + fp32 Adam)")
    b.add_argument("--reserve", type=float, default=2.0, help="GiB kept back (allocator, workspace)")
    b.add_argument("--global-batch", type=int, help="sequences per step (all data-parallel replicas)")
    b.add_argument("--dp", type=int, default=1, help="data-parallel replicas (default 1)")
    b.add_argument("--microbatches", type=int, help="fixed number of micro-batches per step")
    b.add_argument("--rank", type=int, help="pipeline rank to plan for (default: all; the tightest binds)")
    b.add_argument("--prefetch-depth", type=int, default=2, help="layers read ahead in backward (default 2)")
    b.add_argument("--tflops", type=float, default=400.0, help="achieved TFLOP/s per GPU (compute-time model)")
    d = ap.add_argument_group("drive")
    d.add_argument("--write-gbps", type=float, help="sustained write GB/s of one GPU's spill drive(s) (default 3)")
    d.add_argument("--read-gbps", type=float, help="sustained read GB/s (default 6)")
    d.add_argument("--probe", metavar="DIR", help="measure the drive holding DIR instead")
    d.add_argument("--tbw", type=float, help="rated endurance, TB written")
    d.add_argument("--dwpd", type=float, help="rated drive writes per day (with --capacity)")
    d.add_argument("--capacity", type=float, help="drive capacity, TB")
    d.add_argument("--warranty-years", type=float, default=5.0, help="warranty the endurance is rated over (default 5)")
    d.add_argument("--gpus-per-drive", type=float, default=1.0, help="GPUs sharing one drive (default 1)")
    ap.add_argument("--layer-plan", action="store_true",
                    help="also the per-layer plan budget mode would choose (keep / SSD / recompute / "
                    "recompute with the input on the SSD) for the budget, at the largest micro-batch that fits")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--output", help="also write the JSON to this file")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m ssdoffload plan``: prints the table (or JSON); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        schedule = args.schedule or ("1f1b" if args.pp > 1 else "no_pipelining")
        spec = ModelSpec(layers=args.layers, hidden=args.hidden, heads=args.heads, seq=args.seq,
                         vocab=args.vocab, dtype=args.dtype, flash=not args.no_flash, tp=args.tp,
                         pp=args.pp, schedule=schedule, sequence_parallel=args.sequence_parallel,
                         dropout=not args.no_dropout, autocast=args.autocast,
                         mlp_ratio=args.mlp_ratio, device=args.device)
        if args.probe:
            drive = probe_drive(args.probe)
        else:
            drive = Drive(write_gbps=args.write_gbps or 3.0, read_gbps=args.read_gbps or 6.0,
                          source="given" if args.write_gbps or args.read_gbps else "assumed: one Gen4 NVMe")
        drive.tbw, drive.dwpd, drive.capacity_tb = args.tbw, args.dwpd, args.capacity
        drive.warranty_years, drive.gpus_per_drive = args.warranty_years, args.gpus_per_drive
        if args.budget is None and args.gpu_memory is None:
            raise ValueError("give --budget (GiB for activations) or --gpu-memory (GiB of the GPU)")
        common = dict(budget_gib=args.budget, drive=drive, global_batch=args.global_batch, dp=args.dp,
                      num_microbatches=args.microbatches, rank=args.rank,
                      prefetch_depth=args.prefetch_depth)
        if args.profile:
            if args.pp != 1 or args.tp != 1:
                raise ValueError("--profile measures one process: use --pp 1 --tp 1")
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
            prof = profile_benchmark_gpt(spec, args.profile_micro_batch, device)
            result = plan(profile=prof, pp=1, schedule="no_pipelining",
                          **{k: v for k, v in common.items() if k != "budget_gib"},
                          budget_gib=args.budget if args.budget is not None else args.gpu_memory - args.reserve)
        else:
            result = plan(spec, gpu_memory_gib=args.gpu_memory, bytes_per_param=args.bytes_per_param,
                          reserve_gib=args.reserve, tflops=args.tflops, **common)
    except (ValueError, OSError) as exc:
        print(f"ssdoffload plan: error: {exc}", file=sys.stderr)
        return 2
    out = result.as_dict()
    layer = None
    if args.layer_plan:
        from .layer_plan import candidates, layer_plan

        layer = layer_plan(result.profile, int(result.inputs["budget_bytes"]), drive,
                           candidates(args.global_batch, args.dp))
        out["layer_plan"] = layer.as_dict()
    text = json.dumps(out, indent=2, default=float)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    print(text if args.json else result)
    if layer is not None and not args.json:
        print(layer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
