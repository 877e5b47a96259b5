"""Per-sample figures of one pipeline stage: from a description (``spec_profile``) or
measured with saved-tensor hooks on the user's own model (``profile_step``)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from .spec import ModelSpec, layer_bytes, other_bytes


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

    from ..layers import find_layers, in_backward
    from ..policy import Decision, decide, parameter_storages, storage_key

    layers = list(layers) if layers is not None else find_layers(model)
    index = {id(m): i for i, m in enumerate(layers)}
    current = ["other"]
    # The offloader's own rule (policy.decide) says what counts, and its storage key what is
    # the same storage: the planner and the runtime must agree on what would be offloaded.
    param_keys = parameter_storages([model])
    seen: Dict[tuple, tuple] = {}
    keep_alive = []

    def pack(t):
        if decide(t, param_keys, 0, in_backward()) is Decision.OFFLOAD:
            key = storage_key(t)
            if key is not None and key not in seen:
                st = t.untyped_storage()
                seen[key] = (current[0], st.nbytes())
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

    from ..layers import find_layers

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

    from ..models.gpt import GPT, GPTConfig, synthetic_batch

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
