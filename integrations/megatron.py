"""Megatron-core: SSD offload inside Megatron's own pipeline schedules.

Training code changes by one line::

    from megatron.core.pipeline_parallel import get_forward_backward_func
    from ssdoffload.integrations import megatron as ssd_megatron

    # was: forward_backward_func = get_forward_backward_func()
    forward_backward_func = ssd_megatron.wrap(get_forward_backward_func(), model,
                                              ssdoffload.OffloadConfig(path="/nvme/act/{rank}"))

    losses = forward_backward_func(forward_step_func=forward_step, data_iterator=it, model=model,
                                   num_microbatches=8, seq_length=2048, micro_batch_size=4)

The wrapper calls the schedule unchanged; it only wraps the user's ``forward_step_func``, which
the schedule calls once per micro-batch:

* every micro-batch's forward is its own offload scope (``Offloader.micro_batch``), keyed by
  (step, micro-batch index);
* the schedule's order of forwards (F) and backwards (B) is known in advance --
  ``forward_backward_no_pipelining``: F0 B0 F1 B1 ...; the 1F1B
  ``forward_backward_pipelining_without_interleaving`` on pipeline rank ``r`` of ``pp``:
  ``w = min(pp - r - 1, M)`` warm-up forwards, then F(w+i) B(i) pairs, then the remaining
  backwards (backwards always run in forward order) -- so when a forward ends and a backward
  comes next, that micro-batch is prefetched (on a non-last stage this overlaps the read with
  the wait for the next stage's gradient). In the cool-down, where backwards follow backwards,
  the next micro-batch is prefetched when the running backward reaches the stage's first
  layer.

Megatron's recompute settings (``recompute_granularity`` "full" or "selective") compose: with
"full" only the inputs of the checkpointed layer chunks are saved, and those are offloaded;
the recomputation during backward runs outside any offload scope. Megatron's own activation
offloading (``fine_grained_activation_offloading`` or ``cpu_offloading``) moves the same
tensors to CPU memory and is refused with a clear error, as are schedules whose call order
differs from the above (the interleaved virtual-pipeline schedule, MoE expert-parallel
communication overlap, hybrid context parallel) and CUDA graphs (a replayed graph never calls
autograd's saved-tensor hooks).
"""
from __future__ import annotations

import functools
import itertools
import logging
import threading
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils._pytree import tree_flatten

from ssdoffload.config import OffloadConfig
from ssdoffload.errors import OffloadError
from ssdoffload.offloader import Offloader
from ssdoffload.stats import OffloadStats

log = logging.getLogger("ssdoffload")

__all__ = ["wrap", "get_forward_backward_func", "MegatronOffload", "schedule_order",
           "UnsupportedScheduleError"]

NO_PIPELINING = "no_pipelining"
ONE_F_ONE_B = "1f1b"
INTERLEAVED = "interleaved"


class UnsupportedScheduleError(OffloadError, ValueError):
    """The schedule or a Megatron setting cannot be combined with SSD offload."""


# -- the schedules' order of operations ------------------------------------------------------
def schedule_order(kind: str, num_microbatches: int, pp_size: int = 1, pp_rank: int = 0) -> List[Tuple[str, int]]:
    """The order in which a schedule runs forwards ("F", i) and backwards ("B", i) on one rank.

    ``kind`` is ``"no_pipelining"`` or ``"1f1b"``; this mirrors megatron-core's
    ``forward_backward_no_pipelining`` and ``forward_backward_pipelining_without_interleaving``.
    """
    m = int(num_microbatches)
    if m < 1:
        raise ValueError(f"num_microbatches={num_microbatches!r} must be >= 1")
    if kind == NO_PIPELINING:
        return [op for i in range(m) for op in (("F", i), ("B", i))]
    if kind != ONE_F_ONE_B:
        raise ValueError(f"unknown schedule kind {kind!r}")
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank={pp_rank} is not in [0, {pp_size})")
    warmup = min(pp_size - pp_rank - 1, m)
    order = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [("F", warmup + i), ("B", i)]
    order += [("B", i) for i in range(m - warmup, m)]
    return order


