"""One rank of a real DeepSpeed run, launched by tests/test_deepspeed.py through
``python -m torch.distributed.run``. Trains the same steps with the ``ssd_offload`` block
disabled and enabled, in this one process, and writes what it saw to
``<out>/<mode>-rank<r>.json`` for the test to check.

    --mode plain  --cases 0:fp32:1,2:bf16:2   ZeRO stage : dtype : gradient accumulation steps
    --mode pipe   --cases 0,1                 activation_checkpoint_interval (0: none)
    --mode bad                                 bad blocks must fail on every rank, before training
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import deepspeed  # noqa: E402
from deepspeed.pipe import LayerSpec, PipelineModule  # noqa: E402

from ssdoffload.models.gpt import GPT, Block, GPTConfig, synthetic_batch  # noqa: E402
from ssdoffload.integrations import deepspeed as ssd_ds  # noqa: E402
from ssdoffload.io import _native  # noqa: E402

_native.install_crash_handler()  # a rank killed by a signal prints its native stack too

CFG = GPTConfig(vocab=128, seq=32, hidden=64, heads=4, layers=4, dropout=0.1)
STEPS = 5


def ds_config(micro: int, gas: int, world: int, zero: int = 0, bf16: bool = False,
              block: dict | None = None) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": zero},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if block is not None:
        cfg["ssd_offload"] = block
    return cfg


def block(spill: str, enabled: bool, **kw) -> dict:
    b = {"enabled": enabled, "path": spill, "min_offload_bytes": 4096,
         "initial_file_bytes": 1 << 20, "prefetch_depth": 2, "io_threads": 2,
         "policy": "all"}  # the tests count what full offload moves every step
    b.update(kw)
    return b


def digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def leftovers(root: str) -> list:
    return sorted(os.path.join(r, f) for r, _, files in os.walk(root) for f in files)


def offload_report(engine) -> dict:
    off = ssd_ds.get_offload(engine)
    if off is None:
        return {"attached": False, "engine_class": type(engine).__name__}
    stats = off.stats()
    return {
        "attached": True,
        "engine_class": type(engine).__name__,
        "paths": off.offloader.paths,
        "stats": {k: v for k, v in stats.as_dict().items()},
        "step_bytes_written": off.step_bytes,
        "schedule_prefetch_calls": off.schedule_prefetch_calls,
        "schedule_prefetch_reads": off.schedule_prefetch_reads,
        "spill_files_open": len(off.spill_files),
    }


def record_steps(engine):
    """Remember bytes written per optimizer step (the report needs them per stage)."""
    off = ssd_ds.get_offload(engine)
    if off is not None:
        off.step_bytes = []
        orig = off.end_step

        def end_step():
            orig()
            off.step_bytes.append(off.last_step_stats().bytes_written)

        off.end_step = end_step


# -- plain engine --------------------------------------------------------------------------
def run_plain(rank: int, world: int, zero: int, bf16: bool, gas: int, enabled: bool, spill: str) -> dict:
    torch.manual_seed(0)
    model = GPT(CFG)
    cfg = ds_config(2, gas, world, zero, bf16, block(spill, enabled))
    engine, _, _, _ = ssd_ds.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    record_steps(engine)
    losses = []
    t0 = time.perf_counter()
    for step in range(STEPS):
        for micro in range(gas):
            tokens, targets = synthetic_batch(CFG, 2, engine.device, seed=1000 * step + 10 * micro + rank)
            loss = engine(tokens, targets)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach().float().item()))
    seconds = time.perf_counter() - t0
    report = offload_report(engine)
    result = {"losses": losses, "digest": digest(engine.module), "seconds": seconds, **report}
    engine.destroy()
    torch.distributed.barrier()  # every rank has closed before anyone looks
    result["leftover_files"] = leftovers(spill.split("{rank}")[0])
    return result


# -- pipeline engine -----------------------------------------------------------------------
class Embed(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.hidden)
        self.pos = nn.Embedding(cfg.seq, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, tokens):
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        return self.drop(self.tok(tokens) + self.pos(pos))


class Head(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.vocab, bias=False)

    def forward(self, x):
        return self.out(self.ln(x))


def lm_loss(logits, targets):
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def pipe_module(stages: int, interval: int) -> PipelineModule:
    specs = [LayerSpec(Embed, CFG)] + [LayerSpec(Block, CFG) for _ in range(CFG.layers)] + [LayerSpec(Head, CFG)]
    return PipelineModule(layers=specs, num_stages=stages, loss_fn=lm_loss, partition_method="uniform",
                          activation_checkpoint_interval=interval, checkpointable_layers=["Block"])


def _func_name(f) -> str:
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', '?')}"


def run_pipe(rank: int, world: int, interval: int, enabled: bool, spill: str, micro_batches: int = 4) -> dict:
    torch.manual_seed(0)
    module = pipe_module(2, interval)
    cfg = ds_config(2, micro_batches, world // 2, 0, False, block(spill, enabled))
    engine, _, _, _ = ssd_ds.initialize(model=module, model_parameters=[p for p in module.parameters()], config=cfg)
    record_steps(engine)
    losses = []
    t0 = time.perf_counter()
    for step in range(STEPS):
        data = iter([synthetic_batch(CFG, 2, torch.device("cpu"), seed=1000 * step + m) for m in range(micro_batches)])
        loss = engine.train_batch(data_iter=data)
        losses.append(float(loss.detach().float().item()))
    seconds = time.perf_counter() - t0
    report = offload_report(engine)
    result = {"losses": losses, "digest": digest(engine.module), "seconds": seconds, "stage": engine.stage_id,
              "num_layers": len(ssd_ds.get_offload(engine).offloader.layers) if report["attached"] else 0,
              "ckpt_func": _func_name(engine.module.activation_checkpoint_func), **report}
    engine.destroy()
    torch.distributed.barrier()
    result["ckpt_func_after"] = _func_name(module.activation_checkpoint_func)
    result["leftover_files"] = leftovers(spill.split("{rank}")[0])
    return result


# -- bad blocks ----------------------------------------------------------------------------
def run_bad(rank: int, world: int, root: str) -> dict:
    os.makedirs(os.path.join(root, "r0"), exist_ok=True)  # only rank 0's parent exists
    cases = {
        "unknown_key": block(os.path.join(root, "ok"), True, prefetch_dept=3),
        "bad_value": block(os.path.join(root, "ok"), True, prefetch_depth=-1),
        "missing_parent": block(os.path.join(root, "no", "such", "dir"), True),
        "one_rank_bad": block(os.path.join(root, "r{rank}", "act"), True),
        "zero3": block(os.path.join(root, "ok"), True),
    }
    out = {}
    for name, b in cases.items():
        torch.manual_seed(0)
        model = GPT(CFG)
        cfg = ds_config(2, 1, world, 3 if name == "zero3" else 0, False, b)
        try:
            engine, _, _, _ = ssd_ds.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        except Exception as exc:  # the expected path
            out[name] = {"raised": type(exc).__name__, "message": str(exc),
                         "is_value_error": isinstance(exc, ValueError)}
        else:
            out[name] = {"raised": None}
            engine.destroy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True, choices=["plain", "pipe", "bad"])
    ap.add_argument("--cases", default="")
    ap.add_argument("--spill", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if os.environ.get("SSD_DS_TEST_SHM", "0") != "1":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on the first
        # init_distributed (~40 s, cached afterwards under TORCH_EXTENSIONS_DIR); gloo does every
        # collective these tests need, so leave it out (DeepSpeed keeps this dict for edits).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results: dict = {"rank": rank, "world": world, "deepspeed": deepspeed.__version__,
                     "torch": torch.__version__, "cases": {}}
    try:
        if a.mode == "bad":
            results["cases"] = run_bad(rank, world, a.spill)
        for case in filter(None, a.cases.split(",")):
            case_res = {}
            for enabled in (False, True):
                # The plain engine uses the default per-rank subdirectory, the pipeline "{rank}".
                base = os.path.join(a.spill, f"{a.mode}-{case.replace(':', '_')}")
                os.makedirs(base, exist_ok=True)
                spill = os.path.join(base, "{rank}") if a.mode == "pipe" else base
                if a.mode == "plain":
                    zero, dtype, gas = case.split(":")
                    res = run_plain(rank, world, int(zero), dtype == "bf16", int(gas), enabled, spill)
                else:
                    res = run_pipe(rank, world, int(case), enabled, spill)
                case_res["enabled" if enabled else "disabled"] = res
            results["cases"][case] = case_res
    except Exception:
        results["error"] = traceback.format_exc()
    with open(os.path.join(a.out, f"{a.mode}-rank{rank}.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
