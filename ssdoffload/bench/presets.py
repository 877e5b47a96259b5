"""Named benchmark set-ups: a model size, a micro-batch, step counts and offload settings.

``cpu-small`` (the default without a GPU) is sized so that the whole five-strategy comparison
finishes in well under two minutes on a 2-core CPU *and* the drive can hide the I/O: on a CPU
the forward produces activations slowly, so the compute-to-bytes ratio is what decides. The
``gpu-*`` presets are for one large GPU (tens of GB): ``gpu-wide`` is the SSDTrain-style case
(large hidden size, few layers) where a drive has the best chance to hide full offload,
``gpu-1b`` a ~1B-parameter GPT at sequence 2048.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict

from ..models.gpt import GPTConfig


@dataclass(frozen=True)
class Preset:
    """One benchmark set-up. Every field can be overridden from the command line."""

    name: str
    description: str
    model: GPTConfig
    micro_batch: int
    steps: int
    warmup: int
    dtype: str = "float32"  # "float32" or "bfloat16" (autocast)
    min_offload_bytes: int = 256 * 1024
    prefetch_depth: int = 1
    io_threads: int = 4
    for_device: str = "cpu"

    def tokens_per_step(self) -> int:
        return self.micro_batch * self.model.seq

    def replace(self, **changes) -> "Preset":
        model_fields = {f.name for f in dataclasses.fields(GPTConfig)}
        model_changes = {k: v for k, v in changes.items() if k in model_fields and v is not None}
        other = {k: v for k, v in changes.items() if k not in model_fields and v is not None}
        model = dataclasses.replace(self.model, **model_changes) if model_changes else self.model
        return dataclasses.replace(self, model=model, **other)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.as_dict()
        return d


PRESETS: Dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny", "4 small layers; for tests and smoke runs (seconds)",
               GPTConfig(vocab=256, seq=64, hidden=64, heads=4, layers=4, dropout=0.1),
               micro_batch=4, steps=3, warmup=1, min_offload_bytes=16 * 1024, io_threads=2),
        # Tuned on a 2-core VM (ext4 on virtio, ~1.2 GB/s write): the cost of ssdoffload on a CPU
        # is host work per saved tensor, so a wider, shallower model (more compute per tensor)
        # keeps it small; prefetch_depth=1 holds only two of the six layers in backward. The
        # untimed memory pass already grows the spill file, so one warm-up step is enough.
        Preset("cpu-small", "default without a GPU: 6 layers, hidden 512, seq 128, 21 M params; "
               "about a minute for all strategies on 2 cores",
               GPTConfig(vocab=2048, seq=128, hidden=512, heads=8, layers=6, dropout=0.1),
               micro_batch=4, steps=5, warmup=1, min_offload_bytes=256 * 1024, prefetch_depth=1,
               io_threads=4),
        Preset("gpu-wide", "SSDTrain-style: hidden 8192, 2 layers (~1.6 B params), seq 2048; the most compute per activation byte",
               GPTConfig(vocab=32000, seq=2048, hidden=8192, heads=64, layers=2, dropout=0.0),
               micro_batch=4, steps=8, warmup=3, dtype="bfloat16", min_offload_bytes=1 << 20,
               prefetch_depth=1, io_threads=8, for_device="cuda"),
        Preset("gpu-1b", "a ~1.1 B-parameter GPT: hidden 2048, 20 layers, seq 2048",
               GPTConfig(vocab=32000, seq=2048, hidden=2048, heads=16, layers=20, dropout=0.0),
               micro_batch=4, steps=8, warmup=3, dtype="bfloat16", min_offload_bytes=1 << 20,
               prefetch_depth=2, io_threads=8, for_device="cuda"),
        # Long context (issue 14): one sequence of 32K tokens, where a layer's activations are
        # large next to its compute and checkpoint-input offload to the SSD should hide.
        Preset("gpu-long", "long context: hidden 2048, 16 layers, seq 32768, micro-batch 1 (flash attention "
               "via SDPA); where recompute-with-inputs-on-the-SSD pays",
               GPTConfig(vocab=32000, seq=32768, hidden=2048, heads=16, layers=16, dropout=0.0),
               micro_batch=1, steps=6, warmup=2, dtype="bfloat16", min_offload_bytes=1 << 20,
               prefetch_depth=2, io_threads=8, for_device="cuda"),
        Preset("gpu-350m", "a ~350 M-parameter GPT: hidden 1024, 24 layers, seq 2048 (quick GPU check)",
               GPTConfig(vocab=32000, seq=2048, hidden=1024, heads=16, layers=24, dropout=0.0),
               micro_batch=4, steps=8, warmup=3, dtype="bfloat16", min_offload_bytes=1 << 20,
               prefetch_depth=2, io_threads=8, for_device="cuda"),
    )
}

DEFAULT_CPU = "cpu-small"
DEFAULT_GPU = "gpu-1b"


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``ValueError`` lists the valid names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def default_preset_name(device_type: str) -> str:
    return DEFAULT_GPU if device_type == "cuda" else DEFAULT_CPU


def parameter_count(cfg: GPTConfig) -> int:
    """Parameters of ``GPT(cfg)`` without building it."""
    h, f = cfg.hidden, cfg.mlp_ratio * cfg.hidden
    block = 2 * 2 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
    return cfg.vocab * h + cfg.seq * h + cfg.layers * block + 2 * h + h * cfg.vocab
