"""Which modules are "layers", and the module hooks that tag saved tensors with them.

A layer's forward is one prefetch group: every tensor saved while it runs is read back
together. Forward pre/post hooks move the current micro-batch scope to a new group; a hook on
the gradient of each layer output fires just before that layer's backward starts, which is
when the prefetcher reads the layers below it.

Nothing here acts during backward (``torch._C._current_graph_task_id() != -1``): a
checkpointed layer runs its forward again there, and those recomputed tensors are not ours.
"""
from __future__ import annotations

import functools
import logging
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


def stateful_call(kwargs: dict, module: Optional[torch.nn.Module] = None) -> Optional[str]:
    """Why a layer called with ``kwargs`` must not be recomputed (None: it may be)."""
    if module is not None:
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
