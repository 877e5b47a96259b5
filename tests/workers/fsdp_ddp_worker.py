"""One rank of a real 2-rank FSDP2 or DDP run over gloo on the CPU, launched by
tests/test_distributed.py through ``python -m torch.distributed.run``.

Trains the same ``STEPS`` SGD steps three times in this one process, each time from the same
seed and on the same per-rank data (different data on each rank):

1. ``plain``: no offloading; a saved-tensor spy records what autograd saves and classifies
   it against the parameters the modules hold *during* forward (FSDP2's unsharded
   parameters), which gives the expected number and bytes of offloaded storages per step;
2. ``plain2``: no offloading, no spy: the run is deterministic (else bit-for-bit means nothing);
3. ``offload``: the ``Offloader`` (``policy="all"``, path ``<spill>/<mode>/{rank}``). Between
   forward and backward, still inside ``off.step()``, ``off.wait()`` and then the spill files
   are scanned for the bytes of every (full, unsharded) parameter, and for the input batch as
   a positive control of the scan;
4. ``measured``: no offloading, each step's activation peak measured from outside the library
   (``tests/memory_meter.py``; the parameters modules hold in forward, FSDP2's unsharded ones,
   not counted);
5. ``budget``: budget mode, ``memory_budget`` = ``BUDGET_FRACTION`` of this rank's measured
   peak (each rank plans for itself), the peak measured the same way
   (path ``<spill>/<mode>/budget/{rank}``).

Losses and per-rank gradients (``p.grad.to_local()`` for FSDP2's DTensor gradients) are
compared with ``torch.equal`` here; the report ``<out>/<mode>-rank<r>.json`` carries the
verdicts, the stats and, on failure, the traceback. It is rewritten after every phase, so a
crash later still leaves what came before.

    --mode fsdp2 | ddp
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import ssdoffload  # noqa: E402
from ssdoffload.io import _native  # noqa: E402
from memory_meter import ActivationMeter  # noqa: E402

_native.install_crash_handler()  # a rank killed by a signal prints its native stack too

STEPS = 3
BATCH, SEQ, DIM, HEADS, LAYERS = 4, 16, 64, 4, 3
#: Small enough that LayerNorm statistics and parameters (256 B) would be offloaded if they
#: were not recognised: the count check then sees every misclassification.
MIN_OFFLOAD_BYTES = 256
#: The budget phase's memory_budget, as a share of the rank's peak without offloading.
BUDGET_FRACTION = 0.5


# -- model ---------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention (nn.MultiheadAttention) + GELU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.ln2 = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, 4 * DIM)
        self.fc2 = nn.Linear(4 * DIM, DIM)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        mask = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device), 1)
        a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        x = x + a
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(DIM, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build(mode: str):
    """(net, model): ``net`` is the bare module tree (its ``named_parameters`` name the
    gradients), ``model`` what training calls (the FSDP2 root, or the DDP wrapper)."""
    torch.manual_seed(0)
    net = Net()
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in net.blocks:
            fully_shard(block)
        fully_shard(net)
        return net, net
    return net, nn.parallel.DistributedDataParallel(net)


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(BATCH, SEQ, DIM, generator=g), torch.randn(BATCH, SEQ, DIM, generator=g)


def is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


# -- what forward saves --------------------------------------------------------------------
class Spy:
    """A saved-tensor hook (baseline run only) plus forward pre-hooks that remember the
    storages of the parameters the modules hold while they run: under FSDP2 those are the
    unsharded parameters (FSDP2's own pre-forward hook is prepended, so it has run)."""

    def __init__(self, net: nn.Module) -> None:
        self.param_storages: list = []  # strong references: identity stays meaningful
        self.saved: list = []
        self.handles = [m.register_forward_pre_hook(self._pre) for m in net.modules()
                        if any(True for _ in m.parameters(recurse=False))]

    def _pre(self, module, args) -> None:
        for p in module.parameters():  # recurse: MultiheadAttention reads out_proj.weight itself
            if not is_dtensor(p):
                self.param_storages.append(p.untyped_storage())

    def _pack(self, t: torch.Tensor):
        # The size now: FSDP2 frees (resize_(0)) its unsharded parameters after the block.
        self.saved.append((t, t.untyped_storage().nbytes()))
        return t

    def context(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def end_forward(self) -> dict:
        """Classify what this forward saved; forget it for the next step."""
        params = {id(s) for s in self.param_storages}
        seen, rows, expect_n, expect_bytes = set(), [], 0, 0
        for t, nbytes in self.saved:
            storage = t.untyped_storage()
            kind = "param" if (isinstance(t, nn.Parameter) or id(storage) in params) else "activation"
            rows.append({"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                         "storage_bytes": nbytes, "storage_bytes_after_forward": storage.nbytes(), "kind": kind,
                         "is_parameter": isinstance(t, nn.Parameter), "leaf": t.is_leaf,
                         "view_of_parameter": isinstance(t._base, nn.Parameter),
                         "type": type(t).__name__})
            if kind == "activation" and nbytes >= MIN_OFFLOAD_BYTES and id(storage) not in seen:
                seen.add(id(storage))
                expect_n += 1
                expect_bytes += nbytes
        self.saved.clear()
        self.param_storages.clear()
        return {"tensors": expect_n, "bytes": expect_bytes, "saved": rows}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# -- spill-file scan -----------------------------------------------------------------------
def needles(net: nn.Module) -> dict:
    """name -> bytes of each full (unsharded) parameter. Collective under FSDP2 (every rank
    calls it at the same point). Constant tensors (LayerNorm's initial ones and zeros) are
    left out: their bytes are not specific to them."""
    out = {}
    for name, p in net.named_parameters():
        full = p.full_tensor() if is_dtensor(p) else p
        full = full.detach().contiguous()
        if full.numel() >= 16 and torch.unique(full).numel() >= 4:
            out[name] = full.numpy().tobytes()
    return out


def scan(off: ssdoffload.Offloader, wanted: dict) -> dict:
    data = b""
    for path in off.spill_files:
        with open(path, "rb") as fh:
            data += fh.read()
    return {"found": sorted(name for name, b in wanted.items() if data.find(b) >= 0),
            "files": len(off.spill_files), "bytes": len(data)}


# -- training ------------------------------------------------------------------------------
def train(mode: str, rank: int, phase: str, spill: str = "", budget: int = 0) -> dict:
    net, model = build(mode)
    torch.manual_seed(100 + rank)  # dropout: same masks in every phase, different per rank
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    spy = Spy(net) if phase == "plain" else None
    off = None
    if phase == "offload":
        off = ssdoffload.Offloader(model, ssdoffload.OffloadConfig(
            path=os.path.join(spill, "{rank}"), min_offload_bytes=MIN_OFFLOAD_BYTES, policy="all",
            initial_file_bytes=1 << 20, io_threads=2, prefetch_depth=2))
    elif phase == "budget":
        os.makedirs(os.path.join(spill, "budget"), exist_ok=True)
        off = ssdoffload.Offloader(model, ssdoffload.OffloadConfig(
            path=os.path.join(spill, "budget", "{rank}"), min_offload_bytes=MIN_OFFLOAD_BYTES,
            memory_budget=budget, initial_file_bytes=1 << 20))
    out = {"losses": [], "grads": [], "expected": [], "stats": [], "scans": [], "peaks": []}
    t0 = time.perf_counter()
    try:
        for step in range(STEPS):
            x, y = batch(rank, step)
            wanted = needles(net) if phase == "offload" else {}
            if phase == "offload":
                wanted["<input batch>"] = x.numpy().tobytes()
            meter = ActivationMeter(net) if phase in ("measured", "budget") else None
            if meter is not None:
                meter.skip_parameters_held_by(net)
            with meter.measuring() if meter is not None else contextlib.nullcontext(), \
                    off.step() if off is not None else contextlib.nullcontext(), \
                    meter.saving() if meter is not None else contextlib.nullcontext():
                with spy.context() if spy is not None else contextlib.nullcontext():
                    loss = F.mse_loss(model(x), y)
                if spy is not None:
                    out["expected"].append(spy.end_forward())
                if phase == "offload":
                    off.wait()  # every write started by this forward has finished
                    out["scans"].append(scan(off, wanted))
                    out["spill_files"] = off.spill_files
                loss.backward()
            if meter is not None:
                meter.close()
                out["peaks"].append(meter.peak)
            if off is not None:
                out["stats"].append(off.last_step_stats().as_dict())
            out["losses"].append(loss.detach().clone())
            out["grads"].append({n: local(p.grad).detach().clone() for n, p in net.named_parameters()
                                 if p.grad is not None})
            opt.step()
            opt.zero_grad(set_to_none=True)
        if off is not None:
            out["total"] = off.stats().as_dict()
            out["paths"] = off.paths
        if phase == "budget":
            plan = off.plan()
            out["plan"] = {"placement": list(plan.placement), "describe": plan.describe()} if plan else None
    finally:
        if spy is not None:
            spy.remove()
        if off is not None:
            off.close()
    out["seconds"] = time.perf_counter() - t0
    if off is not None:
        # This rank's directory only: the other rank may not have closed yet.
        out["leftovers"] = sorted(os.path.join(r, f) for d in off.paths for r, _, fs in os.walk(d) for f in fs)
    return out


def compare(a: dict, b: dict) -> list:
    """Every loss / gradient that is not bit-identical, as readable lines ([] when equal)."""
    bad = []
    for step, (la, lb) in enumerate(zip(a["losses"], b["losses"])):
        if not torch.equal(la, lb):
            bad.append(f"step {step}: loss {la.item()!r} vs {lb.item()!r}")
    for step, (ga, gb) in enumerate(zip(a["grads"], b["grads"])):
        if sorted(ga) != sorted(gb):
            bad.append(f"step {step}: gradients of different parameters: {sorted(set(ga) ^ set(gb))}")
        for name in sorted(set(ga) & set(gb)):
            x, y = ga[name], gb[name]
            if x.shape != y.shape:
                bad.append(f"step {step}: grad {name} shape {tuple(x.shape)} vs {tuple(y.shape)}")
            elif not torch.equal(x, y):
                bad.append(f"step {step}: grad {name} {tuple(x.shape)} differs, max abs diff "
                           f"{(x - y).abs().max().item():.3g}")
    if len(a["losses"]) != len(b["losses"]):
        bad.append(f"{len(a['losses'])} vs {len(b['losses'])} steps")
    return bad


def summary(run: dict) -> dict:
    return {k: v for k, v in run.items() if k not in ("losses", "grads")} | {
        "losses": [float(l.item()).hex() for l in run["losses"]],
        "grad_shapes": {n: list(g.shape) for n, g in run["grads"][0].items()} if run["grads"] else {}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True, choices=["fsdp2", "ddp"])
    ap.add_argument("--spill", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    # A rank stuck in a collective (its peer died) gives up instead of waiting 30 minutes.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    report: dict = {"rank": rank, "world": world, "mode": a.mode, "torch": torch.__version__}
    path = os.path.join(a.out, f"{a.mode}-rank{rank}.json")

    def save() -> None:
        with open(path + ".tmp", "w") as fh:
            json.dump(report, fh, indent=1)
        os.replace(path + ".tmp", path)

    runs = {}
    try:
        for phase in ("plain", "plain2", "offload", "measured", "budget"):
            report["phase"] = phase
            save()
            spill = os.path.join(a.spill, a.mode)
            os.makedirs(spill, exist_ok=True)
            budget = 0
            if phase == "budget":
                budget = report["memory_budget"] = int(BUDGET_FRACTION * max(runs["measured"]["peaks"]))
            runs[phase] = train(a.mode, rank, phase, spill, budget)
            report[phase] = summary(runs[phase])
            if phase == "plain2":
                report["plain_deterministic"] = compare(runs["plain"], runs["plain2"])
            if phase == "offload":
                report["offload_vs_plain"] = compare(runs["plain"], runs["offload"])
            if phase == "budget":
                report["budget_vs_plain"] = compare(runs["plain"], runs["budget"])
        report["phase"] = "done"
    except BaseException:
        report["error"] = traceback.format_exc()
        save()
        sys.stdout.flush()
        sys.stderr.flush()
        # No barrier: a peer may be stuck in a collective; the launcher ends it when we exit.
        os._exit(1)
    save()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
