"""Which modules are "layers", and the module hooks that tag saved tensors with them.

A layer's forward is one prefetch group: every tensor saved while it runs is read back
together. Forward pre/post hooks move the current micro-batch scope to a new group; a hook on
the gradient of each layer output fires just before that layer's backward starts, which is
when the prefetcher reads the layers below it.

A layer compiled in place (``layer.compile()``, torchtitan's way) runs its hooks inside its
compiled graph, where they do not run per call. ``LayerTracker.follow_compiled`` (at every
scope's start) puts an eager call around such a layer's compiled call that does what the
hooks would; a layer replaced by ``torch.compile(layer)`` (an ``OptimizedModule``) runs its
own hooks eagerly already. A compiled layer saves its tensors when its compiled forward ends
and its backward (one autograd node) reads all of them at once: one group, whole.

Nothing here acts during backward (``torch._C._current_graph_task_id() != -1``): a
checkpointed layer runs its forward again there, and those recomputed tensors are not ours.
"""
from __future__ import annotations

import functools
import logging
import sys
import weakref
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

import torch
from torch.utils._pytree import tree_flatten

from .views import storage_key

if TYPE_CHECKING:
    from .forward_position import ForwardPosition
    from .prefetch import Prefetcher

log = logging.getLogger("ssdoffload")


def find_layers(model: Optional[torch.nn.Module]) -> List[torch.nn.Module]:
    """The longest ``nn.ModuleList`` whose members all have the same type (the blocks).

    Returns an empty list when there is none (then the whole forward is one group, and
    prefetching still works from the unpack order).
    """
    if model is None:
        return []
    best: List[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best):
            members = list(module)
            if members and all(type(m) is type(members[0]) for m in members):
                best = members
    return best


#: Keyword arguments through which a layer updates state outside itself (a KV cache): running
#: its forward again in backward would update it twice.
_STATEFUL_KWARGS = ("past_key_value", "past_key_values", "layer_past", "cache_params")


