"""The micro-batch planner: how far can the micro-batch grow, and what must the drives sustain?

``plan(...)`` (and ``python -m ssdoffload plan``) takes either a model description
(``ModelSpec``: layers, hidden, heads, sequence, vocabulary, dtype, flash attention, tensor-
and pipeline-parallel sizes, schedule) or a profiled step of the user's own model
(``profile_step``: bytes each layer saves, measured with saved-tensor hooks, and its compute
time), a memory budget, the drive's bandwidth and endurance, and returns a ``Plan`` (a table
with ``str(plan)``, JSON with ``plan.as_dict()``):

* activation bytes per micro-batch (per sample) and per layer, on every pipeline stage;
* for ``keep``, ``recompute`` (full, per layer), ``ssd`` (everything offloaded) and ``ssd+keep``
  (offload the share of layers the drive hides, keep the rest) the largest micro-batch that fits
  the budget with the schedule's micro-batches in flight (1F1B: ``pp - rank`` on rank
  ``rank``; no pipelining: 1);
* the write and read bandwidth that hides all I/O at that micro-batch, the expected stall when
  the drive is slower, and the share of activations the drive can take without a stall;
* the pipeline bubble fraction for the resulting number of micro-batches;
* terabytes written per day per drive and the drive's expected life.

The activation model (``layer_bytes``) counts what autograd saves, tensor by tensor, for a
pre-LayerNorm GPT block (the benchmark's GPT and Megatron's layers). In 16-bit with flash
attention, 1-byte dropout masks and no autocast it is Megatron's ``34·h`` bytes per token and
layer (``+5·a·s`` without flash attention); ``device="cpu"`` follows the CPU kernels (float
dropout masks, attention math in fp32 under autocast), which is what the tests measure.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import mmap
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

GB = 1e9
GiB = float(1 << 30)
TB = 1e12
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
SCHEDULES = ("1f1b", "no_pipelining")
STRATEGIES = ("keep", "recompute", "ssd", "ssd+keep")


# -- the model ---------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """A GPT-style decoder, as the planner sees it.

    ``dtype`` is the compute dtype; ``autocast`` means 16-bit matmuls over an fp32 residual
    stream (``torch.autocast``), as opposed to a model held in 16-bit (Megatron ``--bf16``).
    ``device`` picks the kernels' conventions: "cuda" (bool dropout masks; attention in the
    compute dtype) or "cpu" (dropout masks in the input's dtype; attention math in fp32 under
    autocast). ``seq`` is the sequence length; ``mlp_ratio`` the MLP width over ``hidden``.
    """

    layers: int
    hidden: int
    heads: int
    seq: int
    vocab: int
    dtype: str = "bf16"
    flash: bool = True
    tp: int = 1
    pp: int = 1
    schedule: str = "1f1b"
    sequence_parallel: bool = False
    dropout: bool = True
    autocast: bool = False
    mlp_ratio: int = 4
    device: str = "cuda"

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "seq", "vocab", "tp", "pp", "mlp_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelSpec.{name}={v!r} must be a positive integer")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"ModelSpec.dtype={self.dtype!r} is not one of fp32, bf16, fp16")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"ModelSpec.schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.hidden % self.heads:
            raise ValueError(f"ModelSpec.hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.layers % self.pp:
            raise ValueError(f"ModelSpec.layers={self.layers} is not divisible by pp={self.pp}")
        if self.heads % self.tp:
            raise ValueError(f"ModelSpec.heads={self.heads} is not divisible by tp={self.tp}")
        if self.pp > 1 and self.schedule == "no_pipelining":
            raise ValueError("schedule 'no_pipelining' needs pp=1")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"ModelSpec.device={self.device!r} must be 'cuda' or 'cpu'")

    @property
    def e(self) -> int:
        """Bytes of one element in the compute dtype."""
        return DTYPE_BYTES[self.dtype]

    @property
    def r(self) -> int:
        """Bytes of one element of the residual stream (fp32 under autocast)."""
        return 4 if self.autocast else self.e

    def mask(self, input_bytes: int) -> int:
        """Bytes per element of a dropout mask over a tensor of ``input_bytes`` elements."""
        if not self.dropout:
            return 0
        return 1 if self.device == "cuda" else input_bytes

    @property
    def params_per_layer(self) -> int:
        h = self.hidden
        return (4 + 2 * self.mlp_ratio) * h * h + (9 + self.mlp_ratio) * h

    @property
    def params(self) -> int:
        return self.layers * self.params_per_layer + (self.vocab + self.seq) * self.hidden + self.vocab * self.hidden


def layer_bytes(spec: ModelSpec, micro_batch: int = 1) -> Dict[str, float]:
    """Bytes one transformer layer saves for backward, per rank, by component.

    Tensor parallelism divides what lives inside attention and MLP by ``tp`` (everything with
    sequence parallelism); LayerNorm statistics are fp32 per token.
    """
    b, s, h, a, e, r = micro_batch, spec.seq, spec.hidden, spec.heads, spec.e, spec.r
    t = spec.tp
    rep = t if spec.sequence_parallel else 1  # the part replicated across TP ranks without SP
    tok = b * s
    f = spec.mlp_ratio
    att_e = 4 if (spec.autocast and spec.device == "cpu") else e
    out = {
        "layernorm inputs": 2 * tok * h * r / rep,
        "layernorm stats": 2 * 2 * tok * 4 / rep,
        "qkv input": tok * h * e / rep,
        "mlp input": tok * h * e / rep,
        "dropout masks": 2 * tok * h * spec.mask(e) / rep,
        "attention out (proj input)": tok * h * e / t,
        "mlp hidden (gelu in+out)": 2 * f * tok * h * e / t,
    }
    if spec.flash:
        out["q, k, v"] = 3 * tok * h * e / t
        out["softmax stats"] = tok * a * 4 / t
    else:
        out["q, k, v"] = 3 * tok * h * att_e / t
        probs = b * a * s * s / t
        out["attention matrix"] = probs * att_e * (2 if spec.dropout else 1) + probs * spec.mask(att_e)
    return out


def other_bytes(spec: ModelSpec, micro_batch: int, first: bool, last: bool) -> float:
    """Bytes saved outside the layers: embedding dropout on the first stage; final LayerNorm,
    output layer and fp32 log-softmax (cross entropy) on the last."""
    tok, h = micro_batch * spec.seq, spec.hidden
    total = 0.0
    if first:
        total += tok * h * spec.mask(spec.r) + 3 * tok * 8  # mask, tokens, targets, positions
    if last:
        total += tok * h * spec.r + 2 * tok * 4  # final LayerNorm input and stats
        total += tok * h * spec.e + tok * spec.vocab * 4 / spec.tp  # head input, log-softmax
    return total


# -- a measured profile ---------------------------------------------------------------------
@dataclass
class Profile:
    """Per-sample figures of one stage, measured (``profile_step``) or computed from a spec."""

    layer_bytes: List[float]          # bytes each layer saves, per sample
    other_bytes: float                # bytes saved outside the layers, per sample
    layer_input_bytes: float          # bytes of one layer's input, per sample (recompute keeps it)
    forward_seconds: float            # forward time per sample of the whole stage
    backward_seconds: float           # backward time per sample of the whole stage
    small_bytes: float = 0.0          # saved tensors too small to offload, per sample
    source: str = "model"
    detail: Dict[str, float] = field(default_factory=dict)  # per-component bytes of one layer


def spec_profile(spec: ModelSpec, rank: int = 0, tflops: float = 400.0) -> Profile:
    """The per-sample profile of pipeline rank ``rank`` computed from ``spec``.

    Compute time: 2 FLOPs per parameter and token plus the attention products forward
    (backward twice that), at ``tflops`` achieved TFLOP/s per GPU.
    """
    n = spec.layers // spec.pp
    detail = layer_bytes(spec, 1)
    per_layer = sum(detail.values())
    first, last = rank == 0, rank == spec.pp - 1
    s, h = spec.seq, spec.hidden
    layer_flops = (2 * spec.params_per_layer * s + 4 * s * s * h) / spec.tp
    flops = n * layer_flops + (2 * spec.vocab * h * s / spec.tp if last else 0)
    fwd = flops / (tflops * 1e12)
    small = n * (detail["layernorm stats"] + detail.get("softmax stats", 0.0))
    return Profile(layer_bytes=[per_layer] * n, other_bytes=other_bytes(spec, 1, first, last),
                   layer_input_bytes=s * h * spec.r / (spec.tp if spec.sequence_parallel else 1),
                   forward_seconds=fwd, backward_seconds=2 * fwd, small_bytes=small,
                   source=f"model description (rank {rank})", detail=detail)


def measure_saved_bytes(model, run: Callable[[], Any], layers: Optional[Sequence] = None,
                        min_bytes: int = 0) -> Dict[str, Any]:
    """Bytes autograd saves during ``run()`` (a forward), by layer: unique storages only,
    parameters, their views and autocast copies excluded (what ssdoffload would offload)."""
    import torch

    from .layers import find_layers

    layers = list(layers) if layers is not None else find_layers(model)
    index = {id(m): i for i, m in enumerate(layers)}
    current = ["other"]
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_ptrs |= {bf.untyped_storage().data_ptr() for bf in model.buffers()}
    seen: Dict[int, tuple] = {}
    keep_alive = []

    def is_param_copy(t) -> bool:
        fn = t.grad_fn
        for _ in range(3):  # a view (t(), view) of a cast (ToCopyBackward) of a parameter
            if fn is None:
                return False
            if type(fn).__name__.startswith("ToCopyBackward"):
                return any(type(nf).__name__ == "AccumulateGrad" for nf, _ in fn.next_functions if nf is not None)
            nexts = [nf for nf, _ in fn.next_functions if nf is not None]
            if len(nexts) != 1:
                return False
            fn = nexts[0]
        return False

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in param_ptrs or isinstance(t, torch.nn.Parameter) or is_param_copy(t):
            return t
        if ptr not in seen:
            seen[ptr] = (current[0], st.nbytes())
            keep_alive.append(st)  # a freed storage's address may be reused: keep it for the count
        return t

    handles = []
    for m in layers:
        handles.append(m.register_forward_pre_hook(lambda mod, args: current.__setitem__(0, index[id(mod)])))
        handles.append(m.register_forward_hook(lambda mod, args, out: current.__setitem__(0, "other")))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = run()
    finally:
        for hd in handles:
            hd.remove()
    per_layer = [0] * len(layers)
    other = small = 0
    for where, nbytes in seen.values():
        if nbytes < min_bytes:
            small += nbytes
        if where == "other":
            other += nbytes
        else:
            per_layer[where] += nbytes
    return {"layers": per_layer, "other": other, "small": small, "total": sum(per_layer) + other,
            "result": result}


def profile_step(model, step: Callable[[], Any], micro_batch: int, layers: Optional[Sequence] = None,
                 warmup: int = 1, min_offload_bytes: int = 256 * 1024) -> Profile:
    """Profile one training step of the user's own model.

    ``step()`` runs the forward and returns the loss (this function runs its backward);
    ``micro_batch`` is the number of samples in it. Measures the bytes each layer saves
    (saved-tensor hooks, unique storages, parameters excluded), each layer's forward time and
    the backward time; returns them per sample.
    """
    import torch

    from .layers import find_layers

    layers = list(layers) if layers is not None else find_layers(model)
    cuda = any(p.is_cuda for p in model.parameters())

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step().backward()
        model.zero_grad(set_to_none=True)
    starts: Dict[int, float] = {}
    times = [0.0] * len(layers)
    first_input: List[int] = []
    hooks = []
    for i, m in enumerate(layers):
        def pre(mod, args, i=i):
            if i == 0 and not first_input:  # what full recomputation keeps of each layer
                first_input.append(sum(a.untyped_storage().nbytes() for a in args
                                       if isinstance(a, torch.Tensor)))
            sync()
            starts[i] = time.perf_counter()

        def post(mod, args, out, i=i):
            sync()
            times[i] += time.perf_counter() - starts[i]
        hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        sync()
        t0 = time.perf_counter()
        measured = measure_saved_bytes(model, step, layers, min_offload_bytes)
        sync()
        t1 = time.perf_counter()
    finally:
        for hd in hooks:
            hd.remove()
    measured["result"].backward()
    sync()
    t2 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    layer_in = float(first_input[0]) if first_input else 0.0
    mb = float(micro_batch)
    return Profile(layer_bytes=[b / mb for b in measured["layers"]], other_bytes=measured["other"] / mb,
                   layer_input_bytes=layer_in / mb, forward_seconds=(t1 - t0) / mb,
                   backward_seconds=(t2 - t1) / mb, small_bytes=measured["small"] / mb,
                   source=f"profiled step (micro-batch {micro_batch}, {'cuda' if cuda else 'cpu'})")


def profile_benchmark_gpt(spec: ModelSpec, micro_batch: int = 2, device: str = "cpu") -> Profile:
    """Profile the benchmark's GPT built from ``spec`` (one stage, fp32 or bf16 autocast)."""
    import torch

    from .bench.model import GPT, GPTConfig, synthetic_batch

    cfg = GPTConfig(vocab=spec.vocab, seq=spec.seq, hidden=spec.hidden, heads=spec.heads,
                    layers=spec.layers, dropout=0.1 if spec.dropout else 0.0, mlp_ratio=spec.mlp_ratio)
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    tokens, targets = synthetic_batch(cfg, micro_batch, torch.device(device), 0)
    amp = spec.e == 2

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16 if spec.dtype in ("bf16", "bfloat16") else torch.float16,
                            enabled=amp):
            return model(tokens, targets)
    return profile_step(model, step, micro_batch)


