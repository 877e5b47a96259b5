"""DeepSpeed integration: one ``"ssd_offload"`` block in the JSON config turns ssdoffload on.

.. code-block:: json

    {"train_micro_batch_size_per_gpu": 8,
     "ssd_offload": {"enabled": true, "path": "/nvme/act/{rank}", "prefetch_depth": 2}}

.. code-block:: python

    from ssdoffload.integrations import deepspeed as ssd_ds
    engine, optimizer, loader, scheduler = ssd_ds.initialize(
        model=model, model_parameters=model.parameters(), config="ds_config.json")

``initialize`` takes the arguments of ``deepspeed.initialize`` and returns what it returns. The
block is read with ``OffloadConfig.from_dict`` before DeepSpeed starts, so an unknown key or a
bad value fails at once, on every rank, with the list of valid keys. Without the block, or with
``"enabled": false``, the engine is exactly the one ``deepspeed.initialize`` built. DeepSpeed
ignores unknown top-level keys, so the same file still works with plain DeepSpeed.

What is scoped how:

* ``DeepSpeedEngine``: every ``engine(batch)`` with gradients enabled is one micro-batch scope;
  when its backward starts (``engine.backward(loss)`` or ``loss.backward()``), the last layers
  of that micro-batch are read back first. Per-step statistics close at each gradient
  accumulation boundary (``engine.step()``). ZeRO stages 0, 1 and 2, bf16 and gradient
  accumulation work; ZeRO-3 (partitioned parameters) is not supported.
* ``PipelineEngine`` (1F1B ``TrainSchedule``): each ``ForwardPass(buffer_id)`` is its own scope
  (several are in flight); as soon as the compute instruction before a ``BackwardPass(b)`` is
  done, micro-batch ``b``'s last layers are prefetched, so the reads overlap the send/receive
  instructions in between. Layers are the local stage's ``forward_funcs`` that are modules.
* Activation checkpointing: DeepSpeed's checkpoint functions keep their inputs in Python
  attributes that autograd hooks never see. So the pipeline's default
  ``deepspeed.checkpointing.checkpoint`` is replaced (for this engine, while offloading is on)
  by :func:`checkpoint`, the same reentrant algorithm that hands its inputs to
  ``save_for_backward``, where ssdoffload spills them. Models that call
  ``deepspeed.checkpointing.checkpoint`` themselves can call :func:`checkpoint` instead.
* Spill directories: a path containing ``{rank}`` is used as given; any other path gets a
  ``rank<N>`` subdirectory, so ranks never share a directory.

How it hooks in: ``deepspeed.initialize`` chooses the engine class itself, so the engine it
returns is re-classed to a subclass made here (``SSDOffload<EngineClass>``) that overrides
public methods (``forward``, ``step``, ``train_batch``, ``destroy``), the pipeline's
``_exec_schedule`` (it gets the schedule with one-instruction look-ahead) and extends the
class-level ``_INSTRUCTION_MAP`` (``ForwardPass`` / ``BackwardPass`` wrap the original
functions). No DeepSpeed function is replaced in place.

Tried with DeepSpeed 0.19.8 (torch 2.13.0, CPU accelerator over gloo; the pipeline engine with
2 stages, ZeRO 0/1/2, bf16). Other versions with the same ``_INSTRUCTION_MAP`` / ``_exec_schedule``
layout (0.9 and later) should work; a missing extension point raises at ``initialize``.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import json
import logging
import os
from collections import deque
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ssdoffload import OffloadConfig, OffloadError, Offloader, OffloadStats, SpillPathError

log = logging.getLogger("ssdoffload")

#: The top-level key of the DeepSpeed JSON config that holds the ``OffloadConfig`` fields.
BLOCK = "ssd_offload"

#: DeepSpeed versions this module was run against.
TESTED_DEEPSPEED_VERSIONS = ("0.19.8",)

__all__ = ["BLOCK", "initialize", "attach", "offload_config", "checkpoint", "DeepSpeedOffload",
           "get_offload", "TESTED_DEEPSPEED_VERSIONS"]


# --------------------------------------------------------------------------------------------
# The config block
# --------------------------------------------------------------------------------------------
def _load_ds_config(config: Any) -> Dict[str, Any]:
    """The DeepSpeed config as a dict: a dict, a JSON/HJSON file path, or base64 (as DeepSpeed)."""
    if isinstance(config, Mapping):
        return dict(config)
    try:  # DeepSpeed's own reader (hjson, base64, duplicate-key check)
        from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config
    except ImportError:  # older DeepSpeed
        load_ds_config = None
    if load_ds_config is not None:
        return load_ds_config(config)
    with open(config, "r", encoding="utf-8") as fh:
        return json.load(fh)


def _find_ds_config(args: Any, config: Any, config_params: Any) -> Any:
    """Where ``deepspeed.initialize`` takes the config from (same precedence)."""
    if config is None and config_params is not None:
        config = config_params
    for attr in ("deepspeed_config", "deepscale_config"):
        value = getattr(args, attr, None)
        if value is not None and config is None:
            config = value
    return config


def _rank_paths(paths: List[str]) -> List[str]:
    """Give every path a per-rank directory: ``{rank}`` stays, others get ``rank{rank}``."""
    return [p if "{rank}" in p else os.path.join(p, "rank{rank}") for p in paths]


def offload_config(ds_config: Any, **overrides: Any) -> Optional[OffloadConfig]:
    """The ``OffloadConfig`` of a DeepSpeed config (dict, path or base64), or ``None``.

    ``None`` when there is no ``"ssd_offload"`` block. The block is validated with
    ``OffloadConfig.from_dict`` (unknown keys and bad values raise ``ValueError``) even when it
    says ``"enabled": false``. Paths without ``{rank}`` get a ``rank{rank}`` subdirectory.
    ``overrides`` are Python-only fields such as ``layers``.
    """
    cfg = _load_ds_config(ds_config)
    if BLOCK not in cfg:
        return None
    block = cfg[BLOCK]
    if not isinstance(block, Mapping):
        raise ValueError(f'DeepSpeed config "{BLOCK}" must be a JSON object, got {block!r}')
    config = OffloadConfig.from_dict(block, **overrides)
    paths = _rank_paths(list(config.paths))
    return dataclasses.replace(config, path=paths if len(paths) > 1 else paths[0])


# --------------------------------------------------------------------------------------------
# Checkpointing whose inputs autograd (and so ssdoffload) can see
# --------------------------------------------------------------------------------------------
def _ds_checkpointing():
    from deepspeed.runtime.activation_checkpointing import checkpointing
    return checkpointing


class _CheckpointFunction(torch.autograd.Function):
    """DeepSpeed's reentrant ``CheckpointFunction`` with the inputs in ``save_for_backward``.

    Same RNG handling (CPU, accelerator and the model-parallel RNG tracker) and the same
    recompute-then-backward in ``backward``, so the numbers are those of DeepSpeed's function.
    """

    @staticmethod
    def forward(ctx, run_function, all_outputs, *args):
        ds = _ds_checkpointing()
        from deepspeed.accelerator import get_accelerator

        ctx.run_function = run_function
        tensor_args, ctx.non_tensor_args, ctx.tensor_flags = ds.extract_tensors(all_objects=args)
        ctx.fwd_cpu_rng_state = torch.get_rng_state()
        ctx.fwd_acc_rng_state = get_accelerator().get_rng_state()
        ctx.fwd_tracker_states = ds.get_cuda_rng_tracker().get_states()
        with torch.no_grad():
            outputs = run_function(*args)
        # The pack hook sees these: the checkpoint inputs go to the SSD.
        ctx.save_for_backward(*tensor_args)
        if torch.is_tensor(outputs):
            non_grad = [outputs] if not outputs.is_floating_point() else []
        else:
            non_grad = [o for o in outputs if torch.is_tensor(o) and not o.is_floating_point()]
        ctx.mark_non_differentiable(*non_grad)
        if torch.is_tensor(outputs):
            all_outputs.append(outputs)
            return outputs
        all_outputs.extend(outputs)
        outputs, _, _ = ds.extract_tensors(all_objects=outputs)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        ds = _ds_checkpointing()
        from deepspeed.accelerator import get_accelerator

        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError("Checkpointing is not compatible with .grad(), please use .backward() if possible")
        detached = ds.detach_variable(tuple(ctx.saved_tensors))
        inputs = ds.merge_tensors(tensor_objects=detached, non_tensor_objects=ctx.non_tensor_args,
                                  tensor_flags=ctx.tensor_flags)
        acc = get_accelerator()
        bwd_cpu_rng_state = torch.get_rng_state()
        bwd_acc_rng_state = acc.get_rng_state()
        bwd_tracker_states = ds.get_cuda_rng_tracker().get_states()
        torch.set_rng_state(ctx.fwd_cpu_rng_state)
        ds._set_cuda_rng_state(ctx.fwd_acc_rng_state)
        ds.get_cuda_rng_tracker().set_states(ctx.fwd_tracker_states)
        try:
            with torch.enable_grad():
                outputs = ctx.run_function(*inputs)
        finally:
            torch.set_rng_state(bwd_cpu_rng_state)
            ds._set_cuda_rng_state(bwd_acc_rng_state)
            ds.get_cuda_rng_tracker().set_states(bwd_tracker_states)
        if torch.is_tensor(outputs):
            outputs = (outputs,)
        outputs, _, _ = ds.extract_tensors(all_objects=outputs)
        pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.run_function = ctx.non_tensor_args = ctx.tensor_flags = None
        return (None, None) + tuple(t.grad if torch.is_tensor(t) else None for t in inputs)


def checkpoint(function, *args, **kwargs):
    """Drop-in for ``deepspeed.checkpointing.checkpoint`` whose inputs ssdoffload can spill.

    DeepSpeed's function keeps the checkpoint inputs in a Python attribute, out of autograd's
    sight, so they stay in accelerator memory. This one saves them with ``save_for_backward``
    (ssdoffload's hooks then write them to the SSD) and is otherwise the same algorithm.
    When DeepSpeed's ``partition_activations`` or ``cpu_checkpointing`` is configured (those move
    the inputs themselves), DeepSpeed's function is used unchanged.
    """
    ds = _ds_checkpointing()
    if getattr(ds, "PARTITION_ACTIVATIONS", False) or getattr(ds, "CPU_CHECKPOINT", False):
        return ds.checkpoint(function, *args, **kwargs)
    if kwargs:
        keys, npos, run = tuple(kwargs), len(args), function

        def function(*all_args):  # noqa: F811 - same wrapping as DeepSpeed's
            return run(*all_args[:npos], **dict(zip(keys, all_args[npos:])))

        args = args + tuple(kwargs.values())
    all_outputs: list = []
    _CheckpointFunction.apply(function, all_outputs, *args)
    return all_outputs[0] if len(all_outputs) == 1 else tuple(all_outputs)


# --------------------------------------------------------------------------------------------
# What an engine carries
# --------------------------------------------------------------------------------------------
class DeepSpeedOffload:
    """The offloading state of one engine: ``engine.ssd_offload``.

    Attributes:
        offloader: the ``ssdoffload.Offloader`` of this rank.
        schedule_prefetch_calls: prefetches the pipeline schedule (or a backward start of the
            plain engine) asked for, across micro-batch boundaries.
        schedule_prefetch_reads: reads those prefetches started.
    """

    def __init__(self, offloader: Offloader) -> None:
        self.offloader = offloader
        self.schedule_prefetch_calls = 0
        self.schedule_prefetch_reads = 0
        self._keys = itertools.count()
        self._step = 0
        self._buffers: Dict[int, Tuple] = {}       # pipeline buffer_id -> scope key
        self._prefetched: set = set()               # scope keys already prefetched
        self._restore: List = []                    # (obj, attr, value) undone on close
        self.closed = False

    # statistics
    def stats(self) -> OffloadStats:
        """Cumulative ``OffloadStats`` of this rank."""
        return self.offloader.stats()

    def last_step_stats(self) -> OffloadStats:
        """``OffloadStats`` of the last finished optimizer step."""
        return self.offloader.last_step_stats()

    @property
    def spill_files(self) -> list:
        return self.offloader.spill_files

    # scopes
    def new_key(self, kind: str) -> Tuple:
        return (kind, self._step, next(self._keys))

    def prefetch(self, key: Any) -> int:
        if key is None or key in self._prefetched:
            return 0
        self._prefetched.add(key)
        started = self.offloader.prefetch(key)
        self.schedule_prefetch_calls += 1
        self.schedule_prefetch_reads += started
        return started

    def end_step(self) -> None:
        self.offloader.end_step()
        self._step += 1
        self._prefetched.clear()

    def close(self) -> None:
        """Stop offloading: finish I/O, remove the spill files, undo the checkpoint swap."""
        self.closed = True
        for obj, attr, value in reversed(self._restore):
            setattr(obj, attr, value)
        self._restore = []
        self.offloader.close()


def get_offload(engine: Any) -> Optional[DeepSpeedOffload]:
    """``engine.ssd_offload``, or ``None`` for an engine without offloading."""
    return getattr(engine, "ssd_offload", None)


def _first_grad_tensor(obj: Any) -> Optional[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    if hasattr(obj, "to_tuple") and callable(obj.to_tuple):  # HF ModelOutput
        obj = obj.to_tuple()
    for t in tree_flatten(obj)[0]:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return t
    return None


def _backward_started(offload: DeepSpeedOffload, key: Any, grad: torch.Tensor) -> None:
    offload.prefetch(key)


class _DestroyMixin:
    """Both engine subclasses: ``destroy()`` also closes the offloader (threads, spill files)."""

    ssd_offload: "DeepSpeedOffload"

    def destroy(self, *args, **kwargs):
        try:
            self.ssd_offload.close()
        finally:
            parent = getattr(super(), "destroy", None)
            if parent is not None:
                return parent(*args, **kwargs)
        return None


class _EngineMixin(_DestroyMixin):
    """Offloading for ``DeepSpeedEngine``: one scope per ``forward``."""

    ssd_offload: DeepSpeedOffload

    def forward(self, *inputs, **kwargs):
        offload = self.ssd_offload
        if not torch.is_grad_enabled() or offload.closed:
            return super().forward(*inputs, **kwargs)
        key = offload.new_key("fwd")
        with offload.offloader.micro_batch(key):
            out = super().forward(*inputs, **kwargs)
        t = _first_grad_tensor(out)
        if t is not None:  # fires first thing in backward: read this micro-batch's last layers
            t.register_hook(functools.partial(_backward_started, offload, key))
        return out

    def step(self, *args, **kwargs):
        managed = getattr(self, "managed_gradient_accumulation", None)
        # Unmanaged accumulation (DeepSpeed >= 0.18): every step() is the boundary.
        boundary = (managed is not None and not managed()) or self.is_gradient_accumulation_boundary()
        result = super().step(*args, **kwargs)
        if boundary:
            self.ssd_offload.end_step()
        return result


class _LookaheadSchedule:
    """A pipe schedule that yields one instruction at a time and, when the next compute
    instruction is ``BackwardPass(b)``, calls ``on_backward_next(b)`` as soon as the compute
    instruction before it has run."""

    def __init__(self, schedule: Any, on_backward_next) -> None:
        self._schedule = schedule
        self._on_backward_next = on_backward_next

    def __getattr__(self, name: str) -> Any:  # num_pipe_buffers() and friends
        if name == "_schedule":
            raise AttributeError(name)
        return getattr(self._schedule, name)

    def __iter__(self):
        from deepspeed.runtime.pipe import schedule as sched

        compute = (sched.ForwardPass, sched.BackwardPass)
        cmds = (cmd for step in self._schedule for cmd in step)
        ahead: deque = deque()

        def next_compute():
            for cmd in ahead:
                if isinstance(cmd, compute):
                    return cmd
            for cmd in cmds:
                ahead.append(cmd)
                if isinstance(cmd, compute):
                    return cmd
            return None

        while True:
            if not ahead:
                cmd = next(cmds, None)
                if cmd is None:
                    return
            else:
                cmd = ahead.popleft()
            yield [cmd]
            if isinstance(cmd, compute):
                upcoming = next_compute()
                if isinstance(upcoming, sched.BackwardPass):
                    self._on_backward_next(upcoming.buffer_id)


class _PipeMixin(_DestroyMixin):
    """Offloading for ``PipelineEngine``: one scope per pipeline buffer's forward."""

    ssd_offload: DeepSpeedOffload
    _ssd_base_map: dict = {}

    def _ssd_exec_forward_pass(self, buffer_id):
        base = self._ssd_base_map[_ForwardPass()]
        offload = self.ssd_offload
        if not torch.is_grad_enabled() or offload.closed:
            offload._buffers.pop(buffer_id, None)
            return base(self, buffer_id)
        key = offload.new_key(f"buffer{buffer_id}")
        offload._buffers[buffer_id] = key
        with offload.offloader.micro_batch(key):
            return base(self, buffer_id)

    def _ssd_exec_backward_pass(self, buffer_id):
        offload = self.ssd_offload
        offload.prefetch(offload._buffers.pop(buffer_id, None))
        return self._ssd_base_map[_BackwardPass()](self, buffer_id)

    def _ssd_prefetch_buffer(self, buffer_id):
        offload = self.ssd_offload
        if not offload.closed:
            offload.prefetch(offload._buffers.get(buffer_id))

    def _exec_schedule(self, pipe_schedule, *args, **kwargs):
        return super()._exec_schedule(_LookaheadSchedule(pipe_schedule, self._ssd_prefetch_buffer),
                                      *args, **kwargs)

    def train_batch(self, *args, **kwargs):
        result = super().train_batch(*args, **kwargs)
        self.ssd_offload.end_step()
        return result



