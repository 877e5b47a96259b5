"""Recomputing layers: the plan's ``recompute`` choices, applied to the model.

A recomputed layer runs under PyTorch's non-reentrant checkpointing
(``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``): its forward saves nothing
but its positional tensor inputs, and backward runs the forward again (with the forward's RNG
state, so dropout draws the same mask and the gradients are bit-identical on the same device).
The inputs are saved through the saved-tensor hooks like any activation, so the offloader's
plan decides where they go: kept (``recompute``), host RAM (``recompute+ram``) or the SSD
(``recompute+ssd``) — checkpoint-input offload.

``RecomputedLayers.set(indices)`` makes exactly those layers recomputed (an instance
attribute ``forward`` wraps the class's; nothing else of the module changes) and ``clear()``
takes every wrapper off again. Calls outside a training forward (no grad, or the recompute
itself during backward) run the layer as it is.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Dict, Iterable, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from .layers import COMPILED_REFUSAL, compiled, in_backward, stateful_call

log = logging.getLogger("ssdoffload")


_warned: set = set()


def _recomputed(layers: "RecomputedLayers", index: int, forward: Callable[..., Any], *args: Any,
                **kwargs: Any) -> Any:
    if not torch.is_grad_enabled() or in_backward():
        return forward(*args, **kwargs)
    owner = getattr(forward, "__self__", None)
    why = stateful_call(kwargs, owner if isinstance(owner, torch.nn.Module) else None)
    if why is None:
        layers.refused.discard(index)
    else:
        # Its activations are saved as usual: no recomputation to count in backward.
        layers.refused.add(index)
        # Refused, and said once per layer: the layer runs as it is (its activations then go
        # where budget mode's back-pressure puts them, the plan learns it cannot recompute it).
        owner = getattr(forward, "__self__", forward)
        if id(owner) not in _warned:
            _warned.add(id(owner))
            log.warning("ssdoffload: not recomputing %s: %s", type(owner).__name__, why)
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


class RecomputedLayers:
    """The layers currently recomputed (see the module docstring)."""

    def __init__(self, layers: Sequence[torch.nn.Module]) -> None:
        self.layers = list(layers)
        self._wrapped: Dict[int, Any] = {}  # layer index -> the instance forward it had (or None)
        #: Layers whose last call was refused (run as is: they save their activations).
        self.refused: set = set()

    @property
    def indices(self) -> frozenset:
        return frozenset(self._wrapped)

    def set(self, indices: Iterable[int]) -> None:
        wanted = {i for i in indices if 0 <= i < len(self.layers)}
        for i in sorted(set(self._wrapped) - wanted):
            self._unwrap(i)
        for i in sorted(wanted - set(self._wrapped)):
            self._wrap(i)
        if wanted:
            log.debug("ssdoffload: recomputing layers %s", sorted(wanted))

    def clear(self) -> None:
        self.set(())

    def _wrap(self, i: int) -> None:
        layer = self.layers[i]
        if compiled(layer):
            # Its forward runs inside the compiled graph, where a checkpoint would be traced
            # (not run per call): refused here, before any call (a plan made before the layer
            # was compiled may still choose it).
            self.refused.add(i)
            if id(layer) not in _warned:
                _warned.add(id(layer))
                log.warning("ssdoffload: not recomputing %s: %s", type(layer).__name__, COMPILED_REFUSAL)
            return
        own = layer.__dict__.get("forward")  # an instance forward someone else set, if any
        self._wrapped[i] = own
        layer.forward = functools.partial(_recomputed, self, i,
                                          own if own is not None else type(layer).forward.__get__(layer))

    def runs_as_is(self, group: int) -> bool:
        """Whether the layer of forward group ``group`` was refused recomputation at its last
        call (so backward recomputes nothing for it)."""
        return group % 2 == 1 and (group - 1) // 2 in self.refused

    def _unwrap(self, i: int) -> None:
        self.refused.discard(i)
        layer = self.layers[i]
        own = self._wrapped.pop(i)
        if own is None:
            layer.__dict__.pop("forward", None)
        else:
            layer.forward = own