# -- the plan ---------------------------------------------------------------------------------
@dataclass
class Drive:
    """The spill drive(s) of one GPU: bandwidth in GB/s, endurance in TB written."""

    write_gbps: float = 3.0
    read_gbps: float = 6.0
    tbw: Optional[float] = None          # rated terabytes written
    dwpd: Optional[float] = None         # or drive writes per day over the warranty ...
    capacity_tb: Optional[float] = None  # ... of this capacity
    warranty_years: float = 5.0
    gpus_per_drive: float = 1.0
    source: str = "assumed"

    @property
    def endurance_tb(self) -> Optional[float]:
        if self.tbw is not None:
            return self.tbw
        if self.dwpd is not None and self.capacity_tb is not None:
            return self.dwpd * self.capacity_tb * 365 * self.warranty_years
        return None


@dataclass
class Option:
    strategy: str
    micro_batch: int
    memory_bytes: float
    num_microbatches: Optional[int]
    bubble: Optional[float]
    step_seconds: Optional[float]
    write_gbps_needed: float = 0.0
    read_gbps_needed: float = 0.0
    stall_seconds_per_step: float = 0.0
    hidden_fraction: float = 1.0
    tb_per_day: float = 0.0
    drive_life_days: Optional[float] = None
    note: str = ""


