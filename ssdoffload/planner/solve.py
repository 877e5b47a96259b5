"""The plan: for each strategy, the largest micro-batch that fits the budget, the drive
bandwidth it needs and what it costs in wear (``plan``)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .spec import GB, GiB, ModelSpec, STRATEGIES, TB
from .profile import Profile, spec_profile
from .drive import Drive


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
            if not 0 < budget_gib < 1 << 20:
                raise ValueError(f"budget_gib={budget_gib!r}: the activation budget is in GiB (e.g. 40 for "
                                 "40 GiB) and must be positive")
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
            if budget <= 0:
                raise ValueError(
                    f"nothing of the GPU's {gpu_memory_gib:g} GiB is left for activations on rank {r}: its "
                    f"model state takes {stage_params * bytes_per_param / GiB:.1f} GiB ({bytes_per_param:g} bytes "
                    f"per parameter) and the reserve {reserve_gib:g} GiB; shard the model (tp/pp, ZeRO: fewer "
                    "bytes per parameter) or plan for a larger GPU")
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
