"""What a model asks of the drive: offloadable activation bytes per step, forward and backward
time with everything kept, and so the bandwidth that hides all of the I/O behind compute
(writes within forward, reads within backward)."""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch

from .memory import PeakRSS
from ..models.gpt import GPT, synthetic_batch
from .presets import Preset
from .steps import memory_pass, run_step
from .strategies import Strategy


@dataclass
class Demand:
    preset: str
    micro_batch: int
    activation_bytes: int
    offloadable_bytes: int
    forward_seconds: float
    backward_seconds: float

    @property
    def write_bytes_per_s(self) -> float:
        return self.offloadable_bytes / self.forward_seconds

    @property
    def read_bytes_per_s(self) -> float:
        return self.offloadable_bytes / self.backward_seconds

    def movable_fraction(self, write_bps: float, read_bps: float) -> float:
        """Share of the offloadable bytes a drive of these bandwidths can move in the step."""
        if not self.offloadable_bytes:
            return 1.0
        return min(1.0, write_bps * self.forward_seconds / self.offloadable_bytes,
                   read_bps * self.backward_seconds / self.offloadable_bytes)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(write_bytes_per_s=self.write_bytes_per_s, read_bytes_per_s=self.read_bytes_per_s)
        return d


def measure_demand(preset: Preset, device: torch.device, seed: int = 0, steps: int = 2) -> Demand:
    """Keep everything for 1 + ``steps`` steps; the median forward/backward times of the last."""
    torch.manual_seed(seed)
    with torch.device(device):
        state = GPT(preset.model).state_dict()
    strategy = Strategy("keep", preset.model, state, device)
    del state
    try:
        batch = synthetic_batch(preset.model, preset.micro_batch, device, seed=seed)
        mem = memory_pass(strategy, batch, seed, preset.dtype, preset.min_offload_bytes)
        rss = PeakRSS()
        recs = [run_step(strategy, batch, seed + i, i, preset.dtype, rss) for i in range(1 + steps)][1:]
    finally:
        strategy.close()
    return Demand(preset=preset.name, micro_batch=preset.micro_batch, activation_bytes=mem.total_bytes,
                  offloadable_bytes=mem.offloadable_bytes,
                  forward_seconds=statistics.median(r.forward_seconds for r in recs),
                  backward_seconds=statistics.median(r.backward_seconds for r in recs))


def analytic_demand(preset: Preset, tflops: float) -> Demand:
    """The demand computed from the model's shape (``planner.spec_profile``: the activation
    model counts saved tensors per layer, compute time from FLOPs at ``tflops``) instead of
    running it: for a GPU preset asked about on a host that cannot run it (``probe --preset
    gpu-1b`` on a CPU built a 1.1 B model and died of memory)."""
    from ..planner import ModelSpec, spec_profile

    m = preset.model
    dtype = "bf16" if preset.dtype == "bfloat16" else "fp32"
    spec = ModelSpec(layers=m.layers, hidden=m.hidden, heads=m.heads, seq=m.seq, vocab=m.vocab,
                     dtype=dtype, autocast=preset.dtype == "bfloat16", dropout=m.dropout > 0,
                     mlp_ratio=m.mlp_ratio, pp=1, schedule="no_pipelining")
    prof = spec_profile(spec, tflops=tflops)
    b = preset.micro_batch
    total = (sum(prof.layer_bytes) + prof.other_bytes) * b
    return Demand(preset=preset.name, micro_batch=b, activation_bytes=int(total),
                  offloadable_bytes=int(total - prof.small_bytes * b),
                  forward_seconds=prof.forward_seconds * b, backward_seconds=prof.backward_seconds * b)