@dataclass
class Plan:
    inputs: Dict[str, Any]
    profile: Profile
    in_flight: int
    activation_bytes_per_sample: float
    layer_bytes_per_sample: List[float]
    options: List[Option]
    ranks: List[Dict[str, Any]]

    def as_dict(self) -> Dict[str, Any]:
        return {
            "inputs": self.inputs,
            "profile": dataclasses.asdict(self.profile),
            "in_flight_microbatches": self.in_flight,
            "activation_bytes_per_sample": self.activation_bytes_per_sample,
            "layer_bytes_per_sample": self.layer_bytes_per_sample,
            "options": [dataclasses.asdict(o) for o in self.options],
            "ranks": self.ranks,
        }

    def option(self, strategy: str) -> Option:
        return next(o for o in self.options if o.strategy == strategy)

    def __str__(self) -> str:
        p = self.profile
        mib = 1 / (1 << 20)
        lines = [f"ssdoffload plan ({p.source}; binding stage: rank {self.inputs['rank']}, "
                 f"{self.in_flight} micro-batch(es) in flight)",
                 f"  activations per sample: {self.activation_bytes_per_sample * mib:,.1f} MiB "
                 f"({len(self.layer_bytes_per_sample)} layers x "
                 f"{(self.layer_bytes_per_sample[0] if self.layer_bytes_per_sample else 0) * mib:,.2f} MiB"
                 f" + {p.other_bytes * mib:,.2f} MiB outside the layers)",
                 f"  memory budget for activations: {self.inputs['budget_bytes'] / GiB:,.2f} GiB; "
                 f"drive {self.inputs['drive']['write_gbps']:.2f} GB/s write, "
                 f"{self.inputs['drive']['read_gbps']:.2f} GB/s read ({self.inputs['drive']['source']})",
                 ""]
        head = (f"{'strategy':<10}{'micro-batch':>12}{'act. mem GiB':>13}{'#mb':>5}{'bubble':>8}"
                f"{'step s':>9}{'write GB/s':>11}{'read GB/s':>10}{'stall s':>9}{'hidden':>8}"
                f"{'TB/day':>8}{'life (y)':>9}")
        lines += [head, "-" * len(head)]
        for o in self.options:
            def f(v, fmt):
                return format(v, fmt) if v is not None else "-"
            life = o.drive_life_days / 365 if o.drive_life_days is not None else None
            ssd = o.strategy.startswith("ssd")
            lines.append(
                f"{o.strategy:<10}{o.micro_batch:>12}{o.memory_bytes / GiB:>13.2f}"
                f"{f(o.num_microbatches, 'd'):>5}{f(o.bubble, '.1%'):>8}{f(o.step_seconds, '.3f'):>9}"
                f"{(f(o.write_gbps_needed, '.2f') if ssd else '-'):>11}"
                f"{(f(o.read_gbps_needed, '.2f') if ssd else '-'):>10}"
                f"{(f(o.stall_seconds_per_step, '.3f') if ssd else '-'):>9}"
                f"{(f(o.hidden_fraction, '.0%') if ssd else '-'):>8}"
                f"{(f(o.tb_per_day, '.1f') if ssd else '-'):>8}{(f(life, '.1f') if ssd else '-'):>9}")
        for o in self.options:
            if o.note:
                lines.append(f"  {o.strategy}: {o.note}")
        return "\n".join(lines)


