"""Train a small GPT with DeepSpeed and ssdoffload, configured by ds_config.json's block.

    # one GPU, the plain engine (ZeRO 1, bf16, gradient accumulation)
    deepspeed --num_gpus 1 integrations/examples/deepspeed/train.py
    # one GPU, the pipeline engine with 1 stage (1F1B schedule, per-micro-batch scopes)
    deepspeed --num_gpus 1 integrations/examples/deepspeed/train.py --pipeline
    # two processes, a 2-stage pipeline with activation checkpointing every block
    deepspeed --num_gpus 2 integrations/examples/deepspeed/train.py --pipeline --checkpoint
    # the same run without offloading, to compare memory and step time
    deepspeed --num_gpus 1 integrations/examples/deepspeed/train.py --pipeline --no-offload

``--spill DIR`` puts the spill files on your NVMe drive (the block's ``path`` otherwise;
``--deepspeed_config FILE`` picks another config). Without a GPU it runs on the CPU
(``DS_ACCELERATOR=cpu``; use ``torchrun`` or the launcher's CPU support). Each step prints the
loss, the step time, what ssdoffload moved and the accelerator's peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import deepspeed
from deepspeed.accelerator import get_accelerator
from deepspeed.pipe import LayerSpec, PipelineModule

from ssdoffload.models.gpt import GPT, Block, GPTConfig, synthetic_batch
from ssdoffload.integrations import deepspeed as ssd_ds

HERE = os.path.dirname(os.path.abspath(__file__))


class Embed(nn.Module):
    """Token + position embedding: the first pipeline layer."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.hidden)
        self.pos = nn.Embedding(cfg.seq, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        return self.drop(self.tok(tokens) + self.pos(pos))


class Head(nn.Module):
    """Final LayerNorm and the vocabulary projection: the last pipeline layer."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", action="store_true", help="use the PipelineEngine (stages = world size)")
    ap.add_argument("--checkpoint", action="store_true", help="pipeline: activation checkpointing every block")
    ap.add_argument("--no-offload", action="store_true", help="set the block's enabled to false")
    ap.add_argument("--spill", help="spill directory (overrides the block's path)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, help="overrides train_micro_batch_size_per_gpu")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    ap = deepspeed.add_config_arguments(ap)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    config_path = args.deepspeed_config or os.path.join(HERE, "ds_config.json")
    args.deepspeed_config = None  # the config goes in as a dict, edited below
    with open(config_path, encoding="utf-8") as fh:
        config = json.load(fh)
    block = config.setdefault("ssd_offload", {})
    if args.spill:
        block["path"] = args.spill
    if args.no_offload:
        block["enabled"] = False
    deepspeed.init_distributed()
    world = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    acc = get_accelerator()
    if acc.device_name() == "cpu" or not acc.is_bf16_supported():  # bf16 matmuls are slow on CPUs
        config.pop("bf16", None)

    cfg = GPTConfig(vocab=args.vocab, seq=args.seq, hidden=args.hidden, heads=args.heads, layers=args.layers)
    if args.micro_batch:
        config["train_micro_batch_size_per_gpu"] = args.micro_batch
    micro = config["train_micro_batch_size_per_gpu"]
    gas = config.get("gradient_accumulation_steps", 1)
    torch.manual_seed(0)
    if args.pipeline:
        config.setdefault("zero_optimization", {})["stage"] = min(
            config.get("zero_optimization", {}).get("stage", 0), 1)  # the pipeline allows ZeRO 0/1
        specs = [LayerSpec(Embed, cfg)] + [LayerSpec(Block, cfg) for _ in range(cfg.layers)] + [LayerSpec(Head, cfg)]
        model = PipelineModule(layers=specs, num_stages=world, loss_fn=lm_loss, partition_method="uniform",
                               activation_checkpoint_interval=1 if args.checkpoint else 0,
                               checkpointable_layers=["Block"])
        config["train_batch_size"] = micro * gas  # data parallel size 1: all ranks are stages
    else:
        model = GPT(cfg)
        config["train_batch_size"] = micro * gas * world

    engine, _, _, _ = ssd_ds.initialize(args=args, model=model,
                                        model_parameters=[p for p in model.parameters() if p.requires_grad],
                                        config=config)
    offload = ssd_ds.get_offload(engine)
    device = engine.device
    if rank == 0:
        print(f"engine={type(engine).__name__} world={world} device={device} "
              f"offload={'on: ' + ', '.join(offload.offloader.paths) if offload else 'off'}", flush=True)

    for step in range(args.steps):
        if acc.device_name() != "cpu":
            acc.reset_peak_memory_stats()
            acc.synchronize()
        t0 = time.perf_counter()
        if args.pipeline:
            batches = iter([synthetic_batch(cfg, micro, device, seed=step * gas + m) for m in range(gas)])
            loss = engine.train_batch(data_iter=batches)
        else:
            for m in range(gas):
                tokens, targets = synthetic_batch(cfg, micro, device, seed=(step * gas + m) * world + rank)
                loss = engine(tokens, targets)
                engine.backward(loss)
                engine.step()
        if acc.device_name() != "cpu":
            acc.synchronize()
        seconds = time.perf_counter() - t0
        peak = acc.max_memory_allocated() / 2**20 if acc.device_name() != "cpu" else float("nan")
        line = f"rank {rank} step {step} loss {loss.item():.4f} time {seconds:.3f}s peak_mem {peak:.0f} MiB"
        if offload is not None:
            s = offload.last_step_stats()
            line += (f" | written {s.bytes_written / 2**20:.1f} MiB read {s.bytes_read / 2**20:.1f} MiB"
                     f" prefetch hit/miss {s.prefetch_hits}/{s.prefetch_misses} stall {s.stall_seconds:.4f}s"
                     f" peak_resident {s.peak_resident_bytes / 2**20:.1f} MiB")
        print(line, flush=True)
    if offload is not None:
        print(f"rank {rank} total: {offload.stats()}; schedule prefetches {offload.schedule_prefetch_calls} "
              f"({offload.schedule_prefetch_reads} reads)", flush=True)
    engine.destroy()


if __name__ == "__main__":
    main()