def in_flight(order: Sequence[Tuple[str, int]]) -> int:
    """The largest number of micro-batches forwarded but not yet backwarded at any point."""
    live = peak = 0
    for op, _ in order:
        live += 1 if op == "F" else -1
        peak = max(peak, live)
    return peak


def _schedule_kind(func: Callable) -> str:
    from megatron.core.pipeline_parallel import schedules

    target = getattr(func, "__wrapped__", func)
    if isinstance(target, functools.partial):
        target = target.func
    if target is schedules.forward_backward_no_pipelining:
        return NO_PIPELINING
    if target is schedules.forward_backward_pipelining_without_interleaving:
        return ONE_F_ONE_B
    if target is schedules.forward_backward_pipelining_with_interleaving:
        return INTERLEAVED
    name = getattr(target, "__name__", repr(target))
    raise UnsupportedScheduleError(
        f"ssdoffload cannot wrap {name}: only megatron.core.pipeline_parallel.schedules."
        "forward_backward_no_pipelining and forward_backward_pipelining_without_interleaving "
        "(what get_forward_backward_func() returns without virtual pipeline stages) are supported")


def _unwrap_list(model: Any) -> Any:
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise UnsupportedScheduleError(
                f"ssdoffload got {len(model)} model chunks: model chunking (virtual pipeline "
                "stages, the interleaved schedule) is not supported; pass one model per rank")
        return model[0]
    return model


def check_megatron_config(config: Any) -> None:
    """Refuse Megatron settings that cannot be combined with SSD offload (clear errors)."""
    if config is None:
        return
    if getattr(config, "fine_grained_activation_offloading", False):
        raise UnsupportedScheduleError(
            "Megatron's fine_grained_activation_offloading is on: it moves the same activations "
            "to CPU memory that ssdoffload spills to the SSD, and the two cannot both own them. "
            "Set TransformerConfig.fine_grained_activation_offloading=False (or don't wrap the "
            "schedule with ssdoffload).")
    if getattr(config, "cpu_offloading", False):
        raise UnsupportedScheduleError(
            "Megatron's cpu_offloading (Transformer Engine CPU activation offloading) is on: it "
            "offloads the same activations ssdoffload spills to the SSD. Set "
            "TransformerConfig.cpu_offloading=False to use ssdoffload.")
    if getattr(config, "overlap_moe_expert_parallel_comm", False):
        raise UnsupportedScheduleError(
            "overlap_moe_expert_parallel_comm runs Megatron's combined 1F1B schedule, which "
            "interleaves forward and backward of different micro-batches inside one step; "
            "ssdoffload does not support it. Turn it off to use ssdoffload.")
    if getattr(config, "hybrid_context_parallel", False):
        raise UnsupportedScheduleError(
            "hybrid_context_parallel reorders micro-batches inside the schedule; ssdoffload "
            "does not support it. Turn it off to use ssdoffload.")
    impl = getattr(config, "cuda_graph_impl", "none")
    if impl not in (None, "none") or getattr(config, "enable_cuda_graph", False):
        raise UnsupportedScheduleError(
            f"cuda_graph_impl={impl!r}: a replayed CUDA graph never calls autograd's saved-tensor "
            "hooks, so its activations cannot be offloaded. Set cuda_graph_impl='none'.")


def _megatron_config(model: Any) -> Any:
    try:
        from megatron.core.utils import get_model_config
        return get_model_config(model)
    except Exception:  # not a Megatron module: nothing Megatron-specific to check
        return getattr(model, "config", None)