def _fit(fixed: float, per_sample: float, budget: float, limit: int = 1 << 20) -> int:
    if per_sample <= 0:
        return limit
    return max(0, min(limit, int(math.floor((budget - fixed) / per_sample + 1e-9))))


def plan(spec: Optional[ModelSpec] = None, *, profile: Optional[Profile] = None,
         budget_gib: Optional[float] = None, gpu_memory_gib: Optional[float] = None,
         bytes_per_param: float = 18.0, reserve_gib: float = 2.0, drive: Optional[Drive] = None,
         global_batch: Optional[int] = None, dp: int = 1, num_microbatches: Optional[int] = None,
         rank: Optional[int] = None, prefetch_depth: int = 2, tflops: float = 400.0,
         pp: Optional[int] = None, schedule: Optional[str] = None) -> Plan:
    """Plan the micro-batch for ``keep``, ``recompute`` and ``ssd``.

    Args:
        spec: a ``ModelSpec`` (the analytic model); or ``profile``: a measured ``Profile`` of
            one stage (``profile_step``), with ``pp``/``schedule``/``rank`` saying where it runs.
        budget_gib: GPU memory for activations; or ``gpu_memory_gib``, from which the model
            state (``bytes_per_param`` per parameter of the stage: 18 for bf16 + Adam) and
            ``reserve_gib`` are taken off.
        drive: the spill drive(s) of one GPU (bandwidth, endurance).
        global_batch, dp: sequences per step and data-parallel size: the number of micro-batches
            (and the pipeline bubble) follows from the micro-batch. Or a fixed ``num_microbatches``.
        rank: the pipeline rank to plan for; default: every rank, and the tightest one binds.
        prefetch_depth: layers read ahead in backward (what ``ssd`` keeps resident).
        tflops: achieved TFLOP/s per GPU for the compute-time model (spec only).
    """
    drive = drive or Drive()
    if spec is None and profile is None:
        raise ValueError("give a ModelSpec (spec=...) or a measured profile (profile=...)")
    if global_batch is not None and (dp < 1 or global_batch < dp or global_batch % dp):
        raise ValueError(f"global_batch={global_batch} must be a positive multiple of dp={dp} "
                         "(each data-parallel replica runs the same number of sequences)")
    pp = spec.pp if spec is not None else (pp or 1)
    schedule = spec.schedule if spec is not None else (schedule or ("1f1b" if pp > 1 else "no_pipelining"))
    ranks = [rank] if rank is not None else list(range(pp))
    results = []
    for r in ranks:
        prof = spec_profile(spec, r, tflops) if spec is not None else profile
        flight = (pp - r) if schedule == "1f1b" else 1
        if budget_gib is not None:
            budget = budget_gib * GiB
        elif gpu_memory_gib is not None:
            if spec is None:
                raise ValueError("gpu_memory_gib needs a ModelSpec (for the model state); give budget_gib")
            stage_params = spec.params_per_layer * spec.layers / spec.pp / spec.tp
            if r == 0:
                stage_params += (spec.vocab + spec.seq) * spec.hidden / spec.tp
            if r == pp - 1:
                stage_params += spec.vocab * spec.hidden / spec.tp
            budget = gpu_memory_gib * GiB - stage_params * bytes_per_param - reserve_gib * GiB
        else:
            raise ValueError("give a memory budget: budget_gib (activations) or gpu_memory_gib")
        results.append(_plan_rank(prof, r, flight, budget, drive, global_batch, dp,
                                  num_microbatches, prefetch_depth, pp))
    # The micro-batch is one number for the whole pipeline: the tightest rank decides.
    binding = min(results, key=lambda res: res["options"][0].micro_batch)
    options = [min((res["options"][i] for res in results), key=lambda o: o.micro_batch)
               for i in range(len(STRATEGIES))]
    inputs = {
        "spec": dataclasses.asdict(spec) if spec is not None else None,
        "budget_bytes": binding["budget"], "drive": dataclasses.asdict(drive),
        "drive_endurance_tb": drive.endurance_tb, "global_batch": global_batch, "dp": dp,
        "num_microbatches": num_microbatches, "rank": binding["rank"], "pp": pp,
        "schedule": schedule, "prefetch_depth": prefetch_depth, "tflops": tflops,
    }
    prof = binding["profile"]
    return Plan(inputs=inputs, profile=prof, in_flight=binding["in_flight"],
                activation_bytes_per_sample=sum(prof.layer_bytes) + prof.other_bytes,
                layer_bytes_per_sample=list(prof.layer_bytes), options=options,
                ranks=[{"rank": res["rank"], "in_flight": res["in_flight"], "budget_bytes": res["budget"],
                        "activation_bytes_per_sample": sum(res["profile"].layer_bytes) + res["profile"].other_bytes,
                        "options": [dataclasses.asdict(o) for o in res["options"]]} for res in results])


