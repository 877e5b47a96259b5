"""Seeing the user's own gradient checkpointing: a layer whose forward runs again in backward.

Hugging Face's ``gradient_checkpointing_enable`` (reentrant or not), ``torch.utils.checkpoint``,
DeepSpeed's activation checkpointing and Megatron's recompute all run a checkpointed layer's
forward again during backward. What that recomputation saves never reaches our hooks (torch's
non-reentrant checkpoint keeps it in its own frame through its ``_recomputation_hook``; the
reentrant kind saves it under backward, where we keep everything), yet backward holds it —
typically ~34·h bytes per token for a transformer block, against the 2·h of the layer's input
that our hooks do see. A budget planned without it is exceeded silently.

``RecomputeWatch`` puts a forward pre-hook and an always-called forward hook on each layer.
They act only when the layer runs *during backward with grad enabled* — a recomputation (our
own recomputed layers are re-run through the layer's ``forward``, not its ``__call__``, so they
never reach here). For the length of the call a pass-through saved-tensor hook pair sits on top
of whatever is active (the checkpoint's, or ours): it counts the distinct storages saved, then
hands each tensor to the hooks below unchanged, so the checkpoint behaves exactly as without
us. The count goes to ``SavedTensorHooks.user_recompute_done`` (resident bytes, the budget,
the profiler: the plan then holds that layer's working set as what it is).

The forward hook is registered with ``always_call=True``: torch's checkpoint stops a
recomputation early by raising from inside its pack hook, and the pair must come off even then.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, List, Sequence, Set

import torch

from .forward_position import layer_group
from .layers import in_backward, is_compiling
from .views import storage_key

if TYPE_CHECKING:
    from .hooks import SavedTensorHooks
    from .recompute import RecomputedLayers


class _Counting:
    """The pass-through pair: counts each distinct storage saved (parameters aside) — in
    forward only those that never reach our pack (a checkpoint's hook took them instead)."""

    def __init__(self, ours: "SavedTensorHooks", seen: set, backward: bool) -> None:
        self.ours = ours
        self.param_keys = ours.param_keys
        self.seen = seen  # shared by the calls of one pass over a layer: each storage once
        self.backward = backward
        self.nbytes = 0
        below = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self.below_pack, self.below_unpack = below if below is not None else (None, None)
        # No reference to the hooks' context here: it holds our bound methods, and the cycle
        # would keep this object — and through the checkpoint's hooks below it, the
        # checkpoint's frame and the layer inputs it saved — alive until a cyclic collection
        # (a step's inputs outlived the step: measured 11 MiB a step on a 12-layer Llama).

    def pack(self, tensor: torch.Tensor) -> Any:
        before = self.ours.packs
        packed = self.below_pack(tensor) if self.below_pack is not None else tensor
        if self.backward or self.ours.packs == before:  # held by backward, or not by us
            key = storage_key(tensor)
            if key is not None and key not in self.seen and key not in self.param_keys \
                    and not self.ours.holds(key):  # the layer's input: ours already counts it
                self.seen.add(key)
                self.nbytes += tensor.untyped_storage().nbytes()
        return packed

    def unpack(self, packed: Any) -> Any:
        return self.below_unpack(packed) if self.below_unpack is not None else packed


class RecomputeWatch:
    """The module hooks that see checkpointed layers (see the module docstring)."""

    def __init__(self, layers: Sequence[torch.nn.Module], hooks: "SavedTensorHooks",
                 own: "RecomputedLayers") -> None:
        self.hooks = hooks
        self.own = own
        self._layer_of: dict = {}  # id(watched module) -> layer index
        self._local = threading.local()  # per thread: open counts, and the pass being counted
        self._handles: List[Any] = []
        for i, layer in enumerate(layers):
            # Hugging Face checkpoints a layer's ``forward``, not its ``__call__`` (the layer's
            # own hooks stay outside the checkpoint): its children are what runs in both passes.
            for module in list(layer.children()) or [layer]:
                self._layer_of[id(module)] = i
                self._handles.append(module.register_forward_pre_hook(self._pre_hook))
                self._handles.append(module.register_forward_hook(self._post_hook, always_call=True))

    def _state(self):
        local = self._local
        if not hasattr(local, "stack"):
            local.stack, local.current, local.seen, local.nbytes = [], None, set(), 0
        return local

    def _pre_hook(self, module: torch.nn.Module, args) -> None:
        if is_compiling() or not torch.is_grad_enabled():
            return
        index = self._layer_of[id(module)]
        if index in self.own.indices:
            return  # our own recomputation: counted by the plan (SavedTensorHooks._count_recompute)
        backward = in_backward()
        if not backward and (self.hooks.position.scope is None or self._top_is_ours()):
            return  # a plain forward: every tensor reaches our hooks
        st = self._state()
        if st.current != (index, backward):
            # A new pass over this layer: forward under someone's checkpoint, or a recomputation.
            st.current, st.seen, st.nbytes = (index, backward), set(), 0
            if backward:
                self.hooks.user_recompute_started(layer_group(index))
        counting = _Counting(self.hooks, st.seen, backward)
        context = torch.autograd.graph.saved_tensors_hooks(counting.pack, counting.unpack)
        context.__enter__()
        st.stack.append((module, counting, context))

    def _post_hook(self, module: torch.nn.Module, args, output) -> None:
        st = getattr(self._local, "stack", None)
        if not st or st[-1][0] is not module:
            return  # not a call we counted
        _, counting, context = st.pop()
        context.__exit__(None, None, None)
        local = self._local
        local.nbytes += counting.nbytes
        index, backward = local.current
        self.hooks.user_recompute_seen(layer_group(index), local.nbytes, backward)

    def end_step(self) -> None:
        """The step is over: the next call of any layer starts a new pass (a one-layer model
        recomputed in two steps' backwards in a row is two recomputations, not one)."""
        local = self._local
        if hasattr(local, "current"):
            local.current = None

    def _top_is_ours(self) -> bool:
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        return top is None or getattr(top[0], "__self__", None) is self.hooks

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