def _ForwardPass():
    from deepspeed.runtime.pipe import schedule as sched
    return sched.ForwardPass


def _BackwardPass():
    from deepspeed.runtime.pipe import schedule as sched
    return sched.BackwardPass


@functools.lru_cache(maxsize=None)
def _offload_class(base: type) -> type:
    """``SSDOffload<Base>``: ``base`` with the offloading overrides."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if issubclass(base, PipelineEngine):
        base_map = getattr(base, "_INSTRUCTION_MAP", None)
        fwd, bwd = _ForwardPass(), _BackwardPass()
        if not isinstance(base_map, dict) or fwd not in base_map or bwd not in base_map \
                or not hasattr(base, "_exec_schedule"):
            raise OffloadError(
                f"{base.__name__} has no _INSTRUCTION_MAP with ForwardPass/BackwardPass or no "
                "_exec_schedule; this DeepSpeed version is not supported by ssdoffload "
                f"(tried: {', '.join(TESTED_DEEPSPEED_VERSIONS)})")
        namespace = {
            "_ssd_base_map": dict(base_map),
            "_INSTRUCTION_MAP": {**base_map, fwd: _PipeMixin._ssd_exec_forward_pass,
                                 bwd: _PipeMixin._ssd_exec_backward_pass},
        }
        return type(f"SSDOffload{base.__name__}", (_PipeMixin, base), namespace)
    return type(f"SSDOffload{base.__name__}", (_EngineMixin, base), {})


# --------------------------------------------------------------------------------------------
# Attaching to an engine
# --------------------------------------------------------------------------------------------
def _pipeline_layers(module: torch.nn.Module) -> Optional[list]:
    funcs = getattr(module, "forward_funcs", None)
    if funcs is None:
        return None
    layers = [f for f in funcs if isinstance(f, torch.nn.Module)]
    return layers or None


def _world() -> Tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), 1


def _agree(error: Optional[BaseException]) -> None:
    """Every rank learns whether any rank failed to start offloading, and raises if so.

    Without this, the ranks that started fine would train on and hang in their first collective
    while the failed rank exits.
    """
    import torch.distributed as dist

    rank, world = _world()
    mine = None if error is None else (type(error).__name__, str(error))
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    failed = [(r, e) for r, e in enumerate(gathered) if e is not None]
    if not failed:
        return
    if error is not None:
        raise error
    ranks = [r for r, _ in failed]
    kind, message = failed[0][1]
    cls = SpillPathError if kind == "SpillPathError" else OffloadError
    raise cls(f"ssd_offload could not start on rank(s) {ranks} (this is rank {rank}); "
              f"rank {failed[0][0]}: {message}")


_ZERO3 = ("ssd_offload does not support ZeRO stage 3 (partitioned parameters); use ZeRO stage 0, "
          "1 or 2, or set \"enabled\": false in the ssd_offload block")


def attach(engine: Any, config: Optional[OffloadConfig] = None) -> Any:
    """Turn offloading on for an engine made by ``deepspeed.initialize``; returns the engine.

    ``config`` defaults to the ``"ssd_offload"`` block of the engine's own config. With no
    block, or ``enabled: false``, the engine is returned untouched. A spill path that cannot be
    used raises ``SpillPathError`` on every rank (collectively, when several ranks run).
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    if not isinstance(engine, DeepSpeedEngine):
        raise TypeError(f"attach() needs a DeepSpeedEngine, got {type(engine).__name__}")
    if get_offload(engine) is not None:
        raise OffloadError("offloading is already attached to this engine")
    module = engine.module
    layers = _pipeline_layers(module)
    overrides = {"layers": layers} if layers else {}
    if config is None:
        config = offload_config(getattr(engine._config, "_param_dict", {}) or {}, **overrides)
    elif overrides and config.layers is None:
        config = dataclasses.replace(config, layers=layers)  # the caller's config stays as it was
    if config is None or not config.enabled:
        return engine
    if engine.zero_optimization_stage() >= 3:
        raise ValueError(_ZERO3)

    offloader = None
    error: Optional[BaseException] = None
    try:
        offloader = Offloader(module, config)
    except Exception as exc:  # reported on every rank below, so none is left waiting
        error = exc
    try:
        _agree(error)
    except BaseException:
        if offloader is not None:
            offloader.close()
        raise

    offload = DeepSpeedOffload(offloader)
    if getattr(module, "activation_checkpoint_interval", 0) and \
            getattr(module, "activation_checkpoint_func", None) is _ds_checkpointing().checkpoint:
        offload._restore.append((module, "activation_checkpoint_func", module.activation_checkpoint_func))
        module.activation_checkpoint_func = checkpoint
    elif getattr(module, "activation_checkpoint_interval", 0):
        log.warning("ssdoffload: the pipeline checkpoints with %r, whose inputs autograd cannot "
                    "see; they stay in memory (only deepspeed.checkpointing.checkpoint is replaced)",
                    getattr(module.activation_checkpoint_func, "__name__", module.activation_checkpoint_func))
    engine.ssd_offload = offload
    engine.__class__ = _offload_class(type(engine))
    log.info("ssdoffload: DeepSpeed %s on rank %d spills to %s", type(engine).__name__, _world()[0],
             ", ".join(offloader.paths))
    return engine


def initialize(args: Any = None, model: Optional[torch.nn.Module] = None, *positional: Any,
               **kwargs: Any) -> tuple:
    """``deepspeed.initialize`` with the ``"ssd_offload"`` block of the config honoured.

    Same arguments, same return value ``(engine, optimizer, training_dataloader,
    lr_scheduler)``. The block is validated before DeepSpeed starts; the offloader is made after
    (it needs the rank) and before the first step.
    """
    import deepspeed

    bound = inspect.signature(deepspeed.initialize).bind(args, model, *positional, **kwargs)
    given = bound.arguments
    ds_config = _find_ds_config(args, given.get("config"), given.get("config_params"))
    if ds_config is not None:  # fail now, before DeepSpeed spends time starting up
        config = offload_config(ds_config)
        zero = _load_ds_config(ds_config).get("zero_optimization", {})
        if config is not None and config.enabled and isinstance(zero, Mapping) and zero.get("stage", 0) == 3:
            raise ValueError(_ZERO3)
    result = deepspeed.initialize(*bound.args, **bound.kwargs)
    engine = result[0]
    # Read again from the engine: per-rank objects (layers) are known only now.
    attach(engine)
    return result