def _plan_rank(prof: Profile, rank: int, flight: int, budget: float, drive: Drive,
               global_batch: Optional[int], dp: int, fixed_m: Optional[int], depth: int,
               pp: int) -> Dict[str, Any]:
    layers = prof.layer_bytes
    n = len(layers)
    act = sum(layers) + prof.other_bytes                  # per sample, one micro-batch
    biggest = max(layers) if layers else 0.0
    t_f, t_b = prof.forward_seconds, prof.backward_seconds
    written_per_sample = act - prof.small_bytes  # what the offloader writes (and reads back)
    # The share of the activations the drive moves within the compute: activations and compute
    # both grow linearly with the micro-batch, so this share does not depend on it.
    if written_per_sample > 0 and t_f > 0 and t_b > 0:
        share = min(1.0, drive.write_gbps * GB * t_f / written_per_sample,
                    drive.read_gbps * GB * t_b / written_per_sample)
    else:
        share = 1.0
    per_sample = {
        # everything for every micro-batch in flight
        "keep": flight * act,
        # layer inputs for the micro-batches in flight, one layer's activations while it is
        # recomputed, everything outside the layers
        "recompute": flight * (n * prof.layer_input_bytes + prof.other_bytes) + biggest,
        # in memory: the small tensors of every micro-batch in flight, the layers being written
        # (forward) or read ahead (backward), and what lies outside the layers of one micro-batch
        "ssd": flight * prof.small_bytes + (depth + 2) * biggest + prof.other_bytes,
        # offload only the share the drive hides, keep the other layers on the GPU: no stall
        "ssd+keep": (flight * (prof.small_bytes + (1 - share) * (sum(layers) - prof.small_bytes))
                     + min(depth + 2, share * n) * biggest + prof.other_bytes),
    }
    options = []
    for strategy in STRATEGIES:
        b = _fit(0.0, per_sample[strategy], budget)
        m = fixed_m
        if m is None and global_batch is not None and b > 0:
            # Micro-batch x count must be the per-replica batch: the largest micro-batch that
            # fits *and* divides it (29 x 3 is not a batch of 64).
            per_replica = global_batch // dp
            b = max(d for d in range(1, min(int(b), per_replica) + 1) if per_replica % d == 0)
            m = per_replica // b
        bubble = (pp - 1) / (m + pp - 1) if m else None
        compute = (t_f + t_b + (t_f if strategy == "recompute" else 0.0)) * b  # one micro-batch
        step = compute * m / (1 - bubble) if m and bubble is not None and bubble < 1 else None
        opt = Option(strategy=strategy, micro_batch=b, memory_bytes=per_sample[strategy] * b,
                     num_microbatches=m, bubble=bubble, step_seconds=step)
        if strategy.startswith("ssd") and b > 0:
            fraction = 1.0 if strategy == "ssd" else share
            written = written_per_sample * fraction * b       # per micro-batch
            opt.write_gbps_needed = written / (t_f * b) / GB if t_f > 0 else float("inf")
            opt.read_gbps_needed = written / (t_b * b) / GB if t_b > 0 else float("inf")
            w_time, r_time = written / (drive.write_gbps * GB), written / (drive.read_gbps * GB)
            stall_mb = max(0.0, w_time - t_f * b) + max(0.0, r_time - t_b * b)
            opt.hidden_fraction = share / fraction if fraction > 0 else 1.0
            if m:
                opt.stall_seconds_per_step = stall_mb * m
                if step is not None:
                    step += opt.stall_seconds_per_step
                    opt.step_seconds = step
                    opt.tb_per_day = written * m * (86400.0 / step) * drive.gpus_per_drive / TB
                    if drive.endurance_tb and opt.tb_per_day > 0:
                        opt.drive_life_days = drive.endurance_tb / opt.tb_per_day
            if strategy == "ssd" and share < 1.0:
                opt.note = (f"the drive hides {share:.0%} of the I/O (needs {opt.write_gbps_needed:.1f} GB/s "
                            f"write, {opt.read_gbps_needed:.1f} GB/s read); ssd+keep offloads that "
                            f"share of the layers and keeps the rest on the GPU")
        if b == 0:
            opt.note = "does not fit the budget even at micro-batch 1"
        options.append(opt)
    return {"rank": rank, "in_flight": flight, "budget": budget, "profile": prof, "options": options}


