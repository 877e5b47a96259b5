"""Budget mode before a run: the per-layer plan ``memory_budget`` would pick, from a profile.

``layer_plan(profile, budget, drive, micro_batches)`` builds the groups budget mode sees (what
runs before the layers, each layer, what runs after; bytes and times scaled by the
micro-batch), asks the same solver (``ssdoffload.budget.solve``) for each candidate
micro-batch, and returns the largest that fits with its choices and predicted time per sample.
Candidates are the divisors of the sequences per replica when a global batch is given (every
micro-batch then runs the same size), else powers of two up to 1024.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..budget import BudgetGroup, Machine, solve
from .drive import Drive
from .profile import Profile


@dataclass
class LayerPlan:
    micro_batch: Optional[int]
    choices: Tuple[str, ...] = ()
    predicted_step_seconds: float = 0.0
    predicted_peak_bytes: int = 0
    seconds_per_sample: float = 0.0
    exact: bool = True
    tried: List[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"micro_batch": self.micro_batch, "choices": list(self.choices),
                "counts": dict(Counter(self.choices)), "predicted_step_seconds": self.predicted_step_seconds,
                "predicted_peak_bytes": self.predicted_peak_bytes, "seconds_per_sample": self.seconds_per_sample,
                "exact": self.exact, "tried": self.tried}

    def __str__(self) -> str:
        if self.micro_batch is None:
            return "budget mode: no micro-batch fits the budget (the largest layer alone is bigger)"
        layers = self.choices[1::2]
        counts = ", ".join(f"{n} x {c}" for c, n in Counter(layers).items())
        return (f"budget mode at micro-batch {self.micro_batch}: layers {counts}; predicted "
                f"{self.predicted_step_seconds:.3f} s per step ({self.seconds_per_sample * 1e3:.2f} ms per "
                f"sample), peak {self.predicted_peak_bytes / 2**30:.2f} GiB"
                f"{'' if self.exact else ' (grid solver: within its rounding of the optimum)'}\n"
                f"  per layer: {' '.join(c.replace('recompute', 'rc') for c in layers)}")


def groups_for(profile: Profile, micro_batch: int) -> List[BudgetGroup]:
    n = len(profile.layer_bytes)
    total = sum(profile.layer_bytes) or 1.0
    fwd, bwd = profile.forward_seconds * micro_batch, profile.backward_seconds * micro_batch
    half_other = int(profile.other_bytes * micro_batch / 2)
    groups = [BudgetGroup(saved_bytes=half_other, forward_seconds=0.0, backward_seconds=0.0, name="before the layers")]
    for i, b in enumerate(profile.layer_bytes):
        share = b / total
        f = fwd * share
        groups.append(BudgetGroup(saved_bytes=int(b * micro_batch), forward_seconds=f, backward_seconds=bwd * share,
                                  input_bytes=int(profile.layer_input_bytes * micro_batch), recompute_seconds=f,
                                  recomputable=True, name=f"layer {i}"))
        groups.append(BudgetGroup(saved_bytes=half_other if i == n - 1 else 0, forward_seconds=0.0,
                                  backward_seconds=0.0, name=f"after layer {i}"))
    return groups


def candidates(global_batch: Optional[int], dp: int) -> List[int]:
    if global_batch:
        per_replica = global_batch // dp
        return [m for m in range(1, per_replica + 1) if per_replica % m == 0]
    return [1 << k for k in range(11)]


def layer_plan(profile: Profile, budget: int, drive: Drive, micro_batches: Sequence[int],
               host_bytes: int = 0) -> LayerPlan:
    machine = Machine(write_bps=drive.write_gbps * 1e9, read_bps=drive.read_gbps * 1e9, host_bytes=host_bytes)
    best = LayerPlan(micro_batch=None)
    for mb in sorted(micro_batches):
        solved = solve(groups_for(profile, mb), budget, machine)
        row: Dict[str, object] = {"micro_batch": mb, "feasible": solved.feasible,
                                  "predicted_step_seconds": solved.cost.seconds}
        best.tried.append(row)
        if not solved.feasible:
            break  # larger micro-batches only need more
        best = LayerPlan(micro_batch=mb, choices=solved.choices, predicted_step_seconds=solved.cost.seconds,
                         predicted_peak_bytes=solved.cost.peak_bytes, seconds_per_sample=solved.cost.seconds / mb,
                         exact=solved.exact, tried=best.tried)
    return best
