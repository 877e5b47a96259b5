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

Modules: ``spec`` (the activation model of a described GPT), ``profile`` (per-sample figures
of a stage, described or measured), ``drive`` (the drive's figures and a quick probe),
``solve`` (the plan), ``cli`` (``python -m ssdoffload plan``).
"""
from .cli import build_parser, main
from .drive import Drive, probe_drive
from .profile import Profile, measure_saved_bytes, profile_benchmark_gpt, profile_step, spec_profile
from .solve import Option, Plan, plan
from .spec import DTYPE_BYTES, SCHEDULES, STRATEGIES, ModelSpec, layer_bytes, other_bytes

__all__ = ["DTYPE_BYTES", "SCHEDULES", "STRATEGIES", "Drive", "ModelSpec", "Option", "Plan", "Profile",
           "build_parser", "layer_bytes", "main", "measure_saved_bytes", "other_bytes", "plan",
           "probe_drive", "profile_benchmark_gpt", "profile_step", "spec_profile"]
