"""The ways of handling activations that the benchmark compares.

Each ``Strategy`` owns its own copy of the model (loaded from one shared initial state_dict),
its own optimizer and, for the ssd strategies, its own ``Offloader``:

* ``keep``: plain training, every saved tensor stays in memory (the baseline);
* ``recompute``: non-reentrant ``torch.utils.checkpoint`` around every block;
* ``cpu``: PyTorch's own ``torch.autograd.graph.save_on_cpu`` (pinned when CUDA is present);
* ``ssd``: ssdoffload with the fixed full-offload plan (``policy="all"``);
* ``ssd+recompute``: ssdoffload around checkpointed blocks (it then spills the block inputs);
* ``ssd-adaptive``: ssdoffload's adaptive policy: only the layers whose I/O the drive can hide;
* ``ram+ssd``: the adaptive policy with a host-RAM tier (``host_cache_bytes``) in front of the
  drive.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, ContextManager, Dict, Optional, Sequence, Tuple

import torch

from ..config import OffloadConfig
from ..offloader import Offloader
from ..stats import OffloadStats
from ..models.gpt import GPT, GPTConfig

STRATEGIES: Tuple[str, ...] = ("keep", "recompute", "cpu", "ssd", "ssd+recompute", "ssd-adaptive", "ram+ssd")

#: A saved-tensor hook pair: (pack, unpack).
HookPair = Tuple[Callable[[torch.Tensor], object], Callable[[object], torch.Tensor]]

#: Strategies whose plan changes after the first steps (their memory pass runs after the timed
#: steps, so it measures the plan in force rather than the profiling step).
ADAPTIVE_STRATEGIES: Tuple[str, ...] = ("ssd-adaptive", "ram+ssd")


def strategy_offload_config(name: str, base: OffloadConfig) -> OffloadConfig:
    """The ``OffloadConfig`` of ssd strategy ``name`` from the run's shared one: ``ssd`` and
    ``ssd+recompute`` use the fixed full-offload plan, ``ssd-adaptive`` the adaptive policy,
    both without a RAM tier; ``ram+ssd`` the adaptive policy with the shared config's
    ``host_cache_bytes`` (which must be > 0)."""
    if name in ("ssd", "ssd+recompute"):
        return dataclasses.replace(base, policy="all", host_cache_bytes=0)
    if name == "ssd-adaptive":
        return dataclasses.replace(base, policy="adaptive", host_cache_bytes=0)
    if name == "ram+ssd":
        if base.host_cache_bytes <= 0:
            raise ValueError("strategy 'ram+ssd' needs a host cache size > 0 (--host-cache)")
        return dataclasses.replace(base, policy="adaptive")
    raise ValueError(f"strategy {name!r} does not use ssdoffload")


def uses_offloader(name: str) -> bool:
    return name.startswith("ssd") or name == "ram+ssd"


class Strategy:
    """One strategy: a model copy, its optimizer and the context its steps run in."""

    def __init__(self, name: str, cfg: GPTConfig, state_dict: dict, device: torch.device,
                 offload_config: Optional[OffloadConfig] = None, lr: float = 1e-3) -> None:
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
        self.name = name
        self.device = device
        self.recompute = name in ("recompute", "ssd+recompute")
        with torch.device(device):  # initialise on the device: a 1B model builds in seconds there
            self.model = GPT(cfg, recompute=self.recompute)
        self.model.load_state_dict(state_dict)
        self.model.to(device).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.offloader: Optional[Offloader] = None
        self._cpu_hooks: Optional[torch.autograd.graph.save_on_cpu] = None
        if uses_offloader(name):
            if offload_config is None:
                raise ValueError(f"strategy {name!r} needs an OffloadConfig")
            self.offloader = Offloader(self.model, offload_config)

    @property
    def uses_ssd(self) -> bool:
        return self.offloader is not None

    def context(self) -> ContextManager:
        """The context forward and backward of one step run in."""
        if self.offloader is not None:
            return self.offloader.step()
        if self.name == "cpu":
            return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
        return contextlib.nullcontext()

    def hook_pair(self) -> Optional[HookPair]:
        """The strategy's saved-tensor (pack, unpack) pair, for the memory meter to wrap.

        ``None`` means autograd keeps tensors as they are (keep, recompute). Only valid inside
        ``context()`` for the ssd strategies.
        """
        if self.offloader is not None:
            hooks = self.offloader.hooks
            return hooks.pack, hooks.unpack
        if self.name == "cpu":
            inner = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
            return inner.pack_hook, inner.unpack_hook
        return None

    def finish(self) -> None:
        """Wait for the step's I/O still in flight (counted in the step time)."""
        if self.offloader is not None:
            self.offloader.wait()

    def plan(self) -> Optional[dict]:
        """The adaptive plan in force, as a dict (None for fixed plans)."""
        plan = self.offloader.plan() if self.offloader is not None else None
        return plan.as_dict() if plan is not None else None

    def step_stats(self) -> Optional[OffloadStats]:
        return self.offloader.last_step_stats() if self.offloader is not None else None

    def parameter_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   list(self.model.parameters()) + list(self.model.buffers()))

    def close(self) -> None:
        if self.offloader is not None:
            self.offloader.close()
            self.offloader = None


def build_strategies(names: Sequence[str], cfg: GPTConfig, state_dict: dict, device: torch.device,
                     offload_config: Callable[[str], OffloadConfig]) -> Dict[str, Strategy]:
    """Strategies by name, each with its own model copy; ``offload_config(name)`` for ssd ones."""
    built: Dict[str, Strategy] = {}
    try:
        for name in names:
            built[name] = Strategy(name, cfg, state_dict, device,
                                   offload_config(name) if uses_offloader(name) else None)
    except BaseException:
        for s in built.values():
            s.close()
        raise
    return built


def parse_strategies(text: str) -> Tuple[str, ...]:
    """``"keep,ssd"`` -> ``("keep", "ssd")``; always includes ``keep`` first (the baseline)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in STRATEGIES]
    if bad:
        raise ValueError(f"unknown strategy {', '.join(bad)}; choose from {', '.join(STRATEGIES)}")
    ordered = [n for n in STRATEGIES if n in names]
    if "keep" not in ordered:
        ordered.insert(0, "keep")
    return tuple(ordered)
