"""Worker launched by tests/test_megatron.py with ``python -m torch.distributed.run``.

Each rank trains a tiny megatron-core GPT through Megatron's own schedule (no pipelining for
one process, 1F1B for two) twice -- without and with ssdoffload -- and writes what it saw to
``<out>/rank<r>.json``: whether losses and gradients were bit-identical, bytes written and
read, prefetch hits, and the spill files left behind.

On a CPU host megatron-core's hard-coded CUDA calls are redirected to the CPU by the test
fixture ``megatron_common.redirect_cuda_to_cpu`` (tests only).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import megatron_common as mc  # noqa: E402


def run_scenario(name: str, recompute: str, dtype: torch.dtype, microbatches: int, args, rank: int,
                 pp_rank: int) -> dict:
    import ssdoffload

    common = dict(pp_size=args.pp, pp_rank=pp_rank, steps=args.steps, microbatches=microbatches,
                  recompute=recompute, dtype=dtype)
    ref = mc.train(None, **common)
    os.makedirs(os.path.join(args.spill, name), exist_ok=True)
    config = ssdoffload.OffloadConfig(path=os.path.join(args.spill, name, "{rank}"),
                                      min_offload_bytes=4096, initial_file_bytes=1 << 20,
                                      prefetch_depth=args.prefetch_depth, io_threads=2,
                                      policy="all")  # the test expects writes every step
    got = mc.train(config, **common)
    problems = mc.compare(ref, got)
    stats = got[2]
    spill_dir = config.resolved_paths(rank)[0]
    left = sorted(os.listdir(spill_dir)) if os.path.isdir(spill_dir) else []
    print(f"rank {rank} {name}: {'BIT-IDENTICAL' if not problems else problems[:3]} {stats}", flush=True)
    return dict(rank=rank, pp_rank=pp_rank, problems=problems,
                losses=[[float(x) for x in step] for step in got[0]],
                n_losses=sum(len(s) for s in got[0]),
                stats=stats.as_dict(), steps=[s.as_dict() for s in got[3]],
                spill_files_during=got[4], spill_files_left=left)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pp", type=int, required=True)
    ap.add_argument("--scenarios", default="none:fp32:4",
                    help="comma-separated recompute:dtype:microbatches, e.g. none:fp32:4,full:bf16:6")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--prefetch-depth", type=int, default=2)
    ap.add_argument("--spill", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.set_num_threads(1)
    if not torch.cuda.is_available():
        mc.redirect_cuda_to_cpu()

    results = {}
    with mc.distributed(args.pp) as (rank, pp_rank):
        for scenario in args.scenarios.split(","):
            recompute, dtype, microbatches = scenario.split(":")
            results[scenario] = run_scenario(
                scenario.replace(":", "-"), recompute,
                torch.bfloat16 if dtype == "bf16" else torch.float32, int(microbatches),
                args, rank, pp_rank)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
