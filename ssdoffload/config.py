"""``OffloadConfig``: every knob of the offloader, validated when it is made.

A bad value raises ``ValueError`` naming the field, the value and what is allowed, so a typo
in a DeepSpeed JSON block fails before the first step rather than deep inside one.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch

log = logging.getLogger("ssdoffload")

BACKENDS = ("auto", "native", "kvikio")
#: ``"adaptive"``: offload what the drive can hide (measured, re-planned); ``"all"``: every
#: offloadable tensor, always (the fixed full-offload plan); ``"budget"``: meet
#: ``memory_budget`` at the least predicted step time (keep, offload, recompute).
POLICIES = ("adaptive", "all", "budget")

#: Fields that only make sense from Python (module objects), not from a JSON block.
_PYTHON_ONLY_FIELDS = ("layers",)


@dataclass
class OffloadConfig:
    """What to offload, where to, and how hard to prefetch.

    Attributes:
        path: Spill directory, or a list of directories (one per NVMe drive; extents are
            striped across them). ``{rank}`` is replaced by the distributed rank. The parent of
            each directory must exist (a missing parent usually means a drive is not mounted);
            the last level is created with mode 0700.
        min_offload_bytes: Saved tensors whose storage is smaller than this stay in memory:
            the I/O round trip of a tiny tensor costs more than the memory it frees.
        prefetch_depth: How many layers below the one backward is in are read back ahead of
            time. 0 loads each tensor only when autograd asks for it.
        layers: The modules that count as layers (their forward defines a prefetch group).
            Default: the longest ``nn.ModuleList`` of same-typed blocks in the model.
        backend: ``"native"`` (our C++ engine, host memory; CUDA tensors are staged through a
            pinned buffer pool), ``"kvikio"`` (CUDA tensors through kvikio / GPUDirect Storage)
            or ``"auto"`` (kvikio for CUDA tensors when it is importable, else native).
        io_threads: Worker threads of the I/O engine (per process).
        chunk_bytes: Size of one I/O request issued to the drive; a multiple of 4096.
        initial_file_bytes: Preallocated size of each spill file; it grows on demand and is
            reused every step.
        pinned_pool_bytes: Pinned host memory used to stage CUDA tensors (native backend only).
        verify: Checksum (CRC-32C) every piece written to the spill files and check it when
            read back, so a flipped bit, a hole or a lost write on the drive raises
            ``SpillReadError`` instead of reaching the gradients. ``None`` (default): on,
            except with ``backend="kvikio"`` (GPUDirect moves device memory straight to the
            drive: there is no host copy to checksum). ``False`` opts out.
        enabled: ``False`` turns the offloader into a no-op (used by framework config blocks).
        policy: ``"adaptive"`` (default): the first step offloads everything and measures, per
            layer, the bytes saved and the compute time, and the achieved write/read bandwidth;
            from then on only the layers whose I/O the drive can hide are offloaded (the rest,
            typically the last layers, stay on the device), re-planned with damping when
            stalls or bandwidth change (``Offloader.plan()``, logger ``"ssdoffload"``).
            ``"all"``: offload every offloadable tensor, always.
        host_cache_bytes: A host-RAM tier in front of the drive: up to this many bytes of
            activations go to pinned host memory (CUDA tensors; copied on a side stream) and
            only the rest to the spill files; reloads from RAM need no disk I/O. The budget is
            never exceeded. On a CPU-only host the activations already live in host memory,
            so the tier keeps up to this many bytes in place (no copy, no I/O) and spills the
            rest. 0 (default) disables the tier.
        max_write_bandwidth: Cap, in bytes per second, on what the offloader writes to the
            spill files (a token bucket in the write path), for a drive shared with other
            writers or to limit wear. The adaptive policy plans with it. ``None``: no cap.
        max_read_bandwidth: The same cap for reads (e.g. to emulate a slower or throttled
            drive). ``None``: no cap.
        stall_tolerance: The adaptive policy's target: predicted backward waiting on reads,
            as a fraction of the step time, that a plan may cost (default 0.01).
        io_timeout: Seconds the compute thread waits on the drive at most (default 60): a
            spill file's growth or a write back-pressure waits for that does not answer in time
            leaves its tensor in memory (counted in ``stats().io_timeouts``, logged once); a
            read backward needs that does not complete in time raises ``SpillReadError``
            naming the file and the time waited (the step can be retried once the drive
            answers). A frozen or hung drive then fails a step clearly instead of stalling
            training for ever. ``None``: wait for ever.
        memory_budget: Budget mode: the most offloadable activation memory a step may hold,
            in bytes (an int), or as a fraction of the GPU's memory (a float in (0, 1]; CUDA
            models only). Per layer the plan keeps, offloads to RAM or SSD, recomputes (the
            offloader checkpoints the layer itself), or recomputes and offloads the layer's
            input — whatever meets the budget at the least predicted step time, re-planned
            from measurements. The budget is a guarantee: forward waits for writes when the
            drive falls behind. Setting it selects ``policy="budget"``.
    """

    path: Union[str, Sequence[str]] = ""
    min_offload_bytes: int = 256 * 1024
    prefetch_depth: int = 2
    layers: Optional[Sequence[torch.nn.Module]] = None
    backend: str = "auto"
    io_threads: int = 4
    chunk_bytes: int = 4 << 20
    initial_file_bytes: int = 64 << 20
    pinned_pool_bytes: int = 256 << 20
    verify: Optional[bool] = None
    enabled: bool = True
    policy: str = "adaptive"
    host_cache_bytes: int = 0
    max_write_bandwidth: Optional[float] = None
    max_read_bandwidth: Optional[float] = None
    stall_tolerance: float = 0.01
    io_timeout: Optional[float] = 60.0
    memory_budget: Optional[Union[int, float]] = None
    paths: tuple = field(init=False, repr=False, default=())

    @property
    def checksums(self) -> bool:
        """Whether spill data is checksummed (``verify`` resolved: see its description)."""
        return self.verify if self.verify is not None else self.backend != "kvikio"

    def __post_init__(self) -> None:
        self.paths = tuple(_validate_paths(self.path))
        _require_int("min_offload_bytes", self.min_offload_bytes, minimum=0)
        _require_int("prefetch_depth", self.prefetch_depth, minimum=0, maximum=64)
        _require_int("io_threads", self.io_threads, minimum=1, maximum=256)
        _require_int("chunk_bytes", self.chunk_bytes, minimum=4096)
        if self.chunk_bytes % 4096:
            raise ValueError(
                f"OffloadConfig.chunk_bytes={self.chunk_bytes!r} is not a multiple of 4096; "
                "use a multiple of 4096 (O_DIRECT needs aligned requests)"
            )
        _require_int("initial_file_bytes", self.initial_file_bytes, minimum=0)
        _require_int("pinned_pool_bytes", self.pinned_pool_bytes, minimum=0)
        if self.backend not in BACKENDS:
            raise ValueError(
                f"OffloadConfig.backend={self.backend!r} is not one of {', '.join(BACKENDS)}"
            )
        if self.policy not in POLICIES:
            raise ValueError(
                f"OffloadConfig.policy={self.policy!r} is not one of {', '.join(POLICIES)}"
            )
        _validate_budget(self)
        _require_int("host_cache_bytes", self.host_cache_bytes, minimum=0)
        for name in ("max_write_bandwidth", "max_read_bandwidth"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or value != value or value == float("inf"):
                raise ValueError(
                    f"OffloadConfig.{name}={value!r} must be a positive number of bytes per "
                    "second (e.g. 500e6), or None for no cap"
                )
            if value < MIN_BANDWIDTH_CAP:
                # 1 or 500 is almost surely MB/s written as a number: at that many bytes per
                # second the first backward would wait for hours.
                raise ValueError(
                    f"OffloadConfig.{name}={value!r} bytes per second is below the floor of "
                    f"{MIN_BANDWIDTH_CAP:.0f}; caps are in bytes per second (did you mean "
                    f"{value:g}e6, i.e. {value:g} MB/s?)"
                )
        tol = self.stall_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol <= 0.5:
            raise ValueError(
                f"OffloadConfig.stall_tolerance={tol!r} must be a fraction of the step time "
                "in [0, 0.5]"
            )
        t = self.io_timeout
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.01 <= t <= 86400):
            raise ValueError(f"OffloadConfig.io_timeout={t!r} must be seconds in [0.01, 86400] (None: wait for ever)")
        if self.verify is not None and not isinstance(self.verify, bool):
            raise ValueError(f"OffloadConfig.verify={self.verify!r} must be true, false or None (the default: on)")
        for name in ("enabled",):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"OffloadConfig.{name}={getattr(self, name)!r} must be true or false"
                )
        if self.layers is not None:
            layers = list(self.layers)
            bad = [m for m in layers if not isinstance(m, torch.nn.Module)]
            if bad or not layers:
                raise ValueError(
                    f"OffloadConfig.layers={self.layers!r} must be a non-empty sequence of "
                    "torch.nn.Module (or None to detect the layers)"
                )
            self.layers = layers

    @classmethod
    def field_names(cls) -> list:
        """The keys a config block may hold."""
        return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in _PYTHON_ONLY_FIELDS]

    @classmethod
    def from_dict(cls, block: Mapping[str, Any], **overrides: Any) -> "OffloadConfig":
        """Build a config from a JSON block (e.g. DeepSpeed's ``"ssd_offload": {...}``).

        Unknown keys are an error that lists the valid keys. ``overrides`` (Python-only
        fields such as ``layers``) are applied on top.
        """
        if not isinstance(block, Mapping):
            raise ValueError(f"ssd_offload config block must be a JSON object, got {block!r}")
        valid = cls.field_names()
        unknown = sorted(k for k in block if k not in valid)
        if unknown:
            raise ValueError(
                f"unknown ssd_offload config key(s) {unknown}; valid keys are: {', '.join(valid)}"
            )
        kwargs = dict(block)
        kwargs.update(overrides)
        return cls(**kwargs)

    def resolved_paths(self, rank: Optional[int] = None) -> list:
        """The spill directories with ``{rank}`` filled in."""
        if rank is None:
            rank = current_rank()
        return [os.path.abspath(os.path.expanduser(p.replace("{rank}", str(rank)))) for p in self.paths]


#: The smallest bandwidth cap accepted, in bytes per second (100 KB/s).
MIN_BANDWIDTH_CAP = 100e3


def _validate_budget(config: "OffloadConfig") -> None:
    budget = config.memory_budget
    if budget is None:
        if config.policy == "budget":
            raise ValueError("OffloadConfig.policy='budget' needs memory_budget: bytes (e.g. 8 << 30) "
                             "or a fraction of the GPU's memory (e.g. 0.5)")
        return
    forms = ("memory_budget takes one of two forms: bytes, an int (e.g. 8 << 30 for 8 GiB), or a "
             "fraction of the GPU's memory, a float in (0, 1] (e.g. 0.5)")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget != budget or budget <= 0:
        raise ValueError(f"OffloadConfig.memory_budget={budget!r} is not a budget: {forms}")
    if isinstance(budget, float) and budget > 1:
        if budget >= 1 << 20 and budget == int(budget):
            budget = config.memory_budget = int(budget)  # 8e9 from a JSON config: bytes
        else:
            # 2.0 is neither 2 bytes nor 200% of the GPU: say what was probably meant.
            raise ValueError(f"OffloadConfig.memory_budget={budget!r} is a float above 1: {forms}. "
                             f"Did you mean {max(int(budget), 1)} << 30 bytes ({max(int(budget), 1)} GiB)?")
    if isinstance(budget, int) and budget < 1 << 20:
        log.warning("ssdoffload: OffloadConfig.memory_budget=%d bytes is under 1 MiB: almost every activation "
                    "will wait on the drive. Budgets are in bytes (e.g. 8 << 30) or a fraction of the GPU "
                    "(0.5)", budget)
    if config.policy == "all":
        raise ValueError("OffloadConfig.memory_budget is set but policy='all' offloads everything; "
                         "leave policy unset (or 'budget') to meet the budget")
    config.policy = "budget"


def current_rank() -> int:
    """The global rank: from torch.distributed when it is up, else $RANK, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    value = os.environ.get("RANK", "0")
    try:
        rank = int(value)
    except ValueError:
        rank = -1
    if rank < 0:
        raise ValueError(f"the environment variable RANK={value!r} is not a rank (a non-negative "
                         "integer); unset it or set it as torchrun does")
    return rank


def _validate_paths(path: Union[str, Sequence[str]]) -> list:
    if isinstance(path, (str, os.PathLike)):
        paths = [path]
    elif isinstance(path, (list, tuple)):
        paths = list(path)
    else:  # None, a number, a dict, ...: not a directory nor a list of them
        paths = []
    if not paths or any(not isinstance(p, (str, os.PathLike)) or not str(p) for p in paths):
        raise ValueError(
            f"OffloadConfig.path={path!r} must be a directory or a non-empty list of "
            "directories (one per drive), e.g. '/nvme/act' or ['/nvme0/act', '/nvme1/act']"
        )
    paths = [os.fspath(p) for p in paths]
    if len(set(paths)) != len(paths):
        raise ValueError(f"OffloadConfig.path={path!r} names a directory twice")
    return paths


def _require_int(name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"OffloadConfig.{name}={value!r} must be an integer")
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"OffloadConfig.{name}={value!r} must be {allowed}")
