"""Megatron-core pipeline size 1 on one real GPU, without and with ssdoffload (no CUDA redirect).

    python -m torch.distributed.run --nproc_per_node=1 tests/workers/megatron_gpu_pp1.py \
        --spill /tmp/ssd_megatron_gpu

Prints the losses of both runs, whether losses and gradients are bit-identical, and the
offload statistics (bytes written/read, prefetch hits, stall). Exit status 1 on a mismatch.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import megatron_common as mc  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spill", default="/tmp/ssd_megatron_gpu")
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--recompute", default="none", choices=["none", "full", "selective"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: this script runs only on a GPU host", file=sys.stderr)
        return 2
    import ssdoffload

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    os.makedirs(args.spill, exist_ok=True)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with mc.distributed(1, backend="nccl") as (rank, pp_rank):
        common = dict(pp_size=1, pp_rank=0, steps=args.steps, microbatches=args.microbatches,
                      micro_batch=4, seq=256, vocab=1024, recompute=args.recompute,
                      device="cuda", dtype=dtype)
        ref = mc.train(None, **common)
        config = ssdoffload.OffloadConfig(path=os.path.join(args.spill, "{rank}"),
                                          min_offload_bytes=64 << 10, prefetch_depth=2)
        got = mc.train(config, **common)
        torch.cuda.synchronize()
        problems = mc.compare(ref, got)
        print("losses without offload:", [[round(float(x), 6) for x in s] for s in ref[0]])
        print("losses with offload:   ", [[round(float(x), 6) for x in s] for s in got[0]])
        print("bit-identical:", not problems, problems[:5])
        print("stats:", got[2])
        left = os.listdir(config.resolved_paths(rank)[0]) if os.path.isdir(config.resolved_paths(rank)[0]) else []
        print("spill files left:", left)
        return 0 if not problems and got[2].bytes_written > 0 and not left else 1


if __name__ == "__main__":
    sys.exit(main())