def _pipeline_position(kwargs: dict) -> Tuple[int, int]:
    """(pp size, pp rank) the schedule will use: its own arguments first, then parallel_state."""
    group = None
    p2p = kwargs.get("p2p_communicator")
    if p2p is not None:
        group = getattr(p2p, "pp_group", None)
    if group is None and kwargs.get("pg_collection") is not None:
        group = getattr(kwargs["pg_collection"], "pp", None)
    if group is not None:
        return group.size(), group.rank()
    from megatron.core import parallel_state
    return (parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_rank())


# -- one step's bookkeeping ------------------------------------------------------------------
class _StepState:
    """Which micro-batch is being forwarded, and what the schedule runs after each op."""

    def __init__(self, step: int, order: List[Tuple[str, int]]) -> None:
        self.step = step
        self.order = order
        self.position = {op: i for i, op in enumerate(order)}
        self.forwards = 0
        self.backwards_started = set()
        self.late_trigger_armed = set()
        self.current: Optional[int] = None  # micro-batch whose forward runs now

    def key(self, mb: int) -> tuple:
        return ("megatron", self.step, mb)

    def after(self, op: str, mb: int) -> Optional[Tuple[str, int]]:
        i = self.position.get((op, mb))
        if i is None or i + 1 >= len(self.order):
            return None
        return self.order[i + 1]