_batch_norms: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def updates_buffers(module: torch.nn.Module) -> Optional[str]:
    """Why running ``module``'s forward twice would change the model (None: it would not):
    batch norms in training mode update their running statistics on every forward. (The
    batch norms of a module are looked up once; their mode is read at every call.)"""
    norms = _batch_norms.get(module)
    if norms is None:
        norms = _batch_norms[module] = [(name, m) for name, m in module.named_modules()
                                        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for name, m in norms:
        if m.training and m.track_running_stats:
            return (f"{name or type(module).__name__} ({type(m).__name__}) updates its running statistics "
                    "in every training forward: a recomputation would update them twice")
    return None


def compiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` runs as a torch.compile'd graph (in place or wrapped)."""
    if module.__dict__.get("_compiled_call_impl") is not None:
        return True
    # Looked up, not imported: importing Dynamo takes seconds, and nothing is wrapped by it
    # before something imported it.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


#: Why the offloader does not checkpoint a compiled layer.
COMPILED_REFUSAL = ("it is torch.compile'd: a checkpoint put around it would be traced into its graph "
                    "(or recompute the whole compiled call); apply activation checkpointing before "
                    "compiling, as torchtitan does, and the plan offloads the rest")


def stateful_call(kwargs: dict, module: Optional[torch.nn.Module] = None) -> Optional[str]:
    """Why a layer called with ``kwargs`` must not be recomputed (None: it may be)."""
    if module is not None:
        if compiled(module):
            return COMPILED_REFUSAL
        why = updates_buffers(module)
        if why is not None:
            return why
    for name in _STATEFUL_KWARGS:
        if kwargs.get(name) is not None:
            return (f"it is called with {name}= (a cache it updates: recomputing it would update it "
                    "twice); set use_cache=False while training, as Hugging Face's own gradient "
                    "checkpointing does")
    if kwargs.get("use_cache") is True:
        return "it is called with use_cache=True; set use_cache=False while training"
    return None


def in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


#: ``torch.compiler.is_compiling`` itself (not a wrapper: Dynamo recognises that function and
#: folds it to True while tracing; a wrapper reading its flag would be guarded on the flag, and
#: every call of the compiled code would then recompile).
is_compiling = torch.compiler.is_compiling


class LayerTracker:
    """Forward hooks on the layers that move the forward position (``ForwardPosition``
    ``enter_layer`` / ``exit_layer``) and arm a backward trigger: a gradient hook on the
    layer's output that tells the prefetcher, right before the layer's backward, that backward
    reached the layer's group. Hooks act only while a scope is open."""

    def __init__(self, layers: Sequence[torch.nn.Module], position: "ForwardPosition",
                 prefetcher: "Prefetcher") -> None:
        self.layers = list(layers)
        self._index: Dict[int, int] = {id(m): i for i, m in enumerate(self.layers)}
        self.position = position
        self.prefetcher = prefetcher
        self._handles = []
        for module in self.layers:
            self._handles.append(module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post_hook))

    def follow_compiled(self) -> None:
        """Put an eager call around the compiled call of every layer compiled in place since
        the last look (see the module docstring); cheap: one dictionary read per layer."""
        for module in self.layers:
            impl = module.__dict__.get("_compiled_call_impl")
            if impl is not None and not isinstance(impl, _TrackedCompiledCall):
                module._compiled_call_impl = _TrackedCompiledCall(self, module, impl)

    def _stop_following_compiled(self) -> None:
        for module in self.layers:
            impl = module.__dict__.get("_compiled_call_impl")
            if isinstance(impl, _TrackedCompiledCall) and impl.tracker is self:
                module._compiled_call_impl = impl.compiled

    def index_of(self, module: torch.nn.Module) -> int:
        return self._index[id(module)]

    def _pre_hook(self, module: torch.nn.Module, args, kwargs) -> None:
        if is_compiling():
            return  # traced into a compiled graph: it would not run per call (see offloader)
        if self.position.scope is not None and not in_backward():
            # A layer that updates outside state (a KV cache) cannot be recomputed: it reports
            # no input bytes, so the plan never chooses to.
            input_bytes = 0
            if self.position.profiler is not None and stateful_call(kwargs, module) is None:
                input_bytes = _input_bytes(args)  # only the plan uses it
            self.position.enter_layer(self._index[id(module)], input_bytes)

    def _post_hook(self, module: torch.nn.Module, args, output) -> None:
        if is_compiling() or self.position.scope is None or in_backward():
            return
        token = self.position.exit_layer(self._index[id(module)])
        if token is None:
            return
        if not self.prefetcher.wants_trigger(token[0]):
            return
        outputs = (output,) if type(output) is torch.Tensor else tree_flatten(output)[0]
        for t in outputs:
            # Never a view: touching the gradient of a view whose base was changed in place
            # regenerates its grad_fn, which raises for split pieces ("Output 0 of Split is a
            # view and its base ... has been modified inplace") and crashes the process for
            # others (torch 2.13, register_hook) — where autograd itself would not complain.
            # A layer that returns only views gets no trigger; its unpacks still prefetch.
            if isinstance(t, torch.Tensor) and t._base is None and t.requires_grad:
                t.register_hook(functools.partial(_grad_trigger, self.prefetcher.backward_reached, *token))
                break  # one trigger per layer is enough

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._stop_following_compiled()


class _TrackedCompiledCall:
    """A layer's compiled call (``module._compiled_call_impl``, what ``module(...)`` runs once
    ``module.compile()`` was called) with the tracker's two hooks run eagerly around it."""

    def __init__(self, tracker: LayerTracker, module: torch.nn.Module, compiled_call: Callable) -> None:
        self.tracker = tracker
        self.module = module
        self.compiled = compiled_call

    def __call__(self, *args, **kwargs):
        if is_compiling():  # traced as part of a larger compiled region: nothing per call
            return self.compiled(*args, **kwargs)
        self.tracker._pre_hook(self.module, args, kwargs)
        output = self.compiled(*args, **kwargs)
        self.tracker._post_hook(self.module, args, output)
        return output


def _input_bytes(args) -> int:
    """Bytes of the distinct storages of a layer call's positional tensor inputs (what
    checkpointing the layer keeps, or offloads, instead of its activations)."""
    seen, total = set(), 0
    for t in tree_flatten(args)[0]:
        key = storage_key(t) if isinstance(t, torch.Tensor) else None
        if key is not None and key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _grad_trigger(backward_reached: Callable[[object, int], int], scope: object, group: int,
                  grad: torch.Tensor) -> None:
    backward_reached(scope, group)
    return None