# -- a quick drive probe --------------------------------------------------------------------
def probe_drive(path: str, nbytes: int = 256 << 20, chunk: int = 4 << 20) -> Drive:
    """Measure sequential O_DIRECT write and read bandwidth of the drive holding ``path``."""
    os.makedirs(path, exist_ok=True)
    fd_tmp, name = tempfile.mkstemp(prefix=".ssdoffload-probe-", dir=path)
    os.close(fd_tmp)
    buf = mmap.mmap(-1, chunk)
    buf.write(os.urandom(chunk))
    flags = getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(name, os.O_WRONLY | flags)
        try:
            t0 = time.perf_counter()
            for off in range(0, nbytes, chunk):
                os.pwrite(fd, buf, off)
            os.fsync(fd)
            wt = time.perf_counter() - t0
        finally:
            os.close(fd)
        fd = os.open(name, os.O_RDONLY | flags)
        try:
            t0 = time.perf_counter()
            for off in range(0, nbytes, chunk):
                os.preadv(fd, [buf], off)
            rt = time.perf_counter() - t0
        finally:
            os.close(fd)
    finally:
        os.unlink(name)
        buf.close()
    return Drive(write_gbps=nbytes / wt / GB, read_gbps=nbytes / rt / GB,
                 source=f"probed {nbytes >> 20} MiB at {path}")


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
    text = json.dumps(result.as_dict(), indent=2, default=float)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    print(text if args.json else result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
