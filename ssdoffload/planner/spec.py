"""What a model saves for backward, computed from its description (``ModelSpec``;
the activation model is described in the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict



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