class MegatronOffload:
    """A Megatron forward-backward function with SSD offload of every micro-batch's activations.

    Call it exactly like the function it wraps. ``offloader`` is the underlying
    ``ssdoffload.Offloader`` (``stats()``, ``last_step_stats()``, ``timeline()``); ``close()``
    (or leaving ``with``) ends its threads and removes the spill files.
    """

    def __init__(self, forward_backward_func: Callable, model: Any,
                 config: Optional[OffloadConfig] = None, **config_kwargs: Any) -> None:
        self.func = forward_backward_func
        self.kind = _schedule_kind(forward_backward_func)
        if self.kind == INTERLEAVED:
            raise UnsupportedScheduleError(
                "the interleaved (virtual pipeline) schedule "
                "forward_backward_pipelining_with_interleaving is not supported by ssdoffload: "
                "run without virtual pipeline stages (virtual_pipeline_model_parallel_size=None) "
                "to use the 1F1B schedule, which is supported")
        self.model = _unwrap_list(model)
        if not isinstance(self.model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (or a list of one), got {type(model).__name__}")
        check_megatron_config(_megatron_config(self.model))
        self.offloader = Offloader(self.model, config, **config_kwargs)
        self._steps = itertools.count()
        self._state: Optional[_StepState] = None
        self._lock = threading.Lock()
        self._first_layer_hook = None
        layers = self.offloader.layers
        if self.offloader.enabled and layers:
            self._first_layer_hook = layers[0].register_forward_hook(self._first_layer_done)
        functools.update_wrapper(self, forward_backward_func)

    # -- public --------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise TypeError("Megatron's forward-backward functions take keyword arguments only")
        model = _unwrap_list(kwargs.get("model"))
        if model is not self.model:
            raise ValueError("the model passed to the forward-backward function is not the model "
                             "ssdoffload was set up with (wrap(func, model, ...))")
        check_megatron_config(_megatron_config(model))
        if kwargs.get("forward_only", False) or not self.offloader.enabled:
            return self.func(**kwargs)  # evaluation: nothing is saved for backward
        if self._state is not None:
            raise OffloadError("the ssdoffload-wrapped forward-backward function was re-entered")
        pp_size, pp_rank = (1, 0) if self.kind == NO_PIPELINING else _pipeline_position(kwargs)
        num_microbatches = kwargs["num_microbatches"]
        state = _StepState(next(self._steps), schedule_order(self.kind, num_microbatches, pp_size, pp_rank))
        kwargs["forward_step_func"] = self._wrap_forward_step(kwargs["forward_step_func"], state)
        self._state = state
        try:
            result = self.func(**kwargs)
        except BaseException:
            self.offloader.abort()  # discard this step's spill data, as Offloader.step() does
            raise
        finally:
            self._state = None
        if state.forwards != num_microbatches:
            log.warning("ssdoffload: the schedule ran %d forwards for %d micro-batches",
                        state.forwards, num_microbatches)
        self.offloader.end_step()
        return result

    def stats(self) -> OffloadStats:
        return self.offloader.stats()

    def last_step_stats(self) -> OffloadStats:
        return self.offloader.last_step_stats()

    def close(self) -> None:
        if self._first_layer_hook is not None:
            self._first_layer_hook.remove()
            self._first_layer_hook = None
        self.offloader.close()

    def __enter__(self) -> "MegatronOffload":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------
    def _wrap_forward_step(self, forward_step_func: Callable, state: _StepState) -> Callable:
        off = self.offloader

        @functools.wraps(forward_step_func)
        def forward_step(*args: Any, **kwargs: Any):
            if not torch.is_grad_enabled():
                return forward_step_func(*args, **kwargs)
            mb = state.forwards
            state.forwards += 1
            state.current = mb
            try:
                with off.micro_batch(state.key(mb)):
                    result = forward_step_func(*args, **kwargs)
            finally:
                state.current = None
            output = result[0] if isinstance(result, tuple) else result
            for t in tree_flatten(output)[0]:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(functools.partial(self._backward_started, state, mb))
                    break
            self._prefetch_after(state, "F", mb)
            return result

        return forward_step

    def _prefetch_after(self, state: _StepState, op: str, mb: int) -> None:
        nxt = state.after(op, mb)
        if nxt is not None and nxt[0] == "B":
            self.offloader.prefetch(state.key(nxt[1]))

    def _backward_started(self, state: _StepState, mb: int, grad: torch.Tensor) -> None:
        """Gradient reached micro-batch ``mb``'s stage output: its backward is starting."""
        if self.offloader.closed:
            return None
        state.backwards_started.add(mb)
        self.offloader.prefetch(state.key(mb))  # no-op when already prefetched
        if mb not in state.late_trigger_armed:  # no first-layer trigger: look ahead now
            self._prefetch_after(state, "B", mb)
        return None

    def _first_layer_done(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        """Forward of the stage's first layer: arm a trigger for the end of its backward."""
        state, mb = self._state, None
        if state is not None:
            mb = state.current
        if mb is None or torch._C._current_graph_task_id() != -1:
            return
        for t in tree_flatten(output)[0]:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                state.late_trigger_armed.add(mb)
                t.register_hook(functools.partial(self._first_layer_backward, state, mb))
                return

    def _first_layer_backward(self, state: _StepState, mb: int, grad: torch.Tensor) -> None:
        """Backward of ``mb`` reached the stage's first layer: prefetch the next backward."""
        if not self.offloader.closed:
            self._prefetch_after(state, "B", mb)
        return None


def wrap(forward_backward_func: Callable, model: Any, config: Optional[OffloadConfig] = None,
         **config_kwargs: Any) -> MegatronOffload:
    """Wrap what ``megatron.core.pipeline_parallel.get_forward_backward_func()`` returned.

    ``model`` is this rank's model (or a list holding it), the one passed to every call.
    ``config`` is an ``OffloadConfig`` (or give its fields as keyword arguments).
    """
    return MegatronOffload(forward_backward_func, model, config, **config_kwargs)


def get_forward_backward_func(model: Any, config: Optional[OffloadConfig] = None,
                              pp_size: Optional[int] = None, vp_size: Optional[int] = None,
                              **config_kwargs: Any) -> MegatronOffload:
    """``megatron.core.pipeline_parallel.get_forward_backward_func(pp_size, vp_size)``, wrapped."""
    from megatron.core.pipeline_parallel import get_forward_backward_func as megatron_get

    if pp_size is None and vp_size is None:
        func = megatron_get()
    else:
        func = megatron_get(pp_size, vp_size)
    return wrap(func, model, config, **config_kwargs)
